"""``drivejepa plan``: the planner on a logged scene, one decision per key frame, drawn and scored.

From key frame ``t`` on, the planner decides at each logged key frame (open loop: the ego follows the log, the
planner only proposes), warm-started from its previous plan. The route command is the protocol's (derived from the
logged position 3 s ahead) unless one is given. Each decision is compared with the logged future (L2 at every step,
collision of the planned ego box with the annotated agent boxes) and drawn in the ego frame of its key frame: the
drivable grid of the shard, the agent boxes now, the candidates of the last iteration, the plan, constant velocity
and the logged path. ``plan.json`` holds every number.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Optional

import numpy as np

from drivejepa.errors import UserError


def plan_scene(checkpoint: str | Path, shard_dir: str | Path, scene: str, out: str | Path, cfg, *,
               frame: Optional[int] = None, steps: int = 1, command: str = "logged", retrain_heads: bool = False,
               progress: bool = True) -> dict:
    from drivejepa.data.shards import load_manifest, read_shard, shard_path
    from drivejepa.io import atomic_write_json
    from drivejepa.planning.heads import agent_ids, ensure_heads
    from drivejepa.planning.motion import constant_velocity_controls, controls_to_actions, integrate
    from drivejepa.planning.openloop import collisions, l2_errors
    from drivejepa.planning.planner import Planner, observation_history
    from drivejepa.planning.route import COMMANDS
    from drivejepa.planning.windows import scene_windows
    from drivejepa.runtime import select_device
    from drivejepa.training.checkpoint import load_world_model
    from drivejepa.visualization.decoder_training import camera_index

    t0 = time.perf_counter()
    out = Path(out)
    if scene not in load_manifest(shard_dir)["scenes"]:
        raise UserError(f"{shard_dir}: no scene '{scene}' in the shards")
    if command != "logged" and command not in COMMANDS:
        raise UserError(f"--command {command}: one of logged, {', '.join(COMMANDS)}")
    device = select_device(cfg.device)
    model, train_cfg = load_world_model(checkpoint, device)
    heads, heads_meta, heads_file = ensure_heads(checkpoint, model, train_cfg, shard_dir, cfg, retrain=retrain_heads,
                                                 progress=progress)
    shard = read_shard(shard_path(shard_dir, scene))
    context, horizon = int(train_cfg.data.context), int(cfg.horizon)
    windows = scene_windows(shard, context, horizon, max(context - 1, 1), cfg, agent_ids(cfg.agent_classes),
                            starts=_starts(shard, context, horizon, frame, steps))
    planner = Planner(model, heads, cfg, device=device)
    cams = camera_index(shard, model)
    decisions = []
    for w in range(len(windows)):
        s = int(windows.start[w])
        index = np.arange(s - context + 1, s + 1)
        obs = observation_history(shard.arrays, index, cams)
        history = np.asarray(shard.arrays["actions"][max(0, s - max(context - 1, 1)):s], dtype=np.float32)
        name = COMMANDS[int(windows.command[w])] if command == "logged" else command
        plan = planner.plan(obs, history, name)
        one = windows.take([w])
        cv = integrate(controls_to_actions(constant_velocity_controls(one.speed_now.astype(np.float64), horizon),
                                           cfg.frame_seconds))
        decisions.append({
            "frame": s, "command": name, "command_source": command if command != "logged" else "logged 3 s ahead",
            "controls": plan.controls.tolist(), "actions": plan.actions.tolist(),
            "trajectory": plan.trajectory.tolist(), "logged": one.truth[0].tolist(),
            "l2_m": l2_errors(plan.trajectory[None, 1:, :2], one.truth[:, 1:, :2])[0].tolist(),
            "constant_velocity_l2_m": l2_errors(cv[:, 1:, :2], one.truth[:, 1:, :2])[0].tolist(),
            "collides": collisions(plan.trajectory[None], one.boxes, one.box_mask, cfg)[0].tolist(),
            "cost": plan.cost, "terms": plan.terms, "latency_ms": plan.latency_ms,
            "figure": draw_decision(out / f"plan_t{s:03d}.png", shard, s, plan, one, cv, cfg).name,
        })
    summary = {"checkpoint": str(checkpoint), "shards": str(shard_dir), "scene": scene, "device": str(device),
               "config": dataclasses.asdict(cfg), "heads": {"path": str(heads_file),
                                                             "scores": heads_meta.get("held_out_scores")},
               "decisions": decisions, "seconds": round(time.perf_counter() - t0, 2)}
    atomic_write_json(out / "plan.json", summary)
    return summary


def _starts(shard, context: int, horizon: int, frame: Optional[int], steps: int) -> np.ndarray:
    from drivejepa.evaluation.latents import window_starts

    frames = np.asarray(shard.meta.get("frame_indices", np.arange(shard.frames)))
    valid = window_starts(shard.frames, context, horizon, np.asarray(shard.arrays["action_valid"], bool), frames)
    if not len(valid):
        raise UserError(f"{shard.path}: no key frame with {context} context and {horizon} logged future key frames")
    first = int(valid[0]) if frame is None else int(frame)
    if first not in set(valid.tolist()):
        raise UserError(f"--frame {first}: plannable key frames of this scene are {valid.tolist()}")
    return valid[(valid >= first) & (valid < first + max(1, steps))]


def draw_decision(path: Path, shard, s: int, plan, window, cv: np.ndarray, cfg) -> Path:
    """One decision in the ego frame of key frame ``s`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Polygon

    from drivejepa.boxes import box_corners, ego_boxes
    from drivejepa.io import atomic_path

    fig, ax = plt.subplots(figsize=(6, 6))
    grid = np.asarray(shard.arrays["drivable"][s])
    r = _drivable_range(shard)
    ax.imshow(grid.T, origin="lower", extent=(-r, r, -r, r), cmap="Greys", vmin=-1.5, vmax=1.2, alpha=0.6)
    for box, real in zip(window.boxes[0, 0], window.box_mask[0, 0]):
        if real:
            ax.add_patch(Polygon(box_corners(box), closed=True, fill=False, color="tab:purple", lw=1.2))
    ego = ego_boxes(np.zeros(3), cfg.ego_length, cfg.ego_width, cfg.ego_center_ahead)
    ax.add_patch(Polygon(box_corners(ego), closed=True, fill=True, color="black", alpha=0.7))
    for cand in plan.candidates:
        ax.plot(cand[:, 0], cand[:, 1], color="tab:gray", lw=0.5, alpha=0.35)
    ax.plot(cv[0, :, 0], cv[0, :, 1], "--", color="tab:blue", lw=1.5, label="constant velocity")
    ax.plot(window.truth[0, :, 0], window.truth[0, :, 1], "-o", color="tab:green", ms=3, lw=2, label="logged")
    ax.plot(plan.trajectory[:, 0], plan.trajectory[:, 1], "-o", color="tab:red", ms=3, lw=2,
            label=f"plan ({plan.command})")
    reach = max(20.0, float(np.abs(np.concatenate([plan.trajectory[:, :2], window.truth[0, :, :2]])).max()) + 8.0)
    ax.set_xlim(-10.0, reach)
    ax.set_ylim(-(reach + 10.0) / 2, (reach + 10.0) / 2)
    ax.set_aspect("equal")
    ax.set_xlabel("x forward (m)")
    ax.set_ylabel("y left (m)")
    ax.set_title(f"{shard.meta['scene']} key frame {s}: cost {plan.cost:.3f}, "
                 f"{plan.latency_ms['total']:.0f} ms", fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def _drivable_range(shard) -> float:
    from drivejepa.data.shards import load_manifest

    return float(load_manifest(shard.path.parent)["config"]["drivable_range"])

