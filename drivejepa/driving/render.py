"""``drivejepa drive --render``: one Open3D view per key frame of a run, and a GIF of the run.

Each view is drawn in the ego frame of its key frame (x forward, y left), so the camera follows the ego: the lidar
the driver saw (grey), the other agents' boxes by category, the route ahead (green), the driver's plan (red; the
commanded motion when it gives no plan) and its candidates (blue) when it provides them. Run layers are collected
in the worker that drove (:func:`step_layers`, plain arrays) and drawn in the command's process, after the probe of
drivejepa/visualization/headless.py says Open3D can render here.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from drivejepa.planning.motion import compose, relative

ROUTE_AHEAD_M = 60.0
BOX_RANGE_M = 60.0
VIEW_EXTENT = np.array([[-10.0, -16.0], [45.0, 16.0]])    # metres of the ego frame a view frames


def step_layers(loop, decision) -> dict:
    """Plain arrays of what the view of ``decision``'s key frame shows (see the module docstring)."""
    from drivejepa.data.shards import category_to_class

    frame = decision.frame
    k = loop.key_step(frame)
    obs = loop.frames[frame]
    points = obs["lidar"][obs["lidar_mask"]][:, :3]
    ego = loop.ego_local[k]
    w = loop.world
    boxes, labels = [], []
    for i, agent in enumerate(w.agents):
        if i == w.ego_index or not w.agent_active[k, i]:
            continue
        x, y = w.agent_xy[k, i] - loop.offset
        rel = relative(ego, (x, y, w.agent_yaw[k, i]))
        label = category_to_class(agent["category"])
        if np.hypot(rel[0], rel[1]) > BOX_RANGE_M or label is None:
            continue
        width, length, height = agent["size"]
        boxes.append([rel[0], rel[1], height / 2, width, length, height, rel[2], 0.0, 0.0])
        labels.append(label)
    s_now = loop.route.project(ego[:2])[0]
    s = np.linspace(s_now, min(s_now + ROUTE_AHEAD_M, loop.route.length), 31)
    rx, ry, rh = loop.route.at(s)
    route = np.array([relative(ego, p)[:2] for p in zip(rx, ry, rh)])
    plan = decision.plan if decision.plan is not None else compose((0.0, 0.0, 0.0), decision.action)[None]
    plan = np.concatenate([np.zeros((1, 3)), np.asarray(plan, dtype=np.float64)[:, :3]])
    out = {"points": points.astype(np.float32), "boxes": np.array(boxes, np.float64).reshape(-1, 9),
           "labels": np.array(labels, np.int64), "route": route, "plan": plan,
           "frame": frame, "command": decision.command, "speed": float(loop.world.agent_speed[k, 0])}
    if decision.candidates is not None:
        out["candidates"] = np.asarray(decision.candidates, dtype=np.float64)
    return out


def write_run(view, layers: list[dict], title: str, out: Path, size: tuple[int, int]) -> list[str]:
    """PNG per step (``step_FF.png``, FF the key frame) and ``run.gif`` of one run, drawn with ``view``
    (visualization.render.OffscreenView). Returns the file names written."""
    from drivejepa.data.shards import CLASSES
    from drivejepa.visualization.render import caption, fit_camera, save_gif, save_png
    from drivejepa.visualization.scene import (ACTION_PATH_COLOR, CANDIDATE_COLOR, EGO_COLOR, EGO_REAR_AXLE_OFFSET,
                                               TRUE_COLOR, TRUE_PATH_COLOR, SceneLayers, category_color)

    # the synthetic ego pose is the centre of its box; SceneLayers draws the ego ahead of a rear-axle origin
    ego = (-EGO_REAR_AXLE_OFFSET, 0.0, 0.0)
    camera = fit_camera(SceneLayers(ego=None, true_path=VIEW_EXTENT), size[0] / size[1], margin=2.0)
    frames, names = [], []
    for step in layers:
        scene = SceneLayers(true_points=step["points"], boxes=step["boxes"], labels=step["labels"], ego=ego,
                            true_path=step["route"], action_path=step["plan"],
                            candidate_paths=step.get("candidates"))
        legend = [("lidar", TRUE_COLOR), ("ego", EGO_COLOR), ("route", TRUE_PATH_COLOR), ("plan", ACTION_PATH_COLOR)]
        if step.get("candidates") is not None:
            legend.append(("candidates", CANDIDATE_COLOR))
        legend += [(CLASSES[c], category_color(c)) for c in sorted({int(c) for c in step["labels"]})]
        text = (f"{title} | key frame {step['frame']} ({step['frame'] * 0.5:.1f} s) | command {step['command']} | "
                f"{step['speed']:.1f} m/s")
        frames.append(caption(view.render(scene, camera), text, legend, font_size=13))
        name = f"step_{step['frame']:02d}.png"
        save_png(out / name, frames[-1])
        names.append(name)
    if frames:
        save_gif(out / "run.gif", frames, seconds_per_frame=0.5)
        names.append("run.gif")
    return names
