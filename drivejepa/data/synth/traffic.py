"""The traffic simulation: every mover rolled forward at DT, vehicles by the intelligent driver model (IDM)."""
from __future__ import annotations

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
    simulation (a counterfactual branch) instead of starting every mover at its ``s0`` and ``v_init``.

    Vehicles follow the intelligent driver model: desired speed (capped for curves ahead), the nearest mover in a
    corridor along their own path ahead (pedestrians with a wider margin), and red stop lines they can still stop for.
    """
    K = int(round(duration / DT)) + 1
    M = len(movers)
    bank = PathBank([m.path for m in movers])
    if state is None:
        s = np.array([m.s0 for m in movers], dtype=np.float64)
        v = np.array([m.v_init for m in movers], dtype=np.float64)
        active = s < bank.length
    else:
        s, v, active = (np.array(x) for x in state)
    S = np.zeros((K, M))
    V = np.zeros((K, M))
    A = np.ones((K, M), dtype=bool)
    width = np.array([m.size[0] for m in movers])
    length = np.array([m.size[1] for m in movers])
    walker = np.array([m.walker for m in movers])
    vehicle = ~walker
    v_des = np.array([m.v_desired for m in movers])
    a_max = np.array([m.accel for m in movers])
    t_start = np.array([m.t_start for m in movers])
    look = np.linspace(0.0, 50.0, 26)
    ends = bank.length - 0.5
    b_comf, T, s_min = 2.5, 1.2, 2.5
    lat = np.where(walker[None, :], 0.5 * width[:, None] + 1.6, 0.5 * (width[:, None] + width[None, :]) + 0.35)
    other_len = np.where(walker, 0.6, 0.5 * length)
    stops = [(i, s_stop, g) for i, m in enumerate(movers) for s_stop, g in m.stop_lines]
    sched = [(i, t0, t1, vd) for i, m in enumerate(movers) for t0, t1, vd in m.schedule]
    eye = np.eye(M, dtype=bool)
    for k in range(K):
        t = start + k * DT
        S[k], V[k], A[k] = s, v, active
        if k == K - 1:
            break
        px, py, yaw, _ = bank.at(s)
        v0 = v_des.copy()
        for i, t0, t1, vd in sched:
            if t0 <= t < t1:
                v0[i] = vd
        sa = np.minimum(s[:, None] + look[None], bank.length[:, None])
        ax, ay, ah, ak = bank.at(sa)                                    # [M, L]
        v_curve = np.sqrt(2.2 / np.maximum(ak, 1e-4))
        v0 = np.minimum(v0, np.min(np.sqrt(v_curve ** 2 + 4.0 * look[None]), axis=1))
        gap = np.full(M, np.inf)
        v_lead = np.zeros(M)
        dx, dy = px[None, :] - px[:, None], py[None, :] - py[:, None]       # [i, j]: j relative to i
        near = ((dx * dx + dy * dy < 55.0 ** 2) & (dx * np.cos(yaw)[:, None] + dy * np.sin(yaw)[:, None] > 0.0)
                & active[None, :] & active[:, None] & vehicle[:, None] & ~eye)
        ii, jj = np.nonzero(near)
        if len(ii):
            d = np.hypot(ax[ii] - px[jj, None], ay[ii] - py[jj, None])                     # [P, L]
            jb = np.argmin(d, axis=1)
            dmin = d[np.arange(len(ii)), jb]
            cos = np.cos(yaw[jj] - ah[ii, jb])
            hit = (dmin < lat[ii, jj]) & (look[jb] > 0.5 * length[ii]) & (walker[jj] | (cos > 0.5))
            if hit.any():
                ii, jj, jb, cos = ii[hit], jj[hit], jb[hit], cos[hit]
                g = look[jb] - 0.5 * length[ii] - other_len[jj]
                order = np.lexsort((g, ii))                 # per mover i, the nearest first
                first = order[np.concatenate([[True], ii[order][1:] != ii[order][:-1]])]
                gap[ii[first]] = g[first]
                v_lead[ii[first]] = np.where(walker[jj[first]], 0.0, v[jj[first]] * np.maximum(cos[first], 0.0))
        for i, s_stop, g in stops:
            dist = s_stop - (s[i] + 0.5 * length[i])
            if 0.0 < dist + 0.3 < 60.0 and not _green(signals, g, t):
                if v[i] ** 2 / (2 * max(dist, 0.1)) < 5.0 and dist < gap[i]:
                    gap[i], v_lead[i] = max(dist, 0.05), 0.0
        free = 1 - (v / np.maximum(v0, 0.05)) ** 4
        s_star = np.maximum(s_min + v * T + v * (v - v_lead) / (2 * np.sqrt(a_max * b_comf)), 0.0)
        inter = np.where(np.isfinite(gap), (s_star / np.maximum(gap, 0.05)) ** 2, 0.0)
        acc = np.clip(a_max * (free - inter), -7.0, a_max)
        v_walk = np.where((t >= t_start) & (s < bank.length), v_des, 0.0)
        v = np.where(walker, v_walk, np.maximum(v + acc * DT, 0.0))
        v = np.where(active, v, 0.0)
        s = s + v * DT
        active = active & ((s < ends) | walker)
    return S, V, A
