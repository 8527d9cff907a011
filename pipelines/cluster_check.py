"""A real two-node Ray cluster on this machine, and a node lost in the middle of each Ray job.

    python pipelines/cluster_check.py --out out/cluster_check

It starts a head node and a worker node with `ray start` (one CPU each, on loopback, a port of its own), writes a
small synthetic world, and runs the commands a user runs with `--address`:

- `drivejepa preprocess`: the worker node is killed (SIGKILL to its whole process group) as soon as the first shard
  is written; the job must finish on the head with shards byte-identical to a single-process run;
- `drivejepa evaluate` of a smoke checkpoint: the worker node is killed once its scene workers are started; the
  evaluation must finish with a dead worker reported in its log and metrics equal to a single-process evaluation
  (up to float32 summation order: 1e-3 relative).

It prints one line per check and exits non-zero when one fails; the cluster is stopped in every case. It is not part
of the test suite: it starts a second Ray cluster beside any other and takes a few minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
CLI = [sys.executable, "-m", "drivejepa.cli"]


def _node(*args: str) -> subprocess.Popen:
    """A Ray node (``ray start ... --block``) in a process group of its own, so one signal takes it all down."""
    proc = subprocess.Popen([RAY, "start", *args, "--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--block"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    time.sleep(8)  # start-up and registration with the head
    return proc


def _kill_node(node: subprocess.Popen) -> None:
    try:
        os.killpg(node.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _run_killing(cmd: list[str], log: Path, ready, node: subprocess.Popen, timeout: float = 600) -> int:
    """Run ``cmd``; kill the worker node the moment ``ready()`` holds; return the exit code."""
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
        start, killed = time.monotonic(), False
        while proc.poll() is None and time.monotonic() - start < timeout:
            if not killed and ready():
                _kill_node(node)
                killed = True
            time.sleep(0.1)
        if proc.poll() is None:
            proc.kill()
    if not killed:
        print(f"cluster_check: the job ended before the worker node could be killed ({log})", flush=True)
        return -1
    return proc.wait()


def _forget_cluster(port: int) -> None:
    """`ray start --head` records its address in TMP/ray/ray_current_cluster, and a later plain ``ray.init()``
    (the tests', every local command's) tries to join the cluster named there. Killed instead of `ray stop`ped (which
    would stop every Ray process on the machine), this cluster must take its record away itself."""
    record = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    try:
        if record.read_text().strip().endswith(f":{port}"):
            record.unlink()
    except OSError:
        pass


def _check(name: str, ok: bool, detail: str) -> bool:
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
    return ok


def main() -> int:
    from drivejepa.runtime import free_port

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/cluster_check")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    port = free_port()
    address = f"127.0.0.1:{port}"
    world, config = out / "world", REPO / "tests/data/preprocess_tiny.yaml"
    subprocess.run([*CLI, "synth", "-q", "--out", str(world), "--scenes", "12", "--samples-per-scene", "12",
                    "--image-size", "320x180", "--overwrite"], check=True, cwd=REPO)
    single, clustered = out / "shards_single", out / "shards_cluster"
    for old in (single, clustered, out / "eval_single", out / "eval_cluster", out / "run"):
        shutil.rmtree(old, ignore_errors=True)
    subprocess.run([*CLI, "preprocess", "-q", "--dataroot", str(world), "--version", "v1.0-synth", "--out",
                    str(single), "--config", str(config), "--num-workers", "0"], check=True, cwd=REPO)
    head = _node("--head", "--port", str(port), "--include-dashboard=false", "--disable-usage-stats")
    ok = True
    node = None
    try:
        node = _node("--address", address)
        code = _run_killing([*CLI, "preprocess", "-q", "--dataroot", str(world), "--version", "v1.0-synth", "--out",
                             str(clustered), "--config", str(config), "--address", address],
                            out / "preprocess_cluster.log", lambda: any(clustered.glob("*.shard")), node)
        names = sorted(p.name for p in single.glob("*.shard"))
        same = [n for n in names if (clustered / n).is_file()
                and (clustered / n).read_bytes() == (single / n).read_bytes()]
        ok &= _check("preprocess, worker node killed", code == 0 and len(same) == len(names),
                     f"exit {code}, {len(same)} of {len(names)} shards byte-identical to a single-process run")

        run = out / "run"
        subprocess.run([*CLI, "train", "-q", "--config", "pipelines/train_smoke.yaml", "--shards", str(single),
                        "--out", str(run), "optim.max_steps=4"], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
        ckpt = str(run / "checkpoints/best.pt")
        subprocess.run([*CLI, "evaluate", "-q", "--checkpoint", ckpt, "--shards", str(single), "--split", "val",
                        "--out", str(out / "eval_single"), "--num-workers", "0"], check=True, cwd=REPO,
                       stdout=subprocess.DEVNULL)
        node = _node("--address", address)
        log = out / "evaluate_cluster.log"

        def workers_started() -> bool:
            """The progress bar appears once the workers are asked for their scenes (tiny scenes then take well
            under a second each, so waiting for a scored one would often come too late)."""
            return "evaluate scenes:" in log.read_text(errors="replace")

        code = _run_killing([*CLI, "evaluate", "--checkpoint", ckpt, "--shards", str(single), "--split", "val",
                             "--out", str(out / "eval_cluster"), "--address", address, "--num-workers", "2"],
                            log, workers_started, node)
        died = "died" in log.read_text(errors="replace")
        a = json.loads((out / "eval_single/metrics.json").read_text())["headline"] if code == 0 else []
        b = json.loads((out / "eval_cluster/metrics.json").read_text())["headline"] if code == 0 else []
        worst = max((abs(x[k] - y[k]) / max(abs(x[k]), 1e-6) for x, y in zip(a, b) for k in x), default=1.0)
        ok &= _check("evaluate, worker node killed", code == 0 and died and len(a) == len(b) and worst < 1e-3,
                     f"exit {code}, a dead worker {'reported' if died else 'NOT reported'} in the log, headline "
                     f"metrics within {worst:.1e} (relative) of a single-process evaluation")
    finally:
        for proc in (node, head):
            if proc is not None:
                _kill_node(proc)
        _forget_cluster(port)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
