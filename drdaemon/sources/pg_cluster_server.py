"""Running a restored PostgreSQL cluster: as whom, where, and how it is checked.

PostgreSQL never runs as root: when drdaemon does, the restored data directory
is given to an unprivileged OS user (`--owner`, else the source's `os_user`,
else "postgres") and every server runs as that user (setpriv). A private
server (verification, drills) listens on loopback with a socket in a fresh
0700 folder whose pg_hba lets only local socket connections in (trust: only
that user and root can reach the socket) and refuses TCP; it gets
`archive_mode = off` so that a copy never archives into the source's WAL
archive, and a parent-death signal so that it stops if drdaemon is killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from ..errors import SourceError, UsageError, first_line
from .pg_cluster import label_start
from .pg_session import child_env

DEFAULT_OS_USER = "postgres"
START_TIMEOUT = 3600.0  # recovery of a large cluster replays all the WAL of its backup
STOP_TIMEOUT = 60.0
PRIVATE_HBA = "local all all trust\nhost all all 0.0.0.0/0 reject\nhost all all ::/0 reject\n"
# A server started from a restored copy: never archiving into the source's archive.
SAFE_SETTINGS = ("archive_mode=off", "logging_collector=off", "ssl=off")
# Written into a restored data directory that has none (Debian keeps them in /etc).
DEFAULT_HBA = ("local all all peer\nhost all all 127.0.0.1/32 scram-sha-256\n"
               "host all all ::1/128 scram-sha-256\n")


def server_user(name: str | None) -> pwd.struct_passwd | None:
    """The OS user a restored cluster is given to (None: drdaemon's own user, not root)."""
    if os.geteuid() != 0:
        if name is not None and name != pwd.getpwuid(os.geteuid()).pw_name:
            raise UsageError(f"only root can give a restored cluster to user {name!r}")
        return None
    wanted = name or DEFAULT_OS_USER
    try:
        pw = pwd.getpwnam(wanted)
    except KeyError:
        raise UsageError(f"no OS user {wanted!r} to own the restored cluster: give --owner "
                         "(or the source's os_user) an unprivileged user") from None
    if pw.pw_uid == 0:
        raise UsageError("PostgreSQL never runs as root: give --owner (or the source's "
                         "os_user) an unprivileged user")
    return pw


def reachable(path: Path, pw: pwd.struct_passwd | None) -> str | None:
    """Why user `pw` cannot reach `path` (None if it can: every folder above it is searchable)."""
    if pw is None:
        return None
    for folder in path.absolute().parents:
        try:
            st = folder.stat()
        except OSError:
            continue  # made later, by us
        if st.st_uid == pw.pw_uid:
            ok = st.st_mode & stat.S_IXUSR
        elif st.st_gid == pw.pw_gid:
            ok = st.st_mode & stat.S_IXGRP
        else:
            ok = st.st_mode & stat.S_IXOTH
        if not ok:
            return (f"OS user {pw.pw_name} cannot reach {path}: {folder} is not searchable "
                    "by it (choose a folder it can reach; for drills set [drills] scratch_dir)")
    return None


def give_to(root: Path, pw: pwd.struct_passwd | None) -> None:
    """chown a restored tree to `pw` (never following a link); nothing if `pw` is None."""
    if pw is None:
        return
    os.lchown(root, pw.pw_uid, pw.pw_gid)
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            os.lchown(os.path.join(folder, name), pw.pw_uid, pw.pw_gid)


def bin_dir(version_num: int) -> Path:
    """The server programs of PostgreSQL's major version `version_num // 10000`."""
    major = version_num // 10000
    found = Path(f"/usr/lib/postgresql/{major}/bin")
    if (found / "postgres").is_file():
        return found
    on_path = shutil.which("postgres")
    if on_path:
        return Path(on_path).parent
    raise SourceError(f"the PostgreSQL {major} server is not installed here (Debian: apt-get "
                      f"install postgresql-{major})")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def as_user(argv: list[str], pw: pwd.struct_passwd | None, pdeathsig: bool) -> list[str]:
    """`argv` run as `pw` (when root), with a parent-death signal if asked."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        if pw is not None:
            raise SourceError("setpriv (util-linux) is needed to run PostgreSQL as "
                              f"{pw.pw_name}")
        return argv
    opts = ["--pdeathsig", "QUIT"] if pdeathsig else []
    if pw is not None:
        opts += [f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups"]
    return [setpriv, *opts, "--", *argv] if opts else argv


def fill_config(datadir: Path, pw: pwd.struct_passwd | None) -> list[str]:
    """Write the configuration files a data directory lacks; notes for the operator."""
    notes = []
    for name, text in (("postgresql.conf", "# written by drdaemon: the snapshot had none\n"),
                       ("pg_hba.conf", DEFAULT_HBA)):
        path = datadir / name
        if not path.exists():
            path.write_text(text)
            path.chmod(0o600)
            if pw is not None:
                os.lchown(path, pw.pw_uid, pw.pw_gid)
            notes.append(f"the snapshot has no {name} (kept outside the data directory on "
                         "the source): a default one was written")
    return notes


# -- checks against the manifest's facts ------------------------------------------------

_SYSID = re.compile(r"^Database system identifier:\s+(\d+)", re.M)


def offline_problems(datadir: Path, facts: dict[str, Any]) -> list[str]:
    """What a restored data directory's files contradict of the facts (before it runs)."""
    reasons = []
    major = int(facts.get("server_version_num") or 0) // 10000
    try:
        got = (datadir / "PG_VERSION").read_text().strip()
    except OSError:
        return ["the restored copy has no PG_VERSION: it is not a PostgreSQL data directory"]
    if str(major) != got:
        reasons.append(f"its PG_VERSION is {got}, the manifest says {facts.get('server_version')}")
    try:
        label = (datadir / "backup_label").read_text()
    except OSError:
        label = ""
    if label_start(label) != facts.get("start_lsn"):
        reasons.append(f"its backup_label starts at {label_start(label)}, the manifest says "
                       f"{facts.get('start_lsn')}")
    with contextlib.suppress(OSError):
        if (datadir / "tablespace_map").read_text().strip():
            reasons.append("it maps tablespaces outside the data directory (tablespace_map)")
    with contextlib.suppress(OSError, ValueError):
        ranges = json.loads((datadir / "backup_manifest").read_text())
        ends = [r.get("End-LSN") for r in ranges.get("WAL-Ranges", [])]
        if facts.get("end_lsn") not in ends:
            reasons.append(f"its backup_manifest ends at {ends}, the manifest says "
                           f"{facts.get('end_lsn')}")
    try:
        out = subprocess.run([str(bin_dir(major * 10000) / "pg_controldata"), str(datadir)],
                             capture_output=True, text=True, env={**child_env(), "LC_ALL": "C"},
                             timeout=60, check=False).stdout
    except (OSError, SourceError, subprocess.TimeoutExpired) as exc:
        return [*reasons, f"pg_controldata cannot read it: {exc}"]
    m = _SYSID.search(out)
    if m is None or m[1] != facts.get("system_identifier"):
        reasons.append(f"its system identifier is {m[1] if m else 'unreadable'}, the manifest "
                       f"says {facts.get('system_identifier')}")
    return reasons


def online_problems(dsn: str, facts: dict[str, Any], evidence: dict[str, Any]) -> list[str]:
    """What the running restored cluster contradicts of the facts; what it showed goes
    to `evidence`."""
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=30) as conn:
            row = conn.execute(
                "SELECT (SELECT system_identifier::text FROM pg_control_system()), "
                "current_setting('server_version'), pg_is_in_recovery()").fetchone()
            names = [r[0] for r in conn.execute(
                "SELECT datname FROM pg_database WHERE datallowconn ORDER BY 1")]
    except psycopg.Error as exc:
        return [f"cannot query the restored cluster: {first_line(exc)}"]
    assert row is not None
    evidence.update(system_identifier=row[0], server_version=row[1], databases=len(names))
    reasons = []
    if row[0] != facts.get("system_identifier"):
        reasons.append(f"the restored cluster's system identifier is {row[0]}, the manifest "
                       f"says {facts.get('system_identifier')}")
    if row[1] != facts.get("server_version"):
        reasons.append(f"the restored cluster runs {row[1]}, the manifest says "
                       f"{facts.get('server_version')}")
    if row[2]:
        reasons.append("the restored cluster is still in recovery")
    recorded = facts.get("databases")
    want = sorted(str(d.get("name")) for d in recorded if isinstance(d, dict)) \
        if isinstance(recorded, list) else None
    if want is None:
        reasons.append("the manifest records no databases")
    elif want != names:
        missing, extra = sorted(set(want) - set(names)), sorted(set(names) - set(want))
        reasons.append(f"the restored databases differ from the manifest's (missing {missing}, "
                       f"not recorded {extra})")
    return reasons


# -- servers ------------------------------------------------------------------------


@dataclass
class PrivateServer:
    """A restored cluster running for drdaemon alone (see the module's docstring)."""

    proc: subprocess.Popen[bytes]
    datadir: Path
    sockdir: Path
    port: int
    superuser: str

    def dsn(self, dbname: str = "postgres") -> str:
        return make_conninfo(host=str(self.sockdir), port=self.port, user=self.superuser,
                             dbname=dbname)

    def log_tail(self) -> str:
        try:
            lines = (self.sockdir / "server.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return " | ".join(ln.strip() for ln in lines[-3:])

    def stop(self) -> None:
        """Fast shutdown; an immediate one if that takes too long. Removes the socket folder."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)
                try:
                    self.proc.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    self.proc.send_signal(signal.SIGQUIT)
                    try:
                        self.proc.wait(STOP_TIMEOUT)
                    except subprocess.TimeoutExpired:
                        self.proc.kill()
                        self.proc.wait()
        finally:
            shutil.rmtree(self.sockdir, ignore_errors=True)


def start_private(datadir: Path, pw: pwd.struct_passwd | None, facts: dict[str, Any],
                  port: int | None = None, listen: str = "127.0.0.1") -> PrivateServer:
    """Start the cluster in `datadir` and wait until it accepts connections (SourceError
    with the server's last log lines if it stops first)."""
    superuser = str(facts.get("bootstrap_superuser") or "postgres")
    binaries = bin_dir(int(facts.get("server_version_num") or 0))
    sockdir = Path(tempfile.mkdtemp(prefix="drdaemon-pg-"))
    (sockdir / "pg_hba.conf").write_text(PRIVATE_HBA)
    log = open(sockdir / "server.log", "wb")  # noqa: SIM115 - handed to the server
    if pw is not None:
        for path in (sockdir, sockdir / "pg_hba.conf", sockdir / "server.log"):
            os.lchown(path, pw.pw_uid, pw.pw_gid)
    port = port or free_port()
    argv = [str(binaries / "postgres"), "-D", str(datadir), "-p", str(port),
            "-k", str(sockdir), "-c", f"listen_addresses={listen}",
            "-c", f"hba_file={sockdir / 'pg_hba.conf'}"]
    for setting in SAFE_SETTINGS:
        argv += ["-c", setting]
    try:
        proc = subprocess.Popen(as_user(argv, pw, pdeathsig=True), stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log, env=child_env())
    finally:
        log.close()
    server = PrivateServer(proc, datadir, sockdir, port, superuser)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            tail = server.log_tail()
            server.stop()
            raise SourceError(f"the restored cluster did not start (exit {proc.returncode}): "
                              f"{tail or 'no message'}")
        try:
            with psycopg.connect(server.dsn(), connect_timeout=5):
                return server
        except psycopg.OperationalError as exc:
            if time.monotonic() > deadline:
                server.stop()
                raise SourceError(f"the restored cluster did not accept connections within "
                                  f"{START_TIMEOUT:.0f}s: {first_line(exc)}") from None
            time.sleep(0.05)  # polling the starting server


def pg_ctl_start(datadir: Path, pw: pwd.struct_passwd | None, version_num: int,
                 port: int) -> None:
    """Start the restored cluster for good with pg_ctl: TCP on 127.0.0.1:`port` only."""
    opts = [f"-p {port}", "-h 127.0.0.1", "-c unix_socket_directories=''"]
    opts += [f"-c {s}" for s in SAFE_SETTINGS]
    argv = [str(bin_dir(version_num) / "pg_ctl"), "start", "-D", str(datadir), "-w",
            "-t", str(int(START_TIMEOUT)), "-l", str(datadir / "drdaemon-start.log"),
            "-o", " ".join(opts)]
    proc = subprocess.run(as_user(argv, pw, pdeathsig=False), capture_output=True, text=True,
                          env=child_env(), stdin=subprocess.DEVNULL, check=False)
    if proc.returncode != 0:
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        raise SourceError(f"restored to {datadir}, but pg_ctl start failed: "
                          f"{' | '.join(lines[-3:]) or 'no message'}")
