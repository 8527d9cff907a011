"""The traffic simulation: every mover rolled forward at DT, vehicles by the intelligent driver model (IDM)."""
from __future__ import annotations

import copy
from typing import Optional

import numpy as np

from drivejepa.data.synth.builder import Mover
from drivejepa.data.synth.geometry import Path

DT = 0.05                       # simulation step, seconds (the 20 Hz lidar rate)


def _green(signals: dict, group: str, t: float) -> bool:
    return any(a <= t < b for a, b in signals.get(group, [(-1e9, 1e9)]))


class PathBank:
    """All movers' paths resampled every STEP metres into padded arrays, for vectorised look-ups."""
    STEP = 1.0

    def __init__(self, paths: list[Path]):
        self.length = np.array([p.length for p in paths])
        n = int(np.ceil(self.length.max() / self.STEP)) + 2
        self.x = np.zeros((len(paths), n))
        self.y = np.zeros((len(paths), n))
        self.h = np.zeros((len(paths), n))
        self.k = np.zeros((len(paths), n))
        grid = np.arange(n) * self.STEP
        for i, p in enumerate(paths):
            g = np.minimum(grid, p.length)
            self.x[i], self.y[i], self.h[i] = p.at(g)
            self.k[i] = np.interp(g, p.s, p.curvature)
        self.n = n

    def at(self, s: np.ndarray):
        """s: [M] or [M, L] arc lengths (row i on path i) -> x, y, heading, curvature of the same shape."""
        s = np.asarray(s, dtype=np.float64)
        rows = np.arange(len(self.length)).reshape((-1,) + (1,) * (s.ndim - 1))
        f = np.clip(s, 0, None) / self.STEP
        i0 = np.minimum(np.floor(f).astype(np.int64), self.n - 2)
        a = np.clip(f - i0, 0, 1)
        out = []
        for arr in (self.x, self.y, self.h, self.k):
            out.append((1 - a) * arr[rows, i0] + a * arr[rows, i0 + 1])
        return out


def simulate(movers: list[Mover], signals: dict, duration: float, start: float = 0.0, state=None):
    """Roll the traffic forward at DT from scene time ``start`` for ``duration`` seconds; returns arc lengths and
    speeds [K, M] and active flags. ``state`` = (arc lengths, speeds, active flags) [M] at ``start`` resumes a
    simulation (a counterfactual branch) instead of starting every mover at its ``s0`` and ``v_init``."""
    K = int(round(duration / DT)) + 1
    traffic = Traffic(movers, signals, start, state)
    M = len(movers)
    S = np.zeros((K, M))
    V = np.zeros((K, M))
    A = np.ones((K, M), dtype=bool)
    for k in range(K):
        S[k], V[k], A[k] = traffic.s, traffic.v, traffic.active
        if k < K - 1:
            traffic.step()
    return S, V, A


class Traffic:
    """The traffic simulation's state (arc lengths, speeds, active flags [M] at step ``k``) and its DT step.

    Vehicles follow the intelligent driver model: desired speed (capped for curves ahead), the nearest mover in a
    corridor along their own path ahead (pedestrians with a wider margin), and red stop lines they can still stop for.
    A leader is found by its position, wherever it is: mover j leads vehicle i when j lies within a lateral margin of
    i's own path ahead and heads roughly the same way (pedestrians in any heading). So a mover that is not on its
    path (the closed-loop ego, drivejepa/driving) is seen where it really is: :meth:`step` takes its pose and speed
    and everyone else brakes behind it or yields to it as they would behind a mover on a path.
    """

    def __init__(self, movers: list[Mover], signals: dict, start: float = 0.0, state=None):
        self.movers, self.signals, self.start = movers, signals, start
        self.k = 0
        self.bank = bank = PathBank([m.path for m in movers])
        if state is None:
            self.s = np.array([m.s0 for m in movers], dtype=np.float64)
            self.v = np.array([m.v_init for m in movers], dtype=np.float64)
            self.active = self.s < bank.length
        else:
            self.s, self.v, self.active = (np.array(x) for x in state)
        M = len(movers)
        self.width = np.array([m.size[0] for m in movers])
        self.length = np.array([m.size[1] for m in movers])
        self.walker = np.array([m.walker for m in movers])
        self.vehicle = ~self.walker
        self.v_des = np.array([m.v_desired for m in movers])
        self.a_max = np.array([m.accel for m in movers])
        self.t_start = np.array([m.t_start for m in movers])
        self.look = np.linspace(0.0, 50.0, 26)
        self.ends = bank.length - 0.5
        w = self.width
        self.lat = np.where(self.walker[None, :], 0.5 * w[:, None] + 1.6, 0.5 * (w[:, None] + w[None, :]) + 0.35)
        self.other_len = np.where(self.walker, 0.6, 0.5 * self.length)
        self.stops = [(i, s_stop, g) for i, m in enumerate(movers) for s_stop, g in m.stop_lines]
        self.sched = [(i, t0, t1, vd) for i, m in enumerate(movers) for t0, t1, vd in m.schedule]
        self.eye = np.eye(M, dtype=bool)

    @property
    def t(self) -> float:
        """Scene time of the current state."""
        return self.start + self.k * DT

    def copy(self) -> "Traffic":
        """An independent copy of the state (the movers and precomputed tables are shared)."""
        other = copy.copy(self)
        other.s, other.v, other.active = self.s.copy(), self.v.copy(), self.active.copy()
        return other

    def poses(self):
        """x, y, heading [M] of every mover on its path (the path table's interpolation the IDM itself uses)."""
        px, py, yaw, _ = self.bank.at(self.s)
        return px, py, yaw

    def step(self, placed: Optional[dict] = None) -> None:
        """Advance one DT. ``placed`` = {mover index: (x, y, heading, speed)}: movers that are not on their path this
        step (local frame). Everyone else sees them there; their own arc length and speed are left as they were."""
        b_comf, T, s_min = 2.5, 1.2, 2.5
        bank, look, lat, length, walker = self.bank, self.look, self.lat, self.length, self.walker
        s, v, active = self.s, self.v, self.active
        t = self.t
        px, py, yaw, _ = bank.at(s)
        v_seen, seen = v, active
        if placed:
            v_seen, seen = v.copy(), active.copy()
            for i, (x, y, h, speed) in placed.items():
                px[i], py[i], yaw[i], v_seen[i], seen[i] = x, y, h, speed, True
        v0 = self.v_des.copy()
        for i, t0, t1, vd in self.sched:
            if t0 <= t < t1:
                v0[i] = vd
        sa = np.minimum(s[:, None] + look[None], bank.length[:, None])
        ax, ay, ah, ak = bank.at(sa)                                    # [M, L]
        v_curve = np.sqrt(2.2 / np.maximum(ak, 1e-4))
        v0 = np.minimum(v0, np.min(np.sqrt(v_curve ** 2 + 4.0 * look[None]), axis=1))
        M = len(s)
        gap = np.full(M, np.inf)
        v_lead = np.zeros(M)
        dx, dy = px[None, :] - px[:, None], py[None, :] - py[:, None]       # [i, j]: j relative to i
        near = ((dx * dx + dy * dy < 55.0 ** 2) & (dx * np.cos(yaw)[:, None] + dy * np.sin(yaw)[:, None] > 0.0)
                & seen[None, :] & seen[:, None] & self.vehicle[:, None] & ~self.eye)
        ii, jj = np.nonzero(near)
        if len(ii):
            d = np.hypot(ax[ii] - px[jj, None], ay[ii] - py[jj, None])                     # [P, L]
            jb = np.argmin(d, axis=1)
            dmin = d[np.arange(len(ii)), jb]
            cos = np.cos(yaw[jj] - ah[ii, jb])
            hit = (dmin < lat[ii, jj]) & (look[jb] > 0.5 * length[ii]) & (walker[jj] | (cos > 0.5))
            if hit.any():
                ii, jj, jb, cos = ii[hit], jj[hit], jb[hit], cos[hit]
                g = look[jb] - 0.5 * length[ii] - self.other_len[jj]
                order = np.lexsort((g, ii))                 # per mover i, the nearest first
                first = order[np.concatenate([[True], ii[order][1:] != ii[order][:-1]])]
                gap[ii[first]] = g[first]
                v_lead[ii[first]] = np.where(walker[jj[first]], 0.0, v_seen[jj[first]] * np.maximum(cos[first], 0.0))
        for i, s_stop, g in self.stops:
            dist = s_stop - (s[i] + 0.5 * length[i])
            if 0.0 < dist + 0.3 < 60.0 and not _green(self.signals, g, t):
                if v[i] ** 2 / (2 * max(dist, 0.1)) < 5.0 and dist < gap[i]:
                    gap[i], v_lead[i] = max(dist, 0.05), 0.0
        a_max = self.a_max
        free = 1 - (v / np.maximum(v0, 0.05)) ** 4
        s_star = np.maximum(s_min + v * T + v * (v - v_lead) / (2 * np.sqrt(a_max * b_comf)), 0.0)
        inter = np.where(np.isfinite(gap), (s_star / np.maximum(gap, 0.05)) ** 2, 0.0)
        acc = np.clip(a_max * (free - inter), -7.0, a_max)
        v_walk = np.where((t >= self.t_start) & (s < bank.length), self.v_des, 0.0)
        v_new = np.where(walker, v_walk, np.maximum(v + acc * DT, 0.0))
        v_new = np.where(active, v_new, 0.0)
        s_new = s + v_new * DT
        active_new = active & ((s_new < self.ends) | walker)
        if placed:
            keep = list(placed)
            s_new[keep], v_new[keep], active_new[keep] = s[keep], v[keep], active[keep]
        self.s, self.v, self.active = s_new, v_new, active_new
        self.k += 1
