"""Which scenario and weather each scene drives, and the tags that describe what actually happened in it."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np

if TYPE_CHECKING:
    from drivejepa.data.synth.world import World

# Scene n (1-based) drives scenario DRIVING[(n - 1) % 7] in weather WEATHER[n % 3]. 7, 3 and the held-out splits'
# period 5 are coprime, so every combination recurs and the val (n % 5 == 3) and test (n % 5 == 0) scenes see all of
# them.
DRIVING = [
    dict(layout="urban", maneuver="left", words=["city"]),
    dict(layout="highway", maneuver="lanechange", words=["highway"]),
    dict(layout="urban", maneuver="right", crossing=True, words=["city"]),
    dict(layout="urban", maneuver="straight", congestion=True, words=["city"]),
    dict(layout="parking", maneuver="straight", words=[]),
    dict(layout="urban_straight", maneuver="lanechange", congestion=True, words=["city"]),
    dict(layout="parking", maneuver="straight", words=[]),
]
WEATHER = ["day", "night", "rain"]
TAG_VOCABULARY = ["night", "rain", "intersection", "turn left", "turn right", "pedestrians", "parking lot",
                  "high speed", "congestion"]


def scenario(scene_number: int) -> dict:
    """Driving scenario and weather of scene ``scene_number`` (1-based)."""
    return dict(DRIVING[(scene_number - 1) % len(DRIVING)], weather=WEATHER[scene_number % len(WEATHER)])


def describe(world: World, spec: dict, intersection: Optional[np.ndarray]) -> list[str]:
    """Tags that say what actually happens in the simulated scene (checked against the ego trajectory)."""
    e = world.ego_index
    speed = world.agent_speed[:, e]
    yaw = world.agent_yaw[:, e]
    xy = world.agent_xy[:, e]
    turn = float(yaw[-1] - yaw[0])
    tags = list(spec.get("words", []))
    if spec["weather"] in ("night", "rain"):
        tags.append(spec["weather"])
    if intersection is not None and np.min(np.hypot(*(xy - intersection).T)) < 30.0:
        tags.append("intersection")
    if turn > np.radians(35):
        tags.append("turn left")
    elif turn < -np.radians(35):
        tags.append("turn right")
    ped = [i for i, a in enumerate(world.agents) if a["kind"] == "pedestrian"]
    if ped:
        d = np.hypot(world.agent_xy[:, ped, 0] - xy[:, None, 0], world.agent_xy[:, ped, 1] - xy[:, None, 1])
        if (d < 25.0).any(axis=0).sum() >= 2 and (spec.get("crossing") or spec["layout"] == "parking"):
            tags.append("pedestrians")
    if spec["layout"] == "parking":
        tags.append("parking lot")
    if speed.max() > 18.0:
        tags.append("high speed")
    if spec.get("congestion") and (speed < 1.0).any():
        tags.append("congestion")
    return tags


# A counterfactual branch's description: its own tags (as above, for what its ego does), then these, then
# ``collision`` / ``off road`` where its ego hits another agent's box or leaves the asphalt.
COUNTERFACTUAL = "counterfactual"


def branch_tags(parent: str, frame: int, behaviour: str) -> list[str]:
    """Tags of a branch of scene ``parent`` that shares its key frames 0..``frame`` and then does ``behaviour``."""
    return [COUNTERFACTUAL, f"parent {parent}", f"branch frame {frame}", f"behaviour {behaviour}"]


def branch_of(description: str) -> Optional[dict]:
    """``{"parent", "frame", "behaviour"}`` of a counterfactual branch's description, None for any other scene."""
    from drivejepa.data.shards import parse_tags

    tags = parse_tags(description)
    if COUNTERFACTUAL not in tags:
        return None
    out: dict = {}
    for tag in tags:
        for key, prefix in (("parent", "parent "), ("frame", "branch frame "), ("behaviour", "behaviour ")):
            if tag.startswith(prefix):
                out[key] = tag[len(prefix):]
    if set(out) != {"parent", "frame", "behaviour"} or not out["frame"].isdigit():
        return None
    out["frame"] = int(out["frame"])
    return out
