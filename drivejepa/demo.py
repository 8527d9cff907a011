"""The main job end to end on the embedded default: synth -> preprocess -> train -> evaluate -> visualize.

The world has counterfactual branches (``branches`` futures at one branch point a scene): the train scenes' branches
train the model, best.pt is chosen on the val scenes, and the headline numbers, factual and counterfactual, come
from the test scenes, which neither training nor the choice of best.pt has seen.

Every stage runs through the same ``drivejepa <verb>`` entry point a user types, in one process (so Ray starts
once). A rerun resumes: a complete world made with the same parameters is kept, preprocessing skips complete shards,
training continues from its last checkpoint when that checkpoint was trained with the same config (a run of another
config, for instance one an older version of the demo left behind, is moved to ``run.previous`` and training starts
afresh). The last screen is the headline table, where each output is, and the wall time of each stage.

The world renders, and the shards keep, only the cameras the demo's model reads (``data.cameras`` of its train
config: the front camera): rendering all six took a third of the synth stage's time, and nothing downstream of the
shards reads the other five. ``drivejepa synth`` on its own still renders all six.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable, Optional

from drivejepa.errors import UserError

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class DemoPlan:
    out: Path
    scenes: int = 35                # 21 train, 7 val, 7 test (datasets/synthetic/splits.json): each held-out split
                                    # has every scenario type
    samples_per_scene: int = 40
    image_size: str = "800x450"
    seed: int = 0
    branches: int = 5               # futures per branch point, the scene's own included
    branch_frames: int = 6          # key frames each branch runs past its branch point (3 s: the horizon)
    preprocess_config: Path = REPO / "pipelines/preprocess.yaml"
    train_config: Path = REPO / "pipelines/train_demo.yaml"
    suite: Path = REPO / "eval/scenarios/default.yaml"
    train_overrides: tuple[str, ...] = ()
    progress: bool = True

    @property
    def cameras(self) -> list[str]:
        """The cameras the demo's model reads (``data.cameras`` of its train config, overrides applied)."""
        from drivejepa.config import TrainConfig, load_config

        return list(load_config(TrainConfig, self.train_config, list(self.train_overrides)).data.cameras)

    @property
    def world(self) -> Path:
        return self.out / "world"

    @property
    def shards(self) -> Path:
        return self.out / "shards"

    @property
    def run_dir(self) -> Path:
        return self.out / "run"

    @property
    def eval_dir(self) -> Path:
        return self.out / "eval"

    @property
    def vis_dir(self) -> Path:
        return self.out / "vis"


def _cli(argv: list[str]) -> None:
    from drivejepa.cli import main

    code = main(argv)
    if code != 0:
        raise UserError(f"stage 'drivejepa {' '.join(argv[:1])}' failed with exit code {code}")


def _quiet(plan: DemoPlan) -> list[str]:
    return [] if plan.progress else ["--quiet"]


def stage_synth(plan: DemoPlan) -> str:
    from drivejepa.commands.synth import parse_image_size
    from drivejepa.data.synth.writer import read_summary

    made = read_summary(plan.world).get("params", {})
    wanted = dict(scenes=plan.scenes, samples_per_scene=plan.samples_per_scene, seed=plan.seed,
                  image_size=list(parse_image_size(plan.image_size)), branches=plan.branches, branch_points=1,
                  branch_frames=plan.branch_frames, cameras=plan.cameras)
    if made and all(made.get(k) == v for k, v in wanted.items()):
        return "kept the complete world from an earlier run"
    _cli(["synth", *_quiet(plan), "--out", str(plan.world), "--scenes", str(plan.scenes),
          "--samples-per-scene", str(plan.samples_per_scene), "--seed", str(plan.seed),
          "--image-size", plan.image_size, "--branches", str(plan.branches), "--branch-points", "1",
          "--branch-frames", str(plan.branch_frames), "--cameras", *plan.cameras, "--overwrite"])
    return (f"{plan.scenes} scenes x {plan.samples_per_scene} key frames, "
            f"{read_summary(plan.world)['summary']['branch_scenes']} counterfactual branch scenes")


def stage_preprocess(plan: DemoPlan) -> str:
    from drivejepa.data.synth import SYNTH_VERSION

    _cli(["preprocess", *_quiet(plan), "--dataroot", str(plan.world), "--version", SYNTH_VERSION,
          "--out", str(plan.shards), "--config", str(plan.preprocess_config), f"cameras=[{','.join(plan.cameras)}]"])
    return str(plan.shards)


def _set_aside_run_of_another_config(plan: DemoPlan) -> None:
    """Move RUN to RUN.previous when its latest checkpoint was trained with another config than this demo's."""
    import shutil

    from drivejepa.config import TrainConfig, config_hash, load_config, resolve_train_config
    from drivejepa.training.checkpoint import config_of, find_latest, load_checkpoint

    latest = find_latest(plan.run_dir)
    if latest is None:
        return
    current = load_config(TrainConfig, plan.train_config, [*plan.train_overrides, f"data.shards={plan.shards}"])
    if config_hash(resolve_train_config(config_of(load_checkpoint(latest, mmap=True)))) == \
            config_hash(resolve_train_config(current)):
        return
    previous = plan.run_dir.with_name(plan.run_dir.name + ".previous")
    shutil.rmtree(previous, ignore_errors=True)
    plan.run_dir.rename(previous)
    print(f"{plan.run_dir} was trained with another config: moved to {previous}, training afresh", flush=True)


def stage_train(plan: DemoPlan) -> str:
    _set_aside_run_of_another_config(plan)
    _cli(["train", *_quiet(plan), "--config", str(plan.train_config), "--shards", str(plan.shards),
          "--out", str(plan.run_dir), "--resume", "auto", *plan.train_overrides])
    return str(plan.run_dir / "checkpoints" / "best.pt")


def stage_evaluate(plan: DemoPlan) -> str:
    _cli(["evaluate", *_quiet(plan), "--checkpoint", str(plan.run_dir / "checkpoints" / "best.pt"),
          "--shards", str(plan.shards), "--split", "test", "--suite", str(plan.suite), "--out", str(plan.eval_dir)])
    return str(plan.eval_dir / "report.md")


def stage_visualize(plan: DemoPlan) -> str:
    """A held-out test scene predicted 3 s ahead, and a branch point of the test split (one of those with the most
    futures, a lateral one first: lane changes and exits differ most to the eye): the K predicted futures beside
    the K true ones."""
    from drivejepa.data.shards import load_manifest, scenes_in_split
    from drivejepa.evaluation.counterfactual import branch_points

    test = scenes_in_split(plan.shards, "test")
    if not test:
        raise UserError(f"{plan.shards}: no test scene to render")
    checkpoint = str(plan.run_dir / "checkpoints" / "best.pt")
    scenes = load_manifest(plan.shards)["scenes"]
    points = sorted(branch_points({s: scenes[s].get("description", "") for s in test}),
                    key=lambda p: (-len(p.scenes), not any(b.startswith(("lane", "take", "go")) for b in p.behaviours)))
    factual = points[0].parent if points else test[0]
    _cli(["visualize", *_quiet(plan), "--checkpoint", checkpoint, "--shards", str(plan.shards), "--scene", factual,
          "--out", str(plan.vis_dir)])
    if points:
        _cli(["visualize", *_quiet(plan), "--checkpoint", checkpoint, "--shards", str(plan.shards),
              "--branch-point", points[0].name, "--size", "480x360", "--out", str(plan.vis_dir / "branch_point")])
    return str(plan.vis_dir)


STAGES: list[tuple[str, Callable[[DemoPlan], str]]] = [
    ("synth", stage_synth),
    ("preprocess", stage_preprocess),
    ("train", stage_train),
    ("evaluate", stage_evaluate),
    ("visualize", stage_visualize),
]


def run_demo(plan: DemoPlan, stages: Optional[list[str]] = None) -> dict:
    """Run the stages in order; return wall times, outputs and the evaluation's headline numbers."""
    from drivejepa.evaluation.report import headline_rows
    from drivejepa.runtime import init_ray

    init_ray()
    plan.out.mkdir(parents=True, exist_ok=True)
    times, notes = {}, {}
    for name, fn in STAGES:
        if stages is not None and name not in stages:
            continue
        print(f"\n=== demo stage: {name} ===", flush=True)
        start = time.perf_counter()
        notes[name] = fn(plan)
        times[name] = time.perf_counter() - start
    metrics = json.loads((plan.eval_dir / "metrics.json").read_text())
    return dict(times=times, notes=notes, metrics=metrics, headline=headline_rows(metrics))


def format_demo_summary(plan: DemoPlan, result: dict) -> str:
    from drivejepa.evaluation.report import format_headline

    lines = ["", "=" * 100, "drivejepa demo: done", "=" * 100, format_headline(result["metrics"]), ""]
    vis = sorted(plan.vis_dir.glob("*.png")) if plan.vis_dir.is_dir() else []
    lines += [
        f"report       {plan.eval_dir / 'report.md'}",
        f"metrics      {plan.eval_dir / 'metrics.json'}",
        f"plots        {plan.eval_dir}/*.png ({len(list(plan.eval_dir.glob('*.png')))} files)",
        f"renders      {plan.vis_dir}/ ({len(vis)} PNG" + (f", e.g. {vis[0].name})" if vis else ")"),
        f"checkpoint   {plan.run_dir / 'checkpoints' / 'best.pt'}",
        "",
        "wall time    " + "  ".join(f"{k} {v:.0f}s" for k, v in result["times"].items())
        + f"  | total {sum(result['times'].values()):.0f}s",
    ]
    return "\n".join(lines)
