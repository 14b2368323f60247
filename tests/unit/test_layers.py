"""The house's structure, checked: imports run one way (import-linter's contracts in pyproject.toml), no module
reaches into another's private names, and benchmarks stand on the library alone (never on tests/)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

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


def test_every_workload_a_config_can_name_is_a_task_and_every_task_can_be_named():
    """config.py (a leaf: it imports no task) lists the workloads and their model architectures; aidc.tasks
    implements them. Adding a workload adds one to each; this keeps the two lists one."""
    from aidc.config import TASK_ARCHS, TASK_SOURCES
    from aidc.tasks import TASKS

    assert set(TASK_ARCHS) == set(TASKS)
    assert set(TASK_SOURCES) <= set(TASKS)
    for name, task in TASKS.items():
        assert task.name == name


def test_every_package_of_the_library_is_installed():
    """pyproject.toml lists the packages a wheel holds: a package missing there imports from a checkout (an
    editable install) but not from a built image."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    root = REPO / "platform"
    packages = {".".join(p.parent.relative_to(root).parts) for p in root.glob("aidc/**/__init__.py")}
    assert packages - listed == set(), f"add these to [tool.setuptools] packages: {sorted(packages - listed)}"
