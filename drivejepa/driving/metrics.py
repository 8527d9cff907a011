"""Scores of closed-loop runs: per scenario and per driver over the same scenarios.

Per run, from the driver's take-over to the end of the run (all at the simulation's 20 Hz unless said otherwise):
- ``collision``: the run ended with the ego's box overlapping another agent's (safety.collision; a run ends at its
  first collision, so a run has 0 or 1), and with whom; ``collision_type`` and ``at_fault``: nuPlan's classification
  of it (safety.collision_type: being driven into from behind or while standing is not the ego's fault);
- ``distance_m``: the path length the ego drove; ``collisions_per_km`` over a driver's runs divides by its sum;
- ``progress``: how far along the logged ego's route the ego got (its projections onto the route at the start and
  at the end) over how far the logged ego (the expert) got in the whole scenario; a run that ends early keeps its
  shortfall;
- ``route_offset_mean_m`` / ``route_offset_max_m``: the ego's distance from the logged route's centre line (the
  lane the expert drove; the planner is told only the route command, so this is how well it keeps its lane), and
  ``out_of_lane_s``: time with the ego's box past that lane's edge (``safety.out_of_lane``; the lane as wide as
  the road's, ``ClosedLoop.lane_width``);
- ``off_drivable_s``: time with a corner of the ego's box off the drivable area; ``off_road``: the run ended with
  the ego's centre off it;
- ``min_ttc_s``: the smallest time to collision (safety.time_to_collision: both boxes keep their velocity) over
  every 0.1 s, None when nothing came within the horizon;
- ``jerk_mean`` / ``jerk_max`` (m/s^3): longitudinal jerk of the key-frame speeds (the realised actions' chord
  speeds every 0.5 s, from the last logged interval before the take-over on), the rate at which drivers decide.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from drivejepa.data.synth.traffic import DT
from drivejepa.driving import safety
from drivejepa.driving.simulator import KEY_PERIOD_S

SCORES = 4                            # what scenario_metrics reports; part of a saved run's hash, so a run scored
                                      # before a change is driven again rather than resumed without the new scores
TTC_HORIZON_S = 3.0
TTC_EVERY = 2                         # simulation steps between time-to-collision samples (0.1 s)


def jerk(speeds, dt: float) -> tuple[Optional[float], Optional[float]]:
    """(mean |jerk|, max |jerk|) of speeds sampled every ``dt`` seconds (second difference over dt^2); None with
    fewer than three samples."""
    v = np.asarray(speeds, dtype=np.float64)
    if len(v) < 3:
        return None, None
    j = np.abs(np.diff(v, n=2)) / dt ** 2
    return float(j.mean()), float(j.max())


def route_progress(route, start_xy, end_xy) -> float:
    """Metres along ``route`` (a Path) from the projection of ``start_xy`` to that of ``end_xy``."""
    return float(route.project(np.asarray(end_xy, dtype=np.float64))[0]
                 - route.project(np.asarray(start_xy, dtype=np.float64))[0])


def route_offsets(route, xy: np.ndarray) -> np.ndarray:
    """``[N]`` signed lateral offsets (m, left positive) of points ``xy`` ``[N, 2]`` from ``route`` (a Path)."""
    return np.array([route.project(np.asarray(p, dtype=np.float64))[1] for p in xy])


def per_km(count: float, metres: float) -> Optional[float]:
    return None if metres <= 0 else float(count) / (metres / 1000.0)


def path_length(xy: np.ndarray) -> float:
    return float(np.hypot(*np.diff(np.asarray(xy, dtype=np.float64), axis=0).T).sum()) if len(xy) > 1 else 0.0


def scenario_metrics(loop, ttc_horizon: float = TTC_HORIZON_S) -> dict:
    """The metrics of a finished ClosedLoop run (see the module docstring)."""
    sc = loop.scenario
    world = loop.world
    k0, k1 = loop.key_step(sc.start), loop.k
    ego = loop.ego_local[k0:k1 + 1]
    S = loop.sim.S[:, 0]
    expert = float(S[min(loop.key_step(sc.last_frame) + 1, len(S) - 1)] - S[k0])
    progress = route_progress(loop.route, ego[0, :2], ego[-1, :2])
    off = [safety.road_state(world, k, loop.lw)[0] for k in range(k0, k1 + 1)]
    lateral = route_offsets(loop.route, ego[:, :2])                   # signed, at every step of the run
    ttc = min((safety.time_to_collision(world, k, loop.lw, ttc_horizon) for k in range(k0, k1 + 1, TTC_EVERY)),
              default=float("inf"))
    actions = loop.realised_actions()
    speeds = actions[max(sc.start - 1, 0):, 3]
    jerk_mean, jerk_max = jerk(speeds, KEY_PERIOD_S)
    hit = loop.collision_agent
    kind, at_fault = (None, False) if hit is None else safety.collision_type(
        world, loop.end_step, hit, loop.lw, lateral[loop.end_step - k0], loop.lane_width)
    seconds = [d.seconds for d in loop.decisions]
    return {
        "scenario": sc.name, "seed": sc.seed, "start": sc.start, "last_frame": sc.last_frame,
        "end": loop.end_reason, "end_time_s": round((k1 - k0) * DT, 3),
        "collision": loop.end_reason == "collision",
        "collision_with": None if hit is None else loop.world.agents[hit]["kind"],
        "collision_type": kind, "at_fault": at_fault,
        "distance_m": path_length(ego[:, :2]),
        "progress_m": progress, "expert_progress_m": expert,
        "progress": progress / expert if expert > 0.5 else None,
        "route_offset_mean_m": float(np.abs(lateral).mean()), "route_offset_max_m": float(np.abs(lateral).max()),
        "out_of_lane_s": float(np.sum(safety.out_of_lane(lateral, loop.lw[world.ego_index, 1], loop.lane_width))
                               * DT),
        "off_drivable_s": float(np.sum(off) * DT), "off_road": loop.end_reason == "off road",
        "min_ttc_s": None if not np.isfinite(ttc) else round(ttc, 3),
        "jerk_mean": jerk_mean, "jerk_max": jerk_max,
        "decisions": len(loop.decisions),
        "driver_ms": float(np.mean(seconds) * 1000) if seconds else None,
        "observe_ms": float(np.mean(loop.observe_seconds) * 1000) if loop.observe_seconds else None,
        "commands": {c: sum(d.command == c for d in loop.decisions) for c in ("left", "straight", "right")},
    }


def _mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def summarise(runs: list[dict]) -> dict:
    """Per-driver totals over its runs (each run dict: scenario_metrics plus ``driver``)."""
    out = {}
    for driver in dict.fromkeys(r["driver"] for r in runs):
        mine = [r for r in runs if r["driver"] == driver]
        metres = sum(r["distance_m"] for r in mine)
        collisions = sum(bool(r["collision"]) for r in mine)
        at_fault = sum(bool(r["at_fault"]) for r in mine)
        ttcs = [r["min_ttc_s"] for r in mine if r["min_ttc_s"] is not None]
        out[driver] = {
            "runs": len(mine), "completed": sum(r["end"] == "end" for r in mine),
            "collisions": collisions, "collision_rate": collisions / len(mine),
            "km": metres / 1000.0, "collisions_per_km": per_km(collisions, metres),
            "at_fault_collisions": at_fault, "at_fault_per_km": per_km(at_fault, metres),
            "progress_mean": _mean(r["progress"] for r in mine),
            "route_offset_mean_m": _mean(r["route_offset_mean_m"] for r in mine),
            "out_of_lane_s_mean": _mean(r["out_of_lane_s"] for r in mine),
            "off_drivable_s_mean": _mean(r["off_drivable_s"] for r in mine),
            "off_road_runs": sum(bool(r["off_road"]) for r in mine),
            "min_ttc_s": min(ttcs) if ttcs else None,
            "min_ttc_s_median": float(np.median(ttcs)) if ttcs else None,
            "jerk_mean": _mean(r["jerk_mean"] for r in mine),
            "driver_ms": _mean(r["driver_ms"] for r in mine),
            "observe_ms": _mean(r["observe_ms"] for r in mine),
        }
    return out
