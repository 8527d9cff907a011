"""The drivable-area grid of the shards (schema 3): the map seen from each key frame's ego pose."""
from __future__ import annotations

import numpy as np

from drivejepa.data.drivable import drivable_grid, map_crop


def _pose(x, y, yaw):
    m = np.eye(4)
    c, s = np.cos(yaw), np.sin(yaw)
    m[:2, :2] = [[c, -s], [s, c]]
    m[:2, 3] = x, y
    return m


def _blocky_map(seed=0):
    """A 200 m x 150 m map of random 1 m blocks (0.1 m pixels)."""
    blocks = np.random.default_rng(seed).random((150, 200)) > 0.5
    return np.where(np.kron(blocks, np.ones((10, 10), bool)), 255, 0).astype(np.uint8)


def test_the_grid_moves_with_the_ego_pose():
    mask = _blocky_map()
    size, rng = 40, 10.0                                  # 0.5 m cells
    x0, y0 = 101.03, 73.07                                # cell centres fall away from pixel edges
    poses = [_pose(x0, y0, 0.3), _pose(x0 + 0.5, y0, 0.0), _pose(x0, y0 - 0.5, 0.0), _pose(x0, y0, np.pi / 2)]
    crop = map_crop(mask, poses, rng)
    assert crop["mask"].size < mask.size                  # only the region the grids reach travels with the task
    here = drivable_grid(crop, _pose(x0, y0, 0.0), size, rng)
    assert 0.3 < here.mean() < 0.7
    np.testing.assert_array_equal(drivable_grid(crop, poses[1], size, rng)[:-1], here[1:])       # one cell ahead
    np.testing.assert_array_equal(drivable_grid(crop, poses[2], size, rng)[:, 1:], here[:, :-1])  # one cell right
    # Turned 90 degrees left: the new x (forward) axis is the old y (left) axis, the new y the old -x.
    np.testing.assert_array_equal(drivable_grid(crop, poses[3], size, rng), here[::-1, :].T)
    # The same cells read from the whole map, the devkit's way (MapMask.to_pixel_coords rounding).
    whole = map_crop(mask, [_pose(x0, y0, 0.0)], 200.0)
    np.testing.assert_array_equal(drivable_grid(whole, _pose(x0, y0, 0.0), size, rng), here)
    assert not drivable_grid(None, _pose(x0, y0, 0.0), size, rng).any()       # no map, nothing drivable


def test_shards_hold_the_maps_drivable_area(synth_root, shard_dir):
    """On the synthetic world: the ego stands on drivable ground, buildings do not, and every cell agrees with the
    devkit's own MapMask lookup of the map the scene's log points to."""
    from nuscenes.nuscenes import NuScenes

    from drivejepa.data.drivable import sample_grid
    from drivejepa.data.shards import load_manifest, read_shard, shard_path
    from drivejepa.data.synth import SYNTH_VERSION
    from drivejepa.data.synth.materials import BUILDING
    from drivejepa.data.synth.world import mover_tracks, place, simulate_scene
    from drivejepa.data.synth.writer import SENSOR_MARGIN_S
    from drivejepa.evaluation.probes import grid_centers

    cfg = load_manifest(shard_dir)["config"]
    size, rng = cfg["drivable_size"], cfg["drivable_range"]
    nusc = NuScenes(SYNTH_VERSION, str(synth_root), verbose=False)
    scene = next(s for s in nusc.scene if s["name"] == "scene-0001")
    shard = read_shard(shard_path(shard_dir, "scene-0001"))
    grids, poses = np.asarray(shard.arrays["drivable"]), np.asarray(shard.arrays["ego_pose"])
    assert grids.shape == (shard.frames, size, size) and grids.dtype == bool
    mask = nusc.get("map", nusc.get("log", scene["log_token"])["map_token"])["mask"]
    centres = grid_centers(size, rng)
    for k in (0, shard.frames - 1):
        world = centres @ poses[k][:2, :2].T + poses[k][:2, 3]
        np.testing.assert_array_equal(grids[k].ravel(), mask.is_on_mask(world[:, 0], world[:, 1]))
        assert sample_grid(grids[k], rng, np.zeros((1, 2)))[0]                  # the ego's own cell

    sim = simulate_scene(1, 0, (shard.meta["num_samples"] - 1) * 0.5, margin=SENSOR_MARGIN_S)
    ego = sim.builder.movers[0]
    world = place(sim, [mover_tracks(sim.builder.movers, sim.S, sim.V, sim.A)],
                  [ego.path.piece(ego.s0, ego.path.length, 10.0)])[0]
    buildings = world.structures[world.structures[:, 7] == BUILDING][:, :2]
    local = (buildings - poses[0][:2, 3]) @ poses[0][:2, :2]
    near = local[np.all(np.abs(local) < rng - 1.0, axis=1)]
    assert len(near) > 0
    assert not sample_grid(grids[0], rng, near).any()
