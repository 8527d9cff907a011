"""The ego driver's intent: the speed choices of its own that make the action carry information."""
from __future__ import annotations

import numpy as np


def ego_intent(rng: np.random.Generator, v_nominal: float, duration: float, calm: bool) -> list:
    """The ego driver's own choices of speed over time, as (t0, t1, desired speed) schedule entries.

    Without them the ego drives a smooth IDM profile set by the scene, so its future motion follows almost exactly
    from its past motion (over 3 s the forward distance is 97% predictable from the last action) and a world model
    rightly ignores the action it is given. A driver who at moments of its own choosing slows down, speeds up or
    pulls up makes the action carry what the sensors cannot tell. Every choice holds for 1.5-4 s and is reached by
    ramping the desired speed at about 2.5 m/s^2; IDM still keeps the ego behind leaders and at red lights. A
    ``calm`` driver never pulls up and varies its speed less (0.6-1.2 times nominal instead of 0-1.4)."""
    entries: list = []
    t, previous = 0.0, v_nominal
    while t < duration:
        draw = rng.random()
        if not calm and draw < 0.15:
            factor = 0.0
        elif draw < 0.45:
            factor = rng.uniform(0.6, 0.8) if calm else rng.uniform(0.4, 0.75)
        elif draw < 0.75:
            factor = rng.uniform(0.9, 1.1)
        else:
            factor = rng.uniform(1.1, 1.2) if calm else rng.uniform(1.2, 1.4)
        target = factor * v_nominal
        steps, ramp = speed_ramp(t, previous, target, 2.5, 0.5)
        entries += steps
        hold = rng.uniform(1.5, 4.0)
        entries.append((t + ramp, t + ramp + hold, target))
        t, previous = t + ramp + hold, target
    return entries


def speed_ramp(t: float, v0: float, v1: float, rate: float, step: float) -> tuple[list, float]:
    """Schedule entries from time t that take the desired speed from v0 to v1 at about ``rate`` m/s^2 in pieces of
    ``step`` seconds (at least one), and how long that takes."""
    ramp = max(abs(v1 - v0) / rate, step)
    n = int(np.ceil(ramp / step))
    return [(t + i * ramp / n, t + (i + 1) * ramp / n, v0 + (v1 - v0) * (i + 1) / n) for i in range(n)], ramp
