"""The world model's contract: bird's-eye states for any sensor subset, padding invariance, gradient routing, EMA,
rollout."""
from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch

from drivejepa.config import SIZE_PRESETS, ConfigError, LossConfig, ModelConfig, TrainConfig
from drivejepa.models.world_model import WorldModel, build_world_model, ema_momentum


CAMERAS = ["CAM_FRONT", "CAM_BACK"]
B, L, H, W, N, M = 2, 4, 32, 48, 40, 6


def tiny_model(**overrides) -> WorldModel:
    cfg = ModelConfig(size="tiny", **overrides)
    return WorldModel(cfg, CAMERAS)


def state_shape(model) -> tuple[int, int]:
    return model.bev_size ** 2, model.latent_dim


def make_obs(batch=B, lead=(), n=N, m=M, seed=0) -> dict:
    from drivejepa.data.synth.camera import camera_to_ego, intrinsics

    g = torch.Generator().manual_seed(seed)
    shape = (batch, *lead)
    rig = torch.tensor(np.stack([camera_to_ego(c) for c in CAMERAS]), dtype=torch.float32)
    return {
        "images": torch.randint(0, 256, (*shape, len(CAMERAS), H, W, 3), generator=g, dtype=torch.uint8),
        "image_mask": torch.ones(*shape, len(CAMERAS), dtype=torch.bool),
        "cam_intrinsics": torch.tensor(np.stack([intrinsics(c, W, H) for c in CAMERAS]),
                                       dtype=torch.float32).expand(batch, len(CAMERAS), 3, 3).clone(),
        "cam_to_key_ego": rig.expand(*shape, len(CAMERAS), 4, 4).clone(),
        "lidar": torch.randn(*shape, n, 4, generator=g) * torch.tensor([20.0, 20.0, 1.0, 100.0]),
        "lidar_mask": torch.ones(*shape, n, dtype=torch.bool),
        "radar": torch.randn(*shape, m, 6, generator=g) * torch.tensor([40.0, 40.0, 1.0, 10.0, 5.0, 5.0]),
        "radar_mask": torch.ones(*shape, m, dtype=torch.bool),
    }


def make_batch(seed=0) -> dict:
    batch = make_obs(lead=(L,), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    batch["actions"] = torch.randn(B, L, 5, generator=g) * torch.tensor([3.0, 0.3, 0.05, 5.0, 0.1])
    batch["action_valid"] = torch.ones(B, L, dtype=torch.bool)
    return batch


@pytest.fixture(scope="module")
def model() -> WorldModel:
    torch.manual_seed(0)
    return tiny_model().eval()


MODALITY_KEYS = {"images": ("images", "image_mask", "cam_intrinsics", "cam_to_key_ego"), "lidar": ("lidar", "lidar_mask"),
                 "radar": ("radar", "radar_mask")}
SUBSETS = [dict(zip(("images", "lidar", "radar"), bits)) for bits in itertools.product([True, False], repeat=3)
           if any(bits)]


@pytest.mark.parametrize("subset", SUBSETS, ids=lambda s: "+".join(k for k, v in s.items() if v))
def test_encode_shapes_for_every_modality_subset(model, subset):
    full = make_obs()
    obs = {key: full[key] for name, on in subset.items() if on for key in MODALITY_KEYS[name]}
    with torch.no_grad():
        z = model.encode(obs)
        zt = model.encode(obs, target=True)
    assert z.shape == zt.shape == (B, *state_shape(model))
    assert torch.isfinite(z).all()


def test_missing_camera_is_masked_out(model):
    obs = make_obs()
    obs["image_mask"][:, 1] = False
    with torch.no_grad():
        ref = model.encode(obs)
        obs["images"][:, 1] = torch.randint(0, 256, obs["images"][:, 1].shape, dtype=torch.uint8)
        again = model.encode(obs)
        obs["image_mask"][:] = False
        none = model.encode(obs)
    torch.testing.assert_close(ref, again)
    assert torch.isfinite(none).all()


def test_obs_without_any_modality_is_rejected(model):
    with pytest.raises(ValueError, match="none of"):
        model.encode({"actions": torch.zeros(1, 5)})


def test_encode_sequence_matches_frame_by_frame(model):
    batch = make_batch()
    with torch.no_grad():
        seq = model.encode_sequence(batch)
        frame = model.encode({k: (v if k == "cam_intrinsics" else v[:, 2]) for k, v in batch.items()
                              if k not in ("actions", "action_valid")})
    assert seq.shape == (B, L, *state_shape(model))
    torch.testing.assert_close(seq[:, 2], frame, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("branch", ["lidar", "radar"])
def test_padding_never_changes_the_state(model, branch):
    obs = make_obs(n=N, m=M)
    with torch.no_grad():
        ref = model.encode(obs)
        pad = 25
        garbage = torch.randn(B, pad, obs[branch].shape[-1]) * 1e3
        garbage[0, 0, 0] = float("nan")
        padded = dict(obs)
        padded[branch] = torch.cat([garbage[:, :10], obs[branch], garbage[:, 10:]], dim=1)
        mask = obs[f"{branch}_mask"]
        padded[f"{branch}_mask"] = torch.cat([torch.zeros(B, 10, dtype=torch.bool), mask,
                                              torch.zeros(B, pad - 10, dtype=torch.bool)], dim=1)
        out = model.encode(padded)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_point_order_does_not_matter(model):
    obs = make_obs()
    perm = torch.randperm(N)
    shuffled = dict(obs, lidar=obs["lidar"][:, perm])
    with torch.no_grad():
        torch.testing.assert_close(model.encode(shuffled), model.encode(obs), rtol=1e-5, atol=1e-5)


def test_empty_radar_is_valid_and_ignores_its_values(model):
    obs = make_obs()
    obs["radar_mask"][:] = False
    with torch.no_grad():
        a = model.encode(obs)
        obs["radar"] = torch.randn_like(obs["radar"]) * 100
        b = model.encode(obs)
        zero = model.encode(dict(obs, radar=torch.zeros(B, 0, 6), radar_mask=torch.zeros(B, 0, dtype=torch.bool)))
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, zero, rtol=1e-5, atol=1e-5)
    full = make_obs()
    with torch.no_grad():
        assert not torch.allclose(model.encode(full), a)


def test_gradients_reach_online_encoder_and_predictor_not_target():
    torch.manual_seed(0)
    model = tiny_model(modality_dropout=0.0).train()
    loss, metrics = model.loss(make_batch(), LossConfig(rollout_steps=2), context=2)
    loss.backward()
    for name in ("image", "lidar", "radar", "blocks", "head"):
        grads = [p.grad for p in getattr(model.encoder, name).parameters()]
        assert all(g is not None for g in grads), name
        assert sum(float(g.abs().sum()) for g in grads) > 0, name
    assert all(p.grad is not None for p in model.predictor.blocks.parameters())
    assert all(p.grad is None and not p.requires_grad for p in model.target_encoder.parameters())
    assert {"loss", "loss_one_step", "loss_rollout", "std_mean", "std_min", "effective_rank", "cosine",
            "error_ratio_vs_copy_last"} <= set(metrics)
    assert all(isinstance(v, float) for v in metrics.values())


def test_inverse_dynamics_term_trains_the_encoder_on_known_actions_only():
    torch.manual_seed(0)
    model = tiny_model(modality_dropout=0.0, action_dropout=0.0).train()
    batch = make_batch()
    _, plain = model.loss(batch, LossConfig(rollout_steps=2), context=2)
    assert "loss_idm" not in plain
    loss, metrics = model.loss(batch, LossConfig(rollout_steps=2, idm_weight=1.0), context=2)
    loss.backward()
    assert metrics["loss_idm"] > 0
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.inverse_dynamics.parameters())
    head_only = LossConfig(rollout_steps=0, rollout_weight=0.0, idm_weight=1.0)
    model.zero_grad()
    loss, _ = model.loss(batch, head_only, context=2)
    (loss - model.loss(batch, dataclasses.replace(head_only, idm_weight=0.0), context=2)[0]).backward()
    assert float(model.encoder.lidar.mlp[0].weight.grad.abs().sum()) > 0      # the regulariser shapes the encoder
    unknown = dict(batch, action_valid=torch.zeros(B, L, dtype=torch.bool))
    assert model.loss(unknown, head_only, context=2)[1]["loss_idm"] == 0.0   # no action, no motion target


def test_target_encoder_stays_in_eval_mode():
    model = tiny_model().train()
    assert model.encoder.training and not model.target_encoder.training


def test_ema_update_matches_formula():
    torch.manual_seed(0)
    model = tiny_model()
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p))
    online = [p.detach().clone() for p in model.encoder.parameters()]
    target = [p.detach().clone() for p in model.target_encoder.parameters()]
    model.update_target(0.9)
    for o, t, new in zip(online, target, model.target_encoder.parameters()):
        torch.testing.assert_close(new, 0.9 * t + 0.1 * o)
        assert torch.equal(new, t.mul(0.9).add_(o, alpha=0.1))     # the numbers of the in-place per-tensor update
    with torch.no_grad():
        for b in model.encoder.buffers():
            b.add_(1)
    model.update_target(0.5)
    for b, t in zip(model.encoder.buffers(), model.target_encoder.buffers()):
        assert torch.equal(b, t)
    model.update_target(0.0)
    for o, new in zip(online, model.target_encoder.parameters()):
        torch.testing.assert_close(new, o)


def test_ema_momentum_schedule_is_cosine_from_start_to_end():
    assert ema_momentum(0, 100, 0.99, 0.999) == pytest.approx(0.99)
    assert ema_momentum(50, 100, 0.99, 0.999) == pytest.approx(0.9945)
    assert ema_momentum(100, 100, 0.99, 0.999) == pytest.approx(0.999)
    assert ema_momentum(500, 100, 0.99, 0.999) == pytest.approx(0.999)
    values = [ema_momentum(s, 100, 0.99, 0.999) for s in range(101)]
    assert values == sorted(values)
    assert ema_momentum(25, 100, 0.9, 1.0) == pytest.approx(1.0 - 0.1 * (math.cos(math.pi / 4) + 1) / 2)


def test_k_step_rollout_equals_chained_single_steps(model):
    g = torch.Generator().manual_seed(3)
    ctx = torch.randn(B, 2, *state_shape(model), generator=g)
    past = torch.randn(B, 1, 5, generator=g)
    actions = torch.randn(B, 4, 5, generator=g)
    with torch.no_grad():
        rolled = model.rollout(ctx, actions, past_actions=past)
        states, acts, chained = ctx, past, []
        for k in range(4):
            nxt = model.rollout(states, actions[:, k : k + 1], past_actions=acts)
            chained.append(nxt[:, 0])
            states = torch.cat([states, nxt], dim=1)
            acts = torch.cat([acts, actions[:, k : k + 1]], dim=1)
        # and the same through teacher-forced predict on the rolled-out sequence
        seq = torch.cat([ctx, rolled[:, :-1]], dim=1)
        forced = model.predict(seq, torch.cat([past, actions], dim=1))[:, 1:]
    assert rolled.shape == (B, 4, *state_shape(model))
    torch.testing.assert_close(rolled, torch.stack(chained, dim=1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rolled, forced, rtol=1e-5, atol=1e-5)


def test_rollout_beyond_max_context_slides_the_window():
    torch.manual_seed(0)
    model = tiny_model(max_context=4).eval()
    with torch.no_grad():
        out = model.rollout(torch.randn(1, 3, *state_shape(model)), torch.randn(1, 7, 5))
    assert out.shape == (1, 7, *state_shape(model)) and torch.isfinite(out).all()


def test_the_last_block_computing_the_newest_frame_alone_gives_the_full_blocks_newest_frame():
    """The predictor's last block skips the older frames' spatial attention and MLP; that must not change what it
    predicts (modulation weights made non-zero: adaLN-Zero starts every block as the identity)."""
    from drivejepa.models.predictor import SpaceTimeBlock

    torch.manual_seed(0)
    block = SpaceTimeBlock(16, 2, 2.0).eval()
    torch.nn.init.normal_(block.modulation[1].weight, std=0.2)
    x, cond, pos = torch.randn(3, 2, 9, 16), torch.randn(3, 16), torch.randn(9, 16)
    valid = torch.tensor([[True, True], [False, True], [True, True]])
    with torch.no_grad():
        full = block(x, cond, valid, pos)
        last = block(x, cond, valid, pos, last_only=True)
    assert last.shape == (3, 1, 9, 16)
    torch.testing.assert_close(last, full[:, -1:])
    assert (full[:, -1] - x[:, -1]).abs().max() > 0.1                 # the block does change the frame


def test_predictor_is_causal_and_uses_the_action(model):
    g = torch.Generator().manual_seed(4)
    states = torch.randn(B, 5, *state_shape(model), generator=g)
    actions = torch.randn(B, 5, 5, generator=g)
    with torch.no_grad():
        ref = model.predict(states, actions)
        later = actions.clone()
        later[:, 3] += 2.0
        changed = model.predict(states, later)
        turned = model.rollout(states[:, :2], torch.tensor([[5.0, 0.0, 0.3, 10.0, 0.6]]).expand(B, 1, 5))
        straight = model.rollout(states[:, :2], torch.tensor([[5.0, 0.0, 0.0, 10.0, 0.0]]).expand(B, 1, 5))
    torch.testing.assert_close(changed[:, :3], ref[:, :3])
    # Predictions live in the layer-normed space (tokens of unit RMS): the action must move them substantially,
    # through the warp of the grid and through the modulation of every block.
    assert (changed[:, 3] - ref[:, 3]).abs().max() > 0.1
    assert (turned - straight).abs().max() > 0.1


def test_size_presets_and_conflicts():
    cfg = TrainConfig()
    cfg.model.size = "tiny"
    cfg.data.cameras = ["CAM_FRONT", "CAM_FRONT_LEFT"]
    model = build_world_model(cfg)
    assert model.latent_dim == SIZE_PRESETS["tiny"]["latent_dim"]
    assert model.cameras == ["CAM_FRONT", "CAM_FRONT_LEFT"]
    cfg.model.latent_dim = 48
    with pytest.raises(ConfigError, match="latent_dim"):
        build_world_model(cfg)
    custom = WorldModel(ModelConfig(size="custom", latent_dim=24, fusion_heads=2, predictor_heads=2,
                                    lidar_widths=[8], radar_widths=[8], fusion_depth=1, predictor_depth=1),
                        ["CAM_FRONT"])
    assert custom.encode({"lidar": torch.randn(1, 5, 4)}).shape == (1, custom.bev_size ** 2, 24)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_image_weights_load_through_timm_and_never_a_hub(tmp_path, monkeypatch, suffix):
    import timm
    import timm.models._builder as builder

    from drivejepa.errors import UserError

    def no_hub(*args, **kwargs):
        raise AssertionError("a weight file was requested from the internet")

    for name in ("load_state_dict_from_url", "load_state_dict_from_hf", "download_cached_file"):
        if hasattr(builder, name):
            monkeypatch.setattr(builder, name, no_hub)
    # A full ImageNet-style checkpoint, classifier included, as users download them.
    source = timm.create_model("resnet18", pretrained=False)
    state = source.state_dict()
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    loaded = tiny_model(image_weights=str(path))
    for key, value in loaded.target_encoder.image.backbone.state_dict().items():
        torch.testing.assert_close(value, state[key])
    with pytest.raises(UserError, match="not found"):
        tiny_model(image_weights=str(tmp_path / "missing.pth"))
    broken = tmp_path / "partial.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("layer1.")}, broken)
    with pytest.raises(UserError, match="partial.pth"):
        tiny_model(image_weights=str(broken))


def test_image_normalisation_comes_from_the_backbones_pretrained_cfg():
    """timm's test_resnet is trained on (0.5, 0.5, 0.5) statistics, resnet18 on ImageNet's: each gets its own."""
    for backbone in ("resnet18", "test_resnet"):
        image = tiny_model(image_backbone=backbone).encoder.image
        cfg = image.backbone.pretrained_cfg
        torch.testing.assert_close(image.mean.flatten(), torch.tensor(cfg["mean"]) * 255.0)
        torch.testing.assert_close(image.std.flatten(), torch.tensor(cfg["std"]) * 255.0)
        grey = torch.full((1, 4, 4, 3), 127.5)
        expected = (0.5 - torch.tensor(cfg["mean"])) / torch.tensor(cfg["std"])
        torch.testing.assert_close(image.normalise(grey)[0, :, 0, 0], expected)


def test_model_image_size_resizes_what_the_backbone_sees():
    seen = []
    image = tiny_model(image_size=(24, 16)).encoder.image
    image.backbone.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    obs = make_obs()
    features = image(obs["images"])
    assert seen == [(B * len(CAMERAS), 3, 16, 24)] and features.shape[:3] == (B, len(CAMERAS), image.proj.out_channels)
    # A uniform image stays uniform: the resize is a filter, not a crop.
    flat = torch.full((1, H, W, 3), 200, dtype=torch.uint8)
    x = image.normalise(flat)
    assert x.shape == (1, 3, 16, 24) and float(x.flatten(2).std(dim=-1).max()) < 1e-4


def test_modality_dropout_hides_sensors_only_in_training():
    torch.manual_seed(0)
    model = tiny_model(modality_dropout=0.9, drop_path=0.0)
    obs = make_obs(batch=16)
    with torch.no_grad():
        model.eval()
        a, b = model.encode(obs), model.encode(obs)
        torch.testing.assert_close(a, b)
        model.train()
        model.encoder.image.backbone.eval()          # BatchNorm statistics aside, only the dropout differs
        c = model.encode(obs)
    assert torch.isfinite(c).all()
    assert not torch.allclose(a, c)


def test_the_motion_token_has_three_degrees_of_freedom(model):
    """yaw_rate is dyaw / dt at a fixed interval: the predictor reads dx, dy, dyaw (and speed), not the copy."""
    g = torch.Generator().manual_seed(5)
    states = torch.randn(B, 3, *state_shape(model), generator=g)
    actions = torch.randn(B, 3, 5, generator=g)
    other = actions.clone()
    other[..., 4] += 1.0
    with torch.no_grad():
        torch.testing.assert_close(model.predict(states, other), model.predict(states, actions))
        turned = actions.clone()
        turned[..., 2] += 0.2
        assert (model.predict(states, turned) - model.predict(states, actions)).abs().max() > 1e-4


def test_guidance_mixes_the_rollouts_with_and_without_the_action():
    """Classifier-free guidance g: each step is u + g (c - u) from the same frames, c with the actions and u with
    every action unknown; g = 1 is the plain rollout, and training never guides."""
    from drivejepa.config import ConfigError, TrainConfig, check_config

    torch.manual_seed(0)
    model = tiny_model(action_dropout=0.2, guidance=2.0).eval()
    g = torch.Generator().manual_seed(5)
    ctx = torch.randn(B, 2, *state_shape(model), generator=g)
    past = torch.randn(B, 1, 5, generator=g)
    actions = torch.randn(B, 1, 5, generator=g)
    with torch.no_grad():
        guided = model.rollout(ctx, actions, past)
        cond = model.predictor.rollout(ctx, actions, past)
        uncond = model.predictor.rollout(ctx, actions, None, future_known=False)
        model.train()
        plain = model.rollout(ctx, actions, past)
    torch.testing.assert_close(guided, uncond + 2.0 * (cond - uncond), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain, cond)
    assert (guided - cond).abs().max() > 1e-3
    cfg = TrainConfig()
    cfg.model.guidance, cfg.model.action_dropout = 2.0, 0.0
    with pytest.raises(ConfigError, match="model.guidance"):
        check_config(cfg, "guided.yaml")


def test_short_sequence_attention_matches_the_fused_kernel(monkeypatch):
    """The attention over a handful of keys (the predictor's over time) is computed per key instead of by
    ``F.scaled_dot_product_attention``, and over one key as that key's value; it must be the same attention: masks,
    the last queries only, gradients."""
    from drivejepa.models import fusion

    torch.manual_seed(0)
    attn = fusion.Attention(16, 4)
    x = torch.randn(6, 3, 16, requires_grad=True)
    mask = torch.tensor([[True, True, True], [False, True, True]] * 3)[:, None, None, :]
    for kwargs in ({}, {"attn_mask": mask}, {"attn_mask": mask, "last": 1}, {"last": 2}):
        short = attn(x, **kwargs)
        with monkeypatch.context() as m:
            m.setattr(fusion, "SHORT_SEQUENCE", 0)
            fused = attn(x, **kwargs)
        torch.testing.assert_close(short, fused)
        g_short = torch.autograd.grad(short.square().sum(), x)[0]
        g_fused = torch.autograd.grad(fused.square().sum(), x)[0]
        torch.testing.assert_close(g_short, g_fused)
    one = torch.randn(6, 1, 16, requires_grad=True)      # one key (a Markov predictor's time attention): its value
    value_only = attn(one)
    general = attn(one, attn_mask=torch.ones(6, 1, 1, 1, dtype=torch.bool))   # a mask takes the general path
    torch.testing.assert_close(value_only, general)
    torch.testing.assert_close(torch.autograd.grad(value_only.sum(), one)[0],
                               torch.autograd.grad(general.sum(), one)[0])


def test_the_demo_grid_holds_the_ego_lane_in_one_token_column():
    """The demo state's middle token column is centred on the ego and holds its whole lane, while a car centred in
    the next lane lies wholly in the next column: the cost heads can tell a car in the ego's lane from one beside it
    (with the ego on a token corner, each token under the ego's lane held half of the next lane)."""
    from pathlib import Path

    from drivejepa.config import load_config, resolve_model_config
    from drivejepa.data.synth.layouts import HIGHWAY_LANE_WIDTH, LANE_WIDTH
    from drivejepa.evaluation.probes import grid_centers

    cfg = load_config(TrainConfig, Path(__file__).resolve().parents[1] / "pipelines/train_demo.yaml")
    arch = resolve_model_config(cfg.model)
    cell = 2.0 * arch.bev_range / arch.bev_size
    lateral = np.unique(grid_centers(arch.bev_size, arch.bev_range)[:, 1])
    assert np.min(np.abs(lateral)) == pytest.approx(0.0, abs=1e-9)
    car_half_width = 0.95
    for lane in (LANE_WIDTH, HIGHWAY_LANE_WIDTH):
        assert lane / 2 <= cell / 2                                   # the ego's lane within the middle column
        assert lane - car_half_width >= cell / 2                      # a car in the next lane outside it
