"""Precision chosen by the hardware: optim.amp = auto | true | false on CPUs with and without native bf16, and CUDA."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from drivejepa import precision
from drivejepa.config import TrainConfig, load_config
from drivejepa.precision import choose_precision

CPU = torch.device("cpu")


def _cpu(monkeypatch, native: bool) -> None:
    evidence = "ATen CPU capability AVX512, AVX512-BF16 yes" if native else "ATen CPU capability AVX2, AVX512-BF16 no"
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: (native, evidence))


@pytest.mark.parametrize("native", [True, False])
def test_auto_on_cpu_follows_native_bf16(monkeypatch, native):
    _cpu(monkeypatch, native)
    p = choose_precision(CPU, "auto", "auto")
    assert p.dtype == ("bfloat16" if native else None) and not p.grad_scaler
    assert ("native bf16" in p.reason) and (native or "emulated" in p.reason)
    with p.autocast():
        y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == (torch.bfloat16 if native else torch.float32)


def test_explicit_choices_override_auto_and_warn_with_the_cost(monkeypatch, caplog):
    _cpu(monkeypatch, False)
    with caplog.at_level(logging.WARNING, logger="drivejepa.precision"):
        forced = choose_precision(CPU, True, "auto")
    assert forced.dtype == "bfloat16" and "emulated" in forced.reason
    assert any("6-15x slower" in r.getMessage() for r in caplog.records)
    _cpu(monkeypatch, True)
    assert choose_precision(CPU, False, "auto").dtype is None
    with pytest.raises(ValueError, match="optim.amp"):
        choose_precision(CPU, "sometimes", "auto")


@pytest.mark.parametrize("bf16", [True, False])
def test_auto_on_cuda_is_bf16_where_supported_else_fp16_with_a_scaler(monkeypatch, bf16):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Test GPU")
    p = choose_precision(torch.device("cuda", 0), "auto", "auto")
    assert p.dtype == ("bfloat16" if bf16 else "float16") and p.grad_scaler == (not bf16)
    assert "Test GPU" in p.reason
    assert choose_precision(torch.device("cuda", 0), True, "float16").grad_scaler


def test_avx2_kernels_count_as_no_native_bf16():
    """ATEN_CPU_CAPABILITY=avx2 on an AVX512-BF16 CPU runs AVX2 kernels, which emulate bf16: auto must say fp32."""
    code = "from drivejepa.precision import cpu_bf16_support as s; n, e = s(); print(n); print(e)"
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    native, evidence = out.stdout.splitlines()[:2]
    assert native == "False" and "AVX2" in evidence


def test_every_shipped_training_config_chooses_precision_automatically(repo_root):
    for path in sorted((repo_root / "pipelines").glob("train_*.yaml")):
        assert load_config(TrainConfig, path).optim.amp == "auto", path.name


def test_a_run_records_its_precision_and_why(smoke_run):
    summary = json.loads((smoke_run / "summary.json").read_text())
    chosen = choose_precision(CPU, "auto", "auto")
    assert summary["precision"] == chosen.as_dict()
    events = [json.loads(line) for line in (smoke_run / "metrics.jsonl").read_text().splitlines()]
    recorded = [e for e in events if e.get("event") == "precision"]
    assert recorded and recorded[0]["reason"] == chosen.reason


@pytest.mark.parametrize("native", [True, False])
def test_training_uses_the_choice_for_both_answers(monkeypatch, shard_dir, repo_root, tmp_path, native):
    from drivejepa.training.distributed import DistInfo
    from drivejepa.training.trainer import _Run

    _cpu(monkeypatch, native)
    cfg = load_config(TrainConfig, repo_root / "pipelines/train_smoke.yaml", [f"data.shards={shard_dir}"])
    job = _Run(cfg, tmp_path / "run", DistInfo(device=CPU), progress=False)
    assert job.precision.dtype == ("bfloat16" if native else None)
    assert not job.scaler.is_enabled()
    batch = next(iter(job.loader))
    with job.autocast():
        states = job.model.encode_sequence({k: batch[k] for k in ("lidar", "lidar_mask")})
    assert states.dtype == (torch.bfloat16 if native else torch.float32)
