"""The package's imports against the layer order written in the README (section "Layers"): a module imports
only from its own layer and the ones below, no import cycle exists (module-level, function-level, or through
``importlib`` and a registry that walks its package), and no private name is imported across modules. The
habit that import-linter contracts give other projects, in one test and without a dependency."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "onnxprune"


def modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _target(mod: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_edges(mods: dict[str, Path]) -> tuple[dict[str, set[str]], list[str]]:
    """({module: modules it imports}, private names imported across modules) over every import statement,
    at any depth, plus ``importlib.import_module("...")`` of a literal and a registry that imports its
    package's modules by walking it (``pkgutil``)."""
    edges, private = {m: set() for m in mods}, []
    for mod, path in mods.items():
        src = path.read_text()
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.ImportFrom):
                target = _target(mod, path, node)
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    dest = full if full in mods else target
                    if dest in mods and dest != mod:
                        edges[mod].add(dest)
                        if alias.name.startswith("_") and not alias.name.startswith("__"):
                            private.append(f"{mod} imports {dest}.{alias.name}")
            elif isinstance(node, ast.Import):
                edges[mod].update(a.name for a in node.names if a.name in mods and a.name != mod)
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module":
                for arg in node.args:
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value in mods:
                        edges[mod].add(arg.value)
        if "pkgutil" in src and "import_module" in src:
            edges[mod].update(m for m in mods if m.startswith(mod + ".") and m.count(".") == mod.count(".") + 1)
    return edges, private


def readme_layers() -> list[list[str]]:
    """The layers, bottom first, from the README's indented block under "## Layers"."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Layers\n", 1)[1].split("\n## ", 1)[0]
    rows = [m.group(1).split() for m in re.finditer(r"^ {4}\d+ +(.+)$", section, re.M)]
    assert rows, "no layer rows in the README's Layers section"
    return rows


def layer_of(mod: str, layers: list[list[str]]) -> int | None:
    """The layer of the longest name in ``layers`` that is ``mod`` or a package above it (names are given
    without the ``onnxprune.`` prefix; ``onnxprune`` names the package's ``__init__``)."""
    best, level = -1, None
    short = mod.removeprefix("onnxprune.") if mod != "onnxprune" else "onnxprune"
    for i, names in enumerate(layers):
        for n in names:
            if (short == n or short.startswith(n + ".")) and len(n) > best:
                best, level = len(n), i
    return level


def upward(edges: dict[str, set[str]], layers) -> list[str]:
    out = []
    for mod, targets in edges.items():
        for t in targets:
            if layer_of(t, layers) > layer_of(mod, layers):
                out.append(f"{mod} (layer {layer_of(mod, layers)}) imports {t} (layer {layer_of(t, layers)})")
    return sorted(out)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), but a package and a module of it
    alone (a package importing its own module is no cycle)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in list(edges):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer():
    layers = readme_layers()
    assert [m for m in modules() if layer_of(m, layers) is None] == []


def test_imports_point_down_the_layers():
    edges, _ = import_edges(modules())
    assert upward(edges, readme_layers()) == []


def test_no_import_cycle_and_no_private_name_across_modules():
    edges, private = import_edges(modules())
    assert cycles(edges) == []
    assert private == []


def test_the_checks_fail_on_a_planted_fault():
    """An upward import, a cycle through a function-level import and a private name are each found."""
    layers = [["errors"], ["model"], ["match"]]
    edges = {"onnxprune.model.proto": {"onnxprune.match.rules"}, "onnxprune.match.rules": {"onnxprune.model.proto"}}
    assert upward(edges, layers) == ["onnxprune.model.proto (layer 1) imports onnxprune.match.rules (layer 2)"]
    assert cycles(edges) == [["onnxprune.match.rules", "onnxprune.model.proto"]]
    mods = {"onnxprune.a": Path("a.py"), "onnxprune.b": Path("b.py")}
    sources = {"a.py": "def f():\n    from .b import _g\n", "b.py": "from . import a\n"}
    import unittest.mock as mock
    with mock.patch.object(Path, "read_text", lambda self: sources[self.name]):
        found, private = import_edges(mods)
    assert found == {"onnxprune.a": {"onnxprune.b"}, "onnxprune.b": {"onnxprune.a"}}
    assert private == ["onnxprune.a imports onnxprune.b._g"] and cycles(found)
