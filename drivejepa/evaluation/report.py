"""Outputs of an evaluation: metrics.json, report.md, plots (each PNG beside a JSON of its numbers), probes.pt.

Layout of ``metrics.json``: ``provenance`` (checkpoint, its config, shards, split, suite), ``settings`` (horizons in
key frames and seconds, methods, retrieval gallery and chance, the departing-window thresholds), ``headline``,
``overall`` / ``scenarios[name]`` / ``scenes[name]`` blocks (``latent_mse``, ``cosine_distance``,
``retrieval_top{k}``: method -> one value per future step; ``action_sensitivity``: shuffled minus true actions and
their ratio per step, and ``action_sensitivity_departing`` the same on the windows whose actions depart from the
previous one; ``occupancy_iou``: method -> one value per IoU horizon), ``probes`` (linear and MLP probe scores with
their latent-free baselines), ``collapse`` (diagnostics of the evaluated latents), ``windows`` (scene and start of
every evaluated window), ``counterfactual`` (branch points: top-1 and latent error per horizon for the model, the
action-blind rollout and copy-last, overall and per behaviour, beside chance; see evaluation/counterfactual.py) and,
with ``--action-blind-checkpoint``, ``action_blind_checkpoint``. Counterfactual branch scenes are in no factual block.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from drivejepa.io import atomic_path, atomic_write_json, atomic_write_text

LABELS = {"model": "model", "shuffled_actions": "model, shuffled actions", "copy_last": "copy last",
          "warp_last": "warp last (ego motion only)",
          "const_velocity": "constant velocity", "mean_of_context": "mean of context",
          "probe_on_true_future": "probe on true future latent",
          "const_velocity_boxes": "constant-velocity boxes", "copy_last_boxes": "copy-last boxes",
          "action_blind": "model, every action unknown", "chance": "chance (1/K)"}


def _clean(obj):
    """NaN and inf become null: metrics.json stays strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _f(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def _step(metrics: dict, seconds: float) -> Optional[int]:
    """0-based step index of a horizon in seconds, or None when the evaluation did not reach it."""
    for i, s in enumerate(metrics["settings"]["seconds"]):
        if abs(s - seconds) < 1e-6:
            return i
    return None


def headline_rows(metrics: dict, seconds=(0.5, 1.5, 3.0)) -> list[dict]:
    """Model against its baselines over all evaluated windows at the headline horizons (those within the
    evaluated horizon): latent MSE of each method, action sensitivity (on every window and on the departing ones),
    retrieval top-1 of model and copy-last, and the counterfactual top-1 of the model, the action-blind rollout and
    copy-last beside chance (None without branch points)."""
    rows = []
    overall = metrics["overall"]
    mse, top1 = overall["latent_mse"], overall.get("retrieval_top1", {})
    departing = overall.get("action_sensitivity_departing", {})
    cf = (metrics.get("counterfactual") or {}).get("overall", {})
    ci = (metrics.get("counterfactual") or {}).get("interval95") or {}
    for sec in seconds:
        i = _step(metrics, sec)
        if i is None:
            continue
        rows.append({
            "seconds": sec,
            **{f"mse_{m}": mse[m][i] for m in ("model", "copy_last", "warp_last", "const_velocity",
                                               "shuffled_actions") if m in mse},
            "action_sensitivity_gap": overall["action_sensitivity"]["mse_gap"][i],
            "action_sensitivity_ratio": overall["action_sensitivity"]["mse_ratio"][i],
            "action_sensitivity_ratio_departing": departing.get("mse_ratio", [None] * (i + 1))[i],
            "top1_model": top1.get("model", [None] * (i + 1))[i],
            "top1_copy_last": top1.get("copy_last", [None] * (i + 1))[i],
            **{f"counterfactual_top1_{m}": cf["top1"][m][i] if cf.get("futures") else None
               for m in ("model", "warp_last", "action_blind", "copy_last")},
            "counterfactual_chance": cf.get("chance"),
            **{f"counterfactual_{name}_95": [ci[key]["low"][i], ci[key]["high"][i]] if key in ci else None
               for name, key in (("top1_model", "model"), ("model_lead", "model_minus_warp_last"))},
        })
    return rows


def format_headline(metrics: dict) -> str:
    """The headline table as fixed-width text for a terminal (``make demo`` prints it)."""
    seconds = metrics.get("settings", {}).get("headline_seconds", (0.5, 1.5, 3.0))
    rows = headline_rows(metrics, seconds)
    st = metrics["settings"]
    dep = st.get("departing", {})
    head = (f"{'horizon':>8} | {'model':>8} {'copy-last':>9} {'warp-last':>9} {'const-vel':>9} {'shuffled':>9} | "
            f"{'act.gap':>8} {'act.ratio':>9} {'departing':>9} | {'top1 model':>10} {'top1 copy':>9}")
    lines = ["Latent prediction error (MSE, lower is better) and retrieval top-1 over "
             f"{st['windows']} windows (retrieval in each window's scene after its context, chance "
             f"{_f(st['retrieval_chance'].get('top1'), 3)}; act.ratio = shuffled / true actions, 'departing' on the "
             f"{dep.get('windows', 0)} windows whose actions change by >= {dep.get('dx_m', 'n/a')} m dx or "
             f">= {dep.get('dyaw_rad', 'n/a')} rad dyaw from one step to the next)", head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['seconds']:>7.1f}s | {_f(r['mse_model']):>8} {_f(r['mse_copy_last']):>9} "
                     f"{_f(r.get('mse_warp_last')):>9} {_f(r['mse_const_velocity']):>9} "
                     f"{_f(r['mse_shuffled_actions']):>9} | "
                     f"{_f(r['action_sensitivity_gap']):>8} {_f(r['action_sensitivity_ratio'], 3):>9} "
                     f"{_f(r.get('action_sensitivity_ratio_departing'), 3):>9} | "
                     f"{_f(r['top1_model'], 3):>10} {_f(r['top1_copy_last'], 3):>9}")
    cf = metrics.get("counterfactual") or {}
    lines.append("")
    if not cf.get("futures"):
        lines.append("Counterfactual top-1: no branch point in the evaluated split (a synthetic world written with "
                     "--branches K has them)")
        return "\n".join(lines)
    lines.append(f"Counterfactual top-1 over {cf['branch_points']} branch points ({cf['futures']} futures): rollout k "
                 f"with future k's actions is nearest future k's true latent (chance "
                 f"{_f(cf['overall']['chance'], 3)}; copy-last and action-blind are at chance by construction; "
                 f"warp-last carries frame b along each future's ego motion; 95% intervals from resampling the "
                 f"branch points, of the model's top-1 and of its lead over warp-last)")
    head = (f"{'horizon':>8} | {'model':>8} {'warp-last':>9} {'act.blind':>9} {'copy-last':>9} {'chance':>8} | "
            f"{'model 95%':>13} {'lead 95%':>14}")
    lines += [head, "-" * len(head)]

    def interval(v):
        return "n/a" if v is None else f"{v[0]:.2f} .. {v[1]:.2f}"

    for r in rows:
        lines.append(f"{r['seconds']:>7.1f}s | {_f(r['counterfactual_top1_model'], 3):>8} "
                     f"{_f(r.get('counterfactual_top1_warp_last'), 3):>9} "
                     f"{_f(r['counterfactual_top1_action_blind'], 3):>9} "
                     f"{_f(r['counterfactual_top1_copy_last'], 3):>9} {_f(r['counterfactual_chance'], 3):>8} | "
                     f"{interval(r.get('counterfactual_top1_model_95')):>13} "
                     f"{interval(r.get('counterfactual_model_lead_95')):>14}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# report.md
# ----------------------------------------------------------------------------------------------------------------
def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out + [""]


def _horizon_table(metrics: dict, block: dict) -> list[str]:
    methods = metrics["settings"]["methods"]
    ks = metrics["settings"]["retrieval_k"]
    header = ["horizon"] + [f"MSE {LABELS[m]}" for m in methods]
    header += [f"top-{k} {LABELS[m]}" for k in ks for m in methods]
    rows = []
    for i, sec in enumerate(metrics["settings"]["seconds"]):
        row = [f"{sec:.1f} s"] + [_f(block["latent_mse"][m][i]) for m in methods]
        row += [_f(block[f"retrieval_top{k}"][m][i], 3) for k in ks for m in methods]
        rows.append(row)
    return _table(header, rows)


def _occupancy_table(metrics: dict, block: dict) -> list[str]:
    occ = metrics["settings"]["occupancy"]
    if "occupancy_iou" not in block:
        return ["Occupancy forecasts were not computed (no probe was fitted or no IoU horizon is within the "
                "evaluated horizon).", ""]
    header = ["horizon"] + [LABELS[m] for m in occ["methods"]]
    rows = [[f"{sec:.1f} s"] + [_f(block["occupancy_iou"][m][j], 3) for m in occ["methods"]]
            for j, sec in enumerate(occ["seconds"])]
    return _table(header, rows)


def _breakdown_table(metrics: dict, blocks: dict, first_col: str, show_scenes: bool) -> list[str]:
    seconds = metrics["settings"]["seconds"]
    last = len(seconds) - 1
    occ_s = metrics["settings"]["occupancy"]["seconds"]
    header = [first_col] + (["scenes"] if show_scenes else ["description"]) + ["windows"]
    header += [f"MSE@{seconds[0]:.1f}s model / copy / cv / shuffled", f"MSE@{seconds[last]:.1f}s model / copy / cv / "
               "shuffled", f"top-1@{seconds[last]:.1f}s model / copy", f"action ratio@{seconds[last]:.1f}s"]
    if occ_s:
        header.append(f"occ. IoU@{occ_s[-1]:.1f}s model / cv boxes / copy boxes")
    rows = []
    for name, b in blocks.items():
        if not b["windows"]:
            rows.append([name, str(len(b["scenes"])) if show_scenes else b.get("description", ""), "0"]
                        + ["n/a"] * (len(header) - 3))
            continue
        mse = b["latent_mse"]
        row = [name, str(len(b["scenes"])) if show_scenes else b.get("description", ""), str(b["windows"])]
        for i in (0, last):
            row.append(" / ".join(_f(mse[m][i]) for m in ("model", "copy_last", "const_velocity", "shuffled_actions")))
        top1 = b.get("retrieval_top1", {})
        row.append(" / ".join(_f(top1[m][last], 3) for m in ("model", "copy_last")) if top1 else "n/a")
        row.append(_f(b["action_sensitivity"]["mse_ratio"][last], 3))
        if occ_s:
            occ = b.get("occupancy_iou")
            row.append(" / ".join(_f(occ[m][-1], 3) for m in ("model", "const_velocity_boxes", "copy_last_boxes"))
                       if occ else "n/a")
        rows.append(row)
    return _table(header, rows)


def _probe_table(probes: Optional[dict]) -> list[str]:
    if not probes:
        return ["No probe was fitted: the train split has no scene in the shard directory.", ""]
    header = ["probe", "speed MAE (m/s)", "speed R²", "yaw rate MAE (rad/s)", "yaw rate R²", "agent count MAE",
              "agent count R²", "occupancy IoU"]
    rows = []
    for kind in ("linear", "mlp"):
        p = probes[kind]
        rows.append([kind, _f(p["speed"]["mae"], 3), _f(p["speed"]["r2"], 3), _f(p["yaw_rate"]["mae"], 4),
                     _f(p["yaw_rate"]["r2"], 3), _f(p["agent_count"]["mae"], 2), _f(p["agent_count"]["r2"], 3),
                     _f(p["occupancy"]["iou"], 3)])
    base = probes["linear"]
    rows.append(["baseline (train mean / prior grid)", _f(base["speed"]["mae_train_mean"], 3), "0 by definition",
                 _f(base["yaw_rate"]["mae_train_mean"], 4), "0 by definition",
                 _f(base["agent_count"]["mae_train_mean"], 2), "0 by definition",
                 _f(base["occupancy"]["iou_prior_grid"], 3)])
    return _table(header, rows)


def _counterfactual_section(metrics: dict) -> list[str]:
    cf = metrics["counterfactual"]
    seconds = cf["seconds"]
    sizes = ", ".join(f"{n} with {k}" for k, n in cf["futures_per_point"].items())
    out = [f"{cf['branch_points']} branch points ({sizes} futures; {cf['futures']} futures in all). At each, the "
           "predictor is rolled out from the shared context once per future with that future's actions; future k "
           "scores 1 at horizon h when its own true latent is the nearest of the K true latents to rollout k. "
           "Chance is 1/K per point. Copy-last and the action-blind rollout (every action the model's 'unknown' "
           "token) make one prediction for all K futures, so they score 1/K by construction; "
           f"{cf['ties']} (the expected score of a random tie-break, not a win).", ""]
    o = cf["overall"]
    header = ["horizon"] + [f"top-1 {LABELS[m]}" for m in cf["methods"]] + ["chance"] + \
        [f"MSE {LABELS[m]}" for m in cf["methods"]]
    rows = [[f"{sec:.1f} s"] + [_f(o["top1"][m][i], 3) for m in cf["methods"]] + [_f(o["chance"], 3)]
            + [_f(o["latent_mse"][m][i]) for m in cf["methods"]] for i, sec in enumerate(seconds)]
    out += _table(header, rows)
    diff = cf.get("differences") or {}
    if diff:
        out += ["", "How the rollouts of a point differ, over every pair of its futures: the energy of the "
                "rollouts' differences against the futures' (1 = as far apart as the futures, 0 = the action does "
                "not move them) and the cosine between the two (1 = the same directions, 0 = unrelated).", ""]
        header = ["horizon"] + [f"{kind} {LABELS[m]}" for kind in ("energy", "cosine") for m in diff]
        rows = [[f"{sec:.1f} s"] + [_f(diff[m][kind][i], 3) for kind in ("energy", "cosine") for m in diff]
                for i, sec in enumerate(seconds)]
        out += _table(header, rows)
    idx = [i for i, sec in enumerate(seconds) if any(abs(sec - h) < 1e-6
                                                      for h in metrics["settings"].get("headline_seconds", []))]
    idx = idx or [len(seconds) - 1]
    header = ["behaviour", "futures", "chance"] + [f"top-1 model @{seconds[i]:.1f}s" for i in idx] + \
        [f"MSE model / copy-last @{seconds[-1]:.1f}s"]
    rows = []
    for name, b in cf["behaviours"].items():
        rows.append([name, str(b["futures"]), _f(b["chance"], 3)] + [_f(b["top1"]["model"][i], 3) for i in idx]
                    + [f"{_f(b['latent_mse']['model'][-1])} / {_f(b['latent_mse']['copy_last'][-1])}"])
    return out + _table(header, rows)


def _action_blind_section(metrics: dict) -> list[str]:
    ab = metrics["action_blind_checkpoint"]
    seconds = metrics["settings"]["seconds"]
    ours = metrics["overall"]["latent_mse"]
    cf = ab.get("counterfactual") or {}
    main_cf = (metrics.get("counterfactual") or {}).get("overall", {})
    out = [f"`{ab['checkpoint']}` (sha256 {ab['checkpoint_sha256'][:16]}, step {ab.get('step')}), trained with "
           "`model.action_dropout=1.0`: it never saw an action. Its latents are not the evaluated model's, so each "
           f"model is compared with its own copy-last ({ab['windows']} windows, `{ab['metric_space']}` space).", ""]
    header = ["horizon", "MSE / copy-last, evaluated model", "MSE / copy-last, action-blind training",
              "counterfactual top-1, evaluated model", "counterfactual top-1, action-blind training"]
    rows = []
    for i, sec in enumerate(seconds):
        ratio = ours["model"][i] / ours["copy_last"][i] if ours["copy_last"][i] else None
        rows.append([f"{sec:.1f} s", _f(ratio, 3), _f(ab["ratio_to_copy_last"][i], 3),
                     _f(main_cf["top1"]["model"][i], 3) if main_cf.get("futures") else "n/a",
                     _f(cf["top1"]["model"][i], 3) if cf else "n/a"])
    return out + _table(header, rows)


def render_markdown(metrics: dict, plots: list[str]) -> str:
    prov, st = metrics["provenance"], metrics["settings"]
    lines = ["# Scenario evaluation", "", "## Provenance", ""]
    lines += [f"- checkpoint: `{prov['checkpoint']}` (sha256 {prov['checkpoint_sha256'][:16]}, step "
              f"{prov.get('step')}, config hash {prov['config_hash']})",
              f"- shards: `{prov['shards']}` (preprocess config hash {prov.get('shards_config_hash')}), split "
              f"`{prov['split']}`: {len(prov['eval_scenes'])} scenes; probes fitted on split `{prov['train_split']}`: "
              f"{len(prov['train_scenes'])} scenes",
              f"- suite: `{prov['suite']}`; evaluated {st['windows']} windows of {prov['context']} context + "
              f"{st['horizon']} future key frames (counterfactual branch scenes left out: they are in the "
              f"Counterfactual futures section); retrieval gallery: {st['retrieval_gallery']}, "
              f"{_f(st['gallery_size_mean'], 1)} frames on average (chance top-1 "
              f"{_f(st['retrieval_chance'].get('top1'), 3)}; copy-last's prediction, the last context frame, is not "
              f"in the gallery, so its top-1 is not 0 by construction); latents compared in "
              f"`{prov['metric_space']}` space",
              f"- written {prov['created']} by drivejepa {prov['drivejepa_version']}"]
    lines += [f"- skipped scene {s['scene']} ({s['role']}): {s['reason']}" for s in prov.get("skipped_scenes", [])]
    lines += [""]
    lines += ["## Headline", "", "```", format_headline(metrics), "```", "",
              "Action sensitivity = error with shuffled actions minus error with the true actions (gap) and their "
              "ratio; a ratio near 1 means the predictions ignore the actions.", ""]
    lines += ["## Latent prediction per horizon (all windows)", "", *_horizon_table(metrics, metrics["overall"])]
    sens = metrics["overall"]["action_sensitivity"]
    dep = metrics["overall"].get("action_sensitivity_departing", {"windows": 0})
    thr = st.get("departing", {})
    lines += ["## Action sensitivity per horizon", "",
              "Shuffled actions: each window rolled out from its own context with another window's past and future "
              f"actions. Departing windows: the {dep['windows']} of {st['windows']} windows in which two consecutive "
              f"actions among a_(t-1)..a_(t+H-1) differ by at least {thr.get('dx_m')} m in dx or "
              f"{thr.get('dyaw_rad')} rad in dyaw, where continuing the past motion does not give the future.", ""]
    lines += _table(["horizon", "MSE gap (shuffled - true)", "MSE ratio (shuffled / true)",
                     f"MSE gap, departing ({dep['windows']} windows)", "MSE ratio, departing"],
                    [[f"{s:.1f} s", _f(sens["mse_gap"][i]), _f(sens["mse_ratio"][i], 3),
                      _f(dep.get("mse_gap", [None] * (i + 1))[i]), _f(dep.get("mse_ratio", [None] * (i + 1))[i], 3)]
                     for i, s in enumerate(st["seconds"])])
    lines += ["## Occupancy forecasts (all windows)", "",
              f"IoU of the bird's-eye agent occupancy ({st['occupancy']['grid_size']}x{st['occupancy']['grid_size']} "
              f"cells over +-{st['occupancy']['grid_range']:g} m); the model's grid is the {st['occupancy']['forecast_probe']} "
              "probe applied to the predicted latent.", "", *_occupancy_table(metrics, metrics["overall"])]
    if (metrics.get("counterfactual") or {}).get("futures"):      # else the headline says there is none
        lines += ["## Counterfactual futures", "", *_counterfactual_section(metrics)]
    if metrics.get("action_blind_checkpoint"):
        lines += ["## Baseline: the same recipe trained with every action masked", "",
                  *_action_blind_section(metrics)]
    lines += ["## Scenarios", "", *_breakdown_table(metrics, metrics["scenarios"], "scenario", True)]
    lines += ["## Probes (eval split target latents)", "", *_probe_table(metrics.get("probes"))]
    lines += ["## Collapse diagnostics", ""]
    col = metrics["collapse"]
    keys = sorted({k for v in col.values() for k in v})
    lines += _table(["latents"] + keys, [[name] + [_f(v.get(k)) for k in keys] for name, v in col.items()])
    lines += ["## Scenes", "", *_breakdown_table(metrics, metrics["scenes"], "scene", False)]
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------------
def plot_vs_horizon(out_dir: Path, name: str, title: str, ylabel: str, seconds: list[float],
                    series: dict[str, dict[str, list]], log_y: bool = False) -> str:
    """One axis per scenario, every method on it; writes NAME.png and NAME.json (the plotted numbers).
    ``log_y`` for errors, whose baselines can differ from the model by orders of magnitude."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(series)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (scenario, methods) in zip(axes.ravel(), series.items()):
        for method, values in methods.items():
            ys = [float("nan") if v is None else v for v in values]
            ax.plot(seconds, ys, marker="o", label=LABELS.get(method, method),
                    linestyle="-" if method == "model" else "--")
        ax.set_title(scenario)
        ax.set_xlabel("horizon (s)")
        ax.set_ylabel(ylabel)
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    handles, labels = axes.ravel()[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    png = out_dir / f"{name}.png"
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    atomic_write_json(out_dir / f"{name}.json", _clean({"title": title, "ylabel": ylabel, "seconds": seconds,
                                                        "series": series}))
    return png.name


def write_plots(out_dir: Path, metrics: dict) -> list[str]:
    st = metrics["settings"]
    blocks = {name: b for name, b in metrics["scenarios"].items() if b["windows"]}
    plots = [plot_vs_horizon(out_dir, "latent_mse_vs_horizon", "Latent prediction error", "MSE (log scale)",
                             st["seconds"], {n: b["latent_mse"] for n, b in blocks.items()}, log_y=True)]
    if 1 in st["retrieval_k"]:
        plots.append(plot_vs_horizon(out_dir, "retrieval_top1_vs_horizon", "Retrieval top-1 accuracy", "top-1",
                                     st["seconds"], {n: b["retrieval_top1"] for n, b in blocks.items()}))
    occ_blocks = {n: b["occupancy_iou"] for n, b in blocks.items() if "occupancy_iou" in b}
    if occ_blocks and st["occupancy"]["seconds"]:
        plots.append(plot_vs_horizon(out_dir, "occupancy_iou_vs_horizon", "Occupancy forecast IoU", "IoU",
                                     st["occupancy"]["seconds"], occ_blocks))
    cf = metrics.get("counterfactual") or {}
    if cf.get("futures"):
        panels = {"all": cf["overall"], **cf["behaviours"]}
        series = {f"{name} ({b['futures']})": {**b["top1"], "chance": [b["chance"]] * len(cf["seconds"])}
                  for name, b in panels.items() if b["futures"]}
        plots.append(plot_vs_horizon(out_dir, "counterfactual_top1_vs_horizon",
                                     f"Counterfactual top-1 over {cf['branch_points']} branch points (futures per "
                                     "panel)", "top-1", cf["seconds"], series))
    return plots


def write_outputs(out_dir: str | Path, metrics: dict, fitted_probes: Optional[dict]) -> dict:
    """Write every output atomically; returns their paths."""
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = _clean(metrics)
    plots = write_plots(out_dir, metrics)
    paths = {"metrics": atomic_write_json(out_dir / "metrics.json", metrics),
             "report": atomic_write_text(out_dir / "report.md", render_markdown(metrics, plots)),
             "plots": [out_dir / p for p in plots]}
    if fitted_probes:
        state = {kind: {task: p.state() for task, p in probes.items()}
                 for kind, probes in fitted_probes.items() if kind in ("linear", "mlp")}
        state["prior_grid"] = torch.from_numpy(fitted_probes["prior_grid"])
        state["provenance"] = {"checkpoint": metrics["provenance"]["checkpoint"],
                               "checkpoint_sha256": metrics["provenance"]["checkpoint_sha256"]}
        with atomic_path(out_dir / "probes.pt") as tmp:
            torch.save(state, tmp)
        paths["probes"] = out_dir / "probes.pt"
    return paths
