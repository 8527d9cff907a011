"""Planning without a trained model: controls -> actions -> trajectories, box overlap, the sampling optimiser,
action recovery on a model that is exactly linear in the action, the oracle planner, open-loop metrics."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from drivejepa.boxes import boxes_overlap, ego_boxes
from drivejepa.config import OptimizerConfig, PlanConfig
from drivejepa.planning.motion import (compose, constant_velocity_controls, controls_to_actions, feasible,
                                      integrate)


@pytest.fixture
def grid_distance(monkeypatch):
    """The state contract: ``latent_space.distance`` reduces over the last two dims (N, C) of grid states."""
    from drivejepa import latent_space

    if latent_space.distance(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3)).dim() != 1:
        monkeypatch.setattr(latent_space, "distance", lambda a, b: (a - b).pow(2).mean(dim=(-2, -1)))


class LinearModel(torch.nn.Module):
    """A world model whose rollout is exactly linear in the actions: s_t+k = s_t + sum_j<=k W_j a_j, states
    [..., N, C]."""
    space = "raw"

    def __init__(self, n=16, c=8, horizon=6, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        scales = torch.tensor([5.0, 1.0, 0.2, 10.0, 0.4])[None, :, None, None]
        self.register_buffer("w", torch.randn(horizon, 5, n, c, generator=g) / scales)

    def rollout(self, context, actions, past_actions=None):
        k = actions.shape[1]
        return context[:, -1:] + torch.einsum("bka,kanc->bknc", actions, self.w[:k]).cumsum(1)


# ----------------------------------------------------------------------------------------------------------------
# Controls, actions, trajectories
# ----------------------------------------------------------------------------------------------------------------
def test_controls_become_the_actions_preprocessing_writes_for_that_drive():
    from drivejepa.data.frames import compute_actions
    from drivejepa.visualization.geometry import pose2d_matrix

    controls = np.array([[8.0, 0.0], [8.5, 0.2], [9.0, 0.4], [6.0, -0.3]])
    actions = controls_to_actions(controls, 0.5)
    np.testing.assert_allclose(actions[:, 3:5], controls, rtol=1e-6)        # speed and yaw rate are the controls
    poses = integrate(actions)
    rebuilt, valid = compute_actions([pose2d_matrix(*p) for p in poses], [k * 500_000 for k in range(len(poses))])
    assert valid[:-1].all()
    np.testing.assert_allclose(rebuilt[:-1], actions, atol=1e-5)
    torch_poses = integrate(controls_to_actions(torch.tensor(controls, dtype=torch.float64)[None], 0.5))[0]
    np.testing.assert_allclose(torch_poses.numpy(), poses, atol=1e-9)
    straight = integrate(controls_to_actions(constant_velocity_controls(np.float64(10.0), 6), 0.5))
    np.testing.assert_allclose(straight[-1], [30.0, 0.0, 0.0], atol=1e-9)


def test_feasible_controls_respect_the_limits():
    cfg = PlanConfig()
    lim = cfg.limits
    wild = torch.tensor([[[30.0, 0.6], [0.0, 0.6], [0.0, -0.6], [25.0, 0.6]]])
    out = feasible(wild, torch.tensor([5.0]), lim, 0.5)
    v = torch.cat([torch.tensor([5.0]), out[0, :, 0]])
    assert torch.all(torch.diff(v) <= lim.max_accel * 0.5 + 1e-6)
    assert torch.all(torch.diff(v) >= -lim.max_decel * 0.5 - 1e-6)
    w = out[0, :, 1].abs()
    assert torch.all(w <= lim.max_curvature * out[0, :, 0] + 1e-6)                  # a stopped car does not turn
    assert torch.all(w * out[0, :, 0] <= lim.max_lateral_accel + 1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Box overlap
# ----------------------------------------------------------------------------------------------------------------
def test_box_overlap_agrees_with_the_geometry():
    car = np.array([0.0, 0.0, 0.0, 4.0, 2.0])                                 # x, y, yaw, length, width
    cases = [
        ([4.0, 0.0, 0.0, 4.0, 2.0], True),                                   # nose to tail, touching
        ([4.01, 0.0, 0.0, 4.0, 2.0], False),                                 # a centimetre apart
        ([0.0, 2.0, 0.0, 4.0, 2.0], True),                                   # side by side, touching
        ([0.0, 2.01, 0.0, 4.0, 2.0], False),
        ([2.0 + np.sqrt(2) - 0.1, 0.0, np.pi / 4, 2.0, 2.0], True),           # a diamond's corner pokes in
        ([2.0 + np.sqrt(2) + 0.1, 0.0, np.pi / 4, 2.0, 2.0], False),
        ([0.0, 0.0, 1.0, 1.0, 1.0], True),                                   # inside
    ]
    for other, expected in cases:
        assert bool(boxes_overlap(car, np.array(other))) is expected, other
    # Parallel thin boxes at 45 degrees, 1.41 m apart across: their axis-aligned bounds overlap, they do not.
    a = np.array([0.0, 0.0, np.pi / 4, 4.0, 0.5])
    b = np.array([1.0, -1.0, np.pi / 4, 4.0, 0.5])
    assert not boxes_overlap(a, b)
    # Broadcast over leading axes, numpy and torch alike.
    others = np.array([c for c, _ in cases])
    np.testing.assert_array_equal(boxes_overlap(car, others), [e for _, e in cases])
    np.testing.assert_array_equal(boxes_overlap(torch.tensor(car), torch.tensor(others)).numpy(),
                                  [e for _, e in cases])
    ego = ego_boxes(np.array([[0.0, 0.0, 0.0]]), 4.0, 2.0, center_ahead=1.0)
    np.testing.assert_allclose(ego, [[1.0, 0.0, 0.0, 4.0, 2.0]])


# ----------------------------------------------------------------------------------------------------------------
# The optimiser
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["cem", "mppi"])
def test_optimizer_finds_the_minimum_within_bounds_and_is_seeded(method):
    from drivejepa.planning.optimizer import SamplingOptimizer, shift

    cfg = OptimizerConfig(method=method, candidates=128, iterations=12, elites=12, init_std=(2.0, 0.2),
                          temperature=0.05)
    target = torch.tensor([[[6.0, 0.1], [7.0, 0.2], [8.0, -0.1]], [[2.0, 0.0], [1.0, 0.0], [0.5, 0.0]]])

    def cost(x):
        return (x - target[:, None]).pow(2).sum(dim=(-1, -2))

    lower, upper = [0.0, -0.15], [30.0, 0.15]
    start = torch.full((2, 3, 2), 4.0) * torch.tensor([1.0, 0.0])
    opt = SamplingOptimizer(cfg, lower, upper)
    result = opt.minimize(cost, start)
    expected = target.clone()
    expected[..., 1] = expected[..., 1].clamp(-0.15, 0.15)
    assert torch.allclose(result.best, expected, atol=0.25)
    assert torch.all(result.samples[..., 1].abs() <= 0.15)
    again = SamplingOptimizer(cfg, lower, upper).minimize(cost, start)
    assert torch.equal(result.best, again.best)                                    # same seed, same answer
    short = dataclasses.replace(cfg, iterations=1, candidates=4)
    warm = SamplingOptimizer(short, lower, upper).minimize(cost, expected)
    assert torch.all(warm.best_cost <= cost(expected[:, None])[:, 0] + 1e-6)        # a warm start is never lost
    assert torch.equal(shift(expected)[:, :2], expected[:, 1:]) and torch.equal(shift(expected)[:, 2], expected[:, 2])


# ----------------------------------------------------------------------------------------------------------------
# Action recovery
# ----------------------------------------------------------------------------------------------------------------
def test_action_recovery_recovers_a_known_action_on_a_linear_model(grid_distance, tmp_path):
    from drivejepa.planning.recovery import energy_landscape, plot_landscape, recover

    model = LinearModel()
    cfg = PlanConfig(device="cpu")                                             # the default search: CEM, then Adam
    true = torch.tensor([[[8.0, 0.2], [7.5, 0.25], [7.0, 0.3], [6.5, 0.3], [6.0, 0.3], [5.5, 0.3]]])
    context = torch.randn(1, 2, 16, 8, generator=torch.Generator().manual_seed(1))
    actions = controls_to_actions(true, 0.5)
    goal = model.rollout(context, actions)[:, -1]
    found = recover(model, context, None, goal, torch.tensor([8.2]), 6, cfg)
    end = integrate(actions)[0, -1, :2]
    cv_end = integrate(controls_to_actions(constant_velocity_controls(torch.tensor([8.2]), 6), 0.5))[0, -1, :2]
    error, cv_error = float((found.poses[0, -1, :2] - end).norm()), float((cv_end - end).norm())
    assert cv_error > 8.0 and error < 0.3, (error, cv_error)
    cfg.recovery.gradient_steps = 0
    sampled = recover(model, context, None, goal, torch.tensor([8.2]), 6, cfg)
    assert float(found.distance) < float(sampled.distance)                   # the gradient refines the search
    cfg.recovery.landscape_size = 5
    land = energy_landscape(model, context, None, goal, true[0], cfg)
    dist = np.asarray(land["distance"])
    assert dist.shape == (5, 5) and np.unravel_index(dist.argmin(), dist.shape) == (2, 2) and dist[2, 2] < 1e-8
    png = plot_landscape(land, tmp_path / "landscape.png", "linear model")
    assert png.stat().st_size > 0 and png.with_suffix(".json").is_file()


# ----------------------------------------------------------------------------------------------------------------
# The planner with an oracle cost
# ----------------------------------------------------------------------------------------------------------------
def _in_frame(box_global: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """A planar box of the global frame seen from ego pose (x, y, yaw)."""
    c, s = np.cos(pose[2]), np.sin(pose[2])
    dx, dy = box_global[0] - pose[0], box_global[1] - pose[1]
    return np.array([c * dx + s * dy, -s * dx + c * dy, box_global[2] - pose[2], *box_global[3:]])


def test_planner_with_an_oracle_cost_avoids_a_stopped_car_that_constant_velocity_hits():
    from drivejepa.planning.costs import OracleCost
    from drivejepa.planning.planner import Planner

    cfg = PlanConfig(device="cpu")
    stopped = np.array([25.0, 0.0, 0.0, 4.5, 1.9])                            # 25 m ahead in the ego's lane
    speed = 10.0

    def drive(choose, steps=12):
        pose, history = np.zeros(3), [np.array([5.0, 0.0, 0.0, speed, 0.0], np.float32)]
        hits = []
        for _ in range(steps):
            action = choose(pose, history)
            pose = compose(pose, action)
            history.append(action)
            hits.append(bool(boxes_overlap(ego_boxes(pose, cfg.ego_length, cfg.ego_width), stopped)))
        return pose, hits

    cv = controls_to_actions(np.array([speed, 0.0]), 0.5)
    _, cv_hits = drive(lambda pose, history: cv)
    assert any(cv_hits)

    planner = Planner(cfg=cfg, scene_cost=OracleCost(torch.zeros(1, 6, 1, 5), torch.zeros(1, 6, 1), cfg))

    def plan(pose, history):
        box = torch.tensor(_in_frame(stopped, pose), dtype=torch.float32).expand(1, cfg.horizon, 1, 5)
        planner.scene_cost = OracleCost(box, torch.ones(1, cfg.horizon, 1, dtype=torch.bool), cfg)
        p = planner.plan(None, np.stack(history), "straight")
        assert p.candidates.shape == (cfg.optimizer.candidates, cfg.horizon + 1, 3)
        assert p.latency_ms["total"] > 0 and p.command == "straight"
        return p.actions[0]

    end, hits = drive(plan)
    assert not any(hits)
    assert end[0] > 5.0                                                        # and it still drives on


def test_a_decision_reports_the_cost_and_terms_of_its_own_plan():
    """The decision keeps the terms of its best candidate from the search (no extra rollout): they are what
    evaluating the returned plan gives, for each of several problems planned together."""
    from drivejepa.planning.costs import OracleCost, Situation
    from drivejepa.planning.planner import Planner
    from drivejepa.planning.route import command_index

    cfg = PlanConfig(device="cpu")
    stopped = torch.tensor([25.0, 0.0, 0.0, 4.5, 1.9]).expand(2, cfg.horizon, 1, 5)
    planner = Planner(cfg=cfg, scene_cost=OracleCost(stopped, torch.ones(2, cfg.horizon, 1, dtype=torch.bool), cfg))
    situation = Situation(torch.tensor([10.0, 4.0]), torch.tensor([command_index("straight"), command_index("left")]),
                          cruise_speed=torch.tensor([10.0, 8.0]))
    decision = planner.decide(situation)
    cost, terms = planner.evaluate(situation, decision.controls[:, None])
    torch.testing.assert_close(decision.cost, cost[:, 0])
    assert set(decision.terms) == set(terms)
    for name, value in terms.items():
        torch.testing.assert_close(decision.terms[name], value[:, 0])


@pytest.mark.parametrize("score_mean", [True, False])
def test_a_decision_without_its_mean_scored_is_one_rollout_and_the_next_starts_from_that_mean(score_mean):
    """``optimizer.score_mean: false`` (the faster planner): a decision calls the cost once (its candidates; the
    refitted mean gets no rollout of its own), its plan is the best candidate, and the next decision's first candidate
    is that mean shifted by the step driven, the warm start of sampling MPC. Scored, the mean costs a second call and
    the next decision starts from the plan."""
    from drivejepa.planning.costs import OracleCost
    from drivejepa.planning.optimizer import shift
    from drivejepa.planning.planner import Planner

    cfg = PlanConfig(device="cpu", optimizer=OptimizerConfig(score_mean=score_mean))
    stopped = torch.tensor([25.0, 0.0, 0.0, 4.5, 1.9]).expand(1, cfg.horizon, 1, 5)
    planner = Planner(cfg=cfg, scene_cost=OracleCost(stopped, torch.ones(1, cfg.horizon, 1, dtype=torch.bool), cfg))
    seen, means = [], []
    evaluate, decide = planner.evaluate, planner.decide

    def record_candidates(situation, controls):
        seen.append(controls.clone())
        return evaluate(situation, controls)

    def record_mean(situation, warm_start=None):
        decision = decide(situation, warm_start)
        means.append(decision.mean)
        return decision

    planner.evaluate, planner.decide = record_candidates, record_mean
    history = controls_to_actions(np.array([[10.0, 0.0]] * 3), 0.5)
    first = planner.plan(None, history, "straight")
    calls = 2 if score_mean else 1
    assert len(seen) == calls and first.evaluations == cfg.optimizer.candidates + calls - 1
    if not score_mean:
        assert min(float((torch.from_numpy(first.controls) - c).abs().max()) for c in seen[0][0]) == 0.0
    second = planner.plan(None, np.concatenate([history, first.actions[:1]]), "straight")
    start = means[0] if not score_mean else torch.from_numpy(first.controls)[None]
    expected = feasible(shift(start)[:, None], torch.tensor([float(first.actions[0, 3])]), cfg.limits, 0.5)[:, 0]
    torch.testing.assert_close(seen[calls][0, 0], expected[0])
    assert second.evaluations == first.evaluations


def test_jerk_counts_the_first_step_against_the_acceleration_now():
    """An ego braking at 2 m/s^2: a plan that keeps braking has no jerk, with or without the acceleration now, and
    pays its deceleration in comfort (1, in units of 2 m/s^2); constant speed pays no comfort and, without the
    acceleration now, no jerk; with it, the jolt of letting go of the brake at once (4 m/s^3, one unit, over the
    first of its 6 jerk steps: 1/6)."""
    from drivejepa.planning.costs import Situation, comfort, jerk
    from drivejepa.planning.motion import trend_controls

    speed, dt = torch.tensor([10.0]), 0.5
    situation = Situation(speed, torch.tensor([0]), previous_speed=torch.tensor([11.0]))
    accel = situation.accel_now(dt)
    torch.testing.assert_close(accel, torch.tensor([-2.0]))
    assert Situation(speed, torch.tensor([0])).accel_now(dt) is None
    braking = trend_controls(speed, accel, 1.0, 6, dt)[:, None]
    torch.testing.assert_close(braking[0, 0, :, 0], torch.tensor([9.0, 8.0, 7.0, 6.0, 5.0, 4.0]))
    cruising = constant_velocity_controls(speed, 6)[:, None]
    torch.testing.assert_close(comfort(braking, speed, dt), torch.tensor([[1.0]]))
    torch.testing.assert_close(comfort(cruising, speed, dt), torch.tensor([[0.0]]))
    for accel_now in (None, accel):
        torch.testing.assert_close(jerk(braking, speed, dt, accel_now), torch.tensor([[0.0]]))
    torch.testing.assert_close(jerk(cruising, speed, dt), torch.tensor([[0.0]]))
    torch.testing.assert_close(jerk(cruising, speed, dt, accel), torch.tensor([[1.0 / 6.0]]))


def test_the_trend_anchor_keeps_the_acceleration_now_fading_and_never_reverses():
    """``accel_decay``: the first iteration tries the ego's acceleration now, fading by that factor a step; a
    braking ego's trend stops at 0 m/s rather than driving backwards. Off (0), or with the acceleration unknown,
    no candidate is that plan."""
    from drivejepa.planning.costs import OracleCost, Situation
    from drivejepa.planning.motion import trend_controls
    from drivejepa.planning.planner import Planner

    fading = trend_controls(torch.tensor([10.0]), torch.tensor([2.0]), 0.5, 4, 0.5)[0, :, 0]
    torch.testing.assert_close(fading, torch.tensor([11.0, 11.5, 11.75, 11.875]))
    stopping = trend_controls(torch.tensor([2.0]), torch.tensor([-4.0]), 1.0, 4, 0.5)[0, :, 0]
    torch.testing.assert_close(stopping, torch.tensor([0.0, 0.0, 0.0, 0.0]))
    trend = trend_controls(torch.tensor([8.0]), torch.tensor([-1.0]), 0.7, 6, 0.5)
    tried = {}
    for decay, previous in ((0.7, torch.tensor([8.5])), (0.0, torch.tensor([8.5])), (0.7, None)):
        cfg = PlanConfig(device="cpu", accel_decay=decay, optimizer=OptimizerConfig(candidates=8, iterations=1,
                                                                                      elites=2))
        planner = Planner(cfg=cfg, scene_cost=OracleCost(torch.zeros(1, 6, 1, 5), torch.zeros(1, 6, 1), cfg))
        situation = Situation(torch.tensor([8.0]), torch.tensor([0]), previous_speed=previous)
        poses = planner.decide(situation).candidates[0]
        expected = integrate(controls_to_actions(trend, 0.5))[0]
        tried[(decay, previous is None)] = bool(((poses - expected).abs().amax(dim=(-2, -1)) < 1e-4).any())
    assert tried == {(0.7, False): True, (0.0, False): False, (0.7, True): False}


def test_planner_variants_change_the_search_and_costs_only():
    """A variant of ``evaluate``'s planning section is the default planner with overrides; one that would change the
    windows, the cost heads or the baselines is refused, naming itself and the setting, and so is a malformed
    ``--plan-variant``."""
    from drivejepa.commands.evaluate import plan_variants
    from drivejepa.config import ConfigError
    from drivejepa.errors import UserError
    from drivejepa.planning.evaluation import variant_configs

    base = PlanConfig(device="cpu")
    spec = plan_variants(["smooth: accel_decay=0.7 weights.jerk=2.0", "same:"], "plan.yaml")
    assert spec == {"smooth": ["accel_decay=0.7", "weights.jerk=2.0"], "same": []}
    cfgs = variant_configs(base, spec)
    assert cfgs["smooth"].weights.jerk == 2.0 and cfgs["smooth"].accel_decay == 0.7 and cfgs["same"] == base
    assert base.weights.jerk == 0.2                                               # the default is not touched
    with pytest.raises(ConfigError, match=r"variant 'fine' changes heads"):
        variant_configs(base, {"fine": ["heads.subcells=2"]})
    with pytest.raises(ConfigError, match="accel_decay"):
        variant_configs(base, {"bad": ["accel_decay=2.0"]})
    for bad in (["smooth accel_decay=0.7"], ["a: x=1", "a: y=2"], ["a: accel_decay"]):
        with pytest.raises(UserError, match="--plan-variant"):
            plan_variants(bad, "plan.yaml")
    with pytest.raises(UserError, match="needs --plan-config"):
        plan_variants(["a: accel_decay=0.7"], None)


def test_planner_takes_its_cruise_speed_back_once_the_lane_is_clear():
    """An ego that cruised at 10 m/s and slowed to 2 m/s behind traffic (now gone) plans to speed up again; the
    cruise speed is the highest of the last ``reference_seconds`` (with 0, only the current speed counts)."""
    from drivejepa.planning.costs import OracleCost
    from drivejepa.planning.planner import Planner

    history = controls_to_actions(np.array([[10.0, 0.0]] * 10 + [[6.0, 0.0], [2.0, 0.0]]), 0.5)
    ends = {}
    for seconds in (10.0, 0.0):
        cfg = PlanConfig(device="cpu", reference_seconds=seconds)
        planner = Planner(cfg=cfg, scene_cost=OracleCost(torch.zeros(1, 6, 1, 5), torch.zeros(1, 6, 1), cfg))
        ends[seconds] = planner.plan(None, history, "straight").controls[-1, 0]
    assert ends[10.0] > 4.0 and ends[0.0] < 2.5


@pytest.mark.parametrize("resume", [1.5, 0.0])
def test_a_narrow_search_regains_its_cruise_speed_through_the_resume_anchor(resume):
    """CEM 8 x 1 (one iteration of 8 candidates around a slow plan) from 2 m/s with a cruise speed of 10 and the lane
    clear: with ``resume_accel`` the first iteration tries speeding up at the IDM's pace and the ego speeds up by
    about that much each decision (5.0 m/s after 4 decisions); without it the random candidates' comfort and jerk hold
    it back (3.3 m/s at the default spread, 2.0 at a yaw-rate spread of 0.1 rad/s)."""
    from drivejepa.planning.costs import OracleCost
    from drivejepa.planning.planner import Planner

    history = controls_to_actions(np.array([[10.0, 0.0]] * 10 + [[6.0, 0.0], [2.0, 0.0]]), 0.5)
    cfg = PlanConfig(device="cpu", resume_accel=resume,
                     optimizer=OptimizerConfig(candidates=8, iterations=1, elites=2))
    planner = Planner(cfg=cfg, scene_cost=OracleCost(torch.zeros(1, 6, 1, 5), torch.zeros(1, 6, 1), cfg))
    for _ in range(4):
        plan = planner.plan(None, history, "straight")
        history = np.concatenate([history, plan.actions[:1]])
    speed = float(history[-1, 3])
    assert speed > 4.5 if resume else speed < 4.0


@pytest.mark.parametrize("native", [True, False])
def test_planner_rolls_out_in_the_precision_the_hardware_calls_for(monkeypatch, caplog, native):
    """``amp: auto`` plans under bf16 autocast on a CPU with native bf16 and in fp32 where bf16 would be emulated,
    says which and why once a process (not once per planner of an evaluation's variants), and hands the optimiser
    float32 costs either way (bf16 costs tie the candidates)."""
    import logging

    from drivejepa import precision
    from drivejepa.planning import planner as planner_module
    from drivejepa.planning.planner import Planner

    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: (native, "test CPU"))
    monkeypatch.setattr(planner_module, "_LOGGED_PRECISIONS", set())
    seen = []

    class LinearModel(CopyLastModel):
        def __init__(self):
            super().__init__()
            self.mix = torch.nn.Linear(1, 1)

        def rollout(self, context, actions, past_actions=None):
            moved = self.mix(super().rollout(context, actions, past_actions))
            seen.append(moved.dtype)
            return moved

    heads, state = _car_ahead_heads_and_state()
    with caplog.at_level(logging.INFO, logger="drivejepa.planning.planner"):
        planner = Planner(LinearModel(), heads, PlanConfig(device="cpu"))
    assert planner.precision.dtype == ("bfloat16" if native else None)
    assert any("planning precision" in r.getMessage() and "test CPU" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="drivejepa.planning.planner"):
        Planner(LinearModel(), heads, PlanConfig(device="cpu"))
    assert not any("planning precision" in r.getMessage() for r in caplog.records)
    history = controls_to_actions(np.array([[5.0, 0.0]] * 3), 0.5)
    from drivejepa.planning.costs import Situation

    situation = Situation(torch.tensor([5.0]), torch.tensor([0]), state, None, torch.tensor([5.0]))
    cost, terms = planner.evaluate(situation, torch.full((1, 4, 6, 2), 5.0))
    assert set(seen) == {torch.bfloat16 if native else torch.float32}
    assert cost.dtype == torch.float32 and all(t.dtype == torch.float32 for t in terms.values())
    plan = planner.plan_states(state, history, "straight")
    assert np.isfinite(plan.cost) and plan.controls.shape == (6, 2)


class CopyLastModel(torch.nn.Module):
    """A world model whose every predicted state is the last context state (the world moves with the ego)."""
    space = "raw"

    def rollout(self, context, actions, past_actions=None):
        return context[:, -1:].expand(-1, actions.shape[1], *context.shape[2:])


class FadingModel(CopyLastModel):
    """A rollout that loses everything: only the static floor can see a car."""

    def rollout(self, context, actions, past_actions=None):
        return torch.zeros_like(super().rollout(context, actions, past_actions))


def _drove_on(standing):
    """The context of :func:`_car_ahead_heads_and_state` with the car 4 m further back half a second earlier."""
    moving = standing.clone()
    moving[:, 0] = 0.0
    moving[:, 0, [9 * 16 + 7, 9 * 16 + 8], 0] = 1.0   # x in [4, 8) m
    return moving


def _car_ahead_heads_and_state():
    """Cost heads (both sets) that read channel 0 as the occupancy of a token's 4 x 4 cells, and a context whose last
    state has a car 8-12 m ahead of the ego's centre in its lane."""
    from drivejepa.planning.heads import PlanningHeads

    state = torch.zeros(1, 2, 256, 1)
    state[..., [10 * 16 + 7, 10 * 16 + 8], 0] = 1.0    # the tokens of x in [8, 12) m, y in [-4, 4) m
    return PlanningHeads.of(_channel_zero_heads(sees=True)), state


def _channel_zero_heads(sees: bool):
    """A set of cost heads that reads channel 0 as occupancy (``sees``), or reads every cell as free."""
    from drivejepa.planning.heads import CostHeads, HeadSpec

    heads = CostHeads(HeadSpec(channels=1, bev_size=16, bev_range=32.0, subcells=4, kind="linear"))
    with torch.no_grad():
        heads.head.weight.zero_()
        heads.head.bias.fill_(-20.0)
        heads.head.weight[: 16, 0] = 40.0 if sees else 0.0
    return heads


def _headway_terms(model, heads, state, cfg, speeds):
    from drivejepa.planning.costs import LatentSceneCost, Situation

    n = len(speeds)
    actions = controls_to_actions(torch.stack([speeds, torch.zeros(n)], -1)[:, None].expand(n, 6, 2), 0.5)[None]
    cost = LatentSceneCost(model, heads, cfg)
    return cost(Situation(torch.tensor([5.0]), torch.tensor([0]), state, None), actions, integrate(actions))


def test_headway_cost_wants_the_gap_the_planned_speed_needs_from_predicted_occupancy():
    """A car predicted 8-12 m ahead of the ego's centre: standing still needs only the minimum gap and pays nothing,
    faster plans reach further and pay more; the footprint collision term does not see that car at all."""
    from drivejepa.planning.costs import corridor

    cfg = PlanConfig(device="cpu", headway_static_steps=0)
    heads, state = _car_ahead_heads_and_state()
    lane, ahead = corridor(heads.spec.grid, heads.spec.bev_range, cfg)
    assert (ahead >= 0).all() and ahead.min() < 1.0 and lane.numel() > 0
    terms = _headway_terms(CopyLastModel(), heads, state, cfg, torch.tensor([0.0, 5.0, 10.0, 20.0]))
    headway = terms["headway"][0]
    assert headway[0] < 1e-6 and bool((headway[1:] > 0.1).all()) and bool((torch.diff(headway) > 0).all())
    assert float(terms["collision"][0].max()) < 1e-6


def test_headway_reads_the_observed_car_held_still_where_the_rollout_loses_it():
    """A rollout that fades the car out predicts an empty lane; with ``headway_static_steps`` the last observed
    state, held still and seen from the first planned pose, still puts the car in the way of the faster plans."""

    heads, state = _car_ahead_heads_and_state()
    speeds = torch.tensor([0.0, 5.0, 10.0])
    model = FadingModel()
    blind = _headway_terms(model, heads, state, PlanConfig(device="cpu", headway_static_steps=0), speeds)["headway"]
    floor = _headway_terms(model, heads, state, PlanConfig(device="cpu", headway_static_steps=1), speeds)["headway"]
    assert float(blind.max()) < 1e-6
    assert floor[0, 0] < 1e-6 and bool((floor[0, 1:] > 0.5).all())


def test_the_floor_wants_the_gap_of_its_own_time():
    """``headway_static_seconds`` is the floor's gap time: a shorter one asks less room from the car held still (a
    plan may brake later), never more; the rollout's gap is left as it was."""
    heads, state = _car_ahead_heads_and_state()
    speeds = torch.tensor([0.5, 1.0, 2.0, 4.0])
    terms = {t: _headway_terms(FadingModel(), heads, state, PlanConfig(device="cpu", headway_static_seconds=t),
                               speeds)["headway"][0] for t in (0.0, 1.2)}
    assert bool((terms[0.0] <= terms[1.2] + 1e-6).all()) and bool((terms[0.0] < terms[1.2] - 0.05).any())


def test_rollout_heads_read_the_predictions_and_state_heads_the_observed_floor():
    """The planner reads its rollouts with the set fitted on rollouts and the static floor (an encoder state) with
    the set fitted on encoder states: each set alone sees the car only through its own source."""
    from drivejepa.planning.heads import PlanningHeads

    _, state = _car_ahead_heads_and_state()
    speeds = torch.tensor([0.0, 10.0])
    seeing, blind = _channel_zero_heads(sees=True), _channel_zero_heads(sees=False)
    rollout_only = PlanConfig(device="cpu", headway_static_steps=0)
    floor_only = PlanConfig(device="cpu", headway_static_steps=6)
    model = CopyLastModel()
    assert _headway_terms(model, PlanningHeads.of(blind, seeing), state, rollout_only, speeds)["headway"][0, 1] > 0.5
    assert _headway_terms(model, PlanningHeads.of(seeing, blind), state, rollout_only, speeds)["headway"][0, 1] < 1e-6
    assert _headway_terms(model, PlanningHeads.of(seeing, blind), state, floor_only, speeds)["headway"][0, 1] > 0.5


def test_headway_floor_counts_a_standing_car_and_not_one_that_drove_on():
    """The floor is what stood still over the two context frames: a car in the same place in both is in the way of
    a faster plan; a car that was 4 m further back half a second ago (driving on ahead of the ego) is not."""
    from drivejepa.planning.costs import LatentSceneCost, Situation

    heads, standing = _car_ahead_heads_and_state()
    moving = _drove_on(standing)
    cfg = PlanConfig(device="cpu", headway_static_steps=6, headway_static_frames=2)
    actions = controls_to_actions(torch.tensor([[[8.0, 0.0]] * 6]), 0.5)[None]
    past = torch.zeros(1, 1, 5)                        # the ego stood still between the two frames
    cost = LatentSceneCost(FadingModel(), heads, cfg)
    floor = {name: float(cost(Situation(torch.tensor([8.0]), torch.tensor([0]), state, past), actions,
                              integrate(actions))["headway"][0, 0])
             for name, state in (("standing", standing), ("moving", moving))}
    assert floor["standing"] > 0.5 and floor["moving"] < 1e-3


def test_the_lane_floor_moves_a_car_ahead_on_at_the_speed_it_drove():
    """``headway_static_motion: lane``: the lane's occupancy moved 4 m in the last half second, so the floor moves the
    car on at 8 m/s and a plan at 8 m/s keeps its gap; a leader that may brake (``headway_static_brake``) asks for
    more room, never more than a standing car; a standing car reads 0 m/s and is the floor it was."""
    from drivejepa.planning.costs import LatentSceneCost, Situation

    heads, standing = _car_ahead_heads_and_state()
    moving = _drove_on(standing)
    actions = controls_to_actions(torch.tensor([[[8.0, 0.0]] * 6]), 0.5)[None]
    past = torch.zeros(1, 1, 5)
    headway = {}
    for motion, brake in (("still", 0.0), ("lane", 0.0), ("lane", 4.0)):
        cfg = PlanConfig(device="cpu", headway_static_motion=motion, headway_static_brake=brake)
        cost = LatentSceneCost(FadingModel(), heads, cfg)
        for name, state in (("standing", standing), ("moving", moving)):
            situation = Situation(torch.tensor([8.0]), torch.tensor([0]), state, past)
            headway[motion, brake, name] = float(cost(situation, actions, integrate(actions))["headway"][0, 0])
            assert float(cost.lane_speed(state, past)[0]) == (8.0 if name == "moving" else 0.0)
    assert headway["lane", 0.0, "standing"] == headway["lane", 4.0, "standing"] == headway["still", 0.0, "standing"]
    assert headway["still", 0.0, "standing"] > 0.9
    assert headway["lane", 0.0, "moving"] < 0.5 < headway["still", 0.0, "moving"]
    assert headway["lane", 0.0, "moving"] < headway["lane", 4.0, "moving"] <= headway["still", 0.0, "moving"]


def test_the_lane_floor_says_it_stays_still_with_one_context_frame(caplog):
    """A Markov model's decisions have one context frame, so there is no earlier frame to see the lane's occupancy
    move from: ``headway_static_motion: lane`` then reads what ``still`` reads, and says so once, not silently."""
    import logging

    from drivejepa.planning.costs import LatentSceneCost, Situation

    heads, standing = _car_ahead_heads_and_state()
    moving = _drove_on(standing)[:, -1:]                                   # the newest frame alone
    actions = controls_to_actions(torch.tensor([[[8.0, 0.0]] * 6]), 0.5)[None]
    situation = Situation(torch.tensor([8.0]), torch.tensor([0]), moving, None)
    headway = {}
    with caplog.at_level(logging.WARNING, logger="drivejepa.planning.costs"):
        for motion in ("still", "lane", "lane"):
            cost = LatentSceneCost(FadingModel(), heads, PlanConfig(device="cpu", headway_static_motion=motion))
            for _ in range(2):
                headway[motion] = cost(situation, actions, integrate(actions))["headway"]
    assert torch.equal(headway["lane"], headway["still"])
    said = [r for r in caplog.records if "headway_static_motion = lane" in r.getMessage()]
    assert len(said) == 2                                                  # once a cost, not once a decision


def test_cost_heads_map_tokens_to_their_cells():
    """Token i * G + j holds the s x s cells of x bin i and y bin j; reading a few cells gives the full map's values."""
    from drivejepa.planning.heads import CostHeads, HeadSpec

    torch.manual_seed(0)
    heads = CostHeads(HeadSpec(channels=3, bev_size=4, bev_range=8.0, subcells=2, hidden=8, kind="linear"))
    torch.nn.init.normal_(heads.bias)
    states = torch.randn(5, 16, 3)
    full = heads(states)
    assert full.shape == (5, 2, 8, 8)
    cells = torch.tensor([0, 9, 27, 36, 63])
    np.testing.assert_allclose(heads.logits_at(states, cells).detach().numpy(),
                               full.flatten(-2)[..., cells].detach().numpy(), atol=1e-6)
    one = torch.zeros(1, 16, 3)
    one[0, 6] = 1.0                                                            # token of x bin 1, y bin 2
    changed = (heads(one) - heads(torch.zeros(1, 16, 3))).abs().sum(1)[0] > 0
    assert changed.nonzero().tolist() == [[2, 4], [2, 5], [3, 4], [3, 5]]


def test_cost_heads_with_a_neighbourhood_read_the_tokens_around():
    """With neighbourhood 1 a token's cells also read the 8 tokens around it (none beyond the grid's edge), and
    reading a few cells still gives the full map's values."""
    from drivejepa.planning.heads import CostHeads, HeadSpec

    torch.manual_seed(0)
    heads = CostHeads(HeadSpec(channels=3, bev_size=4, bev_range=8.0, subcells=2, hidden=8, kind="linear",
                               neighbourhood=1))
    states = torch.randn(5, 16, 3)
    cells = torch.tensor([0, 9, 27, 36, 63])
    np.testing.assert_allclose(heads.logits_at(states, cells).detach().numpy(),
                               heads(states).flatten(-2)[..., cells].detach().numpy(), atol=1e-6)
    one = torch.zeros(1, 16, 3)
    one[0, 6] = 1.0                                                            # token of x bin 1, y bin 2
    changed = (heads(one) - heads(torch.zeros(1, 16, 3))).abs().sum(1)[0] > 0
    tokens = sorted({(int(i) // 2, int(j) // 2) for i, j in changed.nonzero()})
    assert tokens == [(i, j) for i in (0, 1, 2) for j in (1, 2, 3)]           # the 3 x 3 block around (1, 2)
    corner = torch.zeros(1, 16, 3)
    corner[0, 0] = 1.0                                                         # x bin 0, y bin 0: at the edge
    changed = (heads(corner) - heads(torch.zeros(1, 16, 3))).abs().sum(1)[0] > 0
    assert sorted({(int(i) // 2, int(j) // 2) for i, j in changed.nonzero()}) == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_ego_mlp_learns_the_future_from_past_motion_and_the_command():
    """The ego-status baseline: from the past speed and the route command it learns to hold the speed and turn the
    way the command says (toy windows: speeds 2-15 m/s, left / straight / right at +-0.25 rad/s)."""
    from drivejepa.config import EgoMLPConfig
    from drivejepa.planning.ego_mlp import EgoMLP, EgoSpec, fit_ego_mlp
    from drivejepa.planning.windows import Windows

    rng = np.random.default_rng(0)
    n, horizon = 512, 6
    speed = rng.uniform(2.0, 15.0, n)
    command = rng.integers(0, 3, n)
    yaw_rate = np.array([0.25, 0.0, -0.25])[command]
    past = controls_to_actions(np.stack([speed, np.zeros(n)], -1)[:, None].repeat(4, 1), 0.5)
    truth = integrate(controls_to_actions(np.stack([speed, yaw_rate], -1)[:, None].repeat(horizon, 1), 0.5))
    windows = Windows(scene=["toy"] * n, start=np.zeros(n, int), branch=np.zeros(n, bool), past=past,
                      speed_now=speed.astype(np.float32), cruise_speed=speed.astype(np.float32), command=command,
                      truth=truth,
                      actions=np.zeros((n, horizon, 5), np.float32), boxes=np.zeros((n, horizon, 0, 5)),
                      box_mask=np.zeros((n, horizon, 0), bool))
    model = fit_ego_mlp(windows, EgoSpec(past_steps=4, horizon=horizon, frame_seconds=0.5),
                        EgoMLPConfig(steps=600), progress=False)
    assert isinstance(model, EgoMLP)
    actions, trajectory = model.plan(past[:64], command[:64])
    assert actions.shape == (64, horizon, 5) and trajectory.shape == (64, horizon + 1, 3)
    error = np.linalg.norm(trajectory[:, -1, :2] - truth[:64, -1, :2], axis=-1)
    assert error.mean() < 1.0, error.mean()
    lateral = trajectory[:, -1, 1]
    assert np.all(lateral[command[:64] == 0] > 0.5) and np.all(lateral[command[:64] == 2] < -0.5)
