"""The planning section of ``drivejepa evaluate``: open-loop planning metrics and action recovery on the evaluated
scenes, written under ``metrics.json["planning"]`` and as a table of ``report.md`` (:func:`format_planning`).

Runs in the driver process after the factual evaluation: loads the checkpoint, fits (or finds, beside the run) the
planner's cost heads and the ego-status MLP on the run's train split, picks a seeded choice of ``eval_windows``
factual and branch windows among the evaluated scenes (the section's cost grows with them), encodes every key frame
of the scenes they are in once with the target encoder, plans each chosen window with the world-model planner and
the baselines (``openloop.py``), and recovers actions on ``recovery.max_windows`` of them (``recovery.py``). The
energy landscape of one window (a branch window when there is one) is drawn beside the metrics
(``planning_landscape.png`` + ``.json``). Planner variants (``variants``: a name and overrides of the search and the
costs each, e.g. ``weights.jerk=2.0``) plan the same windows with the same heads beside the default, each its own
row ``world_model[name]``: settings compared on the same windows in one run.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

log = logging.getLogger(__name__)

SUBSETS = ("factual", "branch")
SHARED = ("horizon", "frame_seconds", "device", "eval_windows", "agent_classes", "heads", "ego_mlp", "recovery")


def variant_configs(plan_cfg, variants: dict) -> dict:
    """``{name: [key=value, ...]}`` -> ``{name: PlanConfig}``: ``plan_cfg`` with each variant's overrides. A variant
    changes the search and the costs only: the windows, the cost heads and the baselines are the default's (the
    ``SHARED`` settings), so a variant that changes one of them is refused."""
    import copy

    from drivejepa.config import ConfigError, apply_override, check_config

    out = {}
    for name, overrides in variants.items():
        if not name or any(c in name for c in "[] "):
            raise ConfigError(f"planner variant {name!r}: a name without spaces or brackets is needed")
        cfg = copy.deepcopy(plan_cfg)
        for assignment in overrides:
            apply_override(cfg, assignment)
        check_config(cfg, f"planner variant {name!r}")
        changed = [key for key in SHARED if getattr(cfg, key) != getattr(plan_cfg, key)]
        if changed:
            raise ConfigError(f"planner variant {name!r} changes {', '.join(changed)}: a variant plans the default's "
                              "windows with its cost heads and may change the search and the costs only")
        out[name] = cfg
    return out


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else None


def planning_section(checkpoint: str | Path, shard_dir: str | Path, scenes: list[str], plan_cfg, out: str | Path, *,
                     retrain: bool = False, progress: bool = True, variants: Optional[dict] = None) -> dict:
    """Metrics of the planning section of a checkpoint (see the module docstring); writes the landscape figure into
    ``out``."""
    from drivejepa.runtime import select_device
    from drivejepa.training.checkpoint import load_world_model

    model, train_cfg = load_world_model(checkpoint, select_device(plan_cfg.device))
    return planning_metrics(model, train_cfg, checkpoint, shard_dir, scenes, plan_cfg, out, retrain=retrain,
                            progress=progress, variants=variants)


def planning_metrics(model, train_cfg, checkpoint: str | Path, shard_dir: str | Path, scenes: list[str], plan_cfg,
                     out: str | Path, *, retrain: bool = False, progress: bool = True,
                     variants: Optional[dict] = None) -> dict:
    """:func:`planning_section` for a loaded ``model`` and its ``train_cfg`` (``checkpoint`` names the file the cost
    heads and the ego-status MLP are kept beside); ``variants`` ``{name: [key=value, ...]}``."""
    from tqdm import tqdm

    from drivejepa.data.shards import read_shard, shard_path
    from drivejepa.evaluation.latents import encode_frames
    from drivejepa.planning.costs import Situation
    from drivejepa.planning.ego_mlp import ensure_ego_mlp
    from drivejepa.planning.heads import agent_ids, ensure_heads, model_device
    from drivejepa.planning.motion import constant_velocity_controls, controls_to_actions, integrate
    from drivejepa.planning.openloop import PROTOCOLS, SECONDS, score
    from drivejepa.planning.planner import Planner
    from drivejepa.planning.recovery import energy_landscape, plot_landscape, recovery_errors
    from drivejepa.planning.windows import concatenate, scene_windows
    from drivejepa.visualization.decoder_training import camera_index

    t0 = time.perf_counter()
    out = Path(out)
    device = model_device(model)
    context, horizon, dt = int(train_cfg.data.context), int(plan_cfg.horizon), float(plan_cfg.frame_seconds)
    heads, heads_meta, _ = ensure_heads(checkpoint, model, train_cfg, shard_dir, plan_cfg, retrain=retrain,
                                        progress=progress)
    ego, ego_meta, _ = ensure_ego_mlp(checkpoint, train_cfg, shard_dir, plan_cfg, retrain=retrain,
                                      progress=progress)
    variant_cfgs = variant_configs(plan_cfg, variants or {})
    planners = {"world_model": Planner(model, heads, plan_cfg, device=device),
                **{f"world_model[{name}]": Planner(model, heads, cfg, device=device)
                   for name, cfg in variant_cfgs.items()}}
    ids = agent_ids(plan_cfg.agent_classes)
    past_steps = max(plan_cfg.ego_mlp.past_steps, context - 1, 1)
    rec = plan_cfg.recovery
    rec_steps = sorted({min(horizon, max(1, round(t / dt))) for t in rec.seconds})

    shards = {scene: read_shard(shard_path(shard_dir, scene)) for scene in scenes}
    per_scene = {scene: scene_windows(shard, context, horizon, past_steps, plan_cfg, ids)
                 for scene, shard in shards.items()}
    available = sum(len(w) for w in per_scene.values())
    planned = _choice(per_scene, plan_cfg.eval_windows, plan_cfg.optimizer.seed)
    per_scene = {scene: per_scene[scene].take(sorted(i for subset in SUBSETS for sc, i in planned[subset]
                                                     if sc == scene)) for scene in scenes}
    chosen = _choice(per_scene, rec.max_windows, plan_cfg.optimizer.seed)
    landscape_at = next(((sc, i) for subset in ("branch", "factual") for sc, i in chosen[subset]), None)

    parts, recovered, landscape = [], [], None
    predictions = {**{name: [] for name in planners}, "ego_mlp": []}
    plan_seconds = 0.0
    for scene in tqdm(scenes, desc="planning", unit="scene", disable=not progress, leave=False):
        windows = per_scene[scene]
        if not len(windows):
            continue
        shard = shards[scene]
        _, states = encode_frames(model, shard.arrays, shard.frames, 16, device, camera_index(shard, model),
                                  with_online=False)
        parts.append(windows)
        predictions["ego_mlp"].append(ego.plan(windows.past, windows.command)[1])
        t1 = time.perf_counter()
        for lo in range(0, len(windows), 16):
            sl = slice(lo, lo + 16)
            s = windows.start[sl]
            ctx = torch.from_numpy(np.ascontiguousarray(
                states[s[:, None] + np.arange(-context + 1, 1)[None]], dtype=np.float32)).to(device)
            past = None if context < 2 else torch.from_numpy(
                np.ascontiguousarray(windows.past[sl, -(context - 1):], dtype=np.float32)).to(device)
            situation = Situation(torch.from_numpy(windows.speed_now[sl]).to(device),
                                  torch.from_numpy(windows.command[sl]).to(device), ctx, past,
                                  torch.from_numpy(windows.cruise_speed[sl]).to(device),
                                  torch.from_numpy(windows.past[sl, -2, 3]).to(device) if past_steps >= 2 else None)
            for name, planner in planners.items():
                predictions[name].append(planner.decide(situation).poses.cpu().numpy())
        plan_seconds += time.perf_counter() - t1
        mine = [i for subset in SUBSETS for sc, i in chosen[subset] if sc == scene]
        if mine:
            picked = windows.take(mine)
            for steps in rec_steps:
                errors = recovery_errors(model, states, picked, context, steps, plan_cfg, model.space)
                recovered.append({"steps": steps, "branch": picked.branch, **errors})
        if landscape_at is not None and landscape_at[0] == scene:
            landscape = _landscape(model, states, windows.take([landscape_at[1]]), context, max(rec_steps),
                                   plan_cfg, out, energy_landscape, plot_landscape)
    windows = concatenate(parts)
    if windows is None:
        log.warning("no planning window of %d context and %d future key frames in the evaluated scenes", context,
                    horizon)
        return {"windows": 0}
    speed = windows.speed_now.astype(np.float64)
    poses = {**{name: np.concatenate(predictions[name]) for name in planners},
             "constant_velocity": integrate(controls_to_actions(constant_velocity_controls(speed, horizon), dt)),
             "ego_mlp": np.concatenate(predictions["ego_mlp"]),
             "expert": windows.truth}
    seconds = list(SECONDS)
    open_loop = {"protocols": PROTOCOLS, "seconds": seconds}
    for subset in SUBSETS:
        keep = np.flatnonzero(windows.branch == (subset == "branch"))
        part = windows.take(keep)
        open_loop[subset] = {"windows": int(len(keep)),
                             "methods": {name: score(p[keep], part, plan_cfg, seconds) for name, p in poses.items()}
                             if len(keep) else {}}
    section = {
        "windows": int(len(windows)),
        "windows_available": int(available),
        "open_loop": open_loop,
        "action_recovery": _recovery_summary(recovered, rec_steps, dt),
        "planner": {"method": plan_cfg.optimizer.method, "candidates": plan_cfg.optimizer.candidates,
                    "iterations": plan_cfg.optimizer.iterations, "horizon_steps": horizon, "device": str(device),
                    "seconds_per_window_batched": round(plan_seconds / len(windows) / len(planners), 4),
                    "variants": {name: list(overrides) for name, overrides in (variants or {}).items()}},
        "cost_heads": heads_meta.get("held_out_scores", heads_meta.get("train_scores")),
        "ego_mlp": {"train_windows": ego_meta.get("train_windows"), "train_mean_l2_m": ego_meta.get("train_mean_l2_m")},
        "landscape": landscape,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return section


def _choice(per_scene: dict, max_windows: int, seed: int) -> dict:
    """Seeded (scene, window index) picks of up to ``max_windows`` factual and branch windows each (0 = every
    one): the windows the section plans (``eval_windows``), then those of them it recovers actions on."""
    rng = np.random.default_rng(seed)
    chosen = {}
    for subset in SUBSETS:
        pool = [(scene, i) for scene, w in per_scene.items() for i in range(len(w))
                if bool(w.branch[i]) == (subset == "branch")]
        if max_windows and len(pool) > max_windows:
            pool = [pool[j] for j in sorted(rng.choice(len(pool), max_windows, replace=False))]
        chosen[subset] = pool
    return chosen


def _recovery_summary(recovered: list, steps: list, dt: float) -> dict:
    out = {"seconds": [s * dt for s in steps]}
    for subset in SUBSETS:
        rows = {"windows": 0, "endpoint_error_m": [], "constant_velocity_m": [], "ratio": [],
                "latent_distance_recovered": [], "latent_distance_logged": []}
        for k in steps:
            parts = [(r, r["branch"] == (subset == "branch")) for r in recovered if r["steps"] == k]
            pick = {key: np.concatenate([r[key][m] for r, m in parts]) if parts else np.zeros(0)
                    for key in ("recovered_m", "constant_velocity_m", "distance_recovered", "distance_logged")}
            rows["windows"] = int(len(pick["recovered_m"]))
            err, cv = _mean(pick["recovered_m"].tolist()), _mean(pick["constant_velocity_m"].tolist())
            rows["endpoint_error_m"].append(err)
            rows["constant_velocity_m"].append(cv)
            rows["ratio"].append(err / cv if err is not None and cv else None)
            rows["latent_distance_recovered"].append(_mean(pick["distance_recovered"].tolist()))
            rows["latent_distance_logged"].append(_mean(pick["distance_logged"].tolist()))
        out[subset] = rows
    return out


def _landscape(model, states, window, context, steps, cfg, out, energy_landscape, plot_landscape) -> dict:
    from drivejepa import latent_space
    from drivejepa.planning.heads import model_device
    from drivejepa.planning.motion import actions_to_controls

    device = model_device(model)
    s = int(window.start[0])
    ctx = torch.from_numpy(np.ascontiguousarray(states[s - context + 1:s + 1][None], dtype=np.float32)).to(device)
    past = None if context < 2 else torch.from_numpy(
        np.ascontiguousarray(window.past[:, -(context - 1):], dtype=np.float32)).to(device)
    goal = latent_space.targets(torch.from_numpy(np.ascontiguousarray(states[s + steps][None], dtype=np.float32)),
                                model.space).to(device)
    true = torch.from_numpy(actions_to_controls(window.actions[0, :steps]).astype(np.float32)).to(device)
    land = energy_landscape(model, ctx, past, goal, true, cfg)
    kind = "branch" if window.branch[0] else "factual"
    title = f"{window.scene[0]} frame {s}, {steps * cfg.frame_seconds:g} s ahead ({kind} window)"
    path = plot_landscape(land, Path(out) / "planning_landscape.png", title)
    dist = np.asarray(land["distance"])
    i, j = np.unravel_index(np.argmin(dist), dist.shape)
    flat = np.ptp(dist) <= 1e-9 * max(1.0, float(np.abs(dist).max()))
    return {"png": path.name, "json": path.with_suffix(".json").name, "scene": window.scene[0], "frame": s,
            "window": kind, "minimum_at": None if flat else {"speed_change": land["speed_change"][i],
                                                             "yaw_rate_change": land["yaw_rate_change"][j]}}


def format_planning(section: dict) -> str:
    """The planning section of report.md: open-loop L2 and collision rate per protocol and method, then action
    recovery."""
    if not section.get("windows"):
        return "## Planning (open loop)\n\nNo planning window in the evaluated scenes.\n"
    ol, pl = section["open_loop"], section["planner"]
    secs = ol["seconds"]
    lines = ["## Planning (open loop)", "",
             f"World-model planner: {pl['method'].upper()}, {pl['candidates']} candidates x {pl['iterations']} "
             f"iterations over {pl['horizon_steps']} steps, on {section['windows']} of the "
             f"{section.get('windows_available', section['windows'])} windows of the evaluated scenes (seeded). L2 "
             "in metres, collision rate of the planned ego box against the annotated agent boxes."
             + "".join(f" `world_model[{name}]`: the same planner with {' '.join(overrides) or 'no change'}."
                       for name, overrides in pl.get("variants", {}).items()), ""]
    for subset in SUBSETS:
        block = ol.get(subset, {})
        if not block.get("windows"):
            continue
        for protocol, meaning in ol["protocols"].items():
            lines += [f"{subset.capitalize()} windows ({block['windows']}), `{protocol}`: {meaning}", "",
                      "| method | " + " | ".join(f"L2 {t:g} s" for t in secs) + " | "
                      + " | ".join(f"collision {t:g} s" for t in secs) + " |",
                      "|---" * (1 + 2 * len(secs)) + "|"]
            for name, m in block["methods"].items():
                cells = [f"{v:.3f}" if v is not None else "n/a" for v in m["l2_m"][protocol]]
                cells += [f"{100 * v:.2f}%" if v is not None else "n/a" for v in m["collision_rate"][protocol]]
                lines.append(f"| {name.replace('_', ' ')} | " + " | ".join(cells) + " |")
            lines.append("")
    ar = section["action_recovery"]
    lines += ["## Action recovery", "",
              "End-point error (m) of the action sequence the model maps closest to the true future latent, beside "
              "constant-velocity extrapolation.", "",
              "| windows | " + " | ".join(f"{t:g} s recovered / const. vel. (ratio)" for t in ar["seconds"]) + " |",
              "|---" * (1 + len(ar["seconds"])) + "|"]
    for subset in SUBSETS:
        r = ar[subset]
        if not r["windows"]:
            continue
        cells = [f"{e:.2f} / {c:.2f} ({q:.2f})" if None not in (e, c, q) else "n/a"
                 for e, c, q in zip(r["endpoint_error_m"], r["constant_velocity_m"], r["ratio"])]
        lines.append(f"| {subset} ({r['windows']}) | " + " | ".join(cells) + " |")
    land = section.get("landscape")
    if land:
        at = land["minimum_at"]
        where = ("flat: every action of the grid is as near" if at is None else
                 f"minimum at a speed change of {at['speed_change']:+.2f} m/s and a yaw-rate change of "
                 f"{at['yaw_rate_change']:+.3f} rad/s from the true action")
        lines += ["", f"![Energy landscape]({land['png']}) {land['scene']} key frame {land['frame']}: {where}"]
    return "\n".join(lines) + "\n"

def append_report(out: str | Path, section: dict) -> Path:
    """Add the planning section to ``out/report.md`` (rewritten atomically)."""
    from drivejepa.io import atomic_write_text

    path = Path(out) / "report.md"
    before = path.read_text() if path.is_file() else ""
    return atomic_write_text(path, before.rstrip("\n") + "\n\n" + format_planning(section))
