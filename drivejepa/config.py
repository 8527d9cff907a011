"""Typed configs: dataclasses loaded from YAML, overridable with dotted keys.

One YAML per experiment (``pipelines/*.yaml``). ``load_config(TrainConfig, path, ["optim.lr=1e-4"])`` reads the
file, applies the overrides and checks every value against the dataclass field types, then against its range and
the other fields (:func:`check_config`: positive sizes, heads dividing the width, a horizon of at least 1, lr > 0,
camera names of the devkit). An unknown key, a value of the wrong type or out of range raises :class:`ConfigError`
naming the key and where it came from (the file or the command line).
Values are parsed with ``yaml.safe_load``: configs are data, never executed.

Model sizes: ``model.size`` (tiny / demo / base) fills every architecture field left unset (None); a field set to
a value that contradicts the preset is an error; ``custom`` fills unset fields from the demo preset.
:func:`resolve_model_config` is the one place this happens, and a checkpoint stores the resolved fields.
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
    check_config(cfg, source if not overrides else f"{source} + command line")
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
    """Stable short hash of a config's values, or of a plain mapping of them (used to detect stale outputs)."""
    blob = json.dumps(config_to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg, sort_keys=True).encode()
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
    drivable_size: int = 200                          # cells per side of the drivable-area grid (from the map)
    drivable_range: float = 50.0                      # the drivable grid covers [-range, range] metres (0.5 m cells)
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
    sibling_batches: bool = False                     # windows that share a context (branches) batched together


@dataclasses.dataclass
class ModelConfig:
    """Sizes of the bird's-eye state, the encoder branches, the fusion transformer and the predictor. Architecture
    fields left None are filled by the ``size`` preset (:data:`SIZE_PRESETS`, :func:`resolve_model_config`).

    The state is a ``bev_size x bev_size`` grid of ``latent_dim``-channel tokens over ``[-bev_range, bev_range]``
    metres around the ego (drivejepa/models/bev.py)."""
    size: Literal["tiny", "demo", "base", "custom"] = "demo"
    latent_dim: Optional[int] = None                  # channels of each BEV token (and width of the transformers)
    bev_size: Optional[int] = None                    # cells per side of the state grid
    bev_range: float = 32.0                           # metres: the grid covers [-range, range] in x and y
    pillar_factor: Optional[int] = None               # lidar pillars per cell side (pooled to a cell by a conv)
    image_backbone: str = "resnet18"
    image_weights: str = ""                           # local .pth/.safetensors file; empty = random init
    image_size: Optional[tuple[int, int]] = None      # (width, height) the backbone sees; null = as in the shards
    image_stage: Optional[int] = None                 # last backbone stage used (2: stride 8, 3: 16, 4: 32)
    lift_heights: list[float] = dataclasses.field(default_factory=lambda: [0.5, 1.5])   # metres, sampled per cell
    lidar_widths: Optional[list[int]] = None
    radar_widths: Optional[list[int]] = None
    fusion_depth: Optional[int] = None
    fusion_heads: Optional[int] = None
    predictor_depth: Optional[int] = None
    predictor_heads: Optional[int] = None
    mlp_ratio: Optional[float] = None
    drop_path: float = 0.1
    modality_dropout: float = 0.1
    # Training: share of actions replaced by the 'unknown' token. 1 = every action, in training and every rollout:
    # the action-blind model that `drivejepa evaluate --action-blind-checkpoint` reports as a baseline.
    action_dropout: float = 0.1
    # Rollouts outside training mix the predictions with and without the action (classifier-free guidance):
    # uncond + guidance * (cond - uncond). 1 = the conditional prediction alone; above 1 needs action_dropout > 0.
    guidance: float = 1.0
    action_dim: int = 5                               # dx, dy, dyaw, speed, yaw_rate
    max_context: int = 2                              # states the predictor sees (all warped into the next frame)


# Architecture fields set by model.size ("custom" fills the unset ones from "demo").
SIZE_PRESETS: dict[str, dict] = {
    "tiny": dict(latent_dim=16, bev_size=8, pillar_factor=1, image_stage=2, lidar_widths=[16, 32],
                 radar_widths=[16], fusion_depth=1, fusion_heads=2, predictor_depth=1, predictor_heads=2,
                 mlp_ratio=2.0),
    "demo": dict(latent_dim=64, bev_size=16, pillar_factor=2, image_stage=3, lidar_widths=[32, 64],
                 radar_widths=[32], fusion_depth=2, fusion_heads=4, predictor_depth=2, predictor_heads=4,
                 mlp_ratio=2.0),
    "base": dict(latent_dim=128, bev_size=32, pillar_factor=2, image_stage=3, lidar_widths=[64, 128],
                 radar_widths=[32, 64], fusion_depth=4, fusion_heads=8, predictor_depth=4, predictor_heads=8,
                 mlp_ratio=4.0),
}


def resolve_model_config(cfg: ModelConfig) -> ModelConfig:
    """Every architecture field filled from the size preset. A preset size with a field set to another value than
    the preset's is an error (``size=tiny latent_dim=256`` would otherwise build one of the two silently)."""
    preset = SIZE_PRESETS["demo" if cfg.size == "custom" else cfg.size]
    filled = {}
    for key, value in preset.items():
        mine = getattr(cfg, key)
        if mine is None:
            filled[key] = value
        elif cfg.size != "custom" and mine != value:
            raise ConfigError(f"model.{key} = {mine!r} conflicts with model.size = '{cfg.size}' (which sets "
                              f"{value!r}); use model.size=custom to choose the architecture field by field")
    return dataclasses.replace(cfg, **filled) if filled else cfg


@dataclasses.dataclass
class LossConfig:
    objective: Literal["jepa", "infonce"] = "jepa"
    regression: Literal["smooth_l1", "mse", "l1"] = "smooth_l1"
    normalize_targets: bool = True
    temperature: float = 0.1
    vicreg_weight: float = 0.0
    vicreg_var_weight: float = 1.0
    vicreg_cov_weight: float = 0.04
    rollout_steps: int = 3                            # K for the autoregressive rollout loss
    rollout_weight: float = 0.5
    idm_weight: float = 0.0                           # inverse-dynamics regulariser (models/inverse_dynamics.py)
    equivariance_weight: float = 0.0                  # online state carried by the ego motion against the next
                                                      # target state, over copying it (losses.equivariance_ratio)
    sibling_weight: float = 0.0                       # sibling-contrastive term (losses.sibling_contrast_loss)
    sibling_temperature: float = 0.02                 # its temperature, in units of latent_space.distance
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
class PredictorStageConfig:
    """After the joint run: the predictor alone on the frozen target encoder's cached latents (V-JEPA 2-AC's recipe;
    drivejepa/training/predictor_stage.py). Without the encoder a step costs a fraction of a joint one, so the
    predictor sees many more windows in the same time; it starts from best.pt and replaces it when val improves."""
    steps: int = 0                                    # 0 = no stage
    batch_size: int = 16
    lr: float = 5e-4                                  # the joint run's AdamW recipe (training/optim.py): linear
                                                      # warm-up, then one cosine cycle to optim.min_lr
    weight_decay: float = 0.05
    warmup_steps: int = 50
    val_every: int = 100                              # steps between validations (and resumable checkpoints)


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
    keep_checkpoints: int = 2                         # newest step_XXXXXXX.pt files kept (resume falls back on them)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    predictor_stage: PredictorStageConfig = dataclasses.field(default_factory=PredictorStageConfig)


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
    # A window "departs" when two consecutive actions among a_{s-1}..a_{s+H-1} (the last context frame's, then the
    # future's) differ by at least this much in dx (metres per 0.5 s step) or dyaw (radians per step).
    departure_dx: float = 0.3
    departure_dyaw: float = 0.03
    retrieval_k: list[int] = dataclasses.field(default_factory=lambda: [1, 5])
    headline_seconds: list[float] = dataclasses.field(default_factory=lambda: [0.5, 1.5, 3.0])
    iou_seconds: list[float] = dataclasses.field(default_factory=lambda: [1.0, 2.0, 3.0])
    train_split: str = "train"                        # probes are fitted on this split's target latents
    max_train_scenes: int = 0                         # 0 = every train scene
    probe_seed: int = 0
    probe_epochs: int = 300                           # optimiser steps per probe (occupancy: on minibatches)
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


@dataclasses.dataclass
class OptimizerConfig:
    """The sampling optimiser over control sequences (drivejepa/planning/optimizer.py)."""
    method: Literal["cem", "mppi"] = "cem"
    candidates: int = 8                               # sequences sampled per iteration (the current mean is one)
    iterations: int = 1
    elites: int = 2                                   # CEM: best candidates the next distribution is fitted to
    momentum: float = 0.1                             # CEM: share of the old mean and spread kept each iteration
    temperature: float = 0.5                          # MPPI: weights exp(-(cost - min cost) / temperature)
    noise: Literal["walk", "white"] = "walk"          # a candidate's deviation over the steps: a random walk, or
                                                      # independent per step (see planning/optimizer.py)
    init_std: tuple[float, float] = (1.5, 0.05)       # sampling spread of speed (m/s) and yaw rate (rad/s)
    min_std: tuple[float, float] = (0.05, 0.005)      # CEM: the spread never shrinks below this
    score_mean: bool = True                           # the refitted mean after the last iteration is one more
                                                      # candidate (a rollout of its own); false: it is not scored, and
                                                      # the planner starts its next decision from it instead
    seed: int = 0


@dataclasses.dataclass
class ControlLimits:
    """What the ego can do (drivejepa/planning/motion.py: feasible)."""
    max_speed: float = 30.0                           # m/s
    max_accel: float = 3.0                            # m/s^2
    max_decel: float = 8.0                            # m/s^2 (an emergency stop)
    max_yaw_rate: float = 0.6                         # rad/s
    max_curvature: float = 0.2                        # 1/m (a 5 m turning radius; a stopped car does not turn)
    max_lateral_accel: float = 5.0                    # m/s^2


@dataclasses.dataclass
class CostWeights:
    """Weights of the planner's cost terms (drivejepa/planning/costs.py)."""
    collision: float = 20.0                           # predicted (or, for the oracle, true) occupancy under the ego
    drivable: float = 5.0                             # predicted non-drivable area under the ego
    headway: float = 10.0                             # predicted occupancy in the gap ahead the planned speed needs
    progress: float = 1.0                             # distance short of the reference speed's
    command: float = 2.0                              # end point on the wrong side of the route command
    comfort: float = 0.2                              # acceleration and yaw acceleration
    jerk: float = 0.2                                 # longitudinal jerk, from the ego's acceleration now


@dataclasses.dataclass
class HeadsConfig:
    """The planner's cost heads: per-cell logits read from frozen target-encoder tokens (planning/heads.py)."""
    kind: Literal["linear", "mlp"] = "mlp"
    subcells: int = 4                                 # each state token predicts subcells x subcells cells
    neighbourhood: int = 0                            # ... reading the (2r+1) x (2r+1) tokens centred on it
    hidden: int = 64
    steps: int = 400                                  # AdamW steps on the train split's frozen tokens
    batch_size: int = 64
    lr: float = 3e-3
    max_train_frames: int = 4000
    seed: int = 0
    rollouts: bool = True                             # a second set fitted on the model's own rollouts (else a copy)
    rollout_steps: int = 800                          # its AdamW steps
    rollout_stride: int = 2                           # every n-th window start of each train scene and branch
    max_rollout_frames: int = 8000                    # predicted states it fits on, at most


@dataclasses.dataclass
class EgoMLPConfig:
    """The ego-status baseline (AD-MLP / Ego-MLP, planning/ego_mlp.py): past motion + command -> 3 s trajectory."""
    past_steps: int = 4                               # past actions (0.5 s each) it sees
    hidden: int = 128
    steps: int = 1500
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0


@dataclasses.dataclass
class RecoveryConfig:
    """Action recovery and its energy landscape (planning/recovery.py)."""
    seconds: list[float] = dataclasses.field(default_factory=lambda: [1.0, 2.0, 3.0])
    max_windows: int = 2                              # of the evaluation's planned windows, factual and branch
                                                      # each (seeded choice); 0 = every planned one
    candidates: int = 64
    iterations: int = 4
    gradient_steps: int = 50                          # then Adam on the controls through the model (0 = CEM only)
    gradient_lr: float = 0.05
    landscape_size: int = 9                           # grid points per axis
    landscape_speed: float = 4.0                      # m/s either side of the true speed change
    landscape_yaw_rate: float = 0.3                   # rad/s either side of the true yaw-rate change


@dataclasses.dataclass
class PlanConfig:
    """Model-predictive control in latent space (``drivejepa plan``, planning/planner.py); open-loop metrics."""
    horizon: int = 6                                  # key-frame steps planned (3 s at 2 Hz)
    frame_seconds: float = 0.5
    device: str = "auto"
    amp: Union[bool, Literal["auto"]] = "auto"        # autocast of the rollouts (drivejepa/precision.py): auto = bf16
                                                      # on CUDA and on a CPU with native bf16, else fp32
    ego_length: float = 4.084                         # metres (nuScenes' Renault Zoe, the planning papers' box)
    ego_width: float = 1.85
    ego_center_ahead: float = 0.0                     # box centre ahead of the ego pose (0: synthetic world)
    collision_margin: float = 0.3                     # metres added around the ego box in the latent costs
    headway_seconds: float = 1.8                      # the gap ahead the headway cost wants: min_gap + seconds * v
    headway_min_gap: float = 2.5                      # (the synthetic world's IDM: 1.2 s and 2.5 m)
    headway_static_steps: int = 6                     # steps whose headway also reads the observed scene held still
    headway_static_frames: int = 1                    # ... what stood still over this many context frames
    headway_static_seconds: float = 1.2               # the gap the floor wants: min_gap + these seconds * v
    headway_static_motion: Literal["still", "lane"] = "still"   # lane: the floor's lane moves on at the speed its
                                                      # occupancy moved over the last interval (a car driving ahead)
    headway_static_brake: float = 4.0                 # m/s^2: ... slowing at this rate until it stands (0: never)
    command_threshold: float = 2.0                    # metres of lateral offset at command_seconds: left / right
    command_seconds: float = 3.0
    reference_speed: float = 0.0                      # m/s the progress term asks for; 0 = the cruise speed:
    reference_seconds: float = 10.0                   # the speed kept: the highest of the ego's last seconds (0: now)
    min_reference_speed: float = 2.0                  # ... but at least this (a stopped ego moves on)
    resume_accel: float = 1.5                         # m/s^2: the first iteration also tries speeding up toward
                                                      # the cruise speed at this rate (0 = not)
    accel_decay: float = 0.0                          # > 0: the first iteration also tries keeping the ego's
                                                      # acceleration now, fading by this factor a step, and the
                                                      # jerk term counts the plan's first step from it (0 = neither)
    eval_windows: int = 4                             # evaluate --plan-config: windows planned, factual and branch
                                                      # each (seeded choice over the evaluated scenes); 0 = all
    agent_classes: list[str] = dataclasses.field(default_factory=lambda: [
        "car", "truck", "bus", "trailer", "construction_vehicle", "pedestrian", "motorcycle", "bicycle"])
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    limits: ControlLimits = dataclasses.field(default_factory=ControlLimits)
    weights: CostWeights = dataclasses.field(default_factory=CostWeights)
    heads: HeadsConfig = dataclasses.field(default_factory=HeadsConfig)
    ego_mlp: EgoMLPConfig = dataclasses.field(default_factory=EgoMLPConfig)
    recovery: RecoveryConfig = dataclasses.field(default_factory=RecoveryConfig)


@dataclasses.dataclass
class DriverSpec:
    """One driver of ``drivejepa drive`` (drivejepa/driving/drivers.py): ``kind`` expert or constant_velocity, or
    ``factory`` with ``factory: module:function`` called with ``options`` (how the world-model planner and the
    ego-status MLP plug in). ``name`` labels its runs."""
    name: str = "expert"
    kind: str = "expert"
    factory: str = ""
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


def _default_drivers() -> list[DriverSpec]:
    return [DriverSpec("expert", "expert"), DriverSpec("constant_velocity", "constant_velocity")]


@dataclasses.dataclass
class DriveConfig:
    """Closed-loop driving in the synthetic world (``drivejepa drive``); ``eval/drive.yaml`` fills it. The world
    fields must match the ``drivejepa synth`` run the drivers' models were trained on; ``observation`` is the
    preprocessing config of their shards (what the rendered sensors become)."""
    seed: int = 0                                     # the world's seed (synth --seed)
    samples_per_scene: int = 40                       # key frames of a scene (synth --samples-per-scene): its end
    image_size: tuple[int, int] = (800, 450)          # camera images as the world stores them (synth --image-size)
    branches: int = 0                                 # synth --branches (a scene's branches share its map and frame)
    branch_points: int = 1                            # synth --branch-points
    branch_frames: int = 8                            # synth --branch-frames
    split: str = "val"                                # scenes of this split of datasets/synthetic/splits.json ...
    world_scenes: int = 30                            # ... among the world's first N scenes (synth --scenes)
    scenes: list[str] = dataclasses.field(default_factory=list)   # or these scene names
    start_frame: int = 2                              # the driver takes over at this key frame (before: as logged)
    steps: int = 0                                    # key frames driven per scenario; 0 = to the end of the scene
    ttc_horizon: float = 3.0                          # seconds of constant-velocity look-ahead for time to collision
    observation: PreprocessConfig = dataclasses.field(default_factory=PreprocessConfig)
    drivers: list[DriverSpec] = dataclasses.field(default_factory=_default_drivers)
    render_size: tuple[int, int] = (640, 480)         # --render: pixels of each step's view


def resolve_train_config(cfg: "TrainConfig") -> "TrainConfig":
    """``cfg`` with its model architecture resolved: what a run builds, saves in RUN/config.yaml and checkpoints."""
    return dataclasses.replace(cfg, model=resolve_model_config(cfg.model))


# ----------------------------------------------------------------------------------------------------------------
# Ranges and consistency, checked when a config is loaded
# ----------------------------------------------------------------------------------------------------------------
def _require(ok: bool, source: str, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{source}: '{key}' = {value!r} {rule}")


def _at_least(obj: Any, prefix: str, source: str, minimum: float, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(value >= minimum, source, prefix + name, value, f"must be at least {minimum}")


def _cameras(cameras: Sequence[str], key: str, source: str) -> None:
    _require(len(cameras) > 0, source, key, list(cameras), "must name at least one camera")
    unknown = [c for c in cameras if c not in ALL_CAMERAS]
    _require(not unknown, source, key, list(cameras), f"has unknown cameras {unknown} (nuScenes cameras: "
             f"{', '.join(ALL_CAMERAS)})")
    _require(len(set(cameras)) == len(cameras), source, key, list(cameras), "names a camera twice")


def check_config(cfg: Any, source: str = "<config>") -> None:
    """ConfigError naming the key when a value is out of range or inconsistent with another (the type checks
    happen while loading). Knows TrainConfig, PreprocessConfig, EvalConfig, PlanConfig and DriveConfig (whose
    driver kinds drivejepa/driving/drivers.py checks); other configs pass unchecked."""
    if isinstance(cfg, PreprocessConfig):
        _cameras(cfg.cameras, "cameras", source)
        _require(min(cfg.image_size) >= 1, source, "image_size", list(cfg.image_size), "must be positive (W, H)")
        _at_least(cfg, "", source, 1, "lidar_points", "radar_points", "lidar_sweeps", "max_boxes", "drivable_size")
        _require(cfg.drivable_range > 0, source, "drivable_range", cfg.drivable_range, "must be positive")
        _require(cfg.lidar_range > 0, source, "lidar_range", cfg.lidar_range, "must be positive")
        _require(cfg.box_range > 0, source, "box_range", cfg.box_range, "must be positive")
        _require(cfg.lidar_z_range[0] < cfg.lidar_z_range[1], source, "lidar_z_range", list(cfg.lidar_z_range),
                 "must be (low, high) with low < high")
    elif isinstance(cfg, TrainConfig):
        d, m, loss, o = cfg.data, cfg.model, cfg.loss, cfg.optim
        _cameras(d.cameras, "data.cameras", source)
        _at_least(d, "data.", source, 1, "context", "horizon", "stride", "batch_size")
        _at_least(d, "data.", source, 0, "num_workers")
        try:
            r = resolve_model_config(m)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        _at_least(r, "model.", source, 1, "latent_dim", "bev_size", "pillar_factor", "fusion_depth", "fusion_heads",
                  "predictor_depth", "predictor_heads", "action_dim", "max_context")
        _require(r.bev_range > 0, source, "model.bev_range", r.bev_range, "must be positive")
        _require(r.image_stage in (1, 2, 3, 4), source, "model.image_stage", r.image_stage,
                 "must be 1, 2, 3 or 4 (the backbone stage whose features are lifted)")
        _require(len(r.lift_heights) > 0, source, "model.lift_heights", r.lift_heights,
                 "must list at least one height")
        for key in ("lidar_widths", "radar_widths"):
            widths = getattr(r, key)
            _require(len(widths) > 0 and min(widths) >= 1, source, f"model.{key}", widths,
                     "must be a non-empty list of positive widths")
        for key in ("fusion_heads", "predictor_heads"):
            _require(r.latent_dim % getattr(r, key) == 0, source, f"model.{key}", getattr(r, key),
                     f"must divide model.latent_dim = {r.latent_dim}")
        _require(r.mlp_ratio > 0, source, "model.mlp_ratio", r.mlp_ratio, "must be positive")
        for key in ("drop_path", "modality_dropout"):
            _require(0 <= getattr(m, key) < 1, source, f"model.{key}", getattr(m, key), "must be in [0, 1)")
        _require(0 <= m.action_dropout <= 1, source, "model.action_dropout", m.action_dropout,
                 "must be in [0, 1] (1 = every action masked: the action-blind baseline)")
        _require(m.guidance == 1.0 or 0 < m.action_dropout < 1, source, "model.guidance", m.guidance,
                 "needs 0 < model.action_dropout < 1 (the 'unknown action' prediction it mixes in must be trained)")
        _require(loss.temperature > 0, source, "loss.temperature", loss.temperature, "must be positive")
        _require(loss.sibling_temperature > 0, source, "loss.sibling_temperature", loss.sibling_temperature,
                 "must be positive")
        _at_least(loss, "loss.", source, 1, "rollout_steps")
        _at_least(loss, "loss.", source, 0, "vicreg_weight", "vicreg_var_weight", "vicreg_cov_weight",
                  "rollout_weight", "idm_weight", "equivariance_weight", "sibling_weight")
        _require(0 <= loss.ema_start <= loss.ema_end <= 1, source, "loss.ema_start", loss.ema_start,
                 f"and loss.ema_end = {loss.ema_end} must satisfy 0 <= ema_start <= ema_end <= 1")
        _require(o.lr > 0, source, "optim.lr", o.lr, "must be positive")
        _at_least(o, "optim.", source, 0, "weight_decay", "warmup_steps", "min_lr", "clip_grad", "max_steps")
        _at_least(o, "optim.", source, 1, "t0", "t_mult", "epochs")
        ps = cfg.predictor_stage
        _at_least(ps, "predictor_stage.", source, 0, "steps", "weight_decay", "warmup_steps")
        _at_least(ps, "predictor_stage.", source, 1, "batch_size", "val_every")
        _require(ps.lr > 0, source, "predictor_stage.lr", ps.lr, "must be positive")
        _require(not (ps.steps and d.sibling_batches and ps.batch_size < 2), source, "predictor_stage.batch_size",
                 ps.batch_size, "must be at least 2 with data.sibling_batches")
        _at_least(cfg, "", source, 1, "log_every", "max_bad_steps", "keep_checkpoints")
        _at_least(cfg, "", source, 0, "ckpt_every", "threads")
    elif isinstance(cfg, PlanConfig):
        o, lim, h, e, r = cfg.optimizer, cfg.limits, cfg.heads, cfg.ego_mlp, cfg.recovery
        _at_least(cfg, "", source, 1, "horizon")
        for key in ("frame_seconds", "ego_length", "ego_width", "command_threshold", "command_seconds"):
            _require(getattr(cfg, key) > 0, source, key, getattr(cfg, key), "must be positive")
        _at_least(cfg, "", source, 0, "collision_margin", "reference_speed", "min_reference_speed", "eval_windows",
                  "headway_seconds", "reference_seconds", "headway_static_steps", "headway_static_seconds",
                  "resume_accel", "headway_static_brake")
        _require(0 <= cfg.accel_decay <= 1, source, "accel_decay", cfg.accel_decay, "must be in [0, 1]")
        _at_least(cfg, "", source, 1, "headway_static_frames")
        _require(cfg.headway_min_gap > 0, source, "headway_min_gap", cfg.headway_min_gap, "must be positive")
        _at_least(o, "optimizer.", source, 1, "candidates", "iterations", "elites")
        _require(o.elites <= o.candidates, source, "optimizer.elites", o.elites,
                 f"must be at most optimizer.candidates = {o.candidates}")
        _require(0 <= o.momentum < 1, source, "optimizer.momentum", o.momentum, "must be in [0, 1)")
        _require(o.temperature > 0, source, "optimizer.temperature", o.temperature, "must be positive")
        _require(min(o.init_std) > 0 and min(o.min_std) >= 0, source, "optimizer.init_std", list(o.init_std),
                 "must be positive (and optimizer.min_std not negative)")
        for key in ("max_speed", "max_accel", "max_decel", "max_yaw_rate", "max_curvature", "max_lateral_accel"):
            _require(getattr(lim, key) > 0, source, f"limits.{key}", getattr(lim, key), "must be positive")
        for key in ("collision", "drivable", "headway", "progress", "command", "comfort", "jerk"):
            _at_least(cfg.weights, "weights.", source, 0, key)
        _at_least(h, "heads.", source, 1, "subcells", "hidden", "steps", "batch_size", "max_train_frames",
                  "rollout_steps", "rollout_stride", "max_rollout_frames")
        _at_least(h, "heads.", source, 0, "neighbourhood")
        _at_least(e, "ego_mlp.", source, 1, "past_steps", "hidden", "steps", "batch_size")
        for key, value in (("heads.lr", h.lr), ("ego_mlp.lr", e.lr)):
            _require(value > 0, source, key, value, "must be positive")
        _require(len(r.seconds) > 0 and min(r.seconds) > 0, source, "recovery.seconds", r.seconds,
                 "must list positive horizons")
        _at_least(r, "recovery.", source, 0, "max_windows", "gradient_steps")
        _require(r.gradient_lr > 0, source, "recovery.gradient_lr", r.gradient_lr, "must be positive")
        _at_least(r, "recovery.", source, 2, "candidates", "landscape_size")
        _at_least(r, "recovery.", source, 1, "iterations")
    elif isinstance(cfg, DriveConfig):
        _at_least(cfg, "", source, 0, "seed", "start_frame", "steps", "branches")
        _at_least(cfg, "", source, 1, "world_scenes", "branch_points", "branch_frames")
        _require(cfg.samples_per_scene >= 2, source, "samples_per_scene", cfg.samples_per_scene, "must be at least 2")
        _require(cfg.start_frame < cfg.samples_per_scene - 1, source, "start_frame", cfg.start_frame,
                 f"must be below samples_per_scene - 1 = {cfg.samples_per_scene - 1}")
        _require(min(cfg.image_size) >= 16, source, "image_size", list(cfg.image_size), "must be at least 16 a side")
        _require(min(cfg.render_size) >= 64, source, "render_size", list(cfg.render_size), "must be at least 64 a side")
        _require(cfg.ttc_horizon > 0, source, "ttc_horizon", cfg.ttc_horizon, "must be positive")
        bad = [s for s in cfg.scenes if not (s.startswith("scene-") and s[6:].isdigit() and int(s[6:]) >= 1)]
        _require(not bad, source, "scenes", cfg.scenes, f"has names that are not scene-NNNN: {bad}")
        _cameras(cfg.observation.cameras, "observation.cameras", source)
        _at_least(cfg.observation, "observation.", source, 1, "lidar_points", "radar_points", "lidar_sweeps",
                  "max_boxes")
        names = [d.name for d in cfg.drivers]
        _require(len(names) > 0, source, "drivers", names, "must name at least one driver")
        _require(len(set(names)) == len(names), source, "drivers", names, "names a driver twice")
    elif isinstance(cfg, EvalConfig):
        _at_least(cfg, "", source, 0, "horizon", "max_train_scenes", "probe_epochs")
        _at_least(cfg, "", source, 1, "batch_size", "grid_size", "probe_hidden")
        for key in ("frame_seconds", "grid_range", "count_radius", "probe_lr", "departure_dx", "departure_dyaw"):
            _require(getattr(cfg, key) > 0, source, key, getattr(cfg, key), "must be positive")
