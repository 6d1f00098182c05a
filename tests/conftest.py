"""Shared pytest fixtures for drdaemon: real PostgreSQL, real (moto) S3 servers, clean env.

Nothing here is a mock: ``pg_server`` is a real PostgreSQL cluster started from Debian's
binaries, and every S3 region is a real HTTP server (moto in server mode) in its own process.

Fixtures
--------
clean_env (autouse)   no DRDAEMON_* / PG* / AWS_PROFILE vars, HOME=tmp, fake AWS creds
free_port             the function :func:`find_free_port` (call it: ``free_port()``)
pg_server (session)   :class:`PgServer` - ``.dsn(dbname)``, ``.host``, ``.port``, ``.user``
pg_cluster            context manager: a PostgreSQL cluster of its own, with extra settings
pg_database           DSN (str) of a fresh, empty, uniquely-named database; dropped afterwards
moto_region_factory   ``factory(name, region, continent)`` -> private :class:`S3Region`
s3_regions            ``[eu, us]`` :class:`S3Region` records, emptied and with fresh buckets
                      for every test

Losing a region: ``region.server.stop()`` (the port is closed: connections are refused);
``region.server.start()`` brings it back on the same port with its data intact.  ``s3_regions``
restarts a stopped shared server before the next test, so a test may leave it stopped.

Why each moto server runs in a child process: moto keeps its state in module-level globals,
so two ``ThreadedMotoServer`` instances in the *same* process serve the *same* buckets - a
bucket created through the "eu" endpoint is readable through the "us" endpoint, and stopping
"eu" does not make its data unreachable.  Each region therefore hosts its ThreadedMotoServer in
a separate Python process; :class:`MotoServerProcess` drives it with the same
``start()`` / ``stop()`` / ``get_host_and_port()`` API.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pwd
import re
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import psycopg
import pytest
from psycopg import sql

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

_PG_ENV_VARS = ("PGPASSWORD", "PGSERVICE", "PGHOST", "PGPORT", "PGUSER", "PGDATABASE")
TEST_OS_USER = "drdaemon-test"


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on *host* right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@pytest.fixture
def free_port() -> Callable[[], int]:
    """The function :func:`find_free_port`; call ``free_port()`` for each port you need."""
    return find_free_port


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Hermetic environment: no DRDAEMON_*, no libpq/AWS profile vars, a private HOME."""
    for name in list(os.environ):
        if name.startswith("DRDAEMON_"):
            monkeypatch.delenv(name)
    for name in (*_PG_ENV_VARS, "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path_factory.mktemp("home")))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


# --------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------


@dataclass
class PgServer:
    host: str
    port: int
    user: str
    bin_dir: Path
    data_dir: Path | None = None

    def dsn(self, dbname: str = "postgres") -> str:
        """libpq keyword DSN, e.g. ``host=127.0.0.1 port=5432 user=postgres dbname=x``."""
        return f"host={self.host} port={self.port} user={self.user} dbname={dbname}"

    def bin(self, name: str) -> Path:
        """Path of a PostgreSQL program of the server's version, e.g. ``bin("pg_dump")``."""
        return self.bin_dir / name


def newest_pg_bin_dir() -> Path:
    """Newest ``/usr/lib/postgresql/<major>/bin`` that has ``initdb``."""
    found = []
    for d in Path("/usr/lib/postgresql").glob("*/bin"):
        if (d / "initdb").is_file() and re.fullmatch(r"\d+(\.\d+)?", d.parent.name):
            found.append((tuple(int(p) for p in d.parent.name.split(".")), d))
    if not found:
        raise RuntimeError(
            "no PostgreSQL server binaries in /usr/lib/postgresql/*/bin; "
            "install them with `apt-get install postgresql` (scripts/test does it)"
        )
    return max(found)[1]


def _unprivileged_user() -> pwd.struct_passwd:
    """The OS user that runs PostgreSQL when we are root (it refuses to run as root)."""
    try:
        return pwd.getpwnam(TEST_OS_USER)
    except KeyError:
        pass
    try:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
             "--shell", "/usr/sbin/nologin", TEST_OS_USER],
            check=True, capture_output=True, text=True,
        )
        return pwd.getpwnam(TEST_OS_USER)
    except (OSError, subprocess.CalledProcessError, KeyError):
        return pwd.getpwnam("nobody")  # last resort


def _run(cmd: list[str], *, as_user: pwd.struct_passwd | None, env: dict[str, str],
         log: Path | None = None) -> None:
    if as_user is not None:
        cmd = ["setpriv", f"--reuid={as_user.pw_uid}", f"--regid={as_user.pw_gid}",
               "--clear-groups", "--", *cmd]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)
    if proc.returncode != 0:
        extra = ""
        if log is not None and log.exists():
            extra = "\n--- server log ---\n" + log.read_text(errors="replace")[-4000:]
        raise RuntimeError(
            f"{' '.join(cmd)} failed with exit code {proc.returncode}\n"
            f"{proc.stdout}{proc.stderr}{extra}"
        )


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """A real PostgreSQL cluster on 127.0.0.1:<free port>, trust auth, superuser ``postgres``."""
    with pg_cluster() as server:
        yield server


@contextlib.contextmanager
def pg_cluster(extra_conf: str = "") -> Iterator[PgServer]:
    """A PostgreSQL cluster of its own while the block runs; `extra_conf` adds settings."""
    bin_dir = newest_pg_bin_dir()
    as_user = _unprivileged_user() if os.geteuid() == 0 else None
    base = Path(tempfile.mkdtemp(prefix="drdaemon-pg-"))  # short path: unix socket lives here
    data = base / "data"
    log = base / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(HOME=str(base), LC_ALL="C", TZ="UTC")
    if as_user is not None:
        os.chown(base, as_user.pw_uid, as_user.pw_gid)
    pg_ctl = str(bin_dir / "pg_ctl")
    started = False
    try:
        _run([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
              "-E", "UTF8", "--no-locale", "--no-sync"], as_user=as_user, env=env)
        conf = data / "postgresql.conf"
        base_conf = conf.read_text()
        for attempt in range(5):
            port = find_free_port()
            conf.write_text(
                base_conf
                + "\n# drdaemon tests\n"
                + "listen_addresses = '127.0.0.1'\n"
                + f"port = {port}\n"
                + f"unix_socket_directories = '{base}'\n"
                + "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                + "max_connections = 100\n"
                + extra_conf
            )
            try:
                _run([pg_ctl, "start", "-D", str(data), "-l", str(log), "-w", "-t", "60"],
                     as_user=as_user, env=env, log=log)
                started = True
                break
            except RuntimeError:
                if attempt == 4:  # maybe the port was taken meanwhile; else give up
                    raise
        yield PgServer(host="127.0.0.1", port=port, user="postgres", bin_dir=bin_dir,
                       data_dir=data)
    finally:
        if started:
            with contextlib.suppress(Exception):
                _run([pg_ctl, "stop", "-D", str(data), "-m", "immediate", "-w"],
                     as_user=as_user, env=env)
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def pg_replica(primary: PgServer) -> Iterator[PgServer]:
    """A streaming hot standby of `primary` (`pg_basebackup -R`, which initdb's trust
    pg_hba allows) on a port of its own while the block runs; `stop()` it with pg_ctl."""
    assert primary.data_dir is not None
    bin_dir = primary.bin_dir
    as_user = _unprivileged_user() if os.geteuid() == 0 else None
    base = Path(tempfile.mkdtemp(prefix="drdaemon-pgr-"))
    data = base / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(HOME=str(base), LC_ALL="C", TZ="UTC")
    if as_user is not None:
        os.chown(base, as_user.pw_uid, as_user.pw_gid)
    server = PgServer(host="127.0.0.1", port=find_free_port(), user="postgres",
                      bin_dir=bin_dir, data_dir=data)
    try:
        _run([str(bin_dir / "pg_basebackup"), "-D", str(data), "-R", "-X", "stream",
              "-c", "fast", "-h", primary.host, "-p", str(primary.port), "-U", "postgres",
              "--no-sync"], as_user=as_user, env=env)
        with (data / "postgresql.conf").open("a") as conf:
            conf.write(f"\nport = {server.port}\nunix_socket_directories = '{base}'\n"
                       "hot_standby = on\n")
        _run([str(bin_dir / "pg_ctl"), "start", "-D", str(data), "-l", str(base / "log"),
              "-w", "-t", "60"], as_user=as_user, env=env, log=base / "log")
        yield server
    finally:
        with contextlib.suppress(Exception):
            _run([str(bin_dir / "pg_ctl"), "stop", "-D", str(data), "-m", "immediate", "-w"],
                 as_user=as_user, env=env)
        shutil.rmtree(base, ignore_errors=True)


def stop_server(server: PgServer) -> None:
    """Stop a server made by pg_cluster or pg_replica (immediate shutdown)."""
    as_user = _unprivileged_user() if os.geteuid() == 0 else None
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    _run([str(server.bin("pg_ctl")), "stop", "-D", str(server.data_dir), "-m", "immediate",
          "-w"], as_user=as_user, env=env)


@pytest.fixture
def pg_database(pg_server: PgServer) -> Iterator[str]:
    """DSN of a fresh, empty database on ``pg_server``; dropped (WITH (FORCE)) afterwards."""
    name = f"test_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield pg_server.dsn(name)
    finally:
        with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


# --------------------------------------------------------------------------------------------
# S3 (moto server mode, one process per region)
# --------------------------------------------------------------------------------------------

# Runs in the child: a ThreadedMotoServer driven by one-line commands on stdin.
_MOTO_CHILD = r"""
import logging, sys
logging.getLogger("werkzeug").setLevel(logging.ERROR)
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address=sys.argv[1], port=int(sys.argv[2]), verbose=False)
running = False
def reply(msg):
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()
server.start()
running = True
reply("ok")
for line in sys.stdin:
    cmd = line.strip()
    try:
        if cmd == "start" and not running:
            server.start()
            running = True
        elif cmd == "stop" and running:
            server.stop()
            running = False
        elif cmd == "quit":
            break
        reply("ok")
    except Exception as exc:
        reply("error " + repr(exc).replace("\n", " "))
"""


class MotoServerProcess:
    """A moto ``ThreadedMotoServer`` in its own process (so its buckets are its own).

    Same API as ThreadedMotoServer: ``start()``, ``stop()``, ``get_host_and_port()``.
    ``stop()`` closes the listening socket (clients get "connection refused") but keeps the
    data; ``start()`` listens again on the same port.  ``close()`` ends the process.
    """

    def __init__(self, ip_address: str = "127.0.0.1", port: int = 0,
                 log_path: Path | None = None) -> None:
        self.ip_address = ip_address
        self.port = port or find_free_port(ip_address)
        self.log_path = log_path
        self.running = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.ip_address}:{self.port}"

    def get_host_and_port(self) -> tuple[str, int]:
        return (self.ip_address, self.port)

    def start(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            self._log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _MOTO_CHILD, self.ip_address, str(self.port)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
            )
            self._await_reply("start")
        else:
            self._command("start")
        self.running = True

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._command("stop")
        self.running = False

    def close(self) -> None:
        proc, self._proc = self._proc, None
        self.running = False
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    assert proc.stdin is not None
                    proc.stdin.write(b"quit\n")
                    proc.stdin.close()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
        self._log = None

    def reset(self) -> None:
        """Forget every bucket and object (moto's ``/moto-api/reset``)."""
        req = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()

    def _command(self, cmd: str) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(cmd.encode() + b"\n")
        self._proc.stdin.flush()
        self._await_reply(cmd)

    def _await_reply(self, cmd: str, timeout: float = 60) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self._proc.stdout, selectors.EVENT_READ)
            ready = sel.select(timeout)
        line = self._proc.stdout.readline().decode().strip() if ready else "(timeout)"
        if line != "ok":
            log = ""
            if self.log_path and self.log_path.exists():
                log = "\n--- moto log ---\n" + self.log_path.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"moto server on port {self.port}: {cmd!r} -> {line!r}{log}")

    def __enter__(self) -> MotoServerProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class S3Region:
    name: str
    endpoint_url: str
    region: str
    bucket: str
    continent: str
    server: MotoServerProcess

    def client(self, **kwargs: Any) -> Any:
        """A boto3 S3 client for this region's endpoint (kwargs go to ``boto3.client``)."""
        kwargs.setdefault("endpoint_url", self.endpoint_url)
        kwargs.setdefault("region_name", self.region)
        kwargs.setdefault("aws_access_key_id", "testing")
        kwargs.setdefault("aws_secret_access_key", "testing")
        return boto3.client("s3", **kwargs)

    def create_bucket(self) -> None:
        create: dict[str, Any] = {"Bucket": self.bucket}
        if self.region != "us-east-1":
            create["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        self.client().create_bucket(**create)

    def toml(self, prefix: str = "") -> str:
        """This region as a drdaemon ``[[regions]]`` config table."""
        return (
            "[[regions]]\n"
            f'name = "{self.name}"\nkind = "s3"\ncontinent = "{self.continent}"\n'
            f'bucket = "{self.bucket}"\nregion = "{self.region}"\n'
            f'endpoint_url = "{self.endpoint_url}"\nprefix = "{prefix}"\n'
        )


# (name, AWS region, continent) of the two shared regions, in the order s3_regions yields them
S3_REGION_SPECS = (
    ("eu-frankfurt", "eu-central-1", "europe"),
    ("us-virginia", "us-east-1", "north-america"),
)


def _bucket_name(region: str) -> str:
    return f"drdaemon-{region}-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def _moto_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[MotoServerProcess]]:
    logs = tmp_path_factory.mktemp("moto")
    servers = [MotoServerProcess(log_path=logs / f"{spec[0]}.log") for spec in S3_REGION_SPECS]
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.close()


@pytest.fixture
def s3_regions(_moto_servers: list[MotoServerProcess]) -> list[S3Region]:
    """``[eu-frankfurt (eu-central-1, europe), us-virginia (us-east-1, north-america)]``.

    Two independent S3 servers, each emptied and given a fresh bucket for this test.
    """
    regions = []
    for server, (name, region, continent) in zip(_moto_servers, S3_REGION_SPECS, strict=True):
        if not server.running:  # a previous test stopped it to simulate an outage
            server.start()
        server.reset()
        r = S3Region(name=name, endpoint_url=server.endpoint_url, region=region,
                     bucket=_bucket_name(region), continent=continent, server=server)
        r.create_bucket()
        regions.append(r)
    return regions


@pytest.fixture
def lock_regions(s3_regions: list[S3Region]) -> list[S3Region]:
    """The two moto regions, each with a fresh bucket created with Object Lock."""
    out = []
    for r in s3_regions:
        locked = dataclasses.replace(r, bucket=r.bucket + "-lock")
        create: dict[str, Any] = {"Bucket": locked.bucket, "ObjectLockEnabledForBucket": True}
        if r.region != "us-east-1":
            create["CreateBucketConfiguration"] = {"LocationConstraint": r.region}
        r.client().create_bucket(**create)
        out.append(locked)
    return out


@pytest.fixture
def moto_region_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[[str, str, str], S3Region]]:
    """``factory(name, region, continent)``: a private S3 region (own server + bucket), for
    tests that stop/restart servers or need more than the two shared regions."""
    servers: list[MotoServerProcess] = []
    logs = tmp_path_factory.mktemp("moto-private")

    def make(name: str, region: str = "us-east-1", continent: str = "north-america") -> S3Region:
        server = MotoServerProcess(log_path=logs / f"{name}.log")
        servers.append(server)
        server.start()
        r = S3Region(name=name, endpoint_url=server.endpoint_url, region=region,
                     bucket=_bucket_name(region), continent=continent, server=server)
        r.create_bucket()
        return r

    try:
        yield make
    finally:
        for server in servers:
            server.close()
