"""What the closed loop checks about the ego at a simulation step: box overlap with another agent, the drivable area,
the time to collision, and who is at fault for a collision.

Boxes are the agents' annotation boxes (length and width of ``World.agents[i]["size"]``, centred on the agent's
position, along its heading). The overlap test is the project's one (``drivejepa/boxes.py``), which the branches,
the planner's costs and the open-loop collision rate use too.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from drivejepa import boxes
from drivejepa.data.synth.materials import MARKING, ROAD
from drivejepa.data.synth.world import MAP_RESOLUTION

DRIVABLE = (ROAD, MARKING)          # asphalt: lanes, shoulders, parking lots and their markings
NEAR = 12.0                         # metres: agents farther than this from the ego cannot touch it this step
TTC_STEP = 0.1                      # seconds between the constant-velocity look-ahead samples
STOPPED_SPEED = 0.05                # m/s: at or below, an ego or agent counts as stopped (nuPlan's threshold)
AT_FAULT = {"stopped ego": False, "stopped agent": True, "active rear": False, "active front": True}


def agent_lw(world) -> np.ndarray:
    """[A, 2] length and width of every agent's box."""
    return np.array([(a["size"][1], a["size"][0]) for a in world.agents], dtype=np.float64)


def boxes_overlap(xy_a, yaw_a, lw_a, xy_b, yaw_b, lw_b) -> bool:
    """Whether two planar boxes (centre, heading, (length, width)) overlap."""
    return bool(boxes.boxes_overlap(np.r_[xy_a, yaw_a, lw_a], np.r_[xy_b, yaw_b, lw_b]))


def collision(world, k: int, lw: Optional[np.ndarray] = None) -> Optional[int]:
    """The agent whose box overlaps the ego's at simulation step ``k`` (the nearest if several), or None."""
    lw = agent_lw(world) if lw is None else lw
    e = world.ego_index
    xy, yaw, active = world.agent_xy[k], world.agent_yaw[k], world.agent_active[k]
    dist = np.hypot(*(xy - xy[e]).T)
    near = active & (dist < NEAR)
    near[e] = False
    for i in np.flatnonzero(near)[np.argsort(dist[near])]:
        if boxes_overlap(xy[e], yaw[e], lw[e], xy[i], yaw[i], lw[i]):
            return int(i)
    return None


def ego_corners(xy, yaw: float, lw) -> np.ndarray:
    """[4, 2] corners of a box of length and width ``lw`` at ``xy`` heading ``yaw``."""
    u = np.array([np.cos(yaw), np.sin(yaw)])
    n = np.array([-u[1], u[0]])
    return np.array([np.asarray(xy) + sx * lw[0] / 2 * u + sy * lw[1] / 2 * n for sx in (-1, 1) for sy in (-1, 1)])


def drivable(world, points: np.ndarray) -> np.ndarray:
    """[N] whether each global (x, y) point lies on asphalt (the world's material grid, 0.1 m cells)."""
    grid = world.material_grid
    H, W = grid.shape
    points = np.atleast_2d(points)
    col = np.floor(points[:, 0] / MAP_RESOLUTION).astype(np.int64)
    row = np.floor(H - points[:, 1] / MAP_RESOLUTION).astype(np.int64)
    inside = (col >= 0) & (col < W) & (row >= 0) & (row < H)
    out = np.zeros(len(points), dtype=bool)
    out[inside] = np.isin(grid[row[inside], col[inside]], DRIVABLE)
    return out


def road_state(world, k: int, lw: np.ndarray) -> tuple[bool, bool]:
    """(any corner of the ego's box off the drivable area, the ego's centre off it) at step ``k``."""
    e = world.ego_index
    xy, yaw = world.agent_xy[k, e], float(world.agent_yaw[k, e])
    ok = drivable(world, np.concatenate([ego_corners(xy, yaw, lw[e]), xy[None]]))
    return bool(not ok[:4].all()), bool(not ok[4])


def time_to_collision(world, k: int, lw: np.ndarray, horizon: float) -> float:
    """Seconds until the ego's box would first overlap another agent's if both kept their velocity and heading
    from step ``k`` (sampled every TTC_STEP up to ``horizon``); inf when none would within the horizon. An
    overlap now is 0."""
    e = world.ego_index
    xy, yaw, speed, active = (world.agent_xy[k], world.agent_yaw[k], world.agent_speed[k], world.agent_active[k])
    vel = np.stack([np.cos(yaw), np.sin(yaw)], axis=1) * speed[:, None]
    taus = np.arange(0.0, horizon + 1e-9, TTC_STEP)
    radius = np.hypot(lw[:, 0], lw[:, 1]) / 2
    reach = np.hypot(*(xy - xy[e]).T) - np.hypot(*(vel - vel[e]).T) * horizon - radius - radius[e]
    candidates = np.flatnonzero(active & (reach < 0.0))
    candidates = candidates[candidates != e]
    if not len(candidates):
        return float("inf")
    rel = (xy[candidates] - xy[e])[:, None] + (vel[candidates] - vel[e])[:, None] * taus[None, :, None]   # [C, T, 2]
    close = np.hypot(rel[..., 0], rel[..., 1]) < (radius[candidates] + radius[e])[:, None]
    for t in np.flatnonzero(close.any(axis=0)):
        pe = xy[e] + vel[e] * taus[t]
        for c in np.flatnonzero(close[:, t]):
            i = candidates[c]
            if boxes_overlap(pe, yaw[e], lw[e], xy[i] + vel[i] * taus[t], yaw[i], lw[i]):
                return float(taus[t])
    return float("inf")


def out_of_lane(lateral_offset, width: float, lane_width: float):
    """Whether the ego's box (``width`` metres wide) is past the edge of its lane (``lane_width`` metres: the road's,
    ``ClosedLoop.lane_width``) at a signed ``lateral_offset`` (metres from the lane's centre line; an array gives an
    array): ``|offset| + width / 2 > lane_width / 2``."""
    return np.abs(lateral_offset) + width / 2 > lane_width / 2


def collision_type(world, k: int, other: int, lw: np.ndarray, lateral_offset: float,
                   lane_width: float) -> tuple[str, bool]:
    """(type, ego at fault) of the ego's collision with agent ``other`` at step ``k``, classified the way nuPlan's
    ``no_ego_at_fault_collisions`` metric does, in its order:

    - ``stopped ego``: the ego stood (speed <= STOPPED_SPEED): not at fault;
    - ``stopped agent``: the agent stood: at fault;
    - ``active rear``: the agent's centre is behind the ego's (along the ego's heading): it drove into the ego, not
      at fault (nuPlan measures from the rear axle; the synthetic world's ego pose is its box centre);
    - ``active front``: the front edge of the ego's box touches the agent's box: at fault;
    - ``active lateral``: any other contact: at fault when the ego's box crossed the boundary of the lane it should
      drive (``lateral_offset``, metres from its route's centre line, in a lane ``lane_width`` wide; nuPlan: the ego
      in several lanes) or left the drivable area, else not.
    """
    e = world.ego_index
    xy, yaw, speed = world.agent_xy[k], world.agent_yaw[k], world.agent_speed[k]
    heading = np.array([np.cos(yaw[e]), np.sin(yaw[e])])
    if speed[e] <= STOPPED_SPEED:
        kind = "stopped ego"
    elif speed[other] <= STOPPED_SPEED:
        kind = "stopped agent"
    elif float(np.dot(xy[other] - xy[e], heading)) < 0.0:
        kind = "active rear"
    elif boxes_overlap(xy[e] + heading * lw[e, 0] / 2, yaw[e], (1e-3, lw[e, 1]), xy[other], yaw[other], lw[other]):
        kind = "active front"
    else:
        return "active lateral", bool(out_of_lane(lateral_offset, lw[e, 1], lane_width) or road_state(world, k, lw)[0])
    return kind, AT_FAULT[kind]
