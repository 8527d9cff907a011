"""The route as the nuScenes planning protocol gives it: a high-level command, nothing else from the future.

The planning papers (ST-P3, UniAD, VAD) derive the command from the ego's logged position 3 s ahead in its current
ego frame: a lateral offset of more than 2 m to the left is ``left``, more than 2 m to the right ``right``, anything
else ``straight``. The same rule serves the synthetic world and real nuScenes (both have ego poses in the shards);
the threshold and the time are ``PlanConfig.command_threshold`` and ``command_seconds``.
"""
from __future__ import annotations

import numpy as np

COMMANDS = ("left", "straight", "right")
COMMAND_SIGN = (1.0, 0.0, -1.0)          # which side of the ego frame's y axis (y left) each command asks for


def command_index(command) -> int:
    """An index into :data:`COMMANDS` from a name or an index; ValueError otherwise."""
    if isinstance(command, str):
        name = command.strip().lower()
        if name not in COMMANDS:
            raise ValueError(f"unknown route command {command!r} (one of {', '.join(COMMANDS)})")
        return COMMANDS.index(name)
    index = int(command)
    if not 0 <= index < len(COMMANDS):
        raise ValueError(f"route command index {index} is not one of 0..{len(COMMANDS) - 1}")
    return index


def command_from_offset(lateral, threshold: float) -> np.ndarray:
    """Command indices of lateral offsets (metres, y left) at the command time: > threshold left, < -threshold right."""
    lateral = np.asarray(lateral, dtype=np.float64)
    return np.where(lateral > threshold, 0, np.where(lateral < -threshold, 2, 1)).astype(np.int64)
