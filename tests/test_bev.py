"""The bird's-eye state's geometry: the warp is the ego motion, a token covers its own cell, cameras land where the
lidar sees."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from drivejepa.models.bev import BevGrid, motion_matrix, warp

GRID = BevGrid(32, 32.0)                # 2 m cells


def _field(points_xy: torch.Tensor, grid: BevGrid, sigma: float = 3.0) -> torch.Tensor:
    """A smooth ego-frame field of a point set (kernel density at each cell centre): [N, 1]."""
    d2 = (grid.centres()[:, None, :] - points_xy[None]).pow(2).sum(-1)
    return torch.exp(-d2 / (2 * sigma**2)).sum(dim=1, keepdim=True)


def _to_frame(points_world: torch.Tensor, pose: tuple[float, float, float]) -> torch.Tensor:
    x, y, yaw = pose
    c, s = math.cos(yaw), math.sin(yaw)
    rel = points_world - torch.tensor([x, y])
    return torch.stack([c * rel[:, 0] + s * rel[:, 1], -s * rel[:, 0] + c * rel[:, 1]], dim=1)


def test_a_grid_warped_by_the_ego_motion_is_the_grid_built_at_the_moved_pose():
    g = torch.Generator().manual_seed(0)
    world = (torch.rand(40, 2, generator=g) - 0.5) * 70                      # a static world of 40 objects
    before, motion = (0.0, 0.0, 0.0), (4.3, 1.1, 0.25)                        # frame t+1 in frame t: dx, dy, dyaw
    after = motion                                                            # frame t is the world frame here
    seen_before = _field(_to_frame(world, before), GRID)
    seen_after = _field(_to_frame(world, after), GRID)
    warped, seen = warp(seen_before[None], motion_matrix(torch.tensor([motion]))[0][None], GRID)
    inner = (GRID.centres().abs() < 20).all(dim=1)                            # away from the borders
    assert seen[0, inner].all() and not seen[0].all()                         # the front edge comes into view
    err = (warped[0, inner] - seen_after[inner]).abs().max() / seen_after[inner].abs().max()
    wrong = warp(seen_before[None], motion_matrix(torch.tensor([(4.3, 1.1, -0.25)]))[0][None], GRID)[0]
    err_wrong = (wrong[0, inner] - seen_after[inner]).abs().max() / seen_after[inner].abs().max()
    assert err < 0.1 < 0.5 < err_wrong, (float(err), float(err_wrong))     # bilinear error vs a wrong sign


def test_warps_compose_like_the_motions_and_a_standing_ego_changes_nothing():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(2, GRID.tokens, 3, generator=g)
    same, seen = warp(tokens, motion_matrix(torch.zeros(2, 3)), GRID)
    torch.testing.assert_close(same, tokens)
    assert seen.all()
    a, b = torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([[0.0, 4.0, 0.0]])   # whole cells: exact resampling
    step = warp(warp(tokens[:1], motion_matrix(a), GRID)[0], motion_matrix(b), GRID)[0]
    once = warp(tokens[:1], motion_matrix(a) @ motion_matrix(b), GRID)[0]
    torch.testing.assert_close(step, once)


def test_a_rollout_warping_its_own_states_step_by_step_stays_as_sharp_as_one_warp():
    """A rollout warps its previous prediction at every step; the resampling must not smear the state (bilinear
    does: six sub-cell steps on 4 m cells lose 12% of a scene's variance, bicubic under 3%)."""
    grid = BevGrid(16, 32.0)                                                  # the demo grid: 4 m cells
    g = torch.Generator().manual_seed(3)
    objects = (torch.rand(30, 2, generator=g) - 0.5) * 64
    state = _field(objects, grid, sigma=4.0)[None]
    step = motion_matrix(torch.tensor([[1.3, 0.2, 0.02]]))                    # a third of a cell per step
    stepwise, transform = state, torch.eye(3)[None]
    for _ in range(6):
        transform = transform @ step
        warped, seen = warp(stepwise, step, grid)
        stepwise = torch.where(seen[..., None], warped, stepwise)
    once = warp(state, transform, grid)[0]
    inner = (grid.centres().abs() < 16).all(dim=1)
    lost = (stepwise[0, inner] - once[0, inner]).pow(2).mean() / once[0, inner].var()
    assert lost < 0.05, float(lost)


def test_an_untrained_predictor_carries_the_state_along_the_commanded_motion():
    from drivejepa.config import ModelConfig
    from drivejepa.models.world_model import WorldModel

    torch.manual_seed(0)
    model = WorldModel(ModelConfig(size="tiny", bev_range=32.0), ["CAM_FRONT"]).eval()
    g = torch.Generator().manual_seed(2)
    states = torch.nn.functional.layer_norm(torch.randn(1, 2, model.grid.tokens, model.latent_dim, generator=g),
                                            (model.latent_dim,))
    cell = model.grid.cell
    actions = torch.tensor([[[cell, 0.0, 0.0, 2 * cell, 0.0]]])                  # one cell forward in 0.5 s
    with torch.no_grad():
        nxt = model.rollout(states, actions, actions[:, :1])[0, 0]
    shifted = states[0, 1].view(model.bev_size, model.bev_size, -1)[1:]           # x bin i+1 becomes bin i
    gap = (nxt.view(model.bev_size, model.bev_size, -1)[:-1] - shifted).abs().max()
    assert gap < 0.05 * shifted.abs().max(), float(gap)                           # the gated change starts at 1%


def test_moving_one_lidar_object_changes_the_tokens_of_its_cells_most():
    from drivejepa.config import ModelConfig
    from drivejepa.models.world_model import WorldModel

    torch.manual_seed(0)
    model = WorldModel(ModelConfig(size="tiny", modality_dropout=0.0, drop_path=0.0), ["CAM_FRONT"]).eval()
    g = torch.Generator().manual_seed(3)
    ground = torch.cat([(torch.rand(1500, 2, generator=g) - 0.5) * 60, torch.zeros(1500, 1),
                        torch.full((1500, 1), 5.0)], dim=1)                       # flat road, low intensity

    def car(x, y):
        pts = torch.rand(150, 3, generator=torch.Generator().manual_seed(4)) * torch.tensor([4.0, 1.8, 1.5])
        return torch.cat([pts + torch.tensor([x - 2.0, y - 0.9, 0.0]), torch.full((150, 1), 120.0)], dim=1)

    grid = model.grid
    with torch.no_grad():
        a = model.encode({"lidar": torch.cat([ground, car(-12.0, 12.0)])[None]})[0]
        b = model.encode({"lidar": torch.cat([ground, car(20.0, -12.0)])[None]})[0]
    change = (a - b).norm(dim=-1)                                                 # per token
    cells = {int(grid.cell_index(torch.tensor([x, y]))[0]) for x, y in ((-12.0, 12.0), (20.0, -12.0))}
    top = set(change.topk(2).indices.tolist())
    assert top == cells, (top, cells)
    others = torch.ones_like(change, dtype=torch.bool)
    others[list(cells)] = False
    assert change[list(cells)].min() > 3 * change[others].median()


def test_camera_lifting_puts_a_bright_object_in_the_cell_where_the_lidar_sees_it():
    from drivejepa.data.synth.camera import camera_to_ego, intrinsics
    from drivejepa.models.lift import lift, project

    grid = BevGrid(16, 32.0)                                                      # 4 m cells
    w, h = 160, 90
    K = torch.tensor(intrinsics("CAM_FRONT", w, h), dtype=torch.float32)[None, None]
    rig = torch.tensor(camera_to_ego("CAM_FRONT"), dtype=torch.float32)[None, None]
    face = torch.stack(torch.meshgrid(torch.tensor([18.5]), torch.linspace(-1.5, 1.5, 13),
                                      torch.linspace(0.1, 2.5, 9), indexing="ij"), -1).reshape(-1, 3)
    uv, _ = project(face[None], rig, K)                                           # where the object is in the image
    image = torch.zeros(1, 1, 1, h, w)
    u0, v0 = uv[0, 0].min(0).values.floor().long()
    u1, v1 = uv[0, 0].max(0).values.ceil().long()
    image[..., v0:v1 + 1, u0:u1 + 1] = 1.0                                        # a bright object, dark elsewhere
    image = torch.nn.functional.avg_pool2d(image[0], 5)[None]                    # a feature map of 1/5 resolution
    mask = torch.ones(1, 1, dtype=torch.bool)
    lidar = torch.cat([face, torch.full((len(face), 1), 100.0)], dim=1)[None]
    with_lidar, _ = lift(image, K, rig, mask, (h, w), grid, [0.5, 1.5], lidar)
    ray_only, _ = lift(image, K, rig, mask, (h, w), grid, [0.5, 1.5])
    with_lidar, ray_only = with_lidar[0, :, 0], ray_only[0, :, 0]
    object_cells = {int(i) for i in grid.cell_index(face[:, :2])[0]}
    assert int(with_lidar.argmax()) in object_cells
    behind = int(grid.cell_index(torch.tensor([26.0, 0.0]))[0])                   # on the same rays, 8 m further
    assert ray_only[behind] > 0.5 * ray_only.max()                                # without depth: along the ray
    assert with_lidar[behind] < 0.25 * with_lidar.max()                           # with lidar: where it is
    assert float(with_lidar.max()) > 0.25                                          # the object fills part of a cell


def test_bf16_autocast_leaves_the_warp_geometry_in_float32():
    """Training and planning run under bf16 autocast where the CPU (or GPU) has native bf16; the motions' products
    and the sample coordinates must not: a bf16 product keeps three significant digits (0.1 m of 30 m)."""
    from drivejepa.models.bev import compose

    grid = BevGrid(16, 32.0)
    g = torch.Generator().manual_seed(5)
    tokens = torch.randn(3, grid.tokens, 8, generator=g)
    steps = motion_matrix(torch.tensor([[7.37, 0.41, 0.093], [6.91, -0.22, -0.051], [31.3, 2.7, 0.21]]))
    exact = compose(steps[:1], steps[1:2], steps[2:])
    want = warp(tokens, steps, grid)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        product = compose(steps[:1], steps[1:2], steps[2:])
        got, _ = warp(tokens, steps, grid)
        halved, _ = warp(tokens.bfloat16(), steps, grid)
    assert product.dtype == torch.float32 and torch.equal(product, exact)
    assert exact[0, 0, 2] != steps[0, 0, 2].bfloat16().float()      # the offset is not a bf16 number
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert halved.dtype == torch.bfloat16
    torch.testing.assert_close(halved, warp(tokens.bfloat16().float(), steps, grid)[0].bfloat16())


def test_the_equivariance_ratio_rewards_a_state_that_moves_with_the_world_and_not_a_smaller_change():
    """``losses.equivariance_ratio`` (the training term that asks the state to move with the world): states that
    are a static world seen from each pose score far below 1, a pattern fixed to the ego above 1, and shrinking how
    much the states change from frame to frame does not lower it."""
    from drivejepa.losses import equivariance_ratio

    grid = BevGrid(16, 32.0)                                                  # the demo grid: 4 m cells
    g = torch.Generator().manual_seed(4)
    world = (torch.rand(40, 2, generator=g) - 0.5) * 90
    motion = (3.1, 0.3, 0.06)                                                 # each step: frame t+1 in frame t
    poses = [(0.0, 0.0, 0.0)]
    for _ in range(3):
        x, y, yaw = poses[-1]
        c, s = math.cos(yaw), math.sin(yaw)
        poses.append((x + c * motion[0] - s * motion[1], y + s * motion[0] + c * motion[1], yaw + motion[2]))
    moving = torch.stack([_field(_to_frame(world, p), grid, sigma=4.0) for p in poses])          # [4, N, 1]
    fixed = _field((torch.rand(40, 2, generator=g) - 0.5) * 64, grid, sigma=4.0)[None].expand(4, -1, -1)
    fixed = fixed + 0.05 * torch.randn(4, grid.tokens, 1, generator=g)                           # sensor noise
    transform = motion_matrix(torch.tensor([motion])).expand(3, 3, 3)
    inner = (grid.centres().abs() < 20).all(dim=1)                            # bicubic stencils inside the grid

    def ratio(states):
        warped, seen = warp(states[:-1], transform, grid)
        return float(equivariance_ratio(states[:-1], warped, states[1:], seen & inner))

    mean = moving.mean()
    assert ratio(moving) < 0.3 < 1.0 < ratio(fixed), (ratio(moving), ratio(fixed))
    assert ratio(mean + 0.1 * (moving - mean)) == pytest.approx(ratio(moving), rel=1e-4)
