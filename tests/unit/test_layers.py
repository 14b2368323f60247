"""The house's structure, checked: imports run one way (import-linter's contracts in pyproject.toml), no module
reaches into another's private names, and benchmarks stand on the library alone (never on tests/)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

SOURCES = [REPO / "platform" / "aidc", REPO / "jobs", REPO / "serve_apps", REPO / "benchmarks"]
GENERATED = ("oip_grpc",)  # protoc's output


def _modules(roots=SOURCES):
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            if not any(g in path.parts for g in GENERATED):
                yield path, ast.parse(path.read_text(), str(path))


def test_imports_keep_the_layers_and_form_no_cycle():
    lint = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"import-linter found imports against the layers (pyproject.toml):\n{out.stdout[-4000:]}"
    assert "BROKEN" not in out.stdout and "0 broken" in out.stdout


def test_no_private_name_is_imported_across_modules():
    """`from aidc.x import _y` or `x._y` on an imported aidc module: make the name public where another module
    needs it (one place to change, and the linter sees the dependency)."""
    found = []
    for path, tree in _modules():
        ours = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "aidc":
                ours.update(a.asname or a.name for a in node.names)
                found += [f"{path.relative_to(REPO)}:{node.lineno} from {node.module} import {a.name}"
                          for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
            elif isinstance(node, ast.Import):
                ours.update((a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("aidc"))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id in ours):
                found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.value.id}.{node.attr}")
    assert not found, "private names used across modules:\n" + "\n".join(found)


def test_benchmarks_import_nothing_from_tests():
    found = [f"{path.relative_to(REPO)}:{node.lineno}" for path, tree in _modules([REPO / "benchmarks"])
             for node in ast.walk(tree)
             if isinstance(node, (ast.Import, ast.ImportFrom))
             and any(n.split(".")[0] == "tests" for n in ([node.module or ""] if isinstance(node, ast.ImportFrom)
                                                          else [a.name for a in node.names]))]
    assert not found, f"benchmarks import tests/ (shared helpers live in aidc.testing): {found}"


def test_config_names_no_workload_each_task_registers_its_own_schemas():
    """One registration per workload: config.py (a leaf) names no task and no model architecture; importing
    aidc.tasks registers each task with its model schemas and config rules."""
    import re

    import aidc.config as config
    from aidc.tasks import TASKS

    source = Path(config.__file__).read_text()
    named = [n for n in TASKS if re.search(rf"['\"]{n}['\"]", source)]
    assert not named, f"config.py names workloads {named}: they belong in their task modules"
    assert config.WORKLOADS == TASKS
    archs = [config.arch_of(s) for t in TASKS.values() for s in t.model_schemas]
    assert len(archs) == len(set(archs)), archs  # model.arch names one schema
    for task in TASKS.values():
        assert all(issubclass(s, config.ModelSchema) for s in task.model_schemas), task.name
    # the named datasets data.source takes are the data layer's loaders, registered the same way
    from aidc.data import SOURCES

    assert set(config.DATASETS) == set(SOURCES)


def test_a_new_workload_needs_no_change_in_config():
    """A task registered from outside config (as a new task module does) is a valid job config at once: its own
    model schema (defaults, bounds, unknown fields), its data sources and its own rules."""
    from typing import Literal

    from pydantic import Field

    import aidc.config as config
    from aidc.errors import ConfigError
    from aidc.tasks.base import Task

    class WaveConfig(config.ModelSchema):
        arch: Literal["wave"] = "wave"
        hidden: int = Field(32, ge=1)

    class Speech(Task):
        name = "speech_test"
        model_schemas = (WaveConfig,)
        data_sources = ("files",)

        def check_config(self, cfg):
            if cfg.train.epochs > 99:
                raise ValueError("train.epochs: at most 99 for this task")

    base = {"name": "w", "task": "speech_test", "registry": {"model_name": "w"},
            "data": {"source": "files", "path": "x/*.parquet", "format": "parquet"}}
    config.register_workload(Speech())
    try:
        cfg = config.validate(base)
        assert type(cfg.model) is WaveConfig and cfg.model.hidden == 32  # the default arch, its defaults
        assert config.validate(cfg.model_dump(mode="json")) == cfg  # a dumped config validates back the same
        with pytest.raises(ConfigError, match=r"model.hidden: got 0"):
            config.validate({**base, "model": {"hidden": 0}})
        with pytest.raises(ConfigError, match=r"model.width: unknown field"):
            config.validate({**base, "model": {"arch": "wave", "width": 3}})
        with pytest.raises(ConfigError, match=r"model.arch 'cnn' does not fit task 'speech_test'; use one of \['wave'\]"):
            config.validate({**base, "model": {"arch": "cnn"}})
        with pytest.raises(ConfigError, match=r"data.source 'digits' does not fit task 'speech_test'"):
            config.validate({**base, "data": {"source": "digits"}})
        with pytest.raises(ConfigError, match="at most 99"):
            config.validate({**base, "train": {"epochs": 100}})
    finally:
        del config.WORKLOADS["speech_test"]
    with pytest.raises(ConfigError, match=r"unknown task 'speech_test'; use one of"):
        config.validate(base)


def test_every_package_of_the_library_is_installed():
    """pyproject.toml lists the packages a wheel holds: a package missing there imports from a checkout (an
    editable install) but not from a built image."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    root = REPO / "platform"
    packages = {".".join(p.parent.relative_to(root).parts) for p in root.glob("aidc/**/__init__.py")}
    assert packages - listed == set(), f"add these to [tool.setuptools] packages: {sorted(packages - listed)}"
