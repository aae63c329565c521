"""The layout stays easy to see: imports run one way, no cycles, no imports hidden in functions.

The packages of ``src/sazs`` form layers, each importing only the ones before it:

    core < datasets < features < segments < stores < pipeline < quality < model < train < eval

``core`` holds what every package shares (console, faults, devices, files, metrics, linalg),
``datasets`` reads images and masks, ``features`` extracts ViT patch features (used by the
pipeline, the model and the evaluator), ``segments`` reads ground-truth-free segments from
eigenvectors, ``stores`` is the prior-store format and nothing of the compute, ``pipeline``
computes priors, ``quality`` scores them against human masks, ``model`` is the zero-shot model
(shared by train and eval), ``train`` trains it, ``eval`` evaluates it.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
LAYERS = ("core", "datasets", "features", "segments", "stores", "pipeline", "quality", "model", "train", "eval")
MAX_LINES = 450  # "about 400": a module longer than this is doing more than one job


@dataclass(frozen=True)
class Import:
    source: str  # importing module, e.g. sazs.stores.writer
    target: str  # imported sazs module
    line: int
    in_function: bool


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted((SRC / "sazs").glob("*/*.py")):
        package = f"sazs.{path.parent.name}"
        mods[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return mods


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if MODULES[module].stem == "__init__" else module.rsplit(".", 1)[0]
    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
    return f"{base}.{node.module}" if node.module else base


def _imports(module: str, text: str | None = None) -> list[Import]:
    tree = ast.parse(MODULES[module].read_text() if text is None else text)
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = _resolve(module, child)
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in child.names]
            else:
                visit(child, nested)
                continue
            for name in dict.fromkeys(names):
                while name and name not in MODULES:  # sazs.x.y.attr -> sazs.x.y
                    name = name.rpartition(".")[0]
                if name and name != module:
                    found.append(Import(module, name, child.lineno, in_function))

    visit(tree, False)
    return found


IMPORTS = [imp for module in MODULES for imp in _imports(module)]


def _layer(module: str) -> int:
    return LAYERS.index(module.split(".")[1])


def test_every_package_is_a_layer():
    assert sorted({m.split(".")[1] for m in MODULES}) == sorted(LAYERS)


def test_packages_import_only_the_layers_below():
    upward = [f"{i.source} (line {i.line}) imports {i.target}" for i in IMPORTS if _layer(i.target) > _layer(i.source)]
    assert not upward, "imports against the layer order " + " < ".join(LAYERS) + ":\n" + "\n".join(upward)


def test_no_project_import_inside_a_function():
    hidden = [f"{MODULES[i.source].relative_to(ROOT)}:{i.line} imports {i.target}" for i in IMPORTS if i.in_function]
    assert not hidden, "move these imports to the top of the module:\n" + "\n".join(hidden)


def test_no_import_cycle_between_modules():
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for i in IMPORTS:
        edges[i.source].add(i.target)
    # Tarjan's strongly connected components: a component of more than one module is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in MODULES:
        if v not in index:
            connect(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checks_see_violations():
    """The checks above are not vacuous: on a module written here they find each kind of import."""
    text = (
        "from .manifest import build_manifest\n"
        "import sazs.core.files\n"
        "def f():\n"
        "    from sazs.eval import cli\n"
        "    from ..pipeline.job import run_local\n"
    )
    found = {(i.target, i.in_function) for i in _imports("sazs.stores.writer", text)}
    assert found == {
        ("sazs.stores.manifest", False),
        ("sazs.core.files", False),
        ("sazs.eval.cli", True),
        ("sazs.pipeline.job", True),
    }
    assert _layer("sazs.eval.cli") > _layer("sazs.stores.writer")


def test_modules_stay_small():
    long = {str(p.relative_to(ROOT)): n for p in MODULES.values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by job): {long}"


def test_src_layout_nothing_importable_from_the_root():
    """No top-level folder of the repository is a package (``datasets/`` would shadow HuggingFace's)."""
    assert (SRC / "sazs" / "__init__.py").is_file()
    shadowing = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert not shadowing, f"top-level packages importable from the repository root: {shadowing}"
    assert not [p.name for p in (SRC / "sazs").glob("*.py") if p.stem != "__init__"]
