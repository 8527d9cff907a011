"""The main job end to end at a tiny size: synth -> preprocess -> train -> evaluate -> visualize, one summary."""
from __future__ import annotations

import json

from drivejepa.cli import main


def test_demo_chain_runs_end_to_end_and_its_summary_matches_metrics(tmp_path, repo_root, ray_session, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--quiet", "--out", str(out), "--scenes", "5", "--samples-per-scene", "10",
            "--branches", "2", "--branch-frames", "4",
            "--image-size", "320x180", "--preprocess-config", str(repo_root / "tests/data/preprocess_tiny.yaml"),
            "--train-config", str(repo_root / "pipelines/train_smoke.yaml"), "optim.max_steps=12"]
    assert main(argv) == 0
    screen = capsys.readouterr().out
    assert "drivejepa demo: done" in screen
    for stage in ("synth", "preprocess", "train", "evaluate", "visualize"):
        assert f"{stage} " in screen.split("wall time")[-1]

    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    summary = json.loads((out / "demo_summary.json").read_text())
    from drivejepa.evaluation.report import headline_rows

    assert summary["headline"] == json.loads(json.dumps(headline_rows(metrics)))
    # best.pt is chosen on val (scene 3), the headline comes from the test split (scene 5), branches left out
    assert metrics["provenance"]["split"] == "test" and metrics["provenance"]["eval_scenes"] == ["scene-0005"]
    assert "Counterfactual top-1" in screen and "counterfactual" in metrics
    assert set(summary["times"]) == {"synth", "preprocess", "train", "evaluate", "visualize"}
    assert (out / "eval" / "report.md").is_file()
    assert (out / "run" / "checkpoints" / "best.pt").is_file()
    assert list((out / "vis").glob("*.png")), "the demo renders a predicted scene"
    # The world renders, and the shards keep, only the cameras the model reads (train_smoke: the front camera).
    assert json.loads((out / "world" / ".drivejepa-synth.json").read_text())["params"]["cameras"] == ["CAM_FRONT"]
    assert json.loads((out / "shards" / "manifest.json").read_text())["config"]["cameras"] == ["CAM_FRONT"]

    # A rerun resumes: the world is kept, nothing is retrained from scratch, and the numbers do not change.
    assert main(argv) == 0
    screen = capsys.readouterr().out
    assert "kept the complete world" in json.loads((out / "demo_summary.json").read_text())["outputs"]["synth"]
    again = json.loads((out / "eval" / "metrics.json").read_text())
    assert again["overall"] == metrics["overall"]

    # A run trained with another config is not resumed: it is set aside and the demo trains afresh.
    from drivejepa.demo import DemoPlan, _set_aside_run_of_another_config

    plan = DemoPlan(out=out, train_config=repo_root / "pipelines/train_smoke.yaml",
                    train_overrides=("optim.max_steps=12",))
    _set_aside_run_of_another_config(plan)
    assert (out / "run" / "checkpoints" / "best.pt").is_file()
    plan.train_overrides = ("optim.max_steps=13",)
    _set_aside_run_of_another_config(plan)
    assert not (out / "run").exists() and (out / "run.previous" / "checkpoints" / "best.pt").is_file()
