"""No import cycle among drdaemon's modules, counting every import: at module level, under
`if TYPE_CHECKING:` and inside functions. A cycle means two modules each need the other,
so neither can be read, tested or moved alone (the runtime once imported the catalog, which
imported the runtime back)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import drdaemon

PACKAGE = Path(drdaemon.__file__).parent


def module_files() -> dict[str, Path]:
    """drdaemon's modules by dotted name."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imported(module: str, path: Path, known: set[str]) -> set[str]:
    """The drdaemon modules `module` imports anywhere in its source."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1]
                                + ([node.module] if node.module else []))
            for alias in node.names:
                if f"{base}.{alias.name}" in known:  # from package import module
                    out.add(f"{base}.{alias.name}")
                elif base in known:
                    out.add(base)
    out.discard(module)
    return out


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {m: imported(m, p, set(files)) for m, p in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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


def test_the_graph_sees_imports_of_every_kind() -> None:
    graph = import_graph()
    assert "drdaemon.runtime" in graph["drdaemon.backup"]  # module level
    assert "drdaemon.runtime" in graph["drdaemon.catalog"]  # under TYPE_CHECKING
    assert "drdaemon.sources.pg_session" in graph["drdaemon.locks"]  # inside a function
    assert "drdaemon.audit" in graph["drdaemon.cli.audit"]  # from .. import audit
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_one_that_imports_it_back() -> None:
    graph = import_graph()
    found = cycles(graph)
    details = [" -> ".join(c) + ": " + "; ".join(
        f"{m} imports {', '.join(sorted(graph[m] & set(c)))}" for m in c) for c in found]
    assert not found, "import cycles:\n" + "\n".join(details)


def test_importing_the_runtime_loads_no_service() -> None:
    code = ("import sys, drdaemon.runtime\n"
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('drdaemon'))))")
    loaded = set(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                text=True).stdout.split())
    assert "drdaemon.runtime" in loaded
    services = {"drdaemon.catalog", "drdaemon.backup", "drdaemon.restore", "drdaemon.prune",
                "drdaemon.replicate", "drdaemon.verify", "drdaemon.drills"}
    assert not loaded & services
