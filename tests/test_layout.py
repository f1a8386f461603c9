"""The package's shape: one phase table that every consumer reads, one door to the run's files, no import cycles."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from helpers import ROOT
from kantai_batch.cli import cli
from kantai_batch.phases import PHASES, before, phase
from kantai_batch.rundir import RunDir
from kantai_batch.submission import COMPONENT, kustomize
from kantai_batch.submission import PHASES as SUBMITTED

PACKAGE = ROOT / "kantai_batch"


def _imports() -> dict[str, set[str]]:
    """Each module of the package and the package modules it imports, at its top or inside functions."""
    graph = {}
    for path in PACKAGE.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == "kantai_batch":
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kantai_batch."):
                names.add(node.module.split(".")[1])
        graph[path.stem] = names - {path.stem}
    return graph


def test_the_package_has_no_import_cycles():
    graph = _imports()
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join((*path, module))}"
        if module in done:
            return
        for imported in graph.get(module, ()):
            visit(imported, (*path, module))
        done.add(module)

    for module in graph:
        visit(module, ())


def test_no_phase_imports_another_phase_and_only_the_run_dir_reaches_s3():
    graph = _imports()
    modules = {row.runner.partition(":")[0].rsplit(".", 1)[1] for row in PHASES}
    for module in modules:
        assert not graph[module] & (modules - {module}), f"{module} imports {graph[module] & modules}"
    # Training and checkpoint code go through the run dir, never the transport.
    for module in ("train", "checkpoints", "trainer", *modules):
        assert "s3" not in graph[module], f"{module} imports s3"


def test_every_phase_is_a_command_a_kubernetes_job_and_a_run_dir_folder(tmp_path: Path):
    run = RunDir(tmp_path)
    rendered = yaml.safe_load_all(kustomize(ROOT / "k8s" / "overlays" / "cpu"))
    components = {doc["metadata"]["labels"].get(COMPONENT) for doc in rendered if doc and doc["kind"] == "Job"}
    for row in PHASES:
        assert row.name in cli.commands, row.name
        assert row.name in components and row.name in SUBMITTED, row.name
        assert row.output_of(run).parent == tmp_path
        assert all(phase(name) in before(row.name) for name in row.upstream), row.name


def test_the_readme_module_list_names_every_module():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    listed = {
        line.split()[0] for line in readme.splitlines() if line.startswith("  ") and line.split()[0].endswith(".py")
    }
    modules = {path.name for path in PACKAGE.glob("*.py") if not path.name.startswith("__")}
    assert modules <= listed, f"README's module list lacks {sorted(modules - listed)}"
