"""The package's shape: no import cycle, deferred imports only where they say why, nothing heavy
imported until it is used, and a README whose architecture section names paths that exist."""

from __future__ import annotations

import ast
import re
import subprocess
import sys

import grimp
import pytest

from .conftest import ROOT

PACKAGE = ROOT / "distill"


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each one import cycle or more."""
    modules = sorted(graph.modules)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(m: str) -> None:
        index[m] = low[m] = len(index)
        stack.append(m)
        on_stack.add(m)
        for n in sorted(graph.find_modules_directly_imported_by(m)):
            if n not in index:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in on_stack:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            component = []
            while True:
                n = stack.pop()
                on_stack.discard(n)
                component.append(n)
                if n == m:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for m in modules:
        if m not in index:
            visit(m)
    return found


def test_no_import_cycle_in_the_package():
    graph = grimp.build_graph("distill", include_external_packages=False)
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle(tmp_path, monkeypatch):
    # A package with a -> b -> a: the check above would catch it.
    pkg = tmp_path / "cyclic"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from cyclic import b\n")
    (pkg / "b.py").write_text("from cyclic import a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _cycles(grimp.build_graph("cyclic")) == [["cyclic.a", "cyclic.b"]]


def _function_local_imports(path):
    tree = ast.parse(path.read_text())
    lines = path.read_text().splitlines()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    # the comment may sit on the import's line or on the line above it
                    text = lines[inner.lineno - 1] + (lines[inner.lineno - 2] if inner.lineno > 1 else "")
                    yield inner.lineno, text


def test_function_local_imports_only_defer_heavy_modules_and_say_so():
    unexplained = [f"{path.relative_to(ROOT)}:{line}" for path in sorted(PACKAGE.rglob("*.py"))
                   for line, text in _function_local_imports(path) if "deferred" not in text]
    assert unexplained == []


def test_importing_the_package_loads_no_heavy_optional_module():
    code = ("import sys, distill, distill.pipeline, distill.evaluation, distill.cli; "
            "print(' '.join(m for m in ('deepspeed', 'wandb', 'torch_pruning') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == ""


def test_every_path_the_readme_names_exists():
    readme = (ROOT / "README.md").read_text()
    paths = set(re.findall(r"`((?:distill|conf|tests|bench|docker|docs|\.ci)/[\w./-]*)`", readme))
    assert paths, "the README names no paths"
    missing = sorted(p for p in paths if "*" not in p and "<" not in p and not (ROOT / p).exists())
    assert missing == []


def test_readme_architecture_section_lists_every_folder():
    readme = (ROOT / "README.md").read_text()
    section = re.search(r"## Architecture\n(.*?)\n## ", readme, re.S)
    assert section, "README.md has no Architecture section"
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    absent = [f for f in folders if not re.search(rf"^\s*{re.escape(f)}/", section.group(1), re.M)]
    assert absent == []


@pytest.mark.parametrize("registry", ["loss", "technique", "student", "dataset"])
def test_registries_name_their_choices(make_cfg, registry):
    from distill.checks import validate
    from distill.compress.registry import get_technique
    from distill.errors import ConfigError

    if registry == "technique":
        with pytest.raises(ConfigError, match="unknown compression technique 'distil'; choose from: lowrank, sharing, quant, prune, export"):
            get_technique("distil")
        return
    override = {"loss": "loss.name=dkdd", "student": "student.name=vit", "dataset": "data.name=mnist"}[registry]
    with pytest.raises(ConfigError, match=r"unknown \w+ '\w+'; choose from: "):
        validate(make_cfg(override))
