"""The layering rules of procshare, checked on the source (nothing is imported).

The import graph of ``src/procshare`` is computed with ``ast``: every import
statement anywhere in a module counts, including lazy imports inside functions
and ``if TYPE_CHECKING:`` blocks, and ``importlib.import_module("...")`` /
``__import__("...")`` calls with a literal name.  Relative imports are resolved;
``from pkg import name`` is an edge to ``pkg.name`` when a file for it exists,
else to ``pkg`` (whose ``__init__`` is the module ``pkg``).

The rules (see ``/work/shared/DESIGN.md`` and each package's docstring):

- no import cycle between modules;
- ``wire/`` imports only ``wire/`` and ``procshare.errors``, and no socket I/O module;
- ``client/`` never reaches ``server/`` and ``server/`` never reaches ``client/``
  (directly or through other modules; ``procshare.inprocess`` is their meeting point);
- ``errors`` and ``inprocess`` import nothing from procshare;
- only ``transport/`` imports ``socket``/``select``/``selectors``/``ssl``;
- every module opens with an "Owns" / "Rules it keeps" docstring, except package
  ``__init__`` files and tiny shims (no function or class, under 40 lines).
"""

from __future__ import annotations

import ast
import functools
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = "procshare"

#: modules that do socket I/O; only transport/ may import them
IO_MODULES = frozenset({"socket", "select", "selectors", "ssl"})

#: (module, I/O module) pairs allowed outside transport/, with the only
#: attributes of it the module may use.  client/session.py builds its client id
#: from the host name (`socket.gethostname()`); it never opens a socket.
IO_ALLOWED = {("procshare.client.session", "socket"): frozenset({"gethostname"})}

HEADER_WORDS = ("Owns", "Rules it keeps")
SHIM_MAX_LINES = 40


# -- the graph -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Edge:
    src: str       # importing module, dotted ("procshare.wire.frames")
    dst: str       # imported module (internal) or dotted name (external)
    line: int
    text: str      # the import statement as written (unparsed)


@dataclass
class Graph:
    root: Path                       # the directory that holds the package
    files: dict[str, Path]           # module -> file
    internal: list[Edge]             # edges between modules of the package
    external: list[Edge]             # imports of anything else

    def edges_from(self, module: str) -> list[Edge]:
        return [e for e in self.internal if e.src == module]

    def adjacency(self) -> dict[str, set[str]]:
        adj: dict[str, set[str]] = {m: set() for m in self.files}
        for e in self.internal:
            adj[e.src].add(e.dst)
        return adj

    def where(self, e: Edge) -> str:
        path = self.files[e.src].relative_to(self.root.parent)
        text = e.text if len(e.text) <= 100 else e.text[:97] + "..."
        return f"{path}:{e.line}: {text}"


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _resolve(files: dict[str, Path], name: str) -> str | None:
    """The module `name` names, or its nearest enclosing module of the package."""
    while name:
        if name in files:
            return name
        name = name.rpartition(".")[0]
    return None


def _base_of(module: str, path: Path, level: int, target: str | None) -> str:
    """The absolute name `from <level dots><target> import ...` refers to."""
    pkg = module if is_package(path) else module.rpartition(".")[0]
    for _ in range(level - 1):
        pkg = pkg.rpartition(".")[0]
    if target:
        return f"{pkg}.{target}" if pkg else target
    return pkg


def _literal_import_call(node: ast.Call) -> str | None:
    """`importlib.import_module("x")`, `import_module("x")` or `__import__("x")`."""
    f = node.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
    if name not in ("import_module", "__import__") or not node.args:
        return None
    arg = node.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and not arg.value.startswith("."):
        return arg.value
    return None


def imports_of(module: str, path: Path, tree: ast.AST) -> list[tuple[str, int, str]]:
    """Every import in `tree` as (absolute dotted name, line, text); for
    `from X import a, b` the names are `X.a` and `X.b` (resolved later)."""
    out: list[tuple[str, int, str]] = []
    for node in ast.walk(tree):    # every node: module level, functions, TYPE_CHECKING, ...
        if isinstance(node, ast.Import):
            text = ast.unparse(node)
            for alias in node.names:
                out.append((alias.name, node.lineno, text))
        elif isinstance(node, ast.ImportFrom):
            text = ast.unparse(node)
            base = _base_of(module, path, node.level, node.module) if node.level else node.module
            assert base is not None, f"{path}:{node.lineno}: cannot resolve {text}"
            if base == "__future__":
                continue
            for alias in node.names:
                out.append((base if alias.name == "*" else f"{base}.{alias.name}",
                            node.lineno, text))
        elif isinstance(node, ast.Call):
            name = _literal_import_call(node)
            if name is not None:
                out.append((name, node.lineno, ast.unparse(node)))
    return out


def build_graph(root: Path, package: str) -> Graph:
    files = {module_name(root, p): p for p in sorted((root / package).rglob("*.py"))}
    internal: list[Edge] = []
    external: list[Edge] = []
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for name, line, text in imports_of(module, path, tree):
            if name == package or name.startswith(package + "."):
                dst = _resolve(files, name)
                assert dst is not None, f"{path}:{line}: {text} names no module of {package}"
                if dst != module:   # `from . import NAME` in a package's own __init__
                    internal.append(Edge(module, dst, line, text))
            else:
                external.append(Edge(module, name, line, text))
    return Graph(root, files, internal, external)


@functools.lru_cache(maxsize=1)
def graph() -> Graph:
    return build_graph(SRC, PKG)


def find_cycles(adj: dict[str, set[str]]) -> list[list[str]]:
    """The shortest cycle through each module that is on one, each cycle once
    (as a path that ends where it starts, from its least module); [] when the
    graph is acyclic."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0

    def strongconnect(v: str) -> None:      # Tarjan, iteratively
        nonlocal counter
        work = [(v, iter(sorted(adj.get(v, ()))))]
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        while work:
            node, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(adj.get(w, ())))))
                    break
                if w in on_stack:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    components.append(comp)

    for v in sorted(adj):
        if v not in index:
            strongconnect(v)

    cycles: list[list[str]] = []
    for comp in components:
        members = set(comp)
        if len(comp) == 1 and comp[0] not in adj.get(comp[0], ()):
            continue
        for start in sorted(comp):      # the shortest cycle through each member
            cyc = _shortest_cycle(adj, members, start)
            k = cyc.index(min(cyc[:-1]))
            canonical = [*cyc[k:-1], *cyc[:k], cyc[k]]
            if canonical not in cycles:
                cycles.append(canonical)
    return cycles


def _shortest_cycle(adj: dict[str, set[str]], members: set[str], start: str) -> list[str]:
    """The shortest path from `start` back to `start` inside `members` (BFS)."""
    prev: dict[str, str] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(adj.get(v, ())):
            if w not in members:
                continue
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(prev[path[-1]])
                return [start, *reversed(path[:-1]), start] if v != start else [start, start]
            if w not in prev:
                prev[w] = v
                queue.append(w)
    raise AssertionError(f"{start} is in a strongly connected component but on no cycle")


def reach(g: Graph, start: str, forbidden: str) -> list[Edge] | None:
    """The chain of imports from `start` to the first module under `forbidden`
    (a package prefix), or None."""
    prev: dict[str, Edge | None] = {start: None}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for e in sorted(g.edges_from(v), key=lambda e: (e.dst, e.line)):
            if e.dst in prev:
                continue
            prev[e.dst] = e
            if e.dst == forbidden or e.dst.startswith(forbidden + "."):
                chain = [e]
                while (p := prev[chain[-1].src]) is not None:
                    chain.append(p)
                return chain[::-1]
            queue.append(e.dst)
    return None


def under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


# -- self-tests: the machinery cannot pass vacuously ---------------------------------------

def test_cycle_finder_on_small_graphs() -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"a"}}) == [["a", "a"]]
    # a diamond is not a cycle; a back edge inside a longer chain is
    assert find_cycles({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}) == []
    cycles = find_cycles({"a": {"b"}, "b": {"c"}, "c": {"d", "b"}, "d": {"e"}, "e": {"c"}})
    assert cycles == [["b", "c", "b"], ["c", "d", "e", "c"]]
    # two cycles through one module are both reported
    assert find_cycles({"m": {"x", "y"}, "x": {"m"}, "y": {"m"}}) == [
        ["m", "x", "m"], ["m", "y", "m"]]


def test_resolver_on_a_synthetic_package(tmp_path: Path) -> None:
    files = {
        "pkg/__init__.py": "from . import a\nfrom .sub import helper\n",
        "pkg/a.py": (
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from .sub.c import C\n"
            "def f():\n    from ..pkg import b\n    import socket\n"
        ),
        "pkg/b.py": "import pkg.sub.c as c\nfrom pkg.sub import c as c2, VALUE\n",
        "pkg/sub/__init__.py": "VALUE = 1\nfrom .. import a\n",
        "pkg/sub/c.py": "from ..a import f\nimport importlib\nimportlib.import_module('pkg.b')\n",
        "pkg/sub/helper.py": "",
    }
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    g = build_graph(tmp_path, "pkg")
    got = {(e.src, e.dst) for e in g.internal}
    assert got == {
        ("pkg", "pkg.a"), ("pkg", "pkg.sub.helper"),          # submodules by `from . import`
        ("pkg.a", "pkg.sub.c"),                                # inside `if TYPE_CHECKING:`
        ("pkg.a", "pkg.b"),                                    # lazy, `from ..pkg import b`
        ("pkg.b", "pkg.sub.c"),                                # absolute `import x.y.z`
        ("pkg.b", "pkg.sub"),                                  # `from pkg.sub import VALUE`
        ("pkg.sub", "pkg.a"),                                  # `from .. import a` in __init__
        ("pkg.sub.c", "pkg.a"),                                # `from ..a import f`: the module
        ("pkg.sub.c", "pkg.b"),                                # import_module("pkg.b")
    }
    assert [(e.src, e.dst, e.line) for e in g.external
            if e.dst != "typing" and e.dst != "typing.TYPE_CHECKING"] == [
        ("pkg.a", "socket", 6), ("pkg.sub.c", "importlib", 2)]
    cycles = find_cycles(g.adjacency())
    assert cycles, "pkg.a -> pkg.b -> pkg.sub.c -> pkg.a is a cycle"


def test_the_real_graph_is_not_empty() -> None:
    g = graph()
    assert len(g.files) > 25, sorted(g.files)
    assert len(g.internal) > 20, len(g.internal)
    pairs = {(e.src, e.dst) for e in g.internal}
    for known in [
        ("procshare.managers", "procshare.client.proxy"),
        ("procshare.managers", "procshare.server.server"),
        ("procshare.server.server", "procshare.wire.frames"),
        ("procshare.transport.channel", "procshare.wire.frames"),
        ("procshare.client.session", "procshare.transport.channel"),
        ("procshare.client.session", "procshare.wire.diagnose"),   # lazy, inside a method
        ("procshare.wire.serializers", "procshare.errors"),        # lazy, `from .. import errors`
        ("procshare.client.proxy", "procshare.inprocess"),
        ("procshare.server.server", "procshare.inprocess"),
        ("procshare", "procshare.managers"),                       # the package's __init__
    ]:
        assert known in pairs, f"expected edge {known[0]} -> {known[1]} not found"
    assert ("procshare.transport.channel", "socket") in {(e.src, e.dst) for e in g.external}


# -- the rules -----------------------------------------------------------------------------

def test_no_import_cycles() -> None:
    g = graph()
    cycles = find_cycles(g.adjacency())
    if cycles:
        lines = []
        for cyc in cycles:
            lines.append("  " + " -> ".join(cyc))
            for a, b in zip(cyc, cyc[1:]):
                e = min((e for e in g.edges_from(a) if e.dst == b), key=lambda e: e.line)
                lines.append("      " + g.where(e))
        pytest.fail("import cycles between modules of procshare:\n" + "\n".join(lines))


def test_wire_imports_only_wire_and_errors() -> None:
    g = graph()
    bad = [g.where(e) for e in g.internal
           if under(e.src, "procshare.wire")
           and not (under(e.dst, "procshare.wire") or e.dst == "procshare.errors")]
    bad += [g.where(e) + "   (socket I/O in the sans-IO layer)" for e in g.external
            if under(e.src, "procshare.wire") and e.dst.partition(".")[0] in IO_MODULES]
    assert not bad, "wire/ may import only wire/ and procshare.errors, and no socket " \
                    "module:\n  " + "\n  ".join(bad)


@pytest.mark.parametrize(("side", "other"), [
    ("procshare.client", "procshare.server"),
    ("procshare.server", "procshare.client"),
])
def test_client_and_server_do_not_import_each_other(side: str, other: str) -> None:
    g = graph()
    bad = []
    for module in sorted(g.files):
        if under(module, side):
            chain = reach(g, module, other)
            if chain is not None:
                bad.append(f"{module} reaches {chain[-1].dst}:\n      "
                           + "\n      ".join(g.where(e) for e in chain))
    assert not bad, f"{side} must never import {other} (directly or through other modules; " \
                    "go through procshare.inprocess):\n  " + "\n  ".join(bad)


@pytest.mark.parametrize("module", ["procshare.errors", "procshare.inprocess"])
def test_leaf_modules_import_nothing_from_procshare(module: str) -> None:
    g = graph()
    assert module in g.files
    bad = [g.where(e) for e in g.edges_from(module)]
    assert not bad, f"{module} must import nothing from procshare:\n  " + "\n  ".join(bad)


def _attribute_uses(tree: ast.AST, name: str) -> tuple[set[str], int]:
    """The attributes read from the bare name `name`, and how many other uses
    of `name` there are (e.g. passing the module itself around)."""
    attrs: set[str] = set()
    parents = {id(c): p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
    other = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id == name:
            parent = parents.get(id(node))
            if isinstance(parent, ast.Attribute) and parent.value is node:
                attrs.add(parent.attr)
            else:
                other += 1
    return attrs, other


def test_only_transport_does_socket_io() -> None:
    g = graph()
    bad = []
    for e in g.external:
        top = e.dst.partition(".")[0]
        if top not in IO_MODULES or under(e.src, "procshare.transport"):
            continue
        allowed = IO_ALLOWED.get((e.src, top))
        if allowed is not None and e.text == f"import {top}":
            tree = ast.parse(g.files[e.src].read_text(encoding="utf-8"))
            attrs, other = _attribute_uses(tree, top)
            if attrs <= allowed and not other:
                continue
            bad.append(f"{g.where(e)}   (uses {sorted(attrs)}, only {sorted(allowed)} allowed)")
            continue
        bad.append(g.where(e))
    assert not bad, "only transport/ may import socket I/O modules " \
                    f"({', '.join(sorted(IO_MODULES))}):\n  " + "\n  ".join(bad)


def _is_shim(tree: ast.Module, path: Path) -> bool:
    """A tiny module that only names things defined elsewhere."""
    defines = any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  for n in ast.walk(tree))
    return not defines and len(path.read_text(encoding="utf-8").splitlines()) < SHIM_MAX_LINES


def test_every_module_has_an_owns_and_rules_header() -> None:
    g = graph()
    missing, exempt = [], []
    for module, path in sorted(g.files.items()):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if is_package(path) or _is_shim(tree, path):
            exempt.append(module)
            continue
        doc = ast.get_docstring(tree) or ""
        lacks = [w for w in HEADER_WORDS if w not in doc]
        if lacks:
            rel = path.relative_to(g.root.parent)
            missing.append(f"{rel}: no {' and no '.join(repr(w) for w in lacks)}"
                           + ("" if doc else " (no docstring)"))
    # the exemptions stay few and obvious: every package __init__ and at most a few shims
    shims = [m for m in exempt if not is_package(g.files[m])]
    assert len(shims) <= 3, f"too many modules exempt as shims: {shims}"
    assert not missing, ("modules whose docstring lacks the 'Owns' / 'Rules it keeps' header "
                         f"(exempt: package __init__ files and shims {shims}):\n  "
                         + "\n  ".join(missing))
