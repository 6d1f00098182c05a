"""The postgres-cluster source kind: a whole PostgreSQL cluster, physically.

Backed up by pg_basebackup as a tar (pg_cluster.py), restored into a new data
directory (`drctl restore --to-datadir`): the tar is extracted by the hardened
extractor the directory kind uses (tree_extract: no path escapes, no links
followed, no devices or hard links), the copy is given to the server's OS
user, checked against the manifest's facts with the files alone and then
running (pg_cluster_server.py), and optionally started with pg_ctl. No
recovery.signal is written: backup_label and the WAL inside the tar make the
server replay to the backup's end and open consistent on its first start.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import threading
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

from pyrage import x25519

from ..errors import IntegrityError, SourceError, UsageError
from ..streams import ThreadPipe
from . import pg_cluster, pg_drill, pg_session, tree_extract
from . import pg_cluster_server as srv
from .base import (
    CHECK_FAILED,
    DATADIR,
    PROPERTY_MISMATCH,
    RESTORE_FAILED,
    DataPlace,
    DrillPlace,
    DrillScratch,
    Dump,
    LeftoverJudge,
    RestoreOptions,
    Sink,
    Snapshot,
    SourceSettings,
    SourceWhere,
    SqlCheck,
    whole_sizes,
)
from .directory import remove_tree
from .tree_meta import short_name

CUSTOMER_FACTS = ("server_version", "system_identifier", "start_lsn", "end_lsn", "databases")


def check_datadir(target: Path) -> None:
    """Refuse a restore target that is not an absolute path to a new or empty folder."""
    if not target.is_absolute():
        raise UsageError(f"a data directory target is an absolute path, not {str(target)!r}")
    if target.is_symlink() or (target.exists() and (not target.is_dir()
                                                    or any(target.iterdir()))):
        raise UsageError(f"restore target {target} exists and is not an empty folder; "
                         "choose a new or empty folder")


def refuse_links(root: Path) -> None:
    """HostileEntry for a symbolic link anywhere in an extracted data directory: the
    extractor never follows one, but a server started on it would (pg_basebackup writes
    none: pg_wal as a folder, tablespaces are refused)."""
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                rel = os.path.relpath(path, root)
                raise tree_extract.HostileEntry(
                    f"refused a hostile tar entry: {short_name(rel)}: a data directory from "
                    "pg_basebackup holds no symbolic links")


class ClusterSink:
    """Extracts a base backup into a private staging folder beside `target`.

    `complete` checks the copy against `facts` (files, then a private start) when
    `verify` is set; `commit` renames it into place and starts it if `start_port`.
    """

    def __init__(self, target: Path, snapshot_id: str, facts: dict[str, Any],
                 owner: pwd.struct_passwd | None, max_bytes: int, *, verify: bool = True,
                 start_port: int | None = None) -> None:
        check_datadir(target)
        self.target, self.facts, self.owner = target, facts, owner
        self.verify, self.start_port = verify, start_port
        self.notes: list[str] = []
        self.server: srv.PrivateServer | None = None
        self.max_bytes = max_bytes
        if (why := srv.reachable(target, owner)) is not None:
            raise UsageError(why)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            self.staging = target.parent / (
                f".{target.name}.drdaemon-{snapshot_id}-{secrets.token_hex(3)}.partial")
            self.staging.mkdir(mode=0o700)
            srv.give_to(self.staging, owner)
        except OSError as exc:
            raise UsageError(f"cannot create the data directory next to {target}: "
                             f"{exc.strerror}") from None
        self._pipe = ThreadPipe(self._extract, thread_writes=False, name="untar")
        self.writer: BinaryIO = self._pipe.writer

    def _extract(self, stream: BinaryIO) -> None:
        # The owners the tar names are the source host's: all of it goes to `owner`.
        ignored: list[str] = []
        tree_extract.extract(stream, str(self.staging), ignored, self.max_bytes)

    def complete(self) -> None:
        self._pipe.join()
        refuse_links(self.staging)
        os.chmod(self.staging, 0o700)  # PostgreSQL refuses a group- or world-readable one
        srv.give_to(self.staging, self.owner)
        self.notes.extend(srv.fill_config(self.staging, self.owner))
        if not self.verify:
            return
        reasons = srv.offline_problems(self.staging, self.facts)
        if not reasons:
            server = srv.start_private(self.staging, self.owner, self.facts, listen="")
            try:
                reasons = srv.online_problems(server.dsn(), self.facts, {})
            finally:
                server.stop()
        if reasons:
            raise IntegrityError("restored cluster differs from the manifest: "
                                 + "; ".join(reasons))

    def commit(self) -> str:
        if self.target.exists():
            self.target.rmdir()  # empty, checked before we began
        os.replace(self.staging, self.target)
        if self.start_port is None:
            return str(self.target)
        srv.pg_ctl_start(self.target, self.owner, int(self.facts["server_version_num"]),
                         self.start_port)
        self.notes.append(f"started with pg_ctl on 127.0.0.1:{self.start_port} (TCP only, "
                          f"archive_mode=off); stop it with: pg_ctl stop -D {self.target}")
        return str(self.target)

    def discard(self) -> None:
        with contextlib.suppress(Exception):
            self._pipe.join()
        if self.server is not None:
            self.server.stop()
            self.server = None
        with contextlib.suppress(OSError):
            remove_tree(self.staging)


@dataclass
class ClusterScratch:
    """A drill's restored cluster: started on a free loopback port by `verify`, stopped
    and removed by the sink's `discard` (the drill calls it whatever happened)."""

    sink: ClusterSink
    where: str
    checks: tuple[SqlCheck, ...]
    evidence: dict[str, Any] = field(default_factory=dict)

    def verify(self, facts: dict[str, Any], evidence: dict[str, Any]) -> list[str]:
        """The files against the facts; then started, the facts again and the checks
        (each in its `database`, default "postgres"): done once it accepts connections
        and every check passed."""
        staging = self.sink.staging
        reasons = srv.offline_problems(staging, facts)
        if reasons:
            return [f"{PROPERTY_MISMATCH}: {r}" for r in reasons]
        try:
            server = srv.start_private(staging, self.sink.owner, facts)
        except SourceError as exc:
            return [f"{RESTORE_FAILED}: {exc}"]
        self.sink.server = server
        evidence["port"] = server.port
        reasons = [f"{PROPERTY_MISMATCH}: {r}"
                   for r in srv.online_problems(server.dsn(), facts, evidence)]
        results = [pg_drill.run_check(server.dsn(c.database or "postgres"), c)
                   for c in self.checks]
        evidence["checks"] = results
        reasons.extend(f"{CHECK_FAILED}: {r['sql']!r}: {r['detail']}"
                       for r in results if not r["ok"])
        return reasons


class ClusterKind:
    """A whole PostgreSQL cluster (`dsn` with replication access, `os_user`,
    `wal_retention`)."""

    name = "postgres-cluster"
    dump_format = "basebackup"
    config_keys = ("dsn", "os_user", "wal_retention")
    restore_options = frozenset({"start", "owner"})
    takes_sql_checks = True
    detached_facts: tuple[str, ...] = ()
    export_suffix = ".tar"
    target_noun = DATADIR

    def plaintext_problem(self, head: bytes) -> str | None:
        if head[257:262] == b"ustar":
            return None
        return "is not a tar (no ustar header)"

    def customer_facts(self, facts: Mapping[str, Any]) -> dict[str, Any]:
        return {k: facts[k] for k in CUSTOMER_FACTS if k in facts}

    def load_instructions(self, file: str) -> list[str]:
        return ["a pg_basebackup tar of a whole PostgreSQL data directory; start it with:",
                f"  mkdir -m 700 NEWDIR && tar -xf {file} -C NEWDIR",
                "  pg_ctl start -D NEWDIR -o '-p 5433 -c archive_mode=off'",
                "(as the OS user that owns NEWDIR, with the same PostgreSQL major version)"]

    def data_place(self, source: SourceWhere) -> DataPlace | None:
        if not source.dsn:
            return None
        try:
            host, port, _ = pg_session.database_identity(source.dsn)
        except ValueError:
            return None
        return DataPlace(("postgres-cluster", host, port), what="the same cluster")

    def dump(self, source: SourceSettings, now: datetime | None,
             cancel: threading.Event | None) -> AbstractContextManager[Dump]:
        assert source.dsn is not None
        return pg_cluster.dump(source.dsn, source.wal_retention, cancel)

    def seal_facts(self, facts: dict[str, Any],
                   recipients: Sequence[x25519.Recipient]) -> dict[str, Any]:
        return facts  # versions, positions, names and sizes: nothing secret

    def detached_summary(self, detached: dict[str, Any]) -> dict[str, Any]:
        return {}

    def measures(self, facts: Mapping[str, Any]) -> dict[str, int]:
        """The databases' total size and their count."""
        dbs = facts.get("databases")
        return whole_sizes({"cluster_size": facts.get("cluster_size"),
                            "databases": len(dbs) if isinstance(dbs, list) else None})

    def check_target(self, source: SourceSettings, target: str) -> None:
        check_datadir(Path(target))

    def open_sink(self, source: SourceSettings, snapshot: Snapshot, target: str,
                  options: RestoreOptions) -> Sink:
        if options.start_port is not None and srv.port_in_use(options.start_port):
            raise UsageError(f"port {options.start_port} on 127.0.0.1 is in use: choose "
                             "another --port")
        owner = srv.server_user(options.owner or source.os_user)
        return ClusterSink(Path(target), snapshot.id, snapshot.facts, owner,
                           snapshot.plaintext_size, start_port=options.start_port)

    def open_scratch(self, source: SourceSettings, snapshot: Snapshot, place: DrillPlace,
                     identities: Sequence[x25519.Identity]) -> DrillScratch:
        owner = srv.server_user(source.os_user)
        folder = place.make_folder()
        if owner is not None:
            folder.chmod(0o711)  # the server's user passes through to its own folder
        sink = ClusterSink(folder / "cluster", snapshot.id, {}, owner,
                           snapshot.plaintext_size, verify=False)
        return ClusterScratch(sink, str(sink.staging), tuple(place.checks))

    def clean_leftovers(self, sources: Sequence[SourceSettings], server_dsn: str | None,
                        judge: LeftoverJudge) -> None:
        # Its scratch is a folder in the scratch folder (drills/scratch.py removes it);
        # its server got a parent-death signal, so it stopped with the killed drill.
        pass


CLUSTER = ClusterKind()
