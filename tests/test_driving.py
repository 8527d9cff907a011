"""Closed-loop driving in the synthetic world: the simulator, the drivers, the metrics (drivejepa/driving/)."""
from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest

from conftest import BRANCH_FRAMES

REPO = Path(__file__).resolve().parents[1]
SAMPLES, SIZE = 12, (320, 180)          # the session world of conftest.synth_root


@pytest.fixture(scope="module")
def tiny_cfg():
    from drivejepa.config import PreprocessConfig, load_config

    return load_config(PreprocessConfig, REPO / "tests/data/preprocess_tiny.yaml")


def _run(number, driver, cfg, start=1, steps=0, **world):
    from drivejepa.driving.simulator import ClosedLoop, Scenario

    world = {"samples": SAMPLES, "image_size": SIZE, **world}
    loop = ClosedLoop(Scenario(number, seed=0, start=start, steps=steps, **world), cfg)
    try:
        return loop.run(driver)
    finally:
        loop.close()


@pytest.mark.parametrize("shards, world", [
    ("shard_dir", {}),
    ("branch_shards", {"image_size": (96, 54), "branches": 5, "branch_frames": BRANCH_FRAMES}),
], ids=["plain world", "world with branches"])
def test_expert_reproduces_the_logged_scene(request, shards, world, tiny_cfg):
    """Driven by the expert, the closed loop is the scene `drivejepa synth` wrote: every agent's pose, speed and
    presence at every 20 Hz step, and every sensor array of every key frame as preprocessing made it (also in a
    world whose scenes have counterfactual branches, which share the scene's map and global frame)."""
    from drivejepa.data.shards import read_shard, shard_path
    from drivejepa.data.synth.branches import family
    from drivejepa.data.synth.world import place, simulate_scene
    from drivejepa.driving.drivers import Expert

    loop = _run(2, Expert(), tiny_cfg, **world)
    assert loop.end_reason == "end" and len(loop.frames) == SAMPLES
    sim = simulate_scene(2, 0, (SAMPLES - 1) * 0.5, margin=0.05)
    branches = (world.get("branches", 0), 1, world.get("branch_frames", 8))
    _, tracks, paths = family(sim, SAMPLES, 0, *branches)
    logged = place(sim, tracks, paths)[0]
    w = loop.world
    assert w.steps == logged.steps
    for key in ("agent_xy", "agent_yaw", "agent_speed", "agent_active"):
        assert np.array_equal(getattr(w, key), getattr(logged, key)), key
    shard = read_shard(shard_path(request.getfixturevalue(shards), "scene-0002"))
    for key in loop.frames[0]:
        observed = np.stack([f[key] for f in loop.frames])
        assert observed.dtype == shard.arrays[key].dtype, key
        assert np.array_equal(observed, shard.arrays[key]), key
    assert np.array_equal(loop.observer.intrinsics(), shard.arrays["cam_intrinsics"])
    assert np.array_equal(loop.realised_actions(), shard.arrays["actions"][:SAMPLES - 1])


def test_constant_velocity_rear_ends_a_braking_leader_the_expert_follows(tiny_cfg):
    """Scene 4 (congestion): the leader slows down; repeating the last action drives into it, the IDM expert
    keeps its distance."""
    from drivejepa.driving.drivers import ConstantVelocity, Expert
    from drivejepa.driving.metrics import scenario_metrics
    from drivejepa.planning.motion import relative

    cv = _run(4, ConstantVelocity(), tiny_cfg, start=2)
    expert = _run(4, Expert(), tiny_cfg, start=2)
    assert cv.end_reason == "collision"
    w, k, other = cv.world, cv.end_step, cv.collision_agent
    ego = (w.agent_xy[k, 0, 0], w.agent_xy[k, 0, 1], w.agent_yaw[k, 0])
    rel = relative(ego, (w.agent_xy[k, other, 0], w.agent_xy[k, other, 1], w.agent_yaw[k, other]))
    assert rel[0] > 2.0 and abs(rel[1]) < 1.0 and abs(rel[2]) < 0.3       # it was ahead, in the ego's lane
    assert w.agent_speed[k, other] < w.agent_speed[k, 0]                    # and slower
    m_cv, m_expert = scenario_metrics(cv), scenario_metrics(expert)
    assert expert.end_reason == "end" and not m_expert["collision"] and m_cv["collision"]
    assert m_cv["collision_type"] in ("active front", "stopped agent") and m_cv["at_fault"]
    assert m_expert["collision_type"] is None and not m_expert["at_fault"]
    assert m_cv["min_ttc_s"] == 0.0 and m_expert["min_ttc_s"] > 1.0


def test_a_commanded_action_is_what_the_ego_does(tiny_cfg):
    """A planner given as a plain callable drives: braking makes the ego travel less than the expert, and the
    motion between key frames is the commanded one."""
    from drivejepa.driving.drivers import CallableDriver, Expert, window
    from drivejepa.driving.metrics import path_length

    commanded = []

    def brake(history, status, command):
        assert command in ("left", "straight", "right") and len(history) >= 3
        w = window(history, status, 3)                   # what a model-based planner would stack
        assert w["lidar"].shape == (3, 1024, 5) and w["images"].shape == (3, 1, 64, 112, 3)
        assert np.array_equal(w["actions"][:2], status.past_actions[-2:]) and w["action_valid"].tolist() == [
            True, True, False]
        last = status.past_actions[-1]
        action = np.array([0.5 * last[0], 0.5 * last[1], 0.5 * last[2], 0.5 * last[3], 0.5 * last[4]])
        commanded.append(action)
        return action

    steps = 3
    braked = _run(2, CallableDriver("brake", brake), tiny_cfg, start=2, steps=steps)
    expert = _run(2, Expert(), tiny_cfg, start=2, steps=steps)
    k0, k1 = braked.key_step(2), braked.key_step(2 + steps)
    assert len(commanded) == steps and braked.end_reason == "end"
    assert path_length(braked.ego_local[k0:k1 + 1, :2]) < 0.8 * path_length(expert.ego_local[k0:k1 + 1, :2])
    realised = braked.realised_actions()[2:2 + steps]
    assert np.allclose(realised[:, :3], np.array(commanded)[:, :3], atol=1e-4)


def test_an_ego_that_steers_off_its_route_is_scored_out_of_its_lane(tiny_cfg):
    """The expert keeps to the logged route's centre line; a driver that holds its speed and turns at 0.4 rad/s
    leaves it, and the metrics say by how far and for how long its box was past the lane's edge."""
    import torch

    from drivejepa.driving.drivers import CallableDriver, Expert
    from drivejepa.driving.metrics import scenario_metrics
    from drivejepa.planning.motion import controls_to_actions

    def swerve(history, status, command):
        speed = max(float(status.past_actions[-1, 3]), 5.0)
        return controls_to_actions(torch.tensor([[[speed, 0.4]]]), 0.5)[0, 0].numpy()

    kept = scenario_metrics(_run(2, Expert(), tiny_cfg, start=2, steps=4))
    left = scenario_metrics(_run(2, CallableDriver("swerve", swerve), tiny_cfg, start=2, steps=4))
    assert kept["route_offset_max_m"] < 0.05 and kept["out_of_lane_s"] == 0.0
    assert left["route_offset_max_m"] > 1.0 and left["out_of_lane_s"] > 0.0
    assert left["route_offset_mean_m"] < left["route_offset_max_m"]


def test_metrics_of_a_hand_made_trajectory():
    from drivejepa.data.synth.geometry import Path as RoutePath
    from drivejepa.driving import safety
    from drivejepa.driving.metrics import jerk, path_length, per_km, route_offsets, route_progress, summarise

    assert jerk([0.0, 1.0, 3.0, 6.0], 0.5) == (4.0, 4.0)          # accel 2, 4, 6 m/s^2: jerk 4 m/s^3
    assert jerk([5.0, 5.0], 0.5) == (None, None)
    route = RoutePath(np.array([[0.0, 0.0], [50.0, 0.0], [50.0, 50.0]]))
    assert route_progress(route, (10.0, 1.0), (40.0, -2.0)) == pytest.approx(30.0)
    assert route_progress(route, (10.0, 0.0), (52.0, 20.0)) == pytest.approx(60.0)   # round the corner
    assert route_offsets(route, np.array([[10.0, 1.0], [52.0, 20.0]])) == pytest.approx([1.0, -2.0])  # left +
    assert path_length(np.array([[0.0, 0.0], [3.0, 4.0], [3.0, 10.0]])) == pytest.approx(11.0)
    assert per_km(3, 1500.0) == pytest.approx(2.0) and per_km(0, 0.0) is None
    # time to collision: the ego at 10 m/s towards a car standing 30 m ahead (both 4 m long): 26 m of gap, 2.6 s
    world = types.SimpleNamespace(ego_index=0, agent_xy=np.array([[[0.0, 0.0], [30.0, 0.5]]]),
                                  agent_yaw=np.zeros((1, 2)), agent_speed=np.array([[10.0, 0.0]]),
                                  agent_active=np.ones((1, 2), bool))
    lw = np.array([[4.0, 2.0], [4.0, 2.0]])
    assert safety.time_to_collision(world, 0, lw, 3.0) == pytest.approx(2.6)
    assert safety.time_to_collision(world, 0, lw, 2.0) == float("inf")
    world.agent_xy[0, 1] = (3.9, 1.9)                              # corners touching: a collision now
    assert safety.time_to_collision(world, 0, lw, 3.0) == 0.0
    runs = [dict(driver="a", distance_m=1500.0, collision=True, at_fault=True, end="collision", progress=0.5,
                 off_drivable_s=0.0, off_road=False, min_ttc_s=0.0, jerk_mean=1.0, driver_ms=2.0, observe_ms=10.0,
                 route_offset_mean_m=0.2, out_of_lane_s=0.0),
            dict(driver="a", distance_m=500.0, collision=False, at_fault=False, end="end", progress=1.0,
                 off_drivable_s=1.0, off_road=False, min_ttc_s=None, jerk_mean=3.0, driver_ms=4.0, observe_ms=10.0,
                 route_offset_mean_m=0.6, out_of_lane_s=2.0)]
    s = summarise(runs)["a"]
    assert (s["runs"], s["collisions"], s["collision_rate"], s["collisions_per_km"]) == (2, 1, 0.5, 0.5)
    assert (s["at_fault_collisions"], s["at_fault_per_km"]) == (1, 0.5)
    assert (s["progress_mean"], s["jerk_mean"], s["min_ttc_s"], s["completed"]) == (0.75, 2.0, 0.0, 1)
    assert (s["route_offset_mean_m"], s["out_of_lane_s_mean"]) == (pytest.approx(0.4), 1.0)


@pytest.mark.parametrize("number", range(1, 8), ids=lambda n: f"scene-{n:04d}")
def test_the_egos_lane_is_as_wide_as_its_road_lanes(number):
    """What out-of-lane time and a side swipe's fault read (``ClosedLoop.lane_width``): the ego's lane width is the
    spacing of its road's lanes in every layout (town 3.5 m, highway 3.7 m, a parking aisle's two directions 3.0 m):
    some vehicle's path runs parallel to the ego's that far to its side where the ego starts, and none nearer than
    that beyond 1 m (a turning path crosses near it)."""
    from drivejepa.data.synth.world import simulate_scene

    movers = simulate_scene(number, 0, 1.0, margin=0.05).builder.movers
    ego = movers[0]
    x, y, heading = ego.path.at(ego.s0)
    offsets = []
    for m in movers[1:]:
        s, offset = m.path.project(np.array([x, y]))
        if not m.walker and 0.0 < s < m.path.length and abs(np.cos(m.path.at(s)[2] - heading)) > 0.99:
            offsets.append(abs(offset))
    offsets = np.array(offsets)
    assert ego.ego and ego.lane_width is not None
    assert np.abs(offsets - ego.lane_width).min() < 0.01, (ego.lane_width, np.round(offsets, 2))
    assert not ((offsets > 1.0) & (offsets < ego.lane_width - 0.01)).any(), np.round(offsets, 2)


def test_collision_types_follow_nuplans_at_fault_rules():
    """The ego (4 x 2 m, heading +x) touched by a car of its size at its back and front, by a cyclist (2 x 1 m) at
    its side, moving or standing."""
    from drivejepa.data.synth.materials import GRASS, ROAD
    from drivejepa.driving.safety import collision_type

    def kind(agent_xy, ego_speed=5.0, agent_speed=5.0, lateral_offset=0.0, road=True, agent_lw=(4.0, 2.0),
             lane_width=3.5):
        grid = np.full((2000, 2000), ROAD if road else GRASS, dtype=np.uint8)     # 200 m of asphalt or grass
        world = types.SimpleNamespace(ego_index=0, agent_xy=np.array([[[100.0, 100.0], np.add(agent_xy, 100.0)]]),
                                      agent_yaw=np.zeros((1, 2)), agent_speed=np.array([[ego_speed, agent_speed]]),
                                      agent_active=np.ones((1, 2), bool), material_grid=grid)
        return collision_type(world, 0, 1, np.array([[4.0, 2.0], agent_lw]), lateral_offset, lane_width)

    assert kind((-3.9, 0.0), ego_speed=0.0) == ("stopped ego", False)         # hit from behind while standing
    assert kind((3.9, 0.0), agent_speed=0.0) == ("stopped agent", True)       # ran into a standing car
    assert kind((-3.9, 0.3)) == ("active rear", False)                         # the follower drove into the ego
    assert kind((3.9, -0.5)) == ("active front", True)                         # the ego drove into the leader
    side = dict(agent_xy=(0.2, 1.4), agent_lw=(2.0, 1.0))
    assert kind(**side) == ("active lateral", False)                           # side swipe, the ego in its lane
    assert kind(**side, lateral_offset=1.2) == ("active lateral", True)        # ... the ego over its lane's edge
    assert kind(**side, lateral_offset=0.8, lane_width=3.7) == ("active lateral", False)  # 1.8 m < 1.85 m: inside
    assert kind(**side, lateral_offset=0.8, lane_width=3.5) == ("active lateral", True)   # 1.8 m > 1.75 m: over
    assert kind(**side, road=False) == ("active lateral", True)                # ... the ego off the asphalt


TINY = ["samples_per_scene=12", "image_size=[320,180]", "scenes=[scene-0004]", "observation.cameras=[CAM_FRONT]",
        "observation.image_size=[112,64]", "observation.lidar_points=1024", "observation.radar_points=64"]


def test_drive_command_compares_drivers_on_the_same_scenarios_and_resumes(tmp_path, ray_session, capsys):
    import json

    from drivejepa.cli import main

    out = tmp_path / "drive"
    args = ["drive", "--out", str(out), "--no-progress", *TINY, "steps=2"]
    assert main(args) == 0
    shown = capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    assert [(r["scenario"], r["driver"], r["decisions"]) for r in m["runs"]] == [
        ("scene-0004", "expert", 2), ("scene-0004", "constant_velocity", 2)]
    expert = m["runs"][0]
    assert expert["progress"] == pytest.approx(1.0, abs=1e-6) and not expert["collision"]
    plotted = json.loads((out / "drive.json").read_text())
    assert plotted["series"]["progress"]["constant_velocity"]["scene-0004"] == m["runs"][1]["progress"]
    assert (out / "drive.png").stat().st_size > 0
    assert all(name in shown for name in ("expert", "constant_velocity", "simulator:"))
    assert main(args) == 0                                            # a rerun of the same config resumes
    again = json.loads((out / "metrics.json").read_text())
    assert again["provenance"]["runs_now"] == 0 and again["runs"] == m["runs"]


BUILT: list[int] = []


def counting_driver(**options):
    """A factory driver (constant velocity) that records, each time it is built, how many times it was built."""
    from drivejepa.driving.drivers import ConstantVelocity

    BUILT.append(len(BUILT))
    return ConstantVelocity()


def test_drive_builds_each_factory_driver_once_before_its_workers(tmp_path, monkeypatch):
    """A factory driver is built once in the drive process before any worker gets a run, so what it fits on first
    use (the planner's cost heads) is fitted once, not by two workers at the same time."""
    from drivejepa.config import DriveConfig, DriverSpec, load_config
    from drivejepa.driving import runner

    built_before = []

    def in_process(todo, cfg, render, num_workers, address, finish):
        built_before.append(len(BUILT))
        for sc, spec, rid, h in todo:
            finish(rid, h, runner.run_one(sc, spec, cfg.observation, cfg.ttc_horizon, render))

    monkeypatch.setattr(runner, "_run_ray", in_process)
    BUILT.clear()
    cfg = load_config(DriveConfig, REPO / "eval/drive.yaml", [*TINY, "steps=1", "scenes=[scene-0004, scene-0005]"])
    cfg.drivers = [DriverSpec("mine", "factory", "test_driving:counting_driver", {})]
    metrics = runner.drive(cfg, tmp_path / "d", num_workers=2, progress=False)
    assert [r["driver"] for r in metrics["runs"]] == ["mine", "mine"]
    assert built_before == [1] and len(BUILT) == 3          # once before the two runs, then once per run


def test_drive_refuses_an_unknown_driver_in_one_line(tmp_path, capsys):
    from drivejepa.cli import main

    code = main(["drive", "--out", str(tmp_path / "d"), "--num-workers", "0", *TINY,
                 "drivers=[{name: mine, kind: planner}]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "mine" in err[0] and "planner" in err[0]
    assert not (tmp_path / "d" / "metrics.json").exists()


def test_drive_render_writes_a_view_per_key_frame_and_a_gif(tmp_path):
    from drivejepa.config import DriveConfig, load_config
    from drivejepa.driving.runner import drive
    from drivejepa.visualization.headless import probe_rendering

    support = probe_rendering()
    if not support.ok:
        pytest.skip(support.message)
    cfg = load_config(DriveConfig, REPO / "eval/drive.yaml", [*TINY, "steps=2", "render_size=[160,120]",
                                                               "drivers=[{name: expert, kind: expert}]"])
    metrics = drive(cfg, tmp_path / "d", render=True, num_workers=0, progress=False)
    files = metrics["rendered"]["runs"]["scene-0004__expert"]
    assert files == ["render/scene-0004__expert/step_02.png", "render/scene-0004__expert/step_03.png",
                     "render/scene-0004__expert/run.gif"]
    from PIL import Image

    img = np.asarray(Image.open(tmp_path / "d" / files[0]).convert("RGB"))
    assert img.shape[1] == 160 and img.std() > 5                      # a drawn scene, not a blank frame
