"""Typed configs: dataclasses loaded from YAML, overridable with dotted keys.

One YAML per experiment (``pipelines/*.yaml``). ``load_config(TrainConfig, path, ["optim.lr=1e-4"])`` reads the
file, applies the overrides and checks every value against the dataclass field types. An unknown key or a value of
the wrong type raises :class:`ConfigError` naming the key and where it came from (the file or the command line).
Values are parsed with ``yaml.safe_load``: configs are data, never executed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value that does not fit the schema; the message names the key and its source."""


# ----------------------------------------------------------------------------------------------------------------
# Generic mechanism
# ----------------------------------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Return ``value`` checked (and, for lossless cases, converted) against the annotation ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping of {tp.__name__} fields, got {value!r}")
        return _from_dict(tp, value, source, prefix=key + ".")
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError:
                continue
        raise ConfigError(f"{source}: '{key}' = {value!r} is not a {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: '{key}' = {value!r} must be one of {list(args)}")
        return value
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' = {value!r} must be a list")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{source}: '{key}' = {value!r} must have {len(args)} items")
            return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' = {value!r} must be a mapping")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: '{key}' = {value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: '{key}' = {value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML reads exponent forms without a dot ("1e-4") as strings; accept them as numbers.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: '{key}' = {value!r} must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: '{key}' = {value!r} must be a string")
        return value
    raise ConfigError(f"{source}: '{key}' has an unsupported type {_type_name(tp)}")


def _from_dict(cls: type[T], data: dict, source: str, prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(
                f"{source}: unknown key '{prefix}{key}' (valid keys of {cls.__name__}: {', '.join(sorted(names))})"
            )
    kwargs = {k: _coerce(v, hints[k], prefix + k, source) for k, v in data.items()}
    return cls(**kwargs)


def from_dict(cls: type[T], data: Optional[dict], source: str = "<dict>") -> T:
    """Build ``cls`` from a plain mapping, checking keys and types."""
    return _from_dict(cls, data or {}, source)


def apply_override(cfg: Any, assignment: str) -> None:
    """Apply one ``dotted.key=value`` override (value parsed as YAML) in place."""
    source = "command line"
    if "=" not in assignment:
        raise ConfigError(f"{source}: override '{assignment}' must look like key=value (for example optim.lr=1e-4)")
    key, raw = assignment.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: cannot parse the value of '{key}': {exc}") from exc
    parts = key.split(".")
    node = cfg
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(node):
            raise ConfigError(f"{source}: unknown key '{key}' ('{'.'.join(parts[:i])}' has no sub-keys)")
        names = {f.name for f in dataclasses.fields(node)}
        if part not in names:
            raise ConfigError(
                f"{source}: unknown key '{key}' (valid keys here: {', '.join(sorted(names))})"
            )
        if i == len(parts) - 1:
            tp = typing.get_type_hints(type(node))[part]
            if dataclasses.is_dataclass(tp) and isinstance(value, dict):
                current = dataclasses.asdict(getattr(node, part))
                current.update(value)
                value = current
            setattr(node, part, _coerce(value, tp, key, source))
        else:
            node = getattr(node, part)


def load_config(cls: type[T], path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> T:
    """Load ``cls`` from a YAML file (or its defaults when ``path`` is None) and apply dotted overrides."""
    data: dict = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"{source}: config file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(data).__name__}")
    cfg = _from_dict(cls, data, source)
    for assignment in overrides:
        apply_override(cfg, assignment)
    return cfg


def config_to_dict(cfg: Any) -> dict:
    """Plain, YAML/JSON-serialisable mapping of a config (tuples become lists)."""
    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v
    return plain(dataclasses.asdict(cfg))


def config_hash(cfg: Any) -> str:
    """Stable short hash of a config's values (used to detect stale outputs)."""
    blob = json.dumps(config_to_dict(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML, atomically; loading it back gives the same config."""
    from drivejepa.io import atomic_write_text

    return atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


# ----------------------------------------------------------------------------------------------------------------
# Schemas. Each stage owns one dataclass; YAML files in pipelines/ and eval/ fill them.
# ----------------------------------------------------------------------------------------------------------------
ALL_CAMERAS = ["CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_RIGHT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_FRONT_LEFT"]
ALL_RADARS = ["RADAR_FRONT", "RADAR_FRONT_LEFT", "RADAR_FRONT_RIGHT", "RADAR_BACK_LEFT", "RADAR_BACK_RIGHT"]


@dataclasses.dataclass
class PreprocessConfig:
    """What one key frame of a shard holds (see drivejepa/data/shards.py for the schema)."""
    cameras: list[str] = dataclasses.field(default_factory=lambda: ["CAM_FRONT"])
    image_size: tuple[int, int] = (224, 128)          # (width, height) after resize
    lidar_points: int = 4096                          # fixed count after cropping / sampling
    lidar_range: float = 50.0                         # keep |x|, |y| <= range (metres, ego frame)
    lidar_z_range: tuple[float, float] = (-3.0, 5.0)
    lidar_sweeps: int = 1                             # 1 = key frame only; >1 accumulates previous sweeps
    lidar_min_distance: float = 1.0                   # drop returns with |x|, |y| < this (sensor frame, every sweep)
    radar_points: int = 128                           # merged over the five radars, padded with a mask
    max_boxes: int = 64                               # nearest annotated boxes kept per key frame
    box_range: float = 50.0
    seed: int = 0                                     # point subsampling is seeded per frame from this


@dataclasses.dataclass
class DataConfig:
    """Windows of consecutive key frames read from shards."""
    shards: str = ""                                  # shard directory (also settable with --shards)
    train_split: str = "train"
    val_split: str = "val"
    context: int = 2                                  # observed key frames
    horizon: int = 6                                  # predicted key frames (0.5 s each)
    stride: int = 1                                   # step between window starts
    cameras: list[str] = dataclasses.field(default_factory=lambda: ["CAM_FRONT"])
    batch_size: int = 8
    num_workers: int = 0


@dataclasses.dataclass
class ModelConfig:
    """Sizes of the encoder branches, the fusion transformer and the predictor."""
    size: Literal["tiny", "demo", "base", "custom"] = "demo"
    latent_dim: int = 256
    image_backbone: str = "resnet18"
    image_weights: str = ""                           # local .pth/.safetensors file; empty = random init
    image_size: Optional[tuple[int, int]] = None      # (width, height) the backbone sees; null = as in the shards
    image_tokens: int = 8                             # tokens per camera after pooling
    lidar_widths: list[int] = dataclasses.field(default_factory=lambda: [64, 128, 256])
    lidar_tokens: int = 16
    radar_widths: list[int] = dataclasses.field(default_factory=lambda: [32, 64, 128])
    radar_tokens: int = 4
    fusion_depth: int = 2
    fusion_heads: int = 4
    predictor_depth: int = 2
    predictor_heads: int = 4
    mlp_ratio: float = 2.0
    drop_path: float = 0.1
    modality_dropout: float = 0.1
    action_dropout: float = 0.1                       # training: share of actions replaced by the 'unknown' token
    action_dim: int = 5                               # dx, dy, dyaw, speed, yaw_rate
    max_context: int = 16


@dataclasses.dataclass
class LossConfig:
    objective: Literal["jepa", "infonce"] = "jepa"
    regression: Literal["smooth_l1", "mse"] = "smooth_l1"
    normalize_targets: bool = True
    temperature: float = 0.1
    vicreg_weight: float = 0.0
    vicreg_var_weight: float = 1.0
    vicreg_cov_weight: float = 0.04
    rollout_steps: int = 3                            # K for the autoregressive rollout loss
    rollout_weight: float = 0.5
    idm_weight: float = 0.0                           # inverse-dynamics regulariser (models/inverse_dynamics.py)
    ema_start: float = 0.99
    ema_end: float = 0.999


@dataclasses.dataclass
class OptimConfig:
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup_steps: int = 50
    t0: int = 500                                     # CosineAnnealingWarmRestarts T_0 (steps)
    t_mult: int = 1
    min_lr: float = 1e-6
    clip_grad: float = 1.0
    epochs: int = 10
    max_steps: int = 0                                # 0 = run all epochs
    # Mixed precision (drivejepa/precision.py): auto = bf16 on CUDA where supported, else fp16 + GradScaler; on a
    # CPU bf16 only with native bf16 (AVX512-BF16 / AMX), else fp32. true forces autocast, false forces fp32.
    amp: Union[bool, Literal["auto"]] = "auto"
    amp_dtype: Literal["auto", "bfloat16", "float16"] = "auto"   # CUDA autocast dtype; auto = bf16 where supported


@dataclasses.dataclass
class TrainConfig:
    seed: int = 0
    device: str = "auto"                              # auto | cpu | cuda | cuda:N
    deterministic: bool = False
    threads: int = 0                                  # torch intra-op threads; 0 = leave as is
    log_every: int = 10
    ckpt_every: int = 100                             # steps between resumable checkpoints
    max_bad_steps: int = 5                            # consecutive non-finite losses before stopping
    sync_batchnorm: bool = True                       # DDP on CUDA: BatchNorm statistics over all GPUs
    keep_checkpoints: int = 2                         # step_XXXXXXX.pt files kept (one per epoch)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)


@dataclasses.dataclass
class EvalConfig:
    """Scenario evaluation (``drivejepa evaluate``); a suite file in ``eval/scenarios/`` fills it.

    ``scenarios`` maps a name to a filter over the scenes of the evaluated split (see
    ``drivejepa/evaluation/scenarios.py``): ``{}`` = every scene; ``any`` / ``all`` / ``none`` = phrases matched as
    whole words in the scene description; ``scenes`` = an explicit list of scene names."""
    horizon: int = 0                                  # key frames rolled out; 0 = the checkpoint's data.horizon
    frame_seconds: float = 0.5                        # time between key frames (nuScenes: 2 Hz)
    batch_size: int = 16                              # frames encoded at once
    device: str = "auto"                              # auto (CUDA when available) | cpu | cuda | cuda:N
    shuffle_seed: int = 0                             # permutation of actions across windows (shuffled baseline)
    retrieval_k: list[int] = dataclasses.field(default_factory=lambda: [1, 5])
    headline_seconds: list[float] = dataclasses.field(default_factory=lambda: [0.5, 1.5, 3.0])
    iou_seconds: list[float] = dataclasses.field(default_factory=lambda: [1.0, 2.0, 3.0])
    train_split: str = "train"                        # probes are fitted on this split's target latents
    max_train_scenes: int = 0                         # 0 = every train scene
    probe_seed: int = 0
    probe_epochs: int = 300                           # full-batch optimiser steps per probe
    probe_hidden: int = 256
    probe_lr: float = 3e-3
    probe_weight_decay: float = 1e-4
    forecast_probe: Literal["linear", "mlp"] = "mlp"  # probe that turns predicted latents into occupancy
    grid_size: int = 16                               # BEV occupancy cells per side
    grid_range: float = 32.0                          # the grid covers [-range, range] metres around the ego
    count_radius: float = 30.0                        # agents counted within this distance (metres)
    agent_classes: list[str] = dataclasses.field(default_factory=lambda: [
        "car", "truck", "bus", "trailer", "construction_vehicle", "pedestrian", "motorcycle", "bicycle"])
    scenarios: dict[str, Any] = dataclasses.field(default_factory=lambda: {"all": {}})
