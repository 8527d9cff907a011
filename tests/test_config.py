"""The config system: YAML load, dotted overrides, clear errors for bad keys and types, saved resolved config."""
from __future__ import annotations

import pytest
import yaml

from drivejepa.config import (
    ConfigError,
    PreprocessConfig,
    TrainConfig,
    config_hash,
    load_config,
    save_config,
)


def write(tmp_path, text, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_fills_nested_dataclasses_and_keeps_defaults(tmp_path):
    path = write(tmp_path, "seed: 3\noptim:\n  lr: 1.0e-3\ndata:\n  horizon: 4\n  cameras: [CAM_FRONT, CAM_BACK]\n")
    cfg = load_config(TrainConfig, path)
    assert cfg.seed == 3
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.optim.weight_decay == pytest.approx(0.05)  # untouched default
    assert cfg.data.horizon == 4 and cfg.data.cameras == ["CAM_FRONT", "CAM_BACK"]


def test_dotted_overrides_win_over_the_file(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 1.0e-3\n")
    cfg = load_config(TrainConfig, path, ["optim.lr=1e-4", "data.horizon=6", "loss.objective=infonce",
                                           "model.size=custom", "model.lidar_widths=[32, 64]", "optim.amp=false"])
    assert cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.data.horizon == 6
    assert cfg.loss.objective == "infonce"
    assert cfg.model.lidar_widths == [32, 64]
    assert cfg.optim.amp is False


def test_int_is_accepted_where_float_is_expected(tmp_path):
    cfg = load_config(TrainConfig, None, ["optim.lr=1"])
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 1.0


def test_tuple_field_from_yaml_list(tmp_path):
    cfg = load_config(PreprocessConfig, write(tmp_path, "image_size: [320, 180]\n"))
    assert cfg.image_size == (320, 180)
    with pytest.raises(ConfigError, match="image_size"):
        load_config(PreprocessConfig, write(tmp_path, "image_size: [320]\n", "bad.yaml"))


@pytest.mark.parametrize("text, key", [
    ("optim:\n  lrr: 0.1\n", "optim.lrr"),
    ("seeed: 1\n", "seeed"),
])
def test_unknown_key_in_file_names_key_and_file(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, path)
    assert key in str(err.value) and str(path) in str(err.value)


def test_wrong_type_in_file_names_key_and_file(tmp_path):
    path = write(tmp_path, "data:\n  horizon: six\n")
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, path)
    assert "data.horizon" in str(err.value) and str(path) in str(err.value) and "integer" in str(err.value)


@pytest.mark.parametrize("override, fragment", [
    ("optim.lrr=1", "optim.lrr"),
    ("data.horizon=1.5", "data.horizon"),
    ("optim.amp=maybe", "optim.amp"),
    ("loss.objective=pixels", "loss.objective"),
    ("optim.lr.x=1", "optim.lr.x"),
    ("optim.lr", "key=value"),
])
def test_bad_overrides_name_the_key_and_the_command_line(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, None, [override])
    assert fragment in str(err.value) and "command line" in str(err.value)


def test_missing_or_non_mapping_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(TrainConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(TrainConfig, write(tmp_path, "- 1\n- 2\n"))


def test_config_files_are_data_not_code(tmp_path):
    path = write(tmp_path, "seed: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError):
        load_config(TrainConfig, path)


def test_saved_resolved_config_loads_back_identically(tmp_path):
    cfg = load_config(TrainConfig, None, ["optim.lr=2e-4", "data.cameras=[CAM_FRONT, CAM_FRONT_LEFT]"])
    out = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert yaml.safe_load(out.read_text())["optim"]["lr"] == pytest.approx(2e-4)
    again = load_config(TrainConfig, out)
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


def test_config_hash_changes_with_values():
    a = load_config(PreprocessConfig)
    b = load_config(PreprocessConfig, None, ["lidar_points=2048"])
    assert config_hash(a) != config_hash(b)


def test_every_yaml_in_pipelines_loads(repo_root):
    """The shipped experiment files stay valid against the schema."""
    from drivejepa.config import PlanConfig, PreprocessConfig, TrainConfig

    schemas = {"train_": TrainConfig, "preprocess": PreprocessConfig, "plan": PlanConfig}
    checked = 0
    for path in sorted((repo_root / "pipelines").glob("*.yaml")):
        for prefix, cls in schemas.items():
            if path.name.startswith(prefix):
                load_config(cls, path)
                checked += 1
    assert checked >= 1


def test_plan_config_refuses_values_out_of_range(repo_root):
    from drivejepa.config import PlanConfig

    cfg = load_config(PlanConfig, repo_root / "pipelines/plan.yaml", ["optimizer.method=mppi"])
    assert cfg.optimizer.method == "mppi" and cfg.horizon == 6
    for bad, key in (("optimizer.elites=1000", "optimizer.elites"), ("limits.max_decel=0", "limits.max_decel"),
                     ("optimizer.method=random", "optimizer.method"), ("weights.collision=-1", "collision")):
        with pytest.raises(ConfigError, match=key):
            load_config(PlanConfig, repo_root / "pipelines/plan.yaml", [bad])
