"""Training throughput: windows per second of the real training loop, the share of step time spent waiting for
data, and the step time in fp32 against bf16 autocast on this machine.

Measured in one process on the demo config (``--config``, default ``pipelines/train_demo.yaml``): ``train()`` runs
``--steps`` steps (validation and periodic checkpoints off) with the precision ``optim.amp`` chooses and logs, every
step, windows/s and the time blocked on the DataLoader. The baseline, measured right after in the same process, is
the same training step on one batch held in memory (no loading at all): the loop's windows/s over the baseline's is
the share of compute the loader leaves to the model. Target: under 5% of step time waiting for data.
The in-memory step is then timed in fp32 and in bf16 autocast (``optim.amp=false`` / ``true``), alternating
between the two so that a change in the machine's load hits both, beside what ``optim.amp=auto`` picks here and why.
"""
from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TARGET_WAIT_SHARE = 0.05


def add_arguments(parser) -> None:
    parser.add_argument("--shards", required=True, help="shard directory (e.g. from `drivejepa preprocess`)")
    parser.add_argument("--config", default=str(REPO / "pipelines/train_demo.yaml"), help="training YAML")
    parser.add_argument("--steps", type=int, default=12, help="training steps timed (the first two are warm-up)")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the averages")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. data.num_workers=2)")


def run(args) -> dict:
    import torch

    from drivejepa.config import TrainConfig, load_config
    from drivejepa.precision import choose_precision
    from drivejepa.training.distributed import DistInfo
    from drivejepa.training.metrics_log import read_metrics
    from drivejepa.training.trainer import _Run, train
    from drivejepa.runtime import select_device

    cfg = load_config(TrainConfig, args.config, [*args.overrides, f"data.shards={args.shards}", "data.val_split=''",
                                                 "log_every=1", "ckpt_every=0", f"optim.max_steps={args.steps}",
                                                 "optim.epochs=1000"])
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        train(cfg, Path(tmp) / "run", progress=not getattr(args, "quiet", False))
        records = [r for r in read_metrics(Path(tmp) / "run/metrics.jsonl") if r["split"] == "train"]
    timed = records[args.warmup:] or records
    loop_rate = statistics.median(r["windows_per_s"] for r in timed)
    wait_share = statistics.mean(r["data_wait"] for r in timed)

    # Baseline: the same step on one batch already in memory, in fp32 and in bf16 autocast (alternating, so that a
    # change of the machine's load hits both); the loop is compared with the one optim.amp chose.
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        jobs = {amp: _Run(dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, amp=amp)),
                          Path(tmp) / str(amp), DistInfo(device=select_device(cfg.device)), progress=False)
                for amp in (False, True)}
        chosen = choose_precision(jobs[False].info.device, cfg.optim.amp, cfg.optim.amp_dtype)
        picked = chosen.dtype is not None
        batch = next(iter(jobs[False].loader))
        times = {False: [], True: []}
        for i in range(args.warmup + max(3, len(timed))):
            # The precision not chosen gets 1 warm-up and 3 timed steps: emulated bf16 can take a minute a step.
            for amp in (False, True) if i < 4 else (picked,):
                times[amp].append(_timed_step(jobs[amp], batch))
    times = {amp: statistics.median(t[min(args.warmup, 1) if amp != picked else args.warmup:])
             for amp, t in times.items()}
    compute_rate = len(batch["scene"]) / times[picked]
    job = jobs[picked]
    result = {
        "config": args.config, "shards": args.shards, "steps": args.steps, "batch_size": cfg.data.batch_size,
        "num_workers": cfg.data.num_workers, "device": str(job.info.device), "threads": torch.get_num_threads(),
        "loop_windows_per_s": loop_rate, "in_memory_windows_per_s": compute_rate,
        "loop_vs_in_memory": loop_rate / compute_rate if compute_rate else float("nan"),
        "data_wait_share": wait_share, "target_data_wait_share": TARGET_WAIT_SHARE,
        "meets_target": wait_share < TARGET_WAIT_SHARE,
        "step_seconds_fp32": times[False], "step_seconds_bf16": times[True],
        "bf16_speedup": times[False] / times[True], "chosen_precision": chosen.as_dict(),
    }
    print(f"{'measure':<34}{'value':>12}")
    print(f"{'training loop windows/s':<34}{loop_rate:>12.2f}")
    print(f"{'in-memory batch windows/s':<34}{compute_rate:>12.2f}")
    print(f"{'loop / in-memory':<34}{result['loop_vs_in_memory']:>12.2f}")
    print(f"{'step time waiting for data':<34}{100 * wait_share:>11.1f}%   (target < {100 * TARGET_WAIT_SHARE:.0f}%)")
    print(f"{'in-memory step, fp32':<34}{times[False]:>11.3f}s")
    print(f"{'in-memory step, bf16 autocast':<34}{times[True]:>11.3f}s   (fp32 / bf16 = {result['bf16_speedup']:.2f}x)")
    print(f"optim.amp={cfg.optim.amp} picks {chosen.name} here: {chosen.reason}")
    return result


def _timed_step(job, batch: dict) -> float:
    import torch

    start = time.perf_counter()
    job._train_step(batch)
    if job.info.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start
