"""Every tensor constructor in src/hyperdiff says where its tensor lives.

An AST scan of the package: each call ``torch.zeros(...)``, ``torch.tensor(...)``, ... (the
names in :data:`CONSTRUCTORS`) must pass ``device=`` (the parameters' device, a tensor's
``.device``, or an explicit ``"cpu"`` for host-side state), or be on :data:`ALLOWED` with a
reason. ``*_like`` and ``x.new_*`` derive the device from a tensor and need nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "hyperdiff"

CONSTRUCTORS = frozenset({
    "zeros", "ones", "empty", "full", "arange", "eye", "tensor", "randn", "rand", "randint",
    "linspace", "logspace", "as_tensor", "randperm", "empty_strided", "scalar_tensor",
})

ALLOWED: dict[tuple[str, str, str], str] = {
    # (file relative to src/hyperdiff, enclosing function, constructor): reason
}


def constructor_calls(source: str) -> list[tuple[str, str, int, bool]]:
    """``(function, constructor, line, passes_device)`` for every ``torch.<constructor>(...)``
    call in ``source`` (``function`` is the innermost enclosing def, or ``<module>``)."""
    found: list[tuple[str, str, int, bool]] = []

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = function
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = child.name
            if (
                isinstance(child, ast.Call)
                and isinstance(child.func, ast.Attribute)
                and isinstance(child.func.value, ast.Name)
                and child.func.value.id == "torch"
                and child.func.attr in CONSTRUCTORS
            ):
                has_device = any(k.arg == "device" for k in child.keywords)
                found.append((function, child.func.attr, child.lineno, has_device))
            visit(child, inner)

    visit(ast.parse(source), "<module>")
    return found


def scan(package: Path) -> tuple[list[str], set[tuple[str, str, str]]]:
    """Calls without ``device=`` that are not allowed, and the allow-list entries used."""
    missing, used = [], set()
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package).as_posix()
        for function, name, line, has_device in constructor_calls(path.read_text()):
            key = (relative, function, name)
            if has_device:
                continue
            if key in ALLOWED:
                used.add(key)
            else:
                missing.append(f"src/hyperdiff/{relative}:{line} torch.{name}(...) in "
                               f"{function}() passes no device=")
    return missing, used


def test_every_constructor_in_src_passes_a_device():
    missing, _ = scan(PACKAGE)
    assert not missing, (
        "tensors must be made on the parameters' device: pass device= (or use *_like / "
        "x.new_*), or add the call to ALLOWED with a reason:\n" + "\n".join(missing)
    )


def test_allow_list_is_short_and_current():
    _, used = scan(PACKAGE)
    assert len(ALLOWED) <= 5
    stale = sorted(set(ALLOWED) - used)
    assert not stale, f"ALLOWED entries that match no call any more (remove them): {stale}"


@pytest.mark.parametrize(("code", "flagged"), [
    ("import torch\ndef f():\n    return torch.zeros(3)\n", [("f", "zeros", 3, False)]),
    ("import torch\nx = torch.tensor([1.0], dtype=torch.float64)\n",
     [("<module>", "tensor", 2, False)]),
    ("import torch\ndef f(p):\n    return torch.zeros(3, device=p.device)\n",
     [("f", "zeros", 3, True)]),
    ("import torch\ndef f(p):\n    return torch.zeros_like(p) + p.new_ones(3)\n", []),
])
def test_scanner_sees_constructor_calls(code, flagged):
    assert constructor_calls(code) == flagged


def test_scan_fails_on_a_new_constructor_without_device(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "new.py").write_text("import torch\n\ndef make():\n"
                                             "    return torch.zeros(3)\n")
    (tmp_path / "fine.py").write_text("import torch\nx = torch.ones(2, device='cpu')\n")
    missing, _ = scan(tmp_path)
    assert missing == ["src/hyperdiff/sub/new.py:4 torch.zeros(...) in make() passes no device="]
