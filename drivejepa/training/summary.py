"""The one-screen report printed at the end of ``drivejepa train``, from the summary dict ``train`` returns."""
from __future__ import annotations


def format_summary(summary: dict, horizon: int) -> str:
    """The one-screen report printed at the end of ``drivejepa train``."""
    lines = [
        f"run            {summary['run_dir']}",
        f"steps          {summary['steps']} ({summary['epochs']:.1f} epochs) in {summary['seconds']:.0f} s on "
        f"{summary['device']} x {summary['processes']}, {summary['parameters'] / 1e6:.2f}M parameters",
        f"precision      {summary['precision']['name']} ({summary['precision']['reason']})",
        f"throughput     {summary['windows_per_s']:.1f} windows/s, {100 * summary['data_wait_share']:.1f}% of step "
        "time waiting for data",
        f"train loss     {summary['train_loss']:.4f}" if summary["train_loss"] is not None else "train loss     -",
        f"skipped steps  {summary['bad_steps']} (non-finite)",
    ]
    val = summary["val"]
    if val.get("windows"):
        lines.append(f"validation     {int(val['windows'])} windows; latent error (model / copy-last / ratio), "
                     "action ratio (shuffled / true actions):")
        nan = float("nan")
        for k in range(1, horizon + 1):
            lines.append(f"  +{k} frames    {val[f'err_h{k}']:.4f} / {val[f'copy_last_h{k}']:.4f} / "
                         f"{val[f'ratio_h{k}']:.3f}   {val.get(f'action_ratio_h{k}', nan):.3f}")
        lines.append(f"  mean         {val['err']:.4f} / {val['copy_last']:.4f} / {val['ratio']:.3f}   "
                     f"{val.get('action_ratio', nan):.3f}  "
                     f"({'beats' if summary['beats_copy_last'] else 'does NOT beat'} copy-last at every horizon)")
        lines.append(f"collapse       std_mean {val.get('diag_std_mean', float('nan')):.3f}, effective rank "
                     f"{val.get('diag_effective_rank', float('nan')):.1f}")
    else:
        lines.append("validation     none (no held-out windows)")
    stage = summary.get("predictor_stage")
    if stage:
        val = stage["val"]
        lines.append(f"predictor      {stage['steps']} steps on {stage['train_windows']} windows' cached latents in "
                     f"{stage['seconds']:.0f} s (caching {stage['cache_seconds']:.0f} s): val error / copy-last "
                     f"{stage['start_error']:.3f} -> {val.get('ratio', float('nan')):.3f}"
                     + (f" (+{horizon} frames {val[f'ratio_h{horizon}']:.3f}, action ratio "
                        f"{val.get('action_ratio', float('nan')):.3f})" if val.get("windows") else ""))
    lines += [f"checkpoints    {summary['last_checkpoint']}", f"               {summary['best_checkpoint']}"
              + (f" (best val error / copy-last {summary['best_error']:.3f})" if summary["best_error"] is not None
                 else "")]
    return "\n".join(lines)
