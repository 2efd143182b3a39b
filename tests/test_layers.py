"""Folders are layers: every import of src/hyperdiff runs down a layer, never up or around.

The check reads every import with ``ast`` (top level, inside functions, under
``TYPE_CHECKING``; relative and absolute), maps each module to its layer from :data:`LAYERS`
and fails naming the file, the line and the import when one runs up a layer, sideways into an
independent layer of the same rank, or round a cycle. docs/architecture.md describes the
layers; :func:`test_architecture_page_lists_every_module` keeps its module list true.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"

# folder under hyperdiff -> rank; a folder may import only from lower ranks (and from itself).
# testing/ sits beside methods/, diagnose/ beside tuner/: same rank, independent of each other.
LAYERS = {
    "": 0,  # the foundation at the package root: errors, typing, logs, tree, seeds, wording, ...
    "hparams": 1,
    "engine": 2,
    "methods": 3,
    "testing": 3,
    "diagnose": 4,
    "tuner": 4,
    "app": 5,
}
FOUNDATION = {"errors", "typing", "logs", "tree", "seeds", "version", "wording"}
# the package's public face may re-export from every layer
TOP = {"hyperdiff", "hyperdiff.__main__"}
PYTREE_MODULE = "hyperdiff.tree"


@dataclass(frozen=True)
class Import:
    """One import of a hyperdiff module: who imports what, where."""

    importer: str
    target: str
    file: str
    line: int
    text: str


def modules_under(src: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package under ``src``."""
    found = {}
    for path in sorted((src / "hyperdiff").rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(name: str, source: str, is_package: bool, known: set[str],
               file: str = "<string>") -> list[Import]:
    """Every import of a hyperdiff module in ``source`` (the module ``name``), at any depth.

    ``from pkg import x`` imports the module ``pkg.x`` when there is one, else ``pkg``.
    """
    found = []
    package = name.split(".") if is_package else name.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module
                       for a in node.names]
        else:
            continue
        text = ast.get_source_segment(source, node) or ""
        found += [Import(name, t, file, node.lineno, " ".join(text.split()))
                  for t in targets if t == "hyperdiff" or t.startswith("hyperdiff.")]
    return found


def layer_of(module: str) -> tuple[str, int]:
    """(folder, rank) of a module; the public face (``hyperdiff``, ``__main__``) is on top."""
    if module in TOP:
        return "<top>", max(LAYERS.values()) + 1
    parts = module.split(".")
    if parts[1] in LAYERS:
        return parts[1], LAYERS[parts[1]]
    if len(parts) == 2 and parts[1] in FOUNDATION:
        return "", 0
    raise AssertionError(f"{module} has no layer: add its folder to LAYERS in tests/test_layers.py")


def layer_violations(imports: list[Import]) -> list[str]:
    """One line per import that runs up a layer or sideways into an independent one."""
    bad = []
    for imp in imports:
        if imp.importer in TOP:
            continue
        (folder, rank), (target_folder, target_rank) = layer_of(imp.importer), layer_of(imp.target)
        if folder == target_folder or target_rank < rank:
            continue
        way = "up" if target_rank > rank else "sideways"
        bad.append(f"{imp.file}:{imp.line}: `{imp.text}` runs {way} from {folder or 'root'} "
                   f"(layer {rank}) to {target_folder or 'root'} (layer {target_rank})")
    return bad


def cycles(imports: list[Import]) -> list[list[str]]:
    """The import graph's strongly connected components with more than one module (or a
    module importing itself), by Tarjan's algorithm."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        graph.setdefault(imp.importer, set()).add(imp.target)
        graph.setdefault(imp.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1 or node in graph[node]:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def private_torch(source: str, file: str = "<string>") -> list[str]:
    """Imports of private torch modules or names (``torch.utils._pytree``, ``torch._C``,
    ``from torch.x import _y``) and ``_attribute`` reads on a torch module's name
    (``dist.distributed_c10d._get_default_store``)."""
    bad: list[str] = []
    torch_names = {"torch"}
    tree = ast.parse(source)

    def private(dotted: str) -> bool:
        return any(p.startswith("_") and not p.endswith("__") for p in dotted.split("."))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "torch":
                    torch_names.add(alias.asname or alias.name.split(".")[0])
                    if private(alias.name):
                        bad.append(f"{file}:{node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch":
            for alias in node.names:
                torch_names.add(alias.asname or alias.name)
                if private(f"{node.module}.{alias.name}"):
                    bad.append(f"{file}:{node.lineno}: from {node.module} import {alias.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") \
                and not node.attr.endswith("__"):
            root: ast.expr = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in torch_names:
                bad.append(f"{file}:{node.lineno}: {ast.unparse(node)}")
    return bad


def package_imports(src: Path) -> list[Import]:
    modules = modules_under(src)
    return [imp for name, path in modules.items()
            for imp in imports_of(name, path.read_text(), path.name == "__init__.py",
                                  set(modules), str(path.relative_to(src.parent)))]


def test_every_module_has_a_layer():
    for name in modules_under(SRC):
        layer_of(name)


def test_no_import_runs_up_a_layer():
    assert layer_violations(package_imports(SRC)) == []


def test_no_import_cycles():
    assert cycles(package_imports(SRC)) == []


def test_no_private_torch_outside_the_pytree_module():
    bad = [line for name, path in modules_under(SRC).items() if name != PYTREE_MODULE
           for line in private_torch(path.read_text(), str(path))]
    assert bad == []


KNOWN = {"hyperdiff.hparams.hyperparams", "hyperdiff.tuner.driver", "hyperdiff.errors",
         "hyperdiff.engine", "hyperdiff.engine.training", "hyperdiff.app.config"}


@pytest.mark.parametrize("source, way", [
    ("from hyperdiff.tuner.driver import HyperOptimizer\n", "up"),
    ("def f():\n    from ..tuner import driver\n", "up"),  # inside a function, relative
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
     "    from hyperdiff.app.config import Config\n", "up"),
    ("import hyperdiff.app.config\n", "up"),
])
def test_an_upward_import_is_caught(source, way):
    imports = imports_of("hyperdiff.hparams.hyperparams", source, False, KNOWN, "hp.py")
    bad = layer_violations(imports)
    assert len(bad) == 1 and f"runs {way} from hparams (layer 1)" in bad[0], bad
    assert bad[0].startswith("hp.py:")


def test_a_sideways_import_between_independent_layers_is_caught():
    imports = imports_of("hyperdiff.diagnose.check", "from hyperdiff.tuner import driver\n",
                         False, KNOWN)
    assert "runs sideways from diagnose (layer 4) to tuner (layer 4)" in \
        layer_violations(imports)[0]


def test_a_downward_import_passes():
    imports = imports_of("hyperdiff.tuner.driver", "from ..engine import training\n"
                         "from hyperdiff.errors import fail\n", False, KNOWN)
    assert [i.target for i in imports] == ["hyperdiff.engine.training", "hyperdiff.errors"]
    assert layer_violations(imports) == []


def test_an_upward_import_added_to_a_copy_of_the_package_fails(tmp_path):
    copy = tmp_path / "src"
    for path in (SRC / "hyperdiff").rglob("*.py"):
        target = copy / path.relative_to(SRC)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    assert layer_violations(package_imports(copy)) == []
    schedules = copy / "hyperdiff" / "hparams" / "schedules.py"
    schedules.write_text(schedules.read_text() + "\n\ndef late():\n"
                         "    from hyperdiff.tuner.history import History\n    return History\n")
    bad = layer_violations(package_imports(copy))
    assert len(bad) == 1 and "schedules.py" in bad[0] and "hyperdiff.tuner.history" in bad[0]


def test_a_cycle_is_caught():
    imports = [*imports_of("hyperdiff.engine.a", "from hyperdiff.engine import b\n", False,
                           {"hyperdiff.engine.a", "hyperdiff.engine.b"}),
               *imports_of("hyperdiff.engine.b", "def f():\n    from . import a\n", False,
                           {"hyperdiff.engine.a", "hyperdiff.engine.b"})]
    assert layer_violations(imports) == []  # the same folder: only the cycle is wrong
    assert cycles(imports) == [["hyperdiff.engine.a", "hyperdiff.engine.b"]]


@pytest.mark.parametrize("source", [
    "from torch.utils._pytree import tree_map\n",
    "import torch._dynamo\n",
    "from torch.utils import _pytree\n",
    "import torch.distributed as dist\nstore = dist.distributed_c10d._get_default_store()\n",
    "import torch\nx = torch._C._get_tracing_state()\n",
])
def test_private_torch_is_caught(source):
    assert len(private_torch(source)) >= 1


def test_public_torch_passes():
    assert private_torch("import torch\nimport torch.distributed as dist\n"
                         "x = torch.tensor(1).__class__\ndist.TCPStore\n") == []


def test_architecture_page_lists_every_module():
    """docs/architecture.md names every module of src/hyperdiff and no other."""
    text = DOCS.read_text()
    listed = set(re.findall(r"^\| `(hyperdiff(?:\.[a-z_]+)+)` \|", text, re.MULTILINE))
    missing = sorted(set(modules_under(SRC)) - listed - TOP)
    assert missing == [], f"docs/architecture.md does not list {missing}"
    stale = sorted(m for m in listed if m not in modules_under(SRC))
    assert stale == [], f"docs/architecture.md lists modules that do not exist: {stale}"


def test_architecture_page_lists_each_module_under_its_layer():
    """Every module row of docs/architecture.md sits under the heading of its own folder."""
    folder = None
    for line in DOCS.read_text().splitlines():
        if line.startswith("### "):
            named = re.search(r"`(\w+)/`", line)
            folder = named.group(1) if named else ("" if "package root" in line else None)
        for module in re.findall(r"^\| `(hyperdiff(?:\.[a-z_]+)+)` \|", line):
            assert folder is not None, f"{module} is listed before any layer heading"
            assert layer_of(module)[0] == folder, f"{module} is listed under {folder or 'root'}/"


def test_public_names_survive_the_move():
    """Every public ``hd.X`` still resolves, and the moved subpackages stay attributes."""
    import hyperdiff as hd

    assert [n for n in hd.__all__ if not hasattr(hd, n)] == []
    assert callable(hd.tasks.build_task) and callable(hd.testing.ridge)
    assert callable(hd.distributed.current_group)
