"""`drivejepa synth`: write the synthetic driving world as a nuScenes dataroot."""
from __future__ import annotations

from drivejepa.commands import parse_image_size

HELP = "write the synthetic driving world as a nuScenes dataroot (the devkit loads it like v1.0-mini)"


def add_arguments(parser) -> None:
    from drivejepa.config import ALL_CAMERAS

    parser.add_argument("--out", required=True, help="dataroot to write (empty, new, or a previous synth output)")
    parser.add_argument("--scenes", type=int, default=30, help="number of scenes (default 30)")
    parser.add_argument("--samples-per-scene", type=int, default=40, help="key frames per scene at 2 Hz (default 40)")
    parser.add_argument("--seed", type=int, default=0, help="world seed; the same seed writes the same bytes")
    parser.add_argument("--image-size", default="800x450",
                        help="camera images WIDTHxHEIGHT (800x450)")
    parser.add_argument("--cameras", nargs="+", default=list(ALL_CAMERAS), metavar="CAM",
                        help=f"camera channels to render (default all six: {' '.join(ALL_CAMERAS)})")
    parser.add_argument("--sweeps", action="store_true",
                        help="also write sweeps between key frames: lidar 20 Hz, cameras 12 Hz, radars 13 Hz")
    parser.add_argument("--branches", type=int, default=0, metavar="K",
                        help="counterfactual futures per branch point, the scene's own included (2..5; default 0: "
                             "no branches): K-1 branch scenes replay the scene from there with other ego behaviours")
    parser.add_argument("--branch-points", type=int, default=1, help="seeded branch points per scene (default 1)")
    parser.add_argument("--branch-frames", type=int, default=8,
                        help="key frames each branch runs past its branch point (default 8 = 4 s)")
    parser.add_argument("--workers", type=int, default=None, help="scenes written at once (default: CPU count)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty folder that is not a previous synth output")


def run(args) -> int:
    from drivejepa.data.synth import SYNTH_VERSION, read_summary, write_world

    out = write_world(args.out, scenes=args.scenes, samples_per_scene=args.samples_per_scene, seed=args.seed,
                      image_size=parse_image_size(args.image_size), cameras=args.cameras, sweeps=args.sweeps,
                      workers=args.workers, progress=not args.quiet, overwrite=args.overwrite, branches=args.branches,
                      branch_points=args.branch_points, branch_frames=args.branch_frames)
    s = read_summary(out)["summary"]
    print(f"synthetic world written to {out} (version {SYNTH_VERSION})\n"
          f"  scenes       {s['scenes']} (and {s['branch_scenes']} counterfactual branches)\n"
          f"  key frames   {s['key_frames']}  (sample_data {s['sample_data']}, annotations {s['annotations']})\n"
          f"  lidar points {s['lidar_points_mean']:.0f} a key frame (min {s['lidar_points_min']}, "
          f"max {s['lidar_points_max']})\n"
          f"  files        {s['files']}\n"
          f"  bytes        {s['bytes'] / 1e6:.1f} MB\n"
          f"  seconds      {s['seconds']:.1f} ({s['workers']} workers)\n"
          f"  load it with NuScenes('{SYNTH_VERSION}', '{out}')")
    return 0
