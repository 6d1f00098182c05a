"""The layering of docs/architecture.md, enforced: imports point down, never up.

Services never import the CLI, the daemon's engine or the metrics; adapters
(storage, sources, the stream and state-folder plumbing) never import a
service. Every import counts: top level, inside functions, under TYPE_CHECKING.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "drdaemon"

SERVICES = {"backup", "restore", "prune", "trash", "replicate", "verify", "drills",
            "drill_scratch", "drill_records", "orphans", "catalog", "status", "audit",
            "audit_mirror", "export", "export_doc", "export_files", "offboarding", "erasure",
            "erasure_records", "erasure_sweep", "inventory", "tenant_keys", "key_rotation",
            "evidence", "evidence_check", "standby", "recovery", "uploads", "anchors",
            "key_proof", "proof_log"}
ABOVE_SERVICES = ("drdaemon.cli", "drdaemon.scheduler", "drdaemon.metrics",
                  "drdaemon.metrics_feed", "drdaemon.cluster")
ADAPTER_PACKAGES = ("drdaemon.storage", "drdaemon.sources")
ADAPTER_MODULES = {"pipeline", "streams", "statefs", "locks", "filetrust", "manifest_cache",
                   "tsa", "shared_state", "cluster.queue"}
# Pure cores split out of a service: no I/O, so neither a service nor an adapter.
PURE_MODULES = {"prune_plan", "audit_chain", "audit_secrets", "pages", "tenant_key_record",
                "recovery_plan", "audit_segments", "cluster.plan", "config_cluster"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(path: Path) -> set[str]:
    """Every drdaemon module (or name in one) that `path` imports, resolved to full names."""
    return imported_source(path.read_text(), module_name(path), path.name == "__init__.py")


def imported_source(text: str, name: str, is_package: bool) -> set[str]:
    package = name if is_package else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found.add(module)
            found |= {f"{module}.{a.name}" for a in node.names}
    return {m for m in found if m == "drdaemon" or m.startswith("drdaemon.")}


def is_service(module: str) -> bool:
    return any(module == f"drdaemon.{s}" or module.startswith(f"drdaemon.{s}.")
               for s in SERVICES)


FILES = sorted(PACKAGE.rglob("*.py"))


def test_the_package_is_where_the_test_looks() -> None:
    assert len(FILES) > 40 and PACKAGE.joinpath("backup.py").exists()


@pytest.mark.parametrize("path", FILES, ids=lambda p: module_name(p))
def test_imports_point_down(path: Path) -> None:
    name = module_name(path)
    imports = imported(path)
    short = name.removeprefix("drdaemon.")
    if is_service(name):
        up = sorted(m for m in imports if m.startswith(ABOVE_SERVICES))
        assert not up, f"service {name} imports {up}: the engine and CLI call services, " \
                       "not the other way round"
    if name.startswith(ADAPTER_PACKAGES) or short in ADAPTER_MODULES:
        up = sorted(m for m in imports if is_service(m))
        assert not up, f"adapter {name} imports the service(s) {up}"
    if short in PURE_MODULES:
        io = sorted(m for m in imports if is_service(m) or m.startswith(ADAPTER_PACKAGES)
                    or m.removeprefix("drdaemon.").split(".")[0] in ADAPTER_MODULES)
        assert not io, f"pure module {name} imports {io}"


def test_the_check_sees_relative_and_late_imports() -> None:
    # The rule must catch the forms a shortcut would take.
    text = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..catalog import x\n"
            "def f():\n    from ..backup import snapshot\n    from drdaemon import prune\n")
    found = imported_source(text, "drdaemon.sources.directory", False)
    assert {"drdaemon.backup", "drdaemon.catalog", "drdaemon.prune"} <= found
    assert all(is_service(m) for m in ("drdaemon.backup", "drdaemon.prune.plan"))
    assert not is_service("drdaemon.backupish")
