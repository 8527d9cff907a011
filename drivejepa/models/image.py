"""Image branch: one timm ResNet18 shared by every camera, pooled to a few tokens per camera.

Images arrive as uint8 ``[B, C, H, W, 3]``; the branch converts them to float, normalises them with the ImageNet
statistics and returns ``C * image_tokens`` tokens per sample (camera-major) plus a key padding mask that hides the
tokens of cameras whose ``image_mask`` is False.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from drivejepa.config import ALL_CAMERAS
from drivejepa.errors import UserError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def token_grid(tokens: int) -> tuple[int, int]:
    """Rows x columns of the pooled feature map for ``tokens`` tokens (wider than tall, like camera images)."""
    rows = max(r for r in range(1, int(tokens**0.5) + 1) if tokens % r == 0)
    return rows, tokens // rows


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load a local ResNet weight file (torch ``.pth``/``.pt`` or ``.safetensors``); the classifier is ignored."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: image weight file not found (model.image_weights)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure means the file is unusable
        raise UserError(f"{path}: cannot read image weights: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")}
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if missing:
        raise UserError(f"{path}: image weights lack {len(missing)} backbone tensors (first: {missing[0]})")
    if unexpected:
        log.warning("%s: ignored %d tensors not in the backbone (first: %s)", path, len(unexpected), unexpected[0])


class ImageEncoder(nn.Module):
    """ResNet feature map -> adaptive average pool to a token grid -> linear projection + camera/position embeddings."""

    def __init__(self, dim: int, cameras: list[str], tokens: int, backbone: str = "resnet18", weights: str = ""):
        super().__init__()
        import timm

        unknown = [c for c in cameras if c not in ALL_CAMERAS]
        if unknown or not cameras:
            raise ValueError(f"cameras must be a non-empty subset of {ALL_CAMERAS}, got {cameras}")
        self.cameras = list(cameras)
        self.backbone = timm.create_model(backbone, pretrained=False, num_classes=0, global_pool="")
        if weights:
            load_backbone_weights(self.backbone, weights)
        self.grid = token_grid(tokens)
        self.tokens = tokens
        self.proj = nn.Linear(self.backbone.num_features, dim)
        # Embeddings are indexed by the nuScenes camera name, so a model knows which camera a token came from.
        self.camera_embed = nn.Parameter(torch.zeros(len(ALL_CAMERAS), dim))
        self.pos_embed = nn.Parameter(torch.zeros(tokens, dim))
        nn.init.trunc_normal_(self.camera_embed, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.register_buffer("camera_index", torch.tensor([ALL_CAMERAS.index(c) for c in cameras]), persistent=False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0, persistent=False)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, H, W, 3]`` -> float ``[N, 3, H, W]`` normalised with ImageNet statistics."""
        # Contiguous NCHW: a channels-last view of the HWC bytes makes the CPU convolutions ~40% slower.
        x = images.permute(0, 3, 1, 2).to(self.mean.dtype).contiguous()
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
