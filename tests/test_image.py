"""The container image is reproducible and watched (issue 22, item 8): the base pinned by
digest, Python packages from a lock file with hashes that matches pyproject.toml, a health
check that really probes the metrics endpoint, and a non-root user. No registry or Docker
here: the Dockerfile and the lock are checked as files, the health check command is run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from prometheus_client import CollectorRegistry, Gauge

from drdaemon import metrics

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", "\n".join(ln for ln in DOCKERFILE.splitlines()
                                          if not ln.lstrip().startswith("#")))
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _lock() -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) from requirements.lock."""
    text = re.sub(r"\\\n", " ", (ROOT / "requirements.lock").read_text())
    pins = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        spec, *opts = line.split()
        name, _, version = spec.partition("==")
        pins[canonicalize_name(name)] = (version, [o.split("=", 1)[1] for o in opts])
    return pins


def test_the_base_image_is_pinned_by_digest_and_the_user_is_not_root() -> None:
    ins = _instructions()
    froms = [args for word, args in ins if word == "FROM"]
    assert froms and all(re.search(r"@sha256:[0-9a-f]{64}(\s|$)", f) for f in froms), froms
    users = [args for word, args in ins if word == "USER"]
    assert users == ["drdaemon"]
    last_run = max(i for i, (word, _) in enumerate(ins) if word == "RUN")
    assert ins.index(("USER", "drdaemon")) > last_run


def test_python_packages_come_from_the_lock_with_hashes_and_match_pyproject() -> None:
    runs = [args for word, args in _instructions() if word == "RUN" and "pip install" in args]
    assert any("--require-hashes" in r and "-r requirements.lock" in r for r in runs), runs
    assert all("--require-hashes" in r or "--no-deps" in r for r in runs), runs
    pins = _lock()
    for name, (version, hashes) in pins.items():
        assert version and hashes and all(re.fullmatch(r"sha256:[0-9a-f]{64}", h)
                                          for h in hashes), name
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted = [Requirement(d) for d in project["project"]["dependencies"]]
    wanted += [Requirement(d) for d in project["build-system"]["requires"]]
    for req in wanted:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in requirements.lock: run scripts/lock"
        assert req.specifier.contains(pins[name][0], prereleases=True), (req, pins[name][0])
        for extra in req.extras:  # psycopg[binary] -> psycopg-binary
            assert canonicalize_name(f"{req.name}-{extra}") in pins, (req, extra)


def test_the_health_check_probes_the_metrics_endpoint(free_port: Callable[[], int]) -> None:
    checks = [args for word, args in _instructions() if word == "HEALTHCHECK"]
    assert len(checks) == 1
    cmd = json.loads(checks[0].split(" CMD ", 1)[1])
    env_line = next(args for word, args in _instructions() if word == "ENV")
    url = re.search(r"DRDAEMON_HEALTH_URL=(\S+)", env_line)
    assert url and url.group(1) == "http://127.0.0.1:9467/metrics"
    assert cmd[0] == "python"
    port = free_port()
    probe = [sys.executable, *cmd[1:]]
    env = {"DRDAEMON_HEALTH_URL": f"http://127.0.0.1:{port}/metrics"}
    down = subprocess.run(probe, env=env, capture_output=True, timeout=30, check=False)
    assert down.returncode != 0  # nothing listens: unhealthy
    registry = CollectorRegistry()
    Gauge("drdaemon_up_test", "x", registry=registry).set(1)
    server = metrics.serve(f"127.0.0.1:{port}", registry)
    try:
        up = subprocess.run(probe, env=env, capture_output=True, timeout=30, check=False)
    finally:
        metrics.shutdown(server)
    assert up.returncode == 0, up.stderr
