"""The engine's layers, written down once, and the test that keeps the imports inside them.

AbdomenSegLib's subpackages form a stack: a module may import its own layer or any layer below it, never one
above, and no chain of imports may come back to where it started (an import circle), also through imports made
inside functions, which Python resolves late but which tie the modules together all the same.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from helpers import ROOT

PACKAGE = "AbdomenSegLib"

# Lowest first. The top layer holds the entry points: the command line, the engine process the Slicer panel
# keeps warm, the one-call Python API and the package itself.
LAYERS = (
    "core",  # errors, options, the organ table, output channels, size limits, numeric precision, version
    "io",  # reading and writing images, file integrity, DICOM series and SEG, atomic outputs, the phantom
    "models",  # card schema, model packages and catalog, choosing a model, ensembles, cascades, networks
    "preprocessing",  # the model-space pipeline, resampling, regions of interest, labelled datasets
    "inference",  # inferers, sliding windows, mirroring, the segmenters, resampling back, post-processing
    "qc",  # the result check: anatomy, confidence notes, pictures, qc.json
    "cohort",  # folders of cases: the per-case runner, manifests, Dask
    "evaluation",  # metrics against a reference, label conventions, evaluating folders and comparing models
    "training",  # training configs and recipes, augmentation, synthetic data, trainers, export
    "slicer",  # the Slicer module's logic, background runs, the engine worker client, dependency install
    "",  # top: __init__, __main__, api, cli, worker
)


def layer_of(module: str) -> int:
    """The layer index of a dotted module name inside the package."""
    parts = module.split(".")
    return LAYERS.index(parts[1] if len(parts) > 1 and parts[1] in LAYERS else "")


def _module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = [root.name, *rel.parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str, modules: set) -> set:
    """Every package module `module` imports, at module level or inside functions (TYPE_CHECKING included:
    a circle that only type checkers see still ties the files together)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            # the longest prefix that is one of the package's modules
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module and name != PACKAGE:
                found.add(name)
    return found


def import_graph(root: Path) -> dict:
    files = {_module_name(p, root): p for p in root.rglob("*.py")}
    modules = set(files)
    return {m: _imports(p, m, modules) for m, p in files.items()}


def layer_problems(graph: dict) -> list:
    problems = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if layer_of(target) > layer_of(module):
                problems.append(
                    f"{module} (layer {LAYERS[layer_of(module)] or 'top'}) imports {target} "
                    f"(layer {LAYERS[layer_of(target)] or 'top'}, higher)"
                )
    return problems


def circles(graph: dict) -> list:
    """The strongly connected components of more than one module (Tarjan), each a sorted list."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def unknown_layers(root: Path) -> list:
    return [
        str(p.relative_to(root))
        for p in root.iterdir()
        if p.is_dir() and (p / "__init__.py").exists() and p.name not in LAYERS
    ]


def test_every_subpackage_is_a_layer():
    assert unknown_layers(ROOT / PACKAGE) == []


def test_no_import_reaches_a_higher_layer():
    assert layer_problems(import_graph(ROOT / PACKAGE)) == []


def test_no_import_circles():
    assert circles(import_graph(ROOT / PACKAGE)) == []


def _tree(tmp_path: Path, files: dict) -> Path:
    root = tmp_path / PACKAGE
    for name, text in {"__init__.py": "", **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    for sub in {Path(n).parts[0] for n in files if "/" in n}:
        (root / sub / "__init__.py").touch()
    return root


def test_a_planted_circle_and_an_upward_import_are_found(tmp_path):
    """The checks can fail: a circle through a function-level import, and core importing inference."""
    root = _tree(
        tmp_path,
        {
            "core/errors.py": "from AbdomenSegLib.inference import segmenter\n",
            "inference/segmenter.py": "def f():\n    from ..core.errors import X\n",
            "core/options.py": "from . import errors\n",
        },
    )
    graph = import_graph(root)
    assert circles(graph) == [["AbdomenSegLib.core.errors", "AbdomenSegLib.inference.segmenter"]]
    assert layer_problems(graph) == [
        "AbdomenSegLib.core.errors (layer core) imports AbdomenSegLib.inference.segmenter (layer inference, higher)"
    ]


def test_the_real_tree_is_checked(tmp_path):
    """Guard against a checker that sees nothing: the real graph has the expected size and known arrows."""
    graph = import_graph(ROOT / PACKAGE)
    assert len(graph) > 60
    assert "AbdomenSegLib.core.errors" in graph[f"{PACKAGE}.inference.segmenter"]


@pytest.mark.parametrize("name", ["AbdomenSegLib.core.errors", "AbdomenSegLib.cli", "AbdomenSegLib.slicer.logic"])
def test_layer_of(name):
    assert layer_of(name) == {"core": 0, "cli": len(LAYERS) - 1, "slicer": LAYERS.index("slicer")}[name.split(".")[1]]
