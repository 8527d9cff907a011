"""Objectives learn on a small fixed batch; the collapse diagnostics read collapse and perfect prediction correctly."""
from __future__ import annotations

import math

import pytest
import torch

from drivejepa.config import LossConfig, ModelConfig
from drivejepa.diagnostics import collapse_diagnostics, effective_rank
from drivejepa.latent_space import space_of
from drivejepa.losses import infonce_loss, prediction_loss, vicreg_terms
from drivejepa.models.world_model import WorldModel


OBJECTIVES = {
    "jepa_smooth_l1": LossConfig(objective="jepa", regression="smooth_l1"),
    "jepa_mse": LossConfig(objective="jepa", regression="mse"),
    "infonce": LossConfig(objective="infonce", temperature=0.1),
    "jepa_vicreg": LossConfig(objective="jepa", regression="smooth_l1", vicreg_weight=1.0),
    "jepa_inverse_dynamics": LossConfig(objective="jepa", regression="smooth_l1", idm_weight=1.0),
}


def fixed_batch(b=4, length=3, seed=0) -> dict:
    from drivejepa.data.synth.camera import camera_to_ego, intrinsics

    g = torch.Generator().manual_seed(seed)
    return {
        "images": torch.randint(0, 256, (b, length, 1, 32, 32, 3), generator=g, dtype=torch.uint8),
        "image_mask": torch.ones(b, length, 1, dtype=torch.bool),
        "cam_intrinsics": torch.tensor(intrinsics("CAM_FRONT", 32, 32), dtype=torch.float32).expand(b, 1, 3, 3),
        "cam_to_key_ego": torch.tensor(camera_to_ego("CAM_FRONT"), dtype=torch.float32).expand(b, length, 1, 4, 4),
        "lidar": torch.randn(b, length, 32, 4, generator=g) * 20,
        "lidar_mask": torch.ones(b, length, 32, dtype=torch.bool),
        "radar": torch.randn(b, length, 4, 6, generator=g) * 20,
        "radar_mask": torch.rand(b, length, 4, generator=g) > 0.5,
        "actions": torch.randn(b, length, 5, generator=g) * torch.tensor([3.0, 0.3, 0.05, 5.0, 0.1]),
    }


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_objective_decreases_on_a_fixed_batch(name):
    torch.manual_seed(0)
    cfg = ModelConfig(size="tiny", modality_dropout=0.0, action_dropout=0.0, drop_path=0.0)
    loss_cfg = OBJECTIVES[name]
    model = WorldModel(cfg, ["CAM_FRONT"], space_of(loss_cfg)).train()
    loss_cfg.rollout_steps = 2
    batch = fixed_batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=4e-3)
    losses = []
    for _ in range(40):
        loss, metrics = model.loss(batch, loss_cfg, context=2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_target(0.99)
        losses.append(metrics["loss"])
        assert torch.isfinite(loss)
    first, last = losses[0], sum(losses[-5:]) / 5
    assert last < 0.7 * first, (name, losses)


def test_the_equivariance_term_adds_its_ratio_and_trains_the_online_encoder_only():
    torch.manual_seed(0)
    cfg = ModelConfig(size="tiny", modality_dropout=0.0, action_dropout=0.0, drop_path=0.0)
    model = WorldModel(cfg, ["CAM_FRONT"]).train()
    batch = fixed_batch(length=4)
    plain, _ = model.loss(batch, LossConfig(rollout_steps=2), context=2)
    total, metrics = model.loss(batch, LossConfig(rollout_steps=2, equivariance_weight=2.0), context=2)
    assert 0.0 < metrics["loss_equivariance"] and math.isfinite(metrics["loss_equivariance"])
    assert float((total - plain).detach()) == pytest.approx(2.0 * metrics["loss_equivariance"], rel=1e-4)
    (total - plain).backward()
    online = [p.grad for p in model.encoder.parameters() if p.grad is not None]
    assert online and any(float(g.abs().sum()) > 0 for g in online)
    assert all(p.grad is None for p in model.target_encoder.parameters())


def test_infonce_prefers_matching_pairs():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(16, 4, 8, generator=g)                               # 16 states of 4 tokens
    matched = infonce_loss(target + 0.01 * torch.randn(16, 4, 8, generator=g), target)
    shuffled = infonce_loss(target[torch.randperm(16, generator=g)], target)
    assert matched < 0.1 < shuffled


def test_infonce_does_not_take_the_other_frames_of_a_window_as_negatives():
    """Consecutive frames of a window are nearly the same latent: a perfect prediction must not be penalised for
    also being close to its neighbours, while the other windows stay negatives."""
    g = torch.Generator().manual_seed(0)
    windows = torch.randn(8, 1, 4, 16, generator=g)
    target = windows + 1e-3 * torch.randn(8, 3, 4, 16, generator=g)        # 3 nearly identical frames a window
    assert infonce_loss(target, target, temperature=0.1) < 0.05
    assert infonce_loss(target, target[torch.roll(torch.arange(8), 1)], temperature=0.1) > 3.0


def test_vicreg_penalises_collapse_only():
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(256, 16, generator=g) * 2
    collapsed = torch.randn(256, 1, generator=g) * torch.ones(1, 16)
    var_s, cov_s = vicreg_terms(spread)
    var_c, cov_c = vicreg_terms(collapsed * 0.01)
    assert var_s < 1e-3 and var_c > 0.9
    assert vicreg_terms(collapsed)[1] > 10 * cov_s


def test_jepa_regression_is_on_normalised_targets():
    from drivejepa import latent_space

    target = torch.randn(4, 3, 8) * 50 + 7
    normed = torch.nn.functional.layer_norm(target, (8,))
    cfg = LossConfig(regression="mse")
    assert space_of(cfg) == "layer_norm"
    in_space = latent_space.targets(target, space_of(cfg))
    assert prediction_loss(normed, in_space, cfg) == pytest.approx(0.0, abs=1e-6)
    raw = LossConfig(regression="mse", normalize_targets=False)
    assert space_of(raw) == "raw"
    assert prediction_loss(target, latent_space.targets(target, space_of(raw)), raw) == 0
    assert space_of(LossConfig(objective="infonce")) == "unit"


def test_effective_rank_of_collapsed_and_random_latents():
    g = torch.Generator().manual_seed(0)
    random = torch.randn(512, 32, generator=g)
    line = torch.randn(512, 1, generator=g) * torch.randn(1, 32, generator=g)
    constant = torch.ones(512, 32) * 3.0
    assert effective_rank(random) > 25
    assert effective_rank(line) == pytest.approx(1.0, abs=0.01)
    assert effective_rank(constant) == pytest.approx(1.0, abs=0.01)
    d = collapse_diagnostics(constant)
    assert d["std_mean"] == d["std_min"] == 0.0
    assert collapse_diagnostics(random)["std_min"] > 0.8


def test_error_ratio_of_perfect_and_copy_last_predictors():
    g = torch.Generator().manual_seed(0)
    states = torch.randn(4, 6, 16, generator=g).cumsum(dim=1)
    previous, targets = states[:, :-1], states[:, 1:]
    perfect = collapse_diagnostics(targets, targets, targets, previous)
    assert perfect["error_ratio_vs_copy_last"] == 0.0
    assert perfect["cosine"] == pytest.approx(1.0)
    copy = collapse_diagnostics(targets, previous, targets, previous)
    assert copy["error_ratio_vs_copy_last"] == pytest.approx(1.0)
    noisy = collapse_diagnostics(targets, targets + 3 * torch.randn_like(targets), targets, previous)
    assert noisy["error_ratio_vs_copy_last"] > 1.0


def test_sibling_contrast_rewards_rollouts_that_follow_their_own_actions():
    """Rows of one group share a context and part afterwards: a rollout that lands on its own future scores far
    below chance (log n), one that ignores the action (the same prediction for every sibling) cannot score below
    log n, and the steps before the futures part (where they differ by sensor noise only), or rows without
    siblings, add nothing."""
    from drivejepa.data.dataset import NEVER_PARTS
    from drivejepa.losses import sibling_contrast_loss

    g = torch.Generator().manual_seed(0)
    target = torch.randn(5, 3, 4, 8, generator=g)
    target[1:3, 0] = target[0, 0] + 0.1 * torch.randn(2, 4, 8, generator=g)   # step 0: the same scene, noise apart
    group = torch.tensor([0, 0, 0, 1, 2])               # rows 3 and 4 have no sibling
    parted = torch.tensor([NEVER_PARTS, 2, 2, NEVER_PARTS, 2])   # rows 1, 2 leave row 0's future after position 2
    own, terms = sibling_contrast_loss(target + 0.01 * torch.randn(target.shape, generator=g), target, group,
                                       parted, 2, 0.02)
    assert terms == 6 and own < 0.01                    # 3 rows x the 2 steps at positions 3 and 4
    blind = target[:1].expand_as(target).clone()
    blind[:3, 1:] = target[:3, 1:].mean(dim=0)
    loss, _ = sibling_contrast_loss(blind, target, group, parted, 2, 0.02)
    assert loss >= math.log(3) - 1e-6
    noisy = target.clone()
    noisy[:3, 0] = target[torch.tensor([1, 2, 0]), 0]   # at step 0 each row "predicts" a sibling's noisy copy
    assert sibling_contrast_loss(noisy, target, group, parted, 2, 0.02)[0] < 0.01
    none, terms = sibling_contrast_loss(target, target, torch.arange(5), parted, 2, 0.02)
    assert terms == 0 and float(none) == 0.0
