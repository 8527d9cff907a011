"""Numeric precision of training and planning, chosen from the hardware (``optim.amp`` / ``amp`` of a plan config:
``auto | true | false``).

bf16 autocast only pays where the hardware computes in bf16. On a CPU without AVX512-BF16 or AMX, PyTorch emulates
it: measured on an AVX2-only machine of this project's kind, forward and backward of 8 images at 128x224 took 0.57 s
in fp32 and 8.25 s in bf16 for ResNet18 (0.11 s vs 0.62 s for timm's test_efficientnet), and the demo's training
step went from 1.1 s to 11-13 s. So ``auto`` picks:

- CUDA: bf16 where the GPU supports it, else fp16 with a GradScaler;
- CPU: bf16 where the CPU has native bf16 (ATen runs its AVX512 kernels and the CPU has AVX512-BF16 or AMX), else
  fp32.

``true`` forces autocast (warning, with that cost, on a CPU that would emulate it), ``false`` forces fp32.
``optim.amp_dtype`` picks the CUDA dtype (``auto``: bf16 where supported); CPU autocast is always bf16.
The choice and its reason are logged by the trainer and saved in ``RUN/summary.json`` and ``metrics.jsonl``; the
planner (drivejepa/planning/planner.py) logs its own. Planning only runs forward passes, so the trade is the same
(bf16 where it is native, for speed) and no GradScaler is involved.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Optional, Union

import torch

log = logging.getLogger(__name__)

EMULATED_BF16_COST = ("bf16 autocast is emulated on this CPU and measured 6-15x slower than fp32 "
                      "(ResNet18 forward+backward of 8 images at 128x224: 0.57 s fp32 vs 8.25 s bf16 on an AVX2 CPU)")


@dataclasses.dataclass(frozen=True)
class Precision:
    """The autocast dtype of a run (None = fp32), whether a GradScaler goes with it, and why it was chosen."""
    device_type: str
    dtype: Optional[str]
    reason: str

    @property
    def grad_scaler(self) -> bool:
        return self.dtype == "float16" and self.device_type == "cuda"

    @property
    def name(self) -> str:
        return {"bfloat16": "bf16 autocast", "float16": "fp16 autocast + GradScaler"}.get(self.dtype or "", "fp32")

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=getattr(torch, self.dtype))

    def as_dict(self) -> dict:
        return {"device_type": self.device_type, "dtype": self.dtype or "float32", "name": self.name,
                "reason": self.reason}


def cpu_bf16_support() -> tuple[bool, str]:
    """(native bf16 on this CPU, the evidence). ATen's kernel level counts, not only the CPU flags: with
    ``ATEN_CPU_CAPABILITY=avx2`` an AVX512-BF16 CPU runs the AVX2 kernels and emulates bf16."""
    capability = torch.backends.cpu.get_cpu_capability()
    avx512_bf16 = bool(torch.cpu._is_avx512_bf16_supported())
    amx = bool(torch.cpu._is_amx_tile_supported())
    native = capability.upper().startswith("AVX512") and (avx512_bf16 or amx)
    evidence = (f"ATen CPU capability {capability}, AVX512-BF16 {'yes' if avx512_bf16 else 'no'}, "
                f"AMX {'yes' if amx else 'no'}")
    return native, evidence


def choose_precision(device: torch.device, amp: Union[bool, str] = "auto", amp_dtype: str = "auto",
                     setting: str = "optim.amp") -> Precision:
    """The precision ``amp`` / ``amp_dtype`` mean on ``device`` (see the module docstring); ``setting`` is the config
    key they came from, named in errors and in the reason."""
    if amp not in (True, False, "auto"):
        raise ValueError(f"{setting} must be auto, true or false, got {amp!r}")
    if amp_dtype not in ("auto", "bfloat16", "float16"):
        raise ValueError(f"{setting}_dtype must be auto, bfloat16 or float16, got {amp_dtype!r}")
    kind = device.type
    if amp is False:
        return Precision(kind, None, f"{setting} = false")
    if kind == "cuda":
        bf16 = bool(torch.cuda.is_bf16_supported())
        name = torch.cuda.get_device_name(device)
        if amp_dtype == "auto":
            dtype = "bfloat16" if bf16 else "float16"
            why = f"{name} {'supports' if bf16 else 'does not support'} bf16"
        else:
            dtype, why = amp_dtype, f"{setting}_dtype = {amp_dtype} on {name}"
        return Precision(kind, dtype, f"{setting} = {amp}: {why}")
    if kind != "cpu":
        return Precision(kind, None, f"no autocast policy for device type '{kind}': fp32")
    native, evidence = cpu_bf16_support()
    if amp == "auto":
        if native:
            return Precision(kind, "bfloat16", f"{setting} = auto: native bf16 on this CPU ({evidence})")
        return Precision(kind, None, f"{setting} = auto: no native bf16 on this CPU ({evidence}), where "
                                     f"{EMULATED_BF16_COST}")
    reason = f"{setting} = true ({evidence})"
    if not native:
        log.warning("%s = true on a CPU without native bf16 (%s): %s. Use %s=auto or false.", setting, evidence,
                    EMULATED_BF16_COST, setting)
        reason += f"; {EMULATED_BF16_COST}"
    if amp_dtype == "float16":
        reason += f"; {setting}_dtype = float16 applies to CUDA, CPU autocast is bf16"
    return Precision(kind, "bfloat16", reason)
