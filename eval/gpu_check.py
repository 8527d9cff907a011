"""GPU readiness in one go: the CUDA path of training, DDP over every visible GPU, and evaluation.

    python eval/gpu_check.py --out out/gpu_check            # on a CUDA machine, from the repository root
    python eval/gpu_check.py --out out/gpu_check --cpu      # the same flow on the CPU with the smoke config

It writes a small synthetic world with all six cameras, preprocesses it, trains the base config
(`pipelines/train_base.yaml`) for a few steps on one GPU (the precision optim.amp=auto chose, steps/s after warm-up,
peak GPU memory), trains the same steps under torchrun DDP on every visible GPU (NCCL), evaluates the checkpoint on
the GPU, and prints a short table; OUT/gpu_check.json holds the same numbers. Every stage is the command a user runs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CAMERAS = "[CAM_FRONT,CAM_FRONT_RIGHT,CAM_BACK_RIGHT,CAM_BACK,CAM_BACK_LEFT,CAM_FRONT_LEFT]"


def _run(cmd: list[str], log: Path) -> float:
    start = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-15:]
        raise SystemExit(f"gpu_check: {' '.join(cmd[:4])} ... failed ({proc.returncode}); {log}:\n" + "\n".join(tail))
    return time.perf_counter() - start


def _train_record(run: Path, warmup: int) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("split") == "train" and "windows_per_s" in r][warmup:]
    rate = sum(r["windows_per_s"] for r in train) / len(train) if train else float("nan")
    return {"precision": summary["precision"]["name"], "reason": summary["precision"]["reason"],
            "device": summary["device"], "processes": summary["processes"], "windows_per_s": rate,
            "peak_gpu_memory_gb": summary.get("peak_gpu_memory_gb")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/gpu_check")
    parser.add_argument("--steps", type=int, default=30, help="training steps per run (the first 5 are warm-up)")
    parser.add_argument("--cpu", action="store_true", help="run the flow on the CPU with the smoke config")
    args = parser.parse_args()
    import torch

    gpus = torch.cuda.device_count()
    if not args.cpu and gpus == 0:
        print("gpu_check: no CUDA device is visible here; run it on a GPU machine (or pass --cpu)", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    exe = [sys.executable, "-m", "drivejepa.cli"]
    world, shards = out / "world", out / "shards"
    times = {}
    times["synth"] = _run([*exe, "synth", "-q", "--out", str(world), "--scenes", "6", "--samples-per-scene", "16",
                           "--image-size", "800x450", "--overwrite"], out / "synth.log")
    size = "[224,128]" if args.cpu else "[400,224]"
    times["preprocess"] = _run([*exe, "preprocess", "-q", "--dataroot", str(world), "--version", "v1.0-synth",
                                "--out", str(shards), "--config", "pipelines/preprocess.yaml", f"cameras={CAMERAS}",
                                f"image_size={size}"], out / "preprocess.log")
    config = "pipelines/train_smoke.yaml" if args.cpu else "pipelines/train_base.yaml"
    common = ["--config", config, "--shards", str(shards), f"optim.max_steps={args.steps}", "optim.epochs=1000",
              "log_every=1", "ckpt_every=0", f"data.cameras={CAMERAS}", "data.num_workers=2"]
    if not args.cpu:
        common.append(f"data.batch_size={8 * max(1, gpus)}")
    single, ddp = out / "run_1gpu", out / "run_ddp"
    for run in (single, ddp):
        shutil.rmtree(run, ignore_errors=True)     # a fresh run each time: --resume would skip the timed steps
    times["train_1"] = _run([*exe, "train", "-q", *common, "--out", str(single)]
                            + ([] if args.cpu else ["device=cuda:0"]), out / "train_1.log")
    rows = {"train, 1 device": _train_record(single, 5)}
    procs = 2 if args.cpu else max(1, gpus)
    ddp_cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
               "-m", "drivejepa.train", "-q", *common, "--out", str(ddp)]
    times["train_ddp"] = _run(ddp_cmd, out / "train_ddp.log")
    rows[f"train, DDP x {procs}"] = _train_record(ddp, 5)
    times["evaluate"] = _run([*exe, "evaluate", "-q", "--checkpoint", str(single / "checkpoints/last.pt"),
                              "--shards", str(shards), "--split", "val", "--out", str(out / "eval"),
                              "--num-workers", "0"], out / "evaluate.log")
    name = "CPU" if args.cpu else torch.cuda.get_device_name(0)
    result = {"device": name, "gpus": gpus, "config": config, "steps": args.steps, "runs": rows, "seconds": times}
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    print(f"\ngpu_check on {name} ({gpus} GPU{'s' if gpus != 1 else ''}), {config}, {args.steps} steps a run")
    print(f"{'run':<18}{'precision':<28}{'windows/s':>10}{'peak GPU GB':>13}")
    for label, row in rows.items():
        peak = row["peak_gpu_memory_gb"]
        print(f"{label:<18}{row['precision']:<28}{row['windows_per_s']:>10.1f}"
              f"{(f'{peak:.2f}' if peak is not None else '-'):>13}")
    print("precision reason: " + rows["train, 1 device"]["reason"])
    print("wall time: " + "  ".join(f"{k} {v:.0f}s" for k, v in times.items()))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    sys.exit(main())
