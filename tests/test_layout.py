"""The package's layering (docs/design.md, "Where code lives"), read from the source:
nothing in pipeline/, models/, infra/, training/ or serve/ imports jobs/; training/ is
imported only by commands; infra/ imports no other folder; the stages import no Ray; no
module imports another module's private name; jobs/ holds commands only: no class but an
option type, and a line budget."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("pipeline", "models", "jobs", "infra", "training", "serve")
# A command is its options, its config and one library call; the audit's 30 options
# take 150 lines of it.
COMMAND_LINES = 250


def _modules() -> list[tuple[str, Path, ast.Module]]:
    out = []
    for folder in FOLDERS:
        for path in sorted((REPO / folder).rglob("*.py")):
            out.append((folder, path, ast.parse(path.read_text(), str(path))))
    return out


def _imports(tree: ast.Module) -> list[tuple[str, list[str]]]:
    """(module, names) of every import, at any depth (local imports included)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((a.name, []) for a in node.names)
    return found


MODULES = _modules()


@pytest.mark.parametrize("folder", ["pipeline", "models", "infra", "training", "serve"])
def test_library_folders_never_import_jobs(folder):
    bad = [f"{path.relative_to(REPO)}: {module}"
           for f, path, tree in MODULES if f == folder
           for module, _ in _imports(tree) if module.startswith("deepaudit.jobs")]
    assert bad == []


@pytest.mark.parametrize("folder", ["pipeline", "models", "infra", "serve"])
def test_the_runtime_never_imports_training(folder):
    """Auditing needs no training code: only the train command reaches training/."""
    bad = [f"{path.relative_to(REPO)}: {module}"
           for f, path, tree in MODULES if f == folder
           for module, _ in _imports(tree) if module.startswith("deepaudit.training")]
    assert bad == []


def test_infra_imports_no_other_folder():
    """infra/ is the bottom layer: the other folders build on it, never under."""
    above = tuple(f"deepaudit.{f}" for f in FOLDERS if f != "infra")
    bad = [f"{path.relative_to(REPO)}: {module}"
           for f, path, tree in MODULES if f == "infra"
           for module, _ in _imports(tree) if module.startswith(above)]
    assert bad == []


def test_the_stages_import_no_ray():
    (tree,) = [t for _, p, t in MODULES if p == REPO / "pipeline" / "stages.py"]
    assert [m for m, _ in _imports(tree) if m == "ray" or m.startswith("ray.")] == []


def test_no_module_imports_another_modules_private_name():
    bad = [f"{path.relative_to(REPO)}: {module}.{name}"
           for _, path, tree in MODULES
           for module, names in _imports(tree) if module.startswith("deepaudit.")
           for name in names if name.startswith("_")]
    assert bad == []


def test_ray_data_calls_live_in_pipeline_dataset():
    """Every map_batches / from_blocks call of the audit is wired in one module."""
    calls = sorted({str(path.relative_to(REPO)) for _, path, tree in MODULES
                    for node in ast.walk(tree)
                    if isinstance(node, ast.Attribute)
                    and node.attr in ("map_batches", "from_blocks", "ActorPoolStrategy")})
    assert calls == ["pipeline/dataset.py"]


def _is_option_type(node: ast.ClassDef) -> bool:
    """An Enum of choices for a typer option (``class FailOn(str, Enum)``)."""
    return any(isinstance(b, (ast.Name, ast.Attribute))
               and (b.id if isinstance(b, ast.Name) else b.attr).endswith("Enum")
               for b in node.bases)


@pytest.mark.parametrize("path", sorted(p for f, p, _ in MODULES if f == "jobs"),
                         ids=lambda p: p.name)
def test_jobs_modules_stay_commands(path):
    """jobs/ parses options, builds a config and calls a library function: no class but an
    option type (nested ones included), and short enough to read at a glance."""
    (tree,) = [t for _, p, t in MODULES if p == path]
    classes = [n.name for n in ast.walk(tree)
               if isinstance(n, ast.ClassDef) and not _is_option_type(n)]
    assert classes == [], f"{path.name}: move {classes} to a library package"
    lines = len(path.read_text().splitlines())
    assert lines <= COMMAND_LINES, f"{path.name}: {lines} lines (budget {COMMAND_LINES})"
