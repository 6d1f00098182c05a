"""The metrics package imports no service: jobs hand it observations (issue 13, item 1).

The dependency points from the jobs to the metrics, never back; the translation
from a service's report to an observation lives on the jobs' side (metrics_feed.py).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "drdaemon" / "metrics"

# Every drdaemon module that does a job, reads storage or the state folder, or runs
# the daemon. The metrics package may use the model and utilities only (config, cron,
# statefs, units, errors, filetrust, the package's own modules).
FORBIDDEN = frozenset({
    "audit", "audit_chain", "audit_mirror", "audit_secrets", "audit_segments", "backup",
    "catalog", "cli",
    "drill_records", "drill_scratch", "drills", "keys", "locks", "manifest", "metrics_feed",
    "orphans", "pipeline", "prune", "prune_plan", "replicate", "report", "restore", "retention",
    "runtime", "scheduler", "shrink", "slo", "sources", "state", "status", "storage", "streams",
    "trash", "verify",
    "export", "export_doc", "export_files", "erasure", "erasure_records", "erasure_sweep",
    "tenant_keys", "tenant_key_record", "signing",
    "key_rotation",
    "evidence", "evidence_check",
    "standby",
    "recovery", "recovery_plan", "uploads",
    "anchors", "tsa",
    "key_proof", "proof_log",
    "cluster",
})


def imported_modules(source: str, package: str) -> set[str]:
    """The absolute names of the modules `source` (a module of `package`) imports,
    including names handed to importlib.import_module or __import__."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([base] if base else [])])
            found.add(base)
            # `from drdaemon import backup` imports the module drdaemon.backup.
            found |= {f"{base}.{a.name}" for a in node.names}
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id == "__import__"))):
            found.add(node.args[0].value)
    return found


def forbidden_imports(source: str, package: str = "drdaemon.metrics") -> set[str]:
    """The service modules among what `source` imports."""
    bad = set()
    for name in imported_modules(source, package):
        parts = name.split(".")
        if parts[0] == "drdaemon" and len(parts) > 1 and parts[1] in FORBIDDEN:
            bad.add(".".join(parts[:2]))
    return bad


def test_the_metrics_package_imports_no_service_module() -> None:
    files = sorted(PACKAGE.glob("**/*.py"))
    assert PACKAGE / "__init__.py" in files and len(files) > 1  # a package, not one module
    for path in files:
        package = ".".join(["drdaemon", *path.relative_to(PACKAGE.parent).parent.parts])
        bad = forbidden_imports(path.read_text(), package)
        assert not bad, f"{path.name} imports {sorted(bad)}: hand it an observation instead"


@pytest.mark.parametrize("line", [
    "from .. import backup",
    "from .. import config, status",
    "from ..prune import PruneReport",
    "from ..catalog.x import y",
    "import drdaemon.runtime",
    "from drdaemon.drills import records",
    "from drdaemon.drills.report import ReportData",
    "from drdaemon.verify import VerifyReport",
    "importlib.import_module('drdaemon.drills')",
    "__import__('drdaemon.state')",
    "if TYPE_CHECKING:\n    from ..prune import PruneReport",
    "def f():\n    from ..replicate import ReplicationReport",
])
def test_every_way_of_importing_a_service_is_caught(line: str) -> None:
    assert forbidden_imports(line)


@pytest.mark.parametrize("line", [
    "from .. import __version__, cron, statefs",
    "from ..config import Config",
    "from . import state",  # the package's own state module, not drdaemon.state
    "from .state import MetricsState",
    "from .observations import PruneRun",
    "import json",
])
def test_the_model_utilities_and_the_package_itself_are_allowed(line: str) -> None:
    assert not forbidden_imports(line)
