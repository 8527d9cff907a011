"""Scalars to TensorBoard (RUN/tb/) and the same scalars, one JSON object a line, to RUN/metrics.jsonl.

A resumed run first cuts both logs back to the checkpoint's step (``truncate_after``; TensorBoard's ``purge_step``),
so after a kill and a resume the logs read as one uninterrupted run."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Optional

from drivejepa.io import atomic_write_text

log = logging.getLogger(__name__)


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a metrics.jsonl; a line cut short by a kill (the last one) is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s: ignoring a truncated line", path)
    return records


def truncate_after(path: str | Path, step: int) -> None:
    """Keep only records up to ``step`` (records written after the checkpoint a run resumes from are redone)."""
    path = Path(path)
    if not path.exists():
        return
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


class MetricsLogger:
    """Writes on the main rank only; on other ranks every method does nothing."""

    def __init__(self, run_dir: str | Path, *, enabled: bool = True, resume_step: Optional[int] = None,
                 name: str = "metrics"):
        """Records go to ``RUN/<name>.jsonl`` and TensorBoard's ``RUN/tb`` (``RUN/tb/<name>`` for another name: a
        stage with its own step count, such as the predictor stage); ``resume_step`` drops the records after it."""
        self.enabled = enabled
        self.path = Path(run_dir) / f"{name}.jsonl"
        self._writer = None
        self._fh = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        if resume_step is not None:
            truncate_after(self.path, resume_step)
        self._writer = SummaryWriter(str(Path(run_dir) / "tb" / ("" if name == "metrics" else name)),
                                     purge_step=None if resume_step is None else resume_step + 1)
        self._fh = open(self.path, "a", encoding="utf-8")

    def scalars(self, split: str, step: int, values: dict[str, Any], **extra: Any) -> None:
        """Log numeric ``values`` as ``split/name`` in TensorBoard and as one JSONL record."""
        if not self.enabled:
            return
        record: dict[str, Any] = {"split": split, "step": step}
        record.update(extra)
        for name, value in values.items():
            value = float(value)
            record[name] = value if math.isfinite(value) else str(value)
            self._writer.add_scalar(f"{split}/{name}", value, step)
        self._write(record)

    def event(self, kind: str, step: int, **fields: Any) -> None:
        """A non-scalar event (a skipped batch, a stop) in the JSONL and as TensorBoard text."""
        if not self.enabled:
            return
        record = {"split": "event", "event": kind, "step": step, **fields}
        self._writer.add_text(f"events/{kind}", json.dumps(fields), step)
        self._write(record)

    def _write(self, record: dict) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
        if self._fh is not None:
            self._fh.close()
        self._writer = self._fh = None
