"""Counterfactual branches: ordinary nuScenes scenes that share their parent's past bit for bit and then do what their
behaviour says, as the devkit and preprocessing see them."""
from __future__ import annotations

import copy
import hashlib

import numpy as np
import pytest
import torch

import test_synth
from conftest import BRANCH_FRAMES as FRAMES     # key frames each branch runs past its branch point
from drivejepa.data.synth import SYNTH_VERSION, read_summary, write_world
from drivejepa.data.synth import branches as cf
from drivejepa.data.synth.scenarios import branch_of
from drivejepa.data.synth.world import mover_tracks, place, simulate_scene
from drivejepa.data.synth.writer import SENSOR_MARGIN_S


@pytest.fixture(scope="module")
def nusc(branch_root):
    from nuscenes.nuscenes import NuScenes

    return NuScenes(SYNTH_VERSION, str(branch_root), verbose=False)


def _branches(nusc) -> dict[str, tuple[dict, dict]]:
    """Branch scene name -> (its scene record, what its description says it is)."""
    out = {}
    for scene in nusc.scene:
        info = branch_of(scene["description"])
        if info is not None:
            out[scene["name"]] = (scene, info)
    return out


def _by_name(nusc) -> dict[str, dict]:
    return {s["name"]: s for s in nusc.scene}


def _sha(root, sd: dict) -> str:
    return hashlib.sha256((root / sd["filename"]).read_bytes()).hexdigest()


def _ego_xy(nusc, scene) -> np.ndarray:
    return np.array([nusc.get("ego_pose", nusc.get("sample_data", s["data"]["LIDAR_TOP"])["ego_pose_token"])
                     ["translation"][:2] for s in test_synth._scene_samples(nusc, scene)])


def test_branch_scenes_load_and_share_their_parents_prefix_bit_for_bit(nusc, branch_root):
    branches = _branches(nusc)
    scenes = _by_name(nusc)
    summary = read_summary(branch_root)
    assert summary["params"]["branches"] == 5 and len(scenes) == 4 + len(branches) == 4 + summary["summary"][
        "branch_scenes"]
    assert {info["parent"] for _, info in branches.values()} == {f"scene-000{n}" for n in range(1, 5)}
    assert 8 <= len(branches) <= 16
    for name, (scene, info) in branches.items():
        parent = scenes[info["parent"]]
        b = info["frame"]
        assert name.startswith(info["parent"]) and scene["nbr_samples"] == b + 1 + FRAMES
        assert {"counterfactual", f"branch frame {b}"} <= set(t.strip() for t in scene["description"].split(","))
        mine, theirs = test_synth._scene_samples(nusc, scene), test_synth._scene_samples(nusc, parent)
        assert len(mine) == scene["nbr_samples"]
        assert [s["timestamp"] for s in mine] == [s["timestamp"] for s in theirs[:len(mine)]]
        for i, (s, p) in enumerate(zip(mine, theirs)):
            for ch in s["data"]:
                sd, pd = nusc.get("sample_data", s["data"][ch]), nusc.get("sample_data", p["data"][ch])
                pose, ppose = nusc.get("ego_pose", sd["ego_pose_token"]), nusc.get("ego_pose", pd["ego_pose_token"])
                assert sd["token"] != pd["token"] and sd["timestamp"] == pd["timestamp"]
                if i <= b:                                   # the shared past: the parent's bytes and poses
                    assert _sha(branch_root, sd) == _sha(branch_root, pd), (name, i, ch)
                    assert (pose["translation"], pose["rotation"]) == (ppose["translation"], ppose["rotation"])
                else:                                        # its own future, written as its own files
                    assert sd["filename"] != pd["filename"] and (branch_root / sd["filename"]).is_file()
            anns = sorted((a["category_name"], a["translation"], a["num_lidar_pts"], a["num_radar_pts"])
                          for a in (nusc.get("sample_annotation", t) for t in s["anns"]))
            if i <= b:
                assert anns == sorted((a["category_name"], a["translation"], a["num_lidar_pts"], a["num_radar_pts"])
                                      for a in (nusc.get("sample_annotation", t) for t in p["anns"]))
        future = _ego_xy(nusc, scene)[b + 1:]                # the ego goes elsewhere than the parent's ego
        assert np.hypot(*(future - _ego_xy(nusc, parent)[b + 1:len(mine)]).T).max() > cf.DISTINCT - 0.01, name


def test_brake_travels_less_and_accelerate_more_than_keeping_the_intent(nusc):
    scenes = _by_name(nusc)
    travel = {}
    for name, (scene, info) in _branches(nusc).items():
        b = info["frame"]
        own = _ego_xy(nusc, scene)[b:]
        keep = _ego_xy(nusc, scenes[info["parent"]])[b:b + 1 + FRAMES]
        travel[info["parent"], info["behaviour"]] = (np.hypot(*np.diff(own, axis=0).T).sum(),
                                                      np.hypot(*np.diff(keep, axis=0).T).sum())
    brake = [v for (_, behaviour), v in travel.items() if behaviour == "brake"]
    accelerate = [v for (_, behaviour), v in travel.items() if behaviour == "accelerate"]
    assert len(brake) == 4 and len(accelerate) >= 1
    assert all(mine < keep - 0.5 for mine, keep in brake), brake
    assert all(mine > keep + 0.3 for mine, keep in accelerate), accelerate


def test_speed_behaviours_in_every_scenario():
    """Simulated 40-frame scenes of all seven scenarios, three branch points each: braking always gives a future
    of its own, slows at 2 m/s^2 or more to a stop and covers less ground in 4 s than keeping the intent;
    accelerating covers more wherever the traffic lets it differ (not stuck behind a leader, a red light or in a
    curve): at 10 of these 21 branch points."""
    brakes = accelerations = points = 0
    for n in range(1, 8):
        sim = simulate_scene(n, 0, 19.5, SENSOR_MARGIN_S)
        parent = mover_tracks(sim.builder.movers, sim.S, sim.V, sim.A)
        for candidates in cf.plan(sim, 40, 3, 8, 0):
            points += 1
            k = cf.branch_step(sim, candidates[0].frame)
            end = (candidates[0].frame + 8) * 0.5 + SENSOR_MARGIN_S
            keep = parent[2][k:k + 80, 0].sum() * cf.DT
            for br, (_, _, speed, _) in cf.grow(sim, parent, candidates, 5, end):
                travel = speed[k:k + 80, 0].sum() * cf.DT
                if br.behaviour == "brake":
                    brakes += 1
                    # at least 2 m/s^2 down to a stop (where IDM creeps at 0-0.1 m/s)
                    assert travel < keep - 0.4 and speed[k + 70:k + 80, 0].mean() < max(0.1, speed[k, 0] - 8.0), br.name
                elif br.behaviour == "accelerate":
                    accelerations += 1
                    assert travel > keep + 0.5, br.name
    assert points == 21 and brakes == 21 and accelerations >= 8


def test_devkit_box_lidar_radar_and_map_checks_hold_on_branches(nusc):
    test_synth.test_points_in_annotated_boxes_match_num_lidar_pts(nusc)
    test_synth.test_radar_returns_pass_default_filters_and_move_with_their_agents(nusc)
    test_synth.test_ego_drives_on_the_map_mask(nusc)
    for inst in nusc.instance:                           # every instance lives in one scene
        first = nusc.get("sample_annotation", inst["first_annotation_token"])
        last = nusc.get("sample_annotation", inst["last_annotation_token"])
        assert nusc.get("sample", first["sample_token"])["scene_token"] == \
            nusc.get("sample", last["sample_token"])["scene_token"]


def test_lane_changes_shift_sideways_and_another_exit_turns_away():
    """Simulated (not rendered) 40-frame scenes: the highway's lane changes move the ego a lane width to the side of
    the parent's path; going straight at the intersection where the parent turns right keeps the ego's heading."""
    seen = set()
    for n, behaviours in ((2, ("lane change left", "lane change right")), (3, ("go straight",))):
        sim = simulate_scene(n, 0, 19.5, SENSOR_MARGIN_S)
        parent = mover_tracks(sim.builder.movers, sim.S, sim.V, sim.A)
        ego_path = sim.builder.movers[0].path
        for br in [b for point in cf.plan(sim, 40, 3, 8, 0) for b in point]:
            if br.behaviour not in behaviours:
                continue
            xy, yaw, _, _ = cf.tracks(sim, parent, br, 19.55)
            k = cf.branch_step(sim, br.frame)
            assert np.array_equal(xy[:k + 1], parent[0][:k + 1]) and np.array_equal(yaw[:k + 1], parent[1][:k + 1])
            end = min(k + 80, len(xy) - 1)                  # 4 s later
            if br.behaviour.startswith("lane change"):
                _, side = ego_path.project(xy[end, 0])
                _, before = ego_path.project(xy[k, 0])
                lane_w = sim.builder.roads[0].lane_w
                shift = side - before
                want = lane_w if br.behaviour.endswith("left") else -lane_w
                assert abs(shift - want) < 0.5, (br.name, shift)
            else:
                turn = np.degrees(yaw[-1, 0] - yaw[k, 0])
                assert abs(turn) < 10 and np.degrees(parent[1][-1, 0] - parent[1][k, 0]) < -60, br.name
            seen.add(br.behaviour)
    assert seen == {"lane change left", "lane change right", "go straight"}


def test_collisions_and_leaving_the_road_are_tagged():
    sim = simulate_scene(2, 0, 5.5, SENSOR_MARGIN_S)
    parent = mover_tracks(sim.builder.movers, sim.S, sim.V, sim.A)
    (br, tracks), = cf.grow(sim, parent, cf.plan(sim, 12, 1, 5, 0)[0][:1], 2, 5.55)
    ego = sim.builder.movers[0]
    worlds = place(sim, [parent, tracks], [ego.path.piece(ego.s0, ego.path.length, 10.0)])
    k = cf.branch_step(sim, br.frame)
    tags = {}
    for case in ("clean", "collision", "off road"):
        world = copy.deepcopy(worlds[1])
        if case == "collision":                          # another car drives into the ego one second later
            other = next(i for i, a in enumerate(world.agents) if a["kind"] == "car" and not a["ego"])
            world.agent_xy[k + 20:, other] = world.agent_xy[k + 20:, 0] + [1.0, 0.5]
            world.agent_active[k + 20:, other] = True
        elif case == "off road":                         # the ego ends on the grass at the map's corner
            world.agent_xy[-5:, 0] = (2.0, 2.0)
        cf.finish(world, sim, br)
        tags[case] = world.tags
    assert tags["clean"][-4:] == ["counterfactual", "parent scene-0002", f"branch frame {br.frame}", "behaviour brake"]
    assert tags["collision"] == tags["clean"] + ["collision"] and tags["off road"] == tags["clean"] + ["off road"]


def test_same_seed_same_bytes_and_sweeps_share_the_prefix(tmp_path):
    kw = dict(scenes=2, samples_per_scene=5, image_size=(48, 27), cameras=["CAM_FRONT"], sweeps=True, workers=1,
              progress=False, branches=2, branch_frames=2)
    a = write_world(tmp_path / "a", seed=3, **kw)
    b = write_world(tmp_path / "b", seed=3, **kw)
    fa = test_synth._files(a)
    assert fa == test_synth._files(b) and len(fa) > 200
    assert read_summary(a)["summary"]["branch_scenes"] == 1        # the highway's brake branch (scene 1 is still slow)
    from nuscenes.nuscenes import NuScenes

    nusc = NuScenes(SYNTH_VERSION, str(a), verbose=False)
    scene, info = next(iter(_branches(nusc).values()))
    parent = _by_name(nusc)[info["parent"]]
    shared_until = test_synth._scene_samples(nusc, scene)[info["frame"]]["timestamp"]

    def lidar_chain(sc):
        sd = nusc.get("sample_data", nusc.get("sample", sc["first_sample_token"])["data"]["LIDAR_TOP"])
        while sd["prev"]:
            sd = nusc.get("sample_data", sd["prev"])
        out = [sd]
        while out[-1]["next"]:
            out.append(nusc.get("sample_data", out[-1]["next"]))
        return out

    mine, theirs = lidar_chain(scene), lidar_chain(parent)
    assert sum(not s["is_key_frame"] for s in mine) == 9 * (scene["nbr_samples"] - 1)
    for s, p in zip(mine, theirs):                      # sweeps too: the parent's bytes up to the branch frame
        assert s["timestamp"] == p["timestamp"]
        shared = nusc.get("sample", s["sample_token"])["timestamp"] <= shared_until
        assert (_sha(a, s) == _sha(a, p)) == shared and (s["filename"] == p["filename"]) == shared


def test_split_keeps_branches_with_their_parents(nusc):
    from drivejepa.data.nuscenes_tasks import select_scenes

    val, splits = select_scenes(nusc, SYNTH_VERSION, "val")
    names = [s["name"] for s in val]
    mine = sorted(n for n, (_, info) in _branches(nusc).items() if info["parent"] == "scene-0003")
    assert mine and names == ["scene-0003"] + mine
    assert all(branch_of(s["description"])["parent"] == "scene-0003" for s in val[1:])
    train = set(splits["train"])
    for name, (_, info) in _branches(nusc).items():
        assert (name in train) == (info["parent"] in train) and (name in splits["val"]) != (name in train)


def test_preprocessed_branch_shards_carry_the_tags(nusc, branch_shards):
    from drivejepa.data.shards import load_manifest, read_shard_meta, scenes_in_split, shard_path

    names = scenes_in_split(branch_shards, "val")
    mine = sorted(n for n, (_, info) in _branches(nusc).items() if info["parent"] == "scene-0003")
    assert names == ["scene-0003"] + mine and len(load_manifest(branch_shards)["scenes"]) == len(nusc.scene)
    for name in names[1:]:
        meta = read_shard_meta(shard_path(branch_shards, name))
        info = branch_of(", ".join(meta["tags"]))
        assert info is not None and info["parent"] == "scene-0003" and "counterfactual" in meta["tags"]
        assert f"behaviour {info['behaviour']}" in meta["tags"] and meta["num_samples"] == info["frame"] + 1 + FRAMES


def test_synth_command_refuses_impossible_branches_in_one_line(tmp_path, capsys):
    from drivejepa.cli import main

    base = ["synth", "--out", str(tmp_path / "w"), "--scenes", "1", "--samples-per-scene", "6", "-q"]
    for extra, said in ((["--branches", "7"], "branches: futures per branch point must be 0 (none) or 2..5"),
                        (["--branches", "3", "--branch-frames", "4"], "need at least 7 samples_per_scene, got 6")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert said in err and len(err.splitlines()) == 1
    assert not (tmp_path / "w").exists()


def test_test_split_holds_no_train_scene_and_keeps_branches_with_their_parents():
    """The split file itself: test_synth.py. A branch of a test scene is a test scene, one of a train scene is not."""
    from types import SimpleNamespace

    from drivejepa.data.nuscenes_tasks import select_scenes
    from drivejepa.data.synth.scenarios import branch_tags

    scenes = [dict(name=f"scene-{n:04d}", description="city") for n in range(1, 11)]
    scenes += [dict(name="scene-0005-b07-brake", description=", ".join(["city", *branch_tags("scene-0005", 7, "brake")])),
               dict(name="scene-0004-b03-brake", description=", ".join(branch_tags("scene-0004", 3, "brake")))]
    nusc = SimpleNamespace(scene=scenes, dataroot="/nowhere")
    chosen, splits = select_scenes(nusc, SYNTH_VERSION, "test")
    assert [s["name"] for s in chosen] == ["scene-0005", "scene-0005-b07-brake", "scene-0010"]
    assert not set(splits["test"]) & set(splits["train"]) and "scene-0004-b03-brake" in splits["train"]


def test_training_windows_of_a_branch_reach_past_its_branch_frame(branch_shards):
    """The train split's branches are training data (nothing leaves them out), but a branch window wholly within
    the key frames shared with its parent is the parent's window again and is not repeated."""
    from drivejepa.data.dataset import WindowDataset
    from drivejepa.data.shards import read_shard_meta, scenes_in_split, shard_path

    train = scenes_in_split(branch_shards, "train")
    ds = WindowDataset(branch_shards, train, context=2, horizon=3)
    branches = {s: branch_of(read_shard_meta(shard_path(branch_shards, s))["description"]) for s in train}
    branches = {s: info for s, info in branches.items() if info is not None}
    assert branches and {info["parent"] for info in branches.values()} == {"scene-0001", "scene-0002", "scene-0004"}
    starts: dict[str, list[int]] = {}
    for scene, start in ds.index:
        starts.setdefault(scene, []).append(start)
    for scene, info in branches.items():
        frames = info["frame"] + 1 + FRAMES
        assert starts[scene] == [s for s in range(frames - 4) if s + 4 > info["frame"]], scene
        assert starts[scene]
    assert starts[info["parent"]] == list(range(12 - 4))


def test_windows_that_share_a_context_form_one_sibling_group(branch_shards):
    """A parent window and its branches' windows from the same start share their context key frames while the
    context lies within the shared prefix: one sibling group, the rows the sibling-contrastive loss compares.
    Once the context passes the branch frame each window is on its own."""
    from drivejepa.data.dataset import NEVER_PARTS, WindowDataset
    from drivejepa.data.shards import read_shard, scenes_in_split, shard_path

    ds = WindowDataset(branch_shards, scenes_in_split(branch_shards, "train"), context=2, horizon=3)
    groups = ds.sibling_groups()
    assert groups
    for group in groups:
        rows = [ds.index[i] for i in group]
        infos = [branch_of(read_shard(shard_path(branch_shards, s)).meta["description"]) for s, _ in rows]
        parents = {s if info is None else info["parent"] for (s, _), info in zip(rows, infos)}
        assert len(parents) == 1 and len({start for _, start in rows}) == 1 and len(rows) == len(set(rows))
        start = rows[0][1]
        assert all(info is None or start + 1 <= info["frame"] for info in infos)
        items = [ds[i] for i in group]
        for item in items[1:]:
            for key in ("images", "ego_pose"):     # point subsamples are drawn per sample token
                assert torch.equal(item[key][:2], items[0][key][:2]), key
            assert torch.equal(item["actions"][:1], items[0]["actions"][:1])   # the action taken at frame 2 differs
        assert len({int(item["context_group"]) for item in items}) == 1
        for item, info in zip(items, infos):            # where each future leaves the parent's, in window positions
            frame0 = int(read_shard(shard_path(branch_shards, rows[0][0])).meta["frame_indices"][start])
            assert int(item["parted_after"]) == (NEVER_PARTS if info is None else info["frame"] - frame0)
    for i, (scene, start) in enumerate(ds.index):
        info = branch_of(read_shard(shard_path(branch_shards, scene)).meta["description"])
        if info is not None and start + 1 > info["frame"]:
            assert not any(i in g for g in groups), (scene, start)


def test_training_with_sibling_batches_logs_the_sibling_term_and_resumes(branch_shards, tmp_path):
    """A run with sibling batches trains the sibling-contrastive term on the branch world, and a run resumed from
    its step-2 checkpoint ends where the uninterrupted one does (the sampler hands out whole batches); the data
    order cannot change on resume."""
    import json
    import shutil

    from conftest import REPO
    from drivejepa.config import TrainConfig, load_config
    from drivejepa.errors import UserError
    from drivejepa.training.trainer import train

    overrides = [f"data.shards={branch_shards}", "data.sibling_batches=true", "loss.sibling_weight=1.0",
                 "data.horizon=3", "loss.rollout_steps=3", "optim.max_steps=4", "log_every=1", "ckpt_every=2",
                 "data.val_split="]
    cfg = load_config(TrainConfig, REPO / "pipelines/train_smoke.yaml", overrides)
    train(cfg, tmp_path / "full", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss_sibling" in r for r in rows if r.get("split") == "train")
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    step2 = tmp_path / "resumed" / "checkpoints" / "step_0000002.pt"
    shutil.copyfile(tmp_path / "full" / "checkpoints" / "step_0000002.pt", step2)
    train(cfg, tmp_path / "resumed", resume=str(step2), progress=False)
    full = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)["model"]
    resumed = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=True)["model"]
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], msg=key)
    other = load_config(TrainConfig, REPO / "pipelines/train_smoke.yaml", overrides + ["data.sibling_batches=false"])
    with pytest.raises(UserError, match="data.sibling_batches"):
        train(other, tmp_path / "resumed", resume=str(step2), progress=False)
