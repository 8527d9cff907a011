"""``drivejepa drive``: every driver on every scenario, scenarios in parallel with Ray, scored and summarised.

A run (one scenario, one driver) is one Ray task: it builds the closed loop (simulator.py) and the driver
(drivers.build_driver), drives, scores (metrics.py) and sends back its metrics and, with ``render``, the arrays of
its views. Each finished run is written to ``OUT/runs/<scene>__<driver>.json`` at once, so a rerun of the same
config skips it (a changed config, driver or scenario is run again). The command's process then writes
``OUT/metrics.json`` (every run, the per-driver summary, the config), ``OUT/drive.png`` with ``drive.json`` beside
it, and with ``render`` the views of every run (render.py).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np

from drivejepa.config import DriveConfig, DriverSpec, config_hash, config_to_dict
from drivejepa.driving.simulator import Scenario
from drivejepa.errors import UserError
from drivejepa.io import atomic_write_json

log = logging.getLogger(__name__)

PLOTTED = (("collision", "collisions per run"), ("at_fault", "at-fault collisions per run"),
           ("progress", "progress (x expert)"), ("out_of_lane_s", "time out of its lane (s)"),
           ("min_ttc_s", "minimum time to collision (s)"), ("jerk_mean", "mean |jerk| (m/s^3)"))


def scenarios_of(cfg: DriveConfig) -> list[Scenario]:
    """The scenarios of a drive config: its scene names, or its split's scenes among the world's first scenes."""
    from drivejepa.data.nuscenes_tasks import SYNTH_SPLIT_FILE, split_table

    if cfg.scenes:
        names = list(dict.fromkeys(cfg.scenes))
    else:
        table = split_table("v1.0-synth")
        if cfg.split not in table:
            raise UserError(f"{SYNTH_SPLIT_FILE}: no split '{cfg.split}' (splits: {', '.join(sorted(table))})")
        names = [n for n in table[cfg.split] if int(n[6:]) <= cfg.world_scenes]
        if not names:
            raise UserError(f"{SYNTH_SPLIT_FILE}: split '{cfg.split}' has no scene among the first "
                            f"{cfg.world_scenes}")
    return [Scenario(int(n[6:]), seed=cfg.seed, start=cfg.start_frame, samples=cfg.samples_per_scene,
                     image_size=tuple(cfg.image_size), steps=cfg.steps, branches=cfg.branches,
                     branch_points=cfg.branch_points, branch_frames=cfg.branch_frames) for n in sorted(names)]


def run_one(scenario: Scenario, spec: DriverSpec, observation, ttc_horizon: float, render: bool) -> dict:
    """Drive one scenario with one driver: its metrics (plus ``driver``) and, with ``render``, its view layers."""
    from drivejepa.driving.drivers import build_driver
    from drivejepa.driving.metrics import scenario_metrics
    from drivejepa.driving.render import step_layers
    from drivejepa.driving.simulator import ClosedLoop

    t0 = time.perf_counter()
    driver = build_driver(spec)
    loop = ClosedLoop(scenario, observation)
    try:
        loop.run(driver)
        result = scenario_metrics(loop, ttc_horizon)
        result["driver"] = spec.name
        result["wall_s"] = time.perf_counter() - t0
        layers = [step_layers(loop, d) for d in loop.decisions] if render else None
    finally:
        loop.close()
    return {"metrics": result, "layers": layers}


def _run_id(scenario: Scenario, spec: DriverSpec) -> str:
    return f"{scenario.name}__{spec.name}"


def _run_hash(cfg: DriveConfig, scenario: Scenario, spec: DriverSpec) -> str:
    """What a run's result depends on: its scenario, its driver and the observation and scoring settings."""
    from drivejepa.driving.metrics import SCORES

    return config_hash({"scenario": dataclasses.asdict(scenario), "driver": config_to_dict(spec),
                        "observation": config_to_dict(cfg.observation), "ttc_horizon": cfg.ttc_horizon,
                        "scores": SCORES})


def drive(cfg: DriveConfig, out: str | Path, *, render: bool = False, num_workers: Optional[int] = None,
          address: Optional[str] = None, progress: bool = True) -> dict:
    """Run every driver of ``cfg`` on every scenario; write OUT/metrics.json, drive.png/json (and the views with
    ``render``); return the metrics. ``num_workers=0`` drives in this process, otherwise Ray tasks (at most
    ``num_workers`` at once; default: the CPUs Ray has)."""
    import datetime
    import json

    from tqdm import tqdm

    from drivejepa import __version__
    from drivejepa.driving.drivers import check_spec
    from drivejepa.driving.metrics import summarise

    out = Path(out)
    start = time.perf_counter()
    scenarios = scenarios_of(cfg)
    for spec in cfg.drivers:
        check_spec(spec)
    for sc in scenarios:
        sc.check()
    jobs = [(sc, spec) for sc in scenarios for spec in cfg.drivers]
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    layers: dict[str, list] = {}
    todo = []
    for sc, spec in jobs:
        rid, h = _run_id(sc, spec), _run_hash(cfg, sc, spec)
        path = runs_dir / f"{rid}.json"
        if path.is_file() and not render:
            try:
                saved = json.loads(path.read_text())
            except (OSError, ValueError):
                saved = {}
            if saved.get("hash") == h:
                results[rid] = saved["metrics"]
                continue
        todo.append((sc, spec, rid, h))
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="drive", unit="run", disable=not progress)

    def finish(rid: str, h: str, res: dict) -> None:
        results[rid] = res["metrics"]
        if res["layers"] is not None:
            layers[rid] = res["layers"]
        atomic_write_json(runs_dir / f"{rid}.json", {"hash": h, "metrics": res["metrics"]})
        bar.set_postfix_str(f"{rid}: {res['metrics']['end']}")
        bar.update(1)

    if todo and num_workers == 0:
        for sc, spec, rid, h in todo:
            finish(rid, h, run_one(sc, spec, cfg.observation, cfg.ttc_horizon, render))
    elif todo:
        _prepare_factories(todo)
        _run_ray(todo, cfg, render, num_workers, address, finish)
    bar.close()

    runs = [results[_run_id(sc, spec)] for sc, spec in jobs]
    metrics = {
        "drivers": summarise(runs),
        "runs": runs,
        "scenarios": [sc.name for sc in scenarios],
        "config": config_to_dict(cfg),
        "provenance": {"version": __version__, "date": datetime.datetime.now().isoformat(timespec="seconds"),
                       "seconds": round(time.perf_counter() - start, 2), "runs_now": len(todo)},
    }
    atomic_write_json(out / "metrics.json", metrics)
    plot(out, metrics)
    if render:
        metrics["rendered"] = _render(cfg, out, jobs, layers)
    return metrics


def _prepare_factories(todo: list) -> None:
    """Build each factory driver of the pending runs once here, before the workers start, and drop it: what a
    driver fits and keeps on its first use (the world-model planner's cost heads, the ego-status MLP, beside the
    checkpoint) is then fitted once instead of by every worker that gets one of its runs at the same time."""
    from drivejepa.driving.drivers import build_driver

    done = set()
    for _, spec, _, _ in todo:
        key = config_hash(config_to_dict(spec))
        if spec.kind == "factory" and key not in done:
            done.add(key)
            log.info("preparing driver %s before the workers start", spec.name)
            build_driver(spec)


def _run_ray(todo: list, cfg: DriveConfig, render: bool, num_workers: Optional[int], address: Optional[str],
             finish) -> None:
    """Plain Ray tasks, at most ``num_workers`` in flight; a failed run stops the command with its scenario."""
    import ray

    from drivejepa.runtime import init_ray

    init_ray(address=address, num_cpus=None)
    limit = num_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    remote = ray.remote(num_cpus=1, max_retries=1)(run_one)
    obs_ref = ray.put(cfg.observation)
    queue = list(todo)
    pending: dict = {}
    while queue or pending:
        while queue and len(pending) < limit:
            sc, spec, rid, h = queue.pop(0)
            pending[remote.remote(sc, spec, obs_ref, cfg.ttc_horizon, render)] = (rid, h)
        done, _ = ray.wait(list(pending), num_returns=1)
        rid, h = pending.pop(done[0])
        try:
            res = ray.get(done[0])
        except ray.exceptions.RayTaskError as exc:
            for ref in pending:
                ray.cancel(ref, force=True)
            cause = getattr(exc, "cause", None)
            if isinstance(cause, UserError):
                raise cause from None
            raise RuntimeError(f"run {rid} failed: {str(exc).strip().splitlines()[-1]}") from None
        finish(rid, h, res)


def _render(cfg: DriveConfig, out: Path, jobs: list, layers: dict) -> dict:
    """Views of every run under OUT/render/<run>/ when Open3D can render here; what was written (or why not)."""
    from drivejepa.driving.render import write_run
    from drivejepa.visualization.headless import probe_rendering

    support = probe_rendering()
    if not support.ok:
        log.warning("--render: %s", support.message)
        return {"ok": False, "message": support.message}
    from drivejepa.visualization.render import OffscreenView

    written = {}
    size = tuple(cfg.render_size)
    with OffscreenView(*size) as view:
        for sc, spec in jobs:
            rid = _run_id(sc, spec)
            if rid in layers:
                names = write_run(view, layers[rid], f"{spec.name} | {sc.name}", out / "render" / rid, size)
                written[rid] = [f"render/{rid}/{n}" for n in names]
    return {"ok": True, "runs": written}


def plot(out: Path, metrics: dict) -> str:
    """OUT/drive.png: per metric, each driver's value on every scenario (dots) and their mean (bar); drive.json
    beside it holds the same numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from drivejepa.io import atomic_path

    drivers = list(metrics["drivers"])
    series = {key: {d: {r["scenario"]: None if r[key] is None else float(r[key])
                        for r in metrics["runs"] if r["driver"] == d} for d in drivers} for key, _ in PLOTTED}
    means = {key: {d: (float(np.mean(v)) if (v := [x for x in series[key][d].values() if x is not None]) else None)
                   for d in drivers} for key, _ in PLOTTED}
    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(3.6 * len(PLOTTED), 3.4), squeeze=False)
    for ax, (key, label) in zip(axes[0], PLOTTED):
        for i, d in enumerate(drivers):
            values = [x for x in series[key][d].values() if x is not None]
            if values:
                ax.bar(i, means[key][d], color=f"C{i}", alpha=0.45)
                ax.scatter(i + np.linspace(-0.15, 0.15, len(values)), values, color=f"C{i}", s=14, zorder=3)
        ax.set_xticks(range(len(drivers)))
        ax.set_xticklabels([d.replace("_", "\n") for d in drivers], fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"Closed loop on {len(metrics['scenarios'])} scenarios (bar: mean, dots: scenarios)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    png = out / "drive.png"
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    atomic_write_json(out / "drive.json", {"title": "closed-loop metrics per driver and scenario",
                                           "metrics": dict(PLOTTED), "series": series, "means": means})
    return png.name


def format_summary(metrics: dict, out: Path) -> str:
    """One screen: the drivers side by side, then where the numbers are."""
    def f(v, digits=2):
        return "-" if v is None else f"{v:.{digits}f}"

    cfg = metrics["config"]
    names = metrics["scenarios"]
    lines = [f"drive -> {out}: {len(names)} scenarios ({', '.join(names[:6])}{' ...' if len(names) > 6 else ''}), "
             f"world seed {cfg['seed']}, driver from key frame {cfg['start_frame']}"]
    head = (f"{'driver':<20} {'runs':>4} {'done':>4} {'coll.':>5} {'fault':>5} {'coll/km':>7} {'km':>6} "
            f"{'progress':>8} {'lane m':>6} {'out-lane s':>10} {'off-drv s':>9} {'TTC min':>7} {'TTC med':>7} "
            f"{'jerk':>6} {'ms/act':>7}")
    lines += [head, "-" * len(head)]
    for name, d in metrics["drivers"].items():
        lines.append(f"{name:<20} {d['runs']:>4} {d['completed']:>4} {d['collisions']:>5} "
                     f"{d['at_fault_collisions']:>5} {f(d['collisions_per_km']):>7} {f(d['km']):>6} "
                     f"{f(d['progress_mean']):>8} {f(d['route_offset_mean_m']):>6} {f(d['out_of_lane_s_mean']):>10} "
                     f"{f(d['off_drivable_s_mean']):>9} {f(d['min_ttc_s'], 1):>7} "
                     f"{f(d['min_ttc_s_median'], 1):>7} {f(d['jerk_mean']):>6} {f(d['driver_ms'], 1):>7}")
    obs = [d["observe_ms"] for d in metrics["drivers"].values() if d["observe_ms"] is not None]
    if obs:
        lines.append(f"simulator: {np.mean(obs):.0f} ms a key frame to render the sensors and build the observation")
    collided = [f"{r['scenario']} {r['driver']} ({r['collision_with']}, {r['collision_type']}"
                f"{', at fault' if r['at_fault'] else ''}, {r['end_time_s']:.1f} s)"
                for r in metrics["runs"] if r["collision"]]
    if collided:
        lines.append("collisions: " + "; ".join(collided[:8]) + (" ..." if len(collided) > 8 else ""))
    lines.append(f"wrote {out}/metrics.json, drive.png (+ drive.json)"
                 + (", render/" if metrics.get("rendered", {}).get("ok") else ""))
    return "\n".join(lines)
