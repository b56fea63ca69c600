"""The dependency direction docs/design.md states, checked on the source: only the launchers import
the training loop, kernels import no megatrain code, and the library never imports a launcher.

Imports inside functions count too (they are how the CLI keeps `--help` fast), so the graph is read
from every import statement with ``ast``, not from what one interpreter happens to load."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Source folder -> the package name it is installed under (setup.py's SUBPACKAGE_DIRS).
SOURCE_PACKAGES = {
    "megatrain": "megatrain",
    "kernels": "megatrain.kernels",
    "slurm": "megatrain.slurm",
    "data_pipelines": "megatrain.data_pipelines",
}
# The commands: the only modules that may run a training (docs/design.md, "Code layout").
LAUNCHERS = {
    "megatrain.cli",
    "megatrain.slurm.job",
    "megatrain.experiments.common",
    "megatrain.profiling.memory",
}


def _module_name(folder: str, path: Path) -> str:
    parts = path.relative_to(REPO / folder).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((SOURCE_PACKAGES[folder], *parts))


def _imported(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                prefix = ".".join(base)
                target = f"{prefix}.{node.module}" if node.module else prefix
            else:
                target = node.module
            names.add(target)
            # `from megatrain import trainer` imports the module megatrain.trainer
            names.update(f"{target}.{alias.name}" for alias in node.names)
    return names


@pytest.fixture(scope="module")
def import_graph() -> dict[str, set[str]]:
    graph = {}
    for folder in SOURCE_PACKAGES:
        for path in (REPO / folder).rglob("*.py"):
            module = _module_name(folder, path)
            graph[module] = _imported(ast.parse(path.read_text()), module, path.name == "__init__.py")
    return graph


def _importers(graph: dict[str, set[str]], target: str) -> set[str]:
    return {module for module, names in graph.items() if target in names}


def test_the_graph_is_read_from_the_source(import_graph):
    # The negative control of the checks below: the graph does see the launchers' imports.
    assert "megatrain.trainer" in import_graph["megatrain.cli"]
    assert "megatrain.trainer" in import_graph["megatrain.slurm.job"]
    assert len(import_graph) > 100


def test_only_the_launchers_import_the_training_loop(import_graph):
    assert _importers(import_graph, "megatrain.trainer") <= LAUNCHERS


def test_the_training_loop_does_not_reach_back_into_a_launcher(import_graph):
    seen, todo = set(), ["megatrain.trainer"]
    while todo:
        module = todo.pop()
        if module in seen or module not in import_graph:
            continue
        seen.add(module)
        todo.extend(import_graph[module])
    assert not (seen & LAUNCHERS), "the training loop imports a command module"


def test_kernels_import_no_megatrain_code_outside_kernels(import_graph):
    for module, names in import_graph.items():
        if module.startswith("megatrain.kernels"):
            foreign = {n for n in names
                       if n.startswith("megatrain") and not n.startswith("megatrain.kernels")}
            assert not foreign, f"{module} imports {sorted(foreign)}"


def test_only_the_cli_imports_the_slurm_package(import_graph):
    importers = set()
    for module, names in import_graph.items():
        if not module.startswith("megatrain.slurm") and any(n.startswith("megatrain.slurm") for n in names):
            importers.add(module)
    assert importers <= {"megatrain.cli"}
