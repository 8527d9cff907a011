"""Image branch: one timm ResNet18 shared by every camera, cut after the stage whose feature map is lifted.

Images arrive as uint8 ``[B, C, H, W, 3]``; the branch converts them to float, resizes them to ``model.image_size``
when one is set (antialiased, so a CPU run can train at a fraction of the stored resolution), normalises them with
the backbone's own ``pretrained_cfg`` mean and std, and returns each camera's feature map after
``model.image_stage`` (timm ``features_only``: the later stages are not built), projected to the state's width.
drivejepa/models/lift.py puts those features into the bird's-eye grid with the camera geometry.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from drivejepa.config import ALL_CAMERAS
from drivejepa.errors import UserError


def create_backbone(name: str, weights: str | Path = "", stage: int = 4) -> nn.Module:
    """A timm feature extractor that returns the feature map of ``stage`` (timm ``features_only`` with
    ``out_indices=(stage,)``: for a ResNet 1-4 are layer1-layer4, strides 4-32; later stages are not built).
    ``weights``: a local ``.pth``/``.pt``/``.safetensors`` file, loaded by timm itself through
    ``pretrained_cfg_overlay=dict(file=...)`` (``weights_only`` torch loading; the classifier and the unused stages
    are dropped); empty = random initialisation. Nothing is fetched from a hub.

    timm loads non-strictly once it drops the classifier and only logs the tensors a file lacks; a backbone left
    partly random is not what a user who passed weights asked for, so a lacking tensor of the stages built is an
    error here."""
    import timm

    kwargs = dict(features_only=True, out_indices=(stage,))
    if not weights:
        return timm.create_model(name, pretrained=False, **kwargs)
    path = Path(weights)
    if not path.is_file():
        raise UserError(f"{path}: image weight file not found (model.image_weights)")
    missing = _MissingKeys()
    timm_log = logging.getLogger("timm.models._builder")
    level, propagate = timm_log.level, timm_log.propagate
    timm_log.addHandler(missing)
    timm_log.setLevel(logging.INFO)     # its missing-keys report is an info record
    timm_log.propagate = False
    try:
        backbone = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    except Exception as exc:  # noqa: BLE001 - timm raises RuntimeError/KeyError/pickle errors for an unusable file
        raise UserError(f"{path}: cannot load it as {name} weights (model.image_weights): "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    finally:
        timm_log.removeHandler(missing)
        timm_log.setLevel(level)
        timm_log.propagate = propagate
    used = set(backbone.state_dict())
    lacking = [k for k in missing.keys() if k in used]        # the classifier and unbuilt stages do not count
    if lacking:
        raise UserError(f"{path}: lacks {len(lacking)} tensors of the {name} backbone (model.image_weights): "
                        f"{', '.join(lacking[:8])}")
    return backbone


class _MissingKeys(logging.Handler):
    """Collects timm's 'Missing keys ...' report of a non-strict pretrained load; passes on its other warnings."""

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.messages: list[str] = []

    def keys(self) -> list[str]:
        """The tensor names of every 'Missing keys (a, b, ...) discovered ...' report."""
        out = []
        for message in self.messages:
            inside = message[message.find("(") + 1:message.find(")")]
            out += [k.strip() for k in inside.split(",") if k.strip()]
        return out

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Missing keys"):
            self.messages.append(message)
        elif record.levelno >= logging.WARNING:
            logging.getLogger(__name__).warning("timm: %s", message)


class ImageEncoder(nn.Module):
    """uint8 images ``[B, C, H, W, 3]`` -> feature maps ``[B, C, dim, h, w]`` (backbone stage, 1x1 projection)."""

    def __init__(self, dim: int, cameras: list[str], backbone: str = "resnet18", weights: str = "",
                 image_size: Optional[tuple[int, int]] = None, stage: int = 3):
        super().__init__()
        unknown = [c for c in cameras if c not in ALL_CAMERAS]
        if unknown or not cameras:
            raise ValueError(f"cameras must be a non-empty subset of {ALL_CAMERAS}, got {cameras}")
        self.cameras = list(cameras)
        # Channels-last weights and inputs: the CPU (oneDNN) and CUDA convolutions run fastest in NHWC (ResNet18
        # at 112x64, batch 32, 2 AVX2 cores: forward 119 ms against 170 ms in NCHW, forward+backward 439 vs 485).
        self.backbone = create_backbone(backbone, weights, stage).to(memory_format=torch.channels_last)
        self.image_size = tuple(image_size) if image_size else None           # (W, H) the backbone sees
        self.proj = nn.Conv2d(self.backbone.feature_info.channels()[-1], dim, 1)
        cfg = self.backbone.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1) * 255.0, persistent=False)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, H, W, 3]`` -> float ``[N, 3, H', W']``: resized to ``image_size`` and normalised with the
        backbone's pretrained_cfg statistics."""
        # Contiguous channels-last, as the backbone's weights are (a strided view of the HWC bytes is slower).
        x = images.permute(0, 3, 1, 2).to(self.mean.dtype).contiguous(memory_format=torch.channels_last)
        if self.image_size is not None and tuple(x.shape[-2:]) != self.image_size[::-1]:
            x = F.interpolate(x, size=self.image_size[::-1], mode="bilinear", antialias=True, align_corners=False)
        return (x - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 5 or images.shape[-1] != 3:
            raise ValueError(f"images must be [B, C, H, W, 3], got {tuple(images.shape)}")
        b, c, h, w, _ = images.shape
        if c != len(self.cameras):
            raise ValueError(f"images hold {c} cameras but the model was built for {len(self.cameras)}: {self.cameras}")
        feats = self.proj(self.backbone(self.normalise(images.reshape(b * c, h, w, 3)))[-1])
        return feats.view(b, c, *feats.shape[1:])
