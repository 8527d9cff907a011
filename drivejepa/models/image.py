"""Image branch: one timm ResNet18 shared by every camera, pooled to a few tokens per camera.

Images arrive as uint8 ``[B, C, H, W, 3]``; the branch converts them to float, resizes them to ``model.image_size``
when one is set (antialiased, so a CPU run can train at a fraction of the stored resolution), normalises them with
the backbone's own ``pretrained_cfg`` mean and std, and returns ``C * image_tokens`` tokens per sample
(camera-major) plus a key padding mask that hides the tokens of cameras whose ``image_mask`` is False.
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


def token_grid(tokens: int) -> tuple[int, int]:
    """Rows x columns of the pooled feature map for ``tokens`` tokens (wider than tall, like camera images)."""
    rows = max(r for r in range(1, int(tokens**0.5) + 1) if tokens % r == 0)
    return rows, tokens // rows


def create_backbone(name: str, weights: str | Path = "") -> nn.Module:
    """A timm feature extractor (no classifier, no pooling). ``weights``: a local ``.pth``/``.pt``/``.safetensors``
    file, loaded by timm itself through ``pretrained_cfg_overlay=dict(file=...)`` (``weights_only`` torch loading;
    the classifier is dropped); empty = random initialisation. Nothing is fetched from a hub.

    timm loads non-strictly once it drops the classifier and only logs the backbone tensors a file lacks; a backbone
    left partly random is not what a user who passed weights asked for, so those are an error here."""
    import timm

    if not weights:
        return timm.create_model(name, pretrained=False, num_classes=0, global_pool="")
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
        backbone = timm.create_model(name, pretrained=True, num_classes=0, global_pool="",
                                     pretrained_cfg_overlay=dict(file=str(path)))
    except Exception as exc:  # noqa: BLE001 - timm raises RuntimeError/KeyError/pickle errors for an unusable file
        raise UserError(f"{path}: cannot load it as {name} weights (model.image_weights): "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    finally:
        timm_log.removeHandler(missing)
        timm_log.setLevel(level)
        timm_log.propagate = propagate
    if missing.messages:
        raise UserError(f"{path}: lacks tensors of the {name} backbone (model.image_weights): "
                        f"{missing.messages[0][:300]}")
    return backbone


class _MissingKeys(logging.Handler):
    """Collects timm's 'Missing keys ...' report of a non-strict pretrained load; passes on its other warnings."""

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Missing keys"):
            self.messages.append(message)
        elif record.levelno >= logging.WARNING:
            logging.getLogger(__name__).warning("timm: %s", message)


class ImageEncoder(nn.Module):
    """ResNet feature map -> adaptive average pool to a token grid -> linear projection + camera/position embeddings."""

    def __init__(self, dim: int, cameras: list[str], tokens: int, backbone: str = "resnet18", weights: str = "",
                 image_size: Optional[tuple[int, int]] = None):
        super().__init__()
        unknown = [c for c in cameras if c not in ALL_CAMERAS]
        if unknown or not cameras:
            raise ValueError(f"cameras must be a non-empty subset of {ALL_CAMERAS}, got {cameras}")
        self.cameras = list(cameras)
        self.backbone = create_backbone(backbone, weights)
        self.image_size = tuple(image_size) if image_size else None           # (W, H) the backbone sees
        self.grid = token_grid(tokens)
        self.tokens = tokens
        self.proj = nn.Linear(self.backbone.num_features, dim)
        # Embeddings are indexed by the nuScenes camera name, so a model knows which camera a token came from.
        self.camera_embed = nn.Parameter(torch.zeros(len(ALL_CAMERAS), dim))
        self.pos_embed = nn.Parameter(torch.zeros(tokens, dim))
        nn.init.trunc_normal_(self.camera_embed, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.register_buffer("camera_index", torch.tensor([ALL_CAMERAS.index(c) for c in cameras]), persistent=False)
        cfg = self.backbone.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1) * 255.0, persistent=False)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, H, W, 3]`` -> float ``[N, 3, H', W']``: resized to ``image_size`` and normalised with the
        backbone's pretrained_cfg statistics."""
        # Contiguous NCHW: a channels-last view of the HWC bytes makes the CPU convolutions ~40% slower.
        x = images.permute(0, 3, 1, 2).to(self.mean.dtype).contiguous()
        if self.image_size is not None and tuple(x.shape[-2:]) != self.image_size[::-1]:
            x = F.interpolate(x, size=self.image_size[::-1], mode="bilinear", antialias=True, align_corners=False)
        return (x - self.mean) / self.std

    def forward(self, images: torch.Tensor,
                image_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if images.dim() != 5 or images.shape[-1] != 3:
            raise ValueError(f"images must be [B, C, H, W, 3], got {tuple(images.shape)}")
        b, c, h, w, _ = images.shape
        if c != len(self.cameras):
            raise ValueError(f"images hold {c} cameras but the model was built for {len(self.cameras)}: {self.cameras}")
        feats = self.backbone(self.normalise(images.reshape(b * c, h, w, 3)))         # [B*C, F, h', w']
        feats = F.adaptive_avg_pool2d(feats, self.grid).flatten(2).transpose(1, 2)  # [B*C, tokens, F]
        tokens = self.proj(feats).view(b, c, self.tokens, -1)
        tokens = (tokens + self.camera_embed[self.camera_index].view(1, c, 1, -1)
                  + self.pos_embed.view(1, 1, self.tokens, -1))
        if image_mask is None:
            valid = torch.ones(b, c, dtype=torch.bool, device=images.device)
        else:
            valid = image_mask.to(torch.bool)
        valid = valid.view(b, c, 1).expand(b, c, self.tokens)
        return tokens.reshape(b, c * self.tokens, -1), valid.reshape(b, c * self.tokens)

    def no_weight_decay(self) -> set[str]:
        """Parameters AdamW must not decay (timm's convention; collected by ``training.optim.param_groups``)."""
        return {"camera_embed", "pos_embed"}
