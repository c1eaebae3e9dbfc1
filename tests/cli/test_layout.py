"""The package layout guardrails of DESIGN.md ("Layout")."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]
MAPPED = ["cli", "dataprep", "train", "evals", "recipes"]


def test_every_subpackage_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    for top in MAPPED:
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT).parts
            assert "lmpipe." + ".".join(rel) in listed, (
                f"{init.parent} is not in pyproject's packages"
            )
    for name, folder in config["package-dir"].items():
        assert (ROOT / folder / "__init__.py").is_file(), f"{name} -> {folder} has no __init__.py"


def test_mypy_checks_every_package_from_the_tree():
    # `make lint` links each mapped folder under its package name, and mypy checks the packages
    # [tool.mypy] lists: a package missing from either would go unchecked, silently.
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]
    assert sorted(tool["mypy"]["packages"]) == sorted(tool["setuptools"]["packages"])
    linked = re.search(r"for p in ([\w ]+); do ln -sfn", (ROOT / "Makefile").read_text())
    assert linked, "Makefile's lint no longer links the folders for mypy"
    assert sorted(linked.group(1).split()) == sorted(tool["setuptools"]["package-dir"].values())


def test_imports_are_absolute_through_the_namespace():
    for top in MAPPED + ["tests"]:
        for path in (ROOT / top).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom):
                    assert node.level == 0, f"{path}:{node.lineno}: relative import"
                    assert (node.module or "").split(".")[0] not in MAPPED, (
                        f"{path}:{node.lineno}: bare import"
                    )
                elif isinstance(node, ast.Import):
                    for alias in node.names:
                        assert alias.name.split(".")[0] not in MAPPED, (
                            f"{path}:{node.lineno}: bare import"
                        )


def test_installed_package_is_what_tests_import():
    import lmpipe.train.model

    # CI installs the wheel; a file missing from it fails here rather than for a user.
    origin = Path(lmpipe.train.model.__file__).resolve()
    assert origin.name == "model.py"
    assert (
        subprocess.run(
            [sys.executable, "-c", "import train"], capture_output=True, cwd="/"
        ).returncode
        != 0
    )


def test_shipped_recipes_are_package_data():
    from importlib import resources

    names = {p.name for p in resources.files("lmpipe.recipes").iterdir()}
    assert {"tiny.yaml", "btlm3b.yaml"} <= names
