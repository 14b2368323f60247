import subprocess
import sys

import pytest
import yaml

from aidc.config import JobConfig, apply_overrides, load_config, parse_override
from aidc.errors import ConfigError
from tests.conftest import CONFIGS, REPO


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, JobConfig)
    assert cfg.name == path.stem


def test_overrides_keep_types_and_reach_nested_fields():
    cfg = load_config(CONFIGS / "digits.yaml", ["train.epochs=3", "model.channels=[8, 16]", "run.name=abc"])
    assert cfg.train.epochs == 3
    assert cfg.model.channels == [8, 16]
    assert cfg.run.name == "abc"


def test_override_syntax_errors_say_how_to_write_one():
    with pytest.raises(ConfigError, match="--set section.field=value"):
        parse_override("train.epochs")
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"train": 3}, ["train.epochs=1"])


def test_bad_values_name_file_field_value_and_rule(tmp_path):
    raw = yaml.safe_load((CONFIGS / "digits.yaml").read_text())
    raw["train"]["epochs"] = 0
    raw["train"]["lr"] = "fast"
    raw["model"]["colour"] = "blue"
    raw["data"]["split"] = {"train": 0.5, "val": 0.1, "test": 0.1}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    msg = str(err.value)
    assert str(bad) in msg
    assert "train.epochs: got 0: Input should be greater than or equal to 1" in msg
    assert "train.lr: got 'fast'" in msg
    assert "model.colour: unknown field" in msg
    assert "must add up to 1.0, got 0.7" in msg


def test_missing_required_section_and_reserved_alias(tmp_path):
    raw = yaml.safe_load((CONFIGS / "digits.yaml").read_text())
    del raw["registry"]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="registry: required field is missing"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="reserved by MLflow"):
        load_config(CONFIGS / "digits.yaml", ["registry.alias=latest"])


def test_yaml_syntax_error_gives_line(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: digits\ntrain: {epochs: 3\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+"):
        load_config(bad)


def test_missing_file_suggests_an_example():
    with pytest.raises(ConfigError, match="jobs/configs/digits.yaml"):
        load_config("nope.yaml")


def _job(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_job_exits_2_on_bad_config_before_starting_anything():
    proc = _job("jobs.train", "--config", "jobs/configs/digits.yaml", "--set", "resources.num_workers=-1")
    assert proc.returncode == 2
    assert "resources.num_workers: got -1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_dry_run_prints_resolved_config_and_builds_the_model():
    proc = _job("jobs.train", "--config", "jobs/configs/digits.yaml", "--set", "train.epochs=2", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)
    assert resolved["train"]["epochs"] == 2 and resolved["resources"]["num_workers"] == 2
    assert "parameters" in proc.stdout
