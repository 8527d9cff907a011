"""What is trained for one checkpoint and kept beside its run: the visualisation decoder, the planner's cost heads,
the ego-status baseline. ``RUN/<kind>/<checkpoint stem>.pt`` for ``RUN/checkpoints/<stem>.pt`` (else beside the
checkpoint), written atomically with a JSON of its numbers beside it, and found again only for the exact
checkpoint it was trained for (its SHA-256 in the saved ``meta``): a retrained checkpoint gets new ones. The planner's
heads and the ego-status MLP also depend on the settings they are fitted with (shards, their config section,
horizon), so each set of settings has its own file, ``RUN/<kind>/<stem>-<settings digest>.pt``: two drivers or
evaluations that ask for different settings of one checkpoint each fit once and keep their own, instead of
refitting the one file in turn (:func:`settings_digest`; :func:`changed_settings` still guards what a file holds).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable, Optional

from drivejepa.errors import UserError
from drivejepa.io import atomic_path, atomic_write_json, file_sha256

log = logging.getLogger(__name__)


def settings_digest(settings: dict) -> str:
    """12 hex digits of the SHA-256 of ``settings`` as canonical JSON (sorted keys): the name of a set of settings."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def artifact_path(checkpoint: str | Path, kind: str, settings: Optional[dict] = None) -> Path:
    """RUN/<kind>/<checkpoint stem>.pt for RUN/checkpoints/<stem>.pt (else <checkpoint dir>/<kind>/<stem>.pt);
    with ``settings``, RUN/<kind>/<stem>-<settings digest>.pt."""
    checkpoint = Path(checkpoint)
    run = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    suffix = "" if settings is None else f"-{settings_digest(settings)}"
    return run / kind / f"{checkpoint.stem}{suffix}.pt"


def save_artifact(path: str | Path, state: dict, summary: dict) -> Path:
    """Atomically write ``state`` (plain tensors and numbers, loadable with ``weights_only=True``) and ``summary``
    as JSON beside it."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    atomic_write_json(Path(path).with_suffix(".json"), summary)
    return Path(path)


def load_artifact(path: str | Path, what: str) -> dict:
    """The saved state, or a UserError naming the file when it cannot be read."""
    import torch

    try:
        return torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise UserError(f"{path}: not a readable {what} ({type(exc).__name__}: {exc}); delete it to retrain") from exc


def find_artifact(checkpoint: str | Path, kind: str, what: str, fmt: Optional[int] = None,
                  settings: Optional[dict] = None) -> Optional[dict]:
    """The saved state of ``kind`` for this exact checkpoint (same SHA-256 in its ``meta``), for ``settings`` when
    given (:func:`artifact_path`) and, when ``fmt`` is given, of this code's format; else None (the caller fits a new
    one)."""
    path = artifact_path(checkpoint, kind, settings)
    if not path.is_file():
        return None
    state = load_artifact(path, what)
    if fmt is not None and state.get("format") != fmt:
        log.info("%s was written in format %s, this code reads %s; retraining", path, state.get("format"), fmt)
        return None
    if dict(state.get("meta", {})).get("checkpoint_sha256") != file_sha256(checkpoint):
        log.info("%s was trained for another version of %s; retraining", path, checkpoint)
        return None
    return state


def changed_settings(meta: dict, wanted: dict) -> Optional[str]:
    """None when the saved ``meta`` holds every setting of ``wanted`` (name -> value; dicts compared key by key,
    values as JSON) at the same value, else which differ, ``name: saved -> wanted`` (a missing one counts as
    changed): what a cached artifact was fitted with against what the caller asks for now."""
    import json

    def flat(prefix, value):
        if isinstance(value, dict):
            return {k: v for key, item in value.items() for k, v in flat(f"{prefix}.{key}", item).items()}
        return {prefix: json.loads(json.dumps(value))}

    saved, now = {}, {}
    for name, value in wanted.items():
        now.update(flat(name, value))
        saved.update(flat(name, meta[name]) if name in meta else {})
    changed = [f"{k}: {saved.get(k, '(not recorded)')} -> {v}" for k, v in now.items() if saved.get(k) != v]
    return "; ".join(changed) or None


def save_module(path: str | Path, module, spec, meta: dict, fmt: int) -> Path:
    """A torch module with its dataclass ``spec`` (what rebuilds it), ``meta`` and format version; the JSON beside it
    holds the spec and the meta."""
    state = {"format": fmt, "spec": dataclasses.asdict(spec), "meta": meta, "state_dict": module.state_dict()}
    return save_artifact(path, state, {"spec": state["spec"], **meta})


def module_from_state(state: dict, path, build: Callable[[dict], object], what: str, fmt: Optional[int] = None):
    """(module in eval mode, meta) of a state written by :func:`save_module`; ``build(spec dict)`` makes the empty
    module. A state of another format or whose weights do not fit is a UserError naming the file."""
    try:
        if fmt is not None and state.get("format") != fmt:
            raise ValueError(f"format {state.get('format')}, this code reads {fmt}")
        module = build(state["spec"])
        module.load_state_dict(state["state_dict"])
    except Exception as exc:
        raise UserError(f"{path}: not a readable {what} ({type(exc).__name__}: {exc}); delete it to retrain") from exc
    return module.eval(), dict(state.get("meta", {}))
