"""Turning the workers' latents, rollouts and labels into every number of the report.

Every metric is computed per window and future step first, then averaged over the windows of a block: all windows,
each scenario of the suite, each scene. Retrieval searches, for each window, the key frames of its own scene after
its context (``metrics.retrieval_ranks``); its chance level is the mean of 1/gallery size over the windows. Action
sensitivity is reported on every window and on the windows whose actions depart from the previous one
(``plan.departing_windows``), where the past alone cannot tell the future motion.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from drivejepa import baselines as B
from drivejepa import latent_space
from drivejepa.config import EvalConfig
from drivejepa.evaluation import metrics as M
from drivejepa.evaluation import probes as P
from drivejepa.evaluation.latents import future_index

METHODS = ("model", "shuffled_actions", "copy_last", "warp_last", "const_velocity", "mean_of_context")
OCC_METHODS = ("model", "probe_on_true_future", "const_velocity_boxes", "copy_last_boxes")


def _nanmean(x: np.ndarray, axis=0):
    x = np.asarray(x, dtype=np.float64)
    if x.shape[axis] == 0:
        return np.full(np.delete(x.shape, axis), np.nan)
    return x.mean(axis=axis)


class Windows:
    """Every evaluated window, stacked: per method predictions and per-step errors and retrieval ranks."""

    def __init__(self, eval_results: list[dict], horizon: int, context: int, retrieval_k: list[int]):
        import torch

        self.horizon = horizon
        self.retrieval_k = retrieval_k
        self.gallery = np.concatenate([r["target"] for r in eval_results])
        self.online = np.concatenate([r["online"] for r in eval_results])
        preds = {m: [] for m in METHODS}
        truth, scene, starts, departing, gallery_sizes = [], [], [], [], []
        for r in eval_results:
            s = np.asarray(r["starts"], dtype=np.int64)
            fut = future_index(s, horizon)
            truth.append(r["target"][fut])
            scene += [r["scene"]] * len(s)
            starts.append(s)
            departing.append(np.asarray(r.get("departing", np.zeros(len(s), bool)), dtype=bool))
            gallery_sizes.append(len(r["target"]) - 1 - s)
            preds["model"].append(r["model"])
            preds["shuffled_actions"].append(r["shuffled_actions"])
            preds["warp_last"].append(r["warp_last"])
            # frames s-n+1..s (n >= 2: window starts have a previous frame for the constant-velocity baseline)
            n = max(context, 2)
            ctx = torch.from_numpy(r["target"][s[:, None] + np.arange(-n + 1, 1)[None, :]])
            preds["copy_last"].append(B.copy_last(ctx, horizon).numpy())
            preds["const_velocity"].append(B.constant_velocity(ctx, horizon).numpy())
            preds["mean_of_context"].append(B.mean_of_context(ctx[:, n - context:], horizon).numpy())
        self.truth = np.concatenate(truth)
        self.scene = np.array(scene)
        self.starts = np.concatenate(starts)
        self.departing = np.concatenate(departing)
        self.gallery_sizes = np.concatenate(gallery_sizes)
        self.preds = {m: np.concatenate(v) for m, v in preds.items()}
        truth64 = torch.from_numpy(self.truth).double()
        self.mse = {m: latent_space.distance(torch.from_numpy(p).double(), truth64).numpy()
                    for m, p in self.preds.items()}
        w, h = self.truth.shape[:2]
        flat_truth = self.truth.reshape(w, h, -1)
        self.cosine = {m: M.cosine_distance(p.reshape(w, h, -1), flat_truth) for m, p in self.preds.items()}
        bounds = np.cumsum([0] + [len(r["starts"]) for r in eval_results])
        self.ranks = {m: np.concatenate([M.retrieval_ranks(p[lo:hi], r["target"], r["starts"])
                                         for r, lo, hi in zip(eval_results, bounds[:-1], bounds[1:])])
                      for m, p in self.preds.items()}

    def __len__(self) -> int:
        return len(self.scene)

    def block(self, mask: np.ndarray) -> dict:
        """Per-step metrics of the windows in ``mask``, every method side by side."""
        out = {"windows": int(mask.sum()),
               "latent_mse": {m: _nanmean(v[mask]).tolist() for m, v in self.mse.items()},
               "cosine_distance": {m: _nanmean(v[mask]).tolist() for m, v in self.cosine.items()}}
        for k in self.retrieval_k:
            out[f"retrieval_top{k}"] = {m: M.topk_accuracy(v[mask], k).tolist() for m, v in self.ranks.items()}
        out["action_sensitivity"] = self._sensitivity(mask)
        out["action_sensitivity_departing"] = {"windows": int((mask & self.departing).sum()),
                                               **self._sensitivity(mask & self.departing)}
        return out

    def _sensitivity(self, mask: np.ndarray) -> dict:
        model, shuffled = _nanmean(self.mse["model"][mask]), _nanmean(self.mse["shuffled_actions"][mask])
        with np.errstate(divide="ignore", invalid="ignore"):
            return {"mse_gap": (shuffled - model).tolist(), "mse_ratio": (shuffled / model).tolist()}


def _stack(results: list[dict], key: str) -> np.ndarray:
    return np.concatenate([r[key] for r in results])


def _labels(results: list[dict]) -> dict:
    return {k: np.concatenate([r["labels"][k] for r in results]) for k in results[0]["labels"]}


class ProbeInputs:
    """Where probes read the states: tokens as they are (regression) and on the evaluation grid (occupancy)."""

    def __init__(self, cfg: EvalConfig, model_grid: tuple[int, float]):
        self.cfg, self.model_grid = cfg, model_grid

    def occupancy(self, states: np.ndarray) -> np.ndarray:
        return P.tokens_on_grid(states, *self.model_grid, self.cfg.grid_size, self.cfg.grid_range)


def fit_probes(train_results: list[dict], cfg: EvalConfig, inputs: ProbeInputs) -> dict:
    """kind -> task -> FittedProbe, fitted on the train scenes' target states (frames with valid motion labels only
    for speed and yaw rate)."""
    x = _stack(train_results, "target")
    labels = _labels(train_results)
    groups = np.concatenate([[r["scene"]] * len(r["target"]) for r in train_results])
    common = dict(epochs=cfg.probe_epochs, lr=cfg.probe_lr, weight_decay=cfg.probe_weight_decay,
                  hidden=cfg.probe_hidden, seed=cfg.probe_seed)
    grid_tokens = inputs.occupancy(x)
    fitted: dict = {}
    for kind in ("linear", "mlp"):
        fitted[kind] = {}
        for task in P.REGRESSION_TASKS:
            keep = labels["motion_valid"] if task in ("speed", "yaw_rate") else np.ones(len(x), bool)
            fitted[kind][task] = P.fit_regression_probe(task, kind, x[keep], labels[task][keep], groups[keep],
                                                        **common)
        fitted[kind]["occupancy"] = P.fit_occupancy_probe(kind, grid_tokens, labels["occupancy"], **common)
    fitted["prior_grid"] = P.prior_grid(labels["occupancy"])
    return fitted


def probe_scores(fitted: dict, eval_results: list[dict], inputs: ProbeInputs) -> dict:
    """Probe accuracy on the evaluated split's target states, each beside its latent-free baseline."""
    x = _stack(eval_results, "target")
    labels = _labels(eval_results)
    grid_tokens = inputs.occupancy(x)
    out: dict = {}
    for kind in ("linear", "mlp"):
        out[kind] = {}
        for task in P.REGRESSION_TASKS:
            keep = labels["motion_valid"] if task in ("speed", "yaw_rate") else np.ones(len(x), bool)
            probe = fitted[kind][task]
            out[kind][task] = {**P.regression_scores(probe.predict(x[keep]), labels[task][keep], probe.y_mean),
                               **probe.extra}
        occ = fitted[kind]["occupancy"]
        out[kind]["occupancy"] = {"iou": P.iou(occ.predict_occupancy(grid_tokens), labels["occupancy"]),
                                  "iou_prior_grid": P.iou(np.broadcast_to(fitted["prior_grid"],
                                                                          labels["occupancy"].shape),
                                                          labels["occupancy"]),
                                  "threshold": occ.threshold, "n": int(len(x))}
    return out


class OccupancyForecasts:
    """Occupancy grids at the IoU horizons for every window: the probe on predicted states and the baselines."""

    def __init__(self, windows: Windows, eval_results: list[dict], probe: "P.FittedProbe", steps: list[int],
                 inputs: ProbeInputs):
        self.steps = steps
        grids = {m: [] for m in OCC_METHODS}
        truth = []
        for r in eval_results:
            s = np.asarray(r["starts"], dtype=np.int64)
            occ = r["labels"]["occupancy"]
            fut = future_index(s, windows.horizon)[:, [k - 1 for k in steps]]
            truth.append(occ[fut])
            grids["copy_last_boxes"].append(np.repeat(occ[s][:, None], len(steps), axis=1))
            grids["const_velocity_boxes"].append(r["cv_box_grids"][:, [k - 1 for k in steps]])
            grids["probe_on_true_future"].append(self._probe(probe, inputs, r["target"][fut]))
            grids["model"].append(self._probe(probe, inputs, r["model"][:, [k - 1 for k in steps]]))
        self.truth = np.concatenate(truth)
        self.grids = {m: np.concatenate(v) for m, v in grids.items()}

    @staticmethod
    def _probe(probe, inputs: ProbeInputs, states: np.ndarray) -> np.ndarray:
        w, n = states.shape[:2]
        flat = inputs.occupancy(states.reshape(w * n, *states.shape[2:]))
        return probe.predict_occupancy(flat).reshape(w, n, -1)

    def block(self, mask: np.ndarray) -> dict:
        return {m: [P.iou(g[mask, j], self.truth[mask, j]) for j in range(len(self.steps))]
                for m, g in self.grids.items()}


def score(eval_results: list[dict], train_results: list[dict], cfg: EvalConfig, horizon: int, context: int,
          scenario_scenes: dict[str, list[str]], model_grid: tuple[int, float],
          space: str = "layer_norm") -> tuple[dict, Optional[dict]]:
    """(metrics without provenance, fitted probes or None). See report.py for the layout of the metrics."""
    import torch

    from drivejepa.diagnostics import collapse_diagnostics

    windows = Windows(eval_results, horizon, context, cfg.retrieval_k)
    seconds = [round(k * cfg.frame_seconds, 6) for k in range(1, horizon + 1)]
    iou_steps = [k for k in (int(round(t / cfg.frame_seconds)) for t in cfg.iou_seconds) if 1 <= k <= horizon]
    inputs = ProbeInputs(cfg, model_grid)
    fitted = fit_probes(train_results, cfg, inputs) if train_results else None
    forecasts = OccupancyForecasts(windows, eval_results, fitted[cfg.forecast_probe]["occupancy"], iou_steps,
                                   inputs) if fitted and iou_steps else None

    def block(mask: np.ndarray) -> dict:
        b = windows.block(mask)
        if forecasts is not None:
            b["occupancy_iou"] = forecasts.block(mask)
        return b

    everything = np.ones(len(windows), bool)
    scenarios = {}
    for name, scenes in scenario_scenes.items():
        mask = np.isin(windows.scene, scenes)
        scenarios[name] = {"scenes": list(scenes), **block(mask)}
    per_scene = {r["scene"]: {"description": r["description"], **block(windows.scene == r["scene"])}
                 for r in eval_results}
    k1 = torch.from_numpy(windows.preds["model"][:, 0])
    metrics = {
        "settings": {"horizon": horizon, "seconds": seconds, "frame_seconds": cfg.frame_seconds,
                     "methods": list(METHODS), "retrieval_k": list(cfg.retrieval_k),
                     "retrieval_gallery": "each window's own scene, key frames after its context",
                     "gallery_size_mean": float(np.mean(windows.gallery_sizes)) if len(windows) else None,
                     "windows": int(len(windows)),
                     "retrieval_chance": {f"top{k}": M.chance_topk(windows.gallery_sizes, k) for k in cfg.retrieval_k},
                     "departing": {"dx_m": cfg.departure_dx, "dyaw_rad": cfg.departure_dyaw,
                                   "windows": int(windows.departing.sum())},
                     "occupancy": {"steps": iou_steps, "seconds": [round(k * cfg.frame_seconds, 6) for k in iou_steps],
                                   "methods": list(OCC_METHODS), "forecast_probe": cfg.forecast_probe,
                                   "grid_size": cfg.grid_size, "grid_range": cfg.grid_range}},
        "overall": block(everything),
        "scenarios": scenarios,
        "scenes": per_scene,
        "probes": probe_scores(fitted, eval_results, inputs) if fitted else None,
        "collapse": {
            "target_summaries": {**collapse_diagnostics(latent_space.summary(torch.from_numpy(windows.gallery),
                                                                               space)),
                                 "dim": int(windows.gallery.shape[-1])},
            "target_latents": collapse_diagnostics(torch.from_numpy(windows.gallery)),
            "online_latents": collapse_diagnostics(torch.from_numpy(windows.online)),
            "predictions_0.5s": collapse_diagnostics(k1, k1, torch.from_numpy(windows.truth[:, 0]),
                                                     torch.from_numpy(windows.preds["copy_last"][:, 0])),
        },
        "windows": {"scene": windows.scene.tolist(), "start": windows.starts.tolist()},
    }
    return metrics, fitted
