"""Restoring a pg_dump into PostgreSQL: a fresh staging database filled by pg_restore
(from its stdin, or from a private unnamed file with `--jobs`), verified, renamed to
the target on commit, dropped on discard (sources.base.Sink)."""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any, BinaryIO, cast

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ..errors import SourceError, UsageError, first_line
from ..streams import BackgroundWriter, StderrTail
from . import pg_database, pg_recreate
from .pg_session import child_env, connect, describe, describe_connection, tool, with_stdio_buffer

_USER_RELATIONS = """
SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'
"""


def target_dsn(source_dsn: str, target: str) -> str:
    """TARGET as a DSN: itself if it is one, else a database on the source's server."""
    if "=" in target or target.startswith(("postgres://", "postgresql://")):
        try:
            params = conninfo_to_dict(target)
        except psycopg.Error:
            raise UsageError("restore target is not a valid DSN") from None
        if not params.get("dbname"):
            raise UsageError("restore target DSN names no database (dbname=...)")
        if "password" in params:
            # pg_restore would carry it on its command line, readable by every
            # local user in /proc/PID/cmdline. Never echoed.
            raise UsageError("the restore target must not contain a password: use PGPASSFILE "
                             "or a service file (pg_service.conf) for the target's password")
        return target
    if not target or len(target.encode()) > 63 or "\0" in target:
        raise UsageError(f"invalid database name {target!r}: 1-63 bytes expected")
    return make_conninfo(source_dsn, dbname=target)


def database_on(server: str, name: str) -> str:
    """The DSN of database `name` on the server DSN `server` (`drctl recovery run
    --to-server`); UsageError, never echoing it, if `server` is no connection string."""
    try:
        return make_conninfo(server, dbname=name)
    except psycopg.Error:
        raise UsageError("--to-server is not a valid connection string") from None


def unnamed_file(folder: Path) -> int:
    """A new 0600 file in `folder` that has no name: an open descriptor only.

    For plaintext scratch copies: whatever ends the process, even SIGKILL, the
    kernel frees the file with its last descriptor, and nobody can open it by
    name meanwhile. O_TMPFILE where the filesystem has it, otherwise a
    private temporary file unlinked at once.
    """
    tmpfile = getattr(os, "O_TMPFILE", 0)  # Linux only
    if tmpfile:
        try:
            return os.open(folder, tmpfile | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
    fd, name = tempfile.mkstemp(prefix="drdaemon-restore-", dir=folder)
    os.unlink(name)
    return fd


class PostgresSink:
    """pg_restore into a fresh staging database, renamed to the target on commit.

    By default pg_restore reads the dump from its stdin as it streams in. With
    `jobs`, pg_restore needs a seekable file: the dump is written to a private
    0600 file in `scratch_dir` and `pg_restore --jobs` runs on it in `complete()`,
    i.e. only after the stream verified; the file is removed afterwards whatever
    happens (complete, commit or discard).
    """

    def __init__(self, source_dsn: str, target: str, force: bool, *,
                 staging_prefix: str = "drdaemon_restore_",
                 restore_options: Sequence[str] = (), jobs: int | None = None,
                 scratch_dir: Path | None = None, size_hint: int = 0,
                 recreate: pg_recreate.Recreation | None = None) -> None:
        # Drills never commit: they verify the staging database itself and drop
        # it, under their own prefix, restored with their own pg_restore options.
        self.dsn = target_dsn(source_dsn, target)
        self.name = str(conninfo_to_dict(self.dsn)["dbname"])
        self.admin_dsn = make_conninfo(self.dsn, dbname="postgres")
        # 63 bytes at most: a prefix that names its process leaves room for 10 hex.
        room = min(6, (63 - len(staging_prefix)) // 2)
        self.staging = f"{staging_prefix}{secrets.token_hex(room)}"
        self.staging_dsn = make_conninfo(self.dsn, dbname=self.staging)
        self.proc: subprocess.Popen[bytes] | None = None
        self.stderr: StderrTail | None = None
        self._feed: BackgroundWriter | None = None
        # The snapshot's database properties (owner, locale, settings, ACL...).
        self.recreate = recreate or pg_recreate.Recreation(None)
        self.notes: list[str] = self.recreate.notes
        self.jobs = jobs
        self.dump_fd: int | None = None  # the --jobs scratch copy, see unnamed_file
        self.command = [tool("pg_restore"), "--exit-on-error", "--no-password",
                        *restore_options, f"--dbname={self.staging_dsn}"]
        if jobs is not None and scratch_dir is None:
            raise UsageError("pg_restore --jobs needs a scratch folder")
        self.target_exists = self._check_target(force)
        with connect(self.admin_dsn, autocommit=True) as conn:
            try:
                self.recreate.create(conn, self.staging)
            except (SourceError, UsageError) as exc:
                # Which server refused matters as much as why (a DSN resolved by libpq).
                raise type(exc)(f"on {describe_connection(conn)}: {exc}") from None
        try:
            if jobs is not None:
                assert scratch_dir is not None
                self.writer = self._open_dump_file(scratch_dir, size_hint)
                return
            self.proc = subprocess.Popen(
                with_stdio_buffer(self.command, "i"), stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=child_env())
        except BaseException:
            self.discard()
            raise
        self.stderr = StderrTail(self.proc)
        assert self.proc.stdin is not None
        # Fed from a thread: decrypting the next chunk overlaps pg_restore
        # taking the last one, as in a shell pipeline of separate processes.
        self._feed = BackgroundWriter(cast(BinaryIO, self.proc.stdin), name="pg_restore-feed")
        self.writer = cast(BinaryIO, self._feed)

    def _open_dump_file(self, scratch_dir: Path, size_hint: int) -> BinaryIO:
        try:
            scratch_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            free = shutil.disk_usage(scratch_dir).free
            if free < size_hint:
                raise UsageError(
                    f"scratch folder {scratch_dir} has {free >> 20} MiB free, the dump needs "
                    f"{size_hint >> 20} MiB: choose another with --scratch-dir")
            fd = unnamed_file(scratch_dir)
        except OSError as exc:
            raise UsageError(f"cannot create a scratch file in {scratch_dir}: "
                             f"{exc.strerror or exc}") from None
        self.dump_fd = fd
        # Written from a thread: the disk keeps pace while the stream decrypts.
        return cast(BinaryIO, BackgroundWriter(os.fdopen(os.dup(fd), "wb", buffering=1 << 20),
                                               name="scratch-writer"))

    def _close_dump_file(self) -> None:
        """Close the scratch copy: with its last descriptor the kernel frees it."""
        if self.dump_fd is not None:
            with suppress(OSError):
                self.writer.close()
            os.close(self.dump_fd)
            self.dump_fd = None

    def _admin(self, query: sql.Composed | sql.SQL, params: tuple[Any, ...] = ()) -> list[Any]:
        with connect(self.admin_dsn, autocommit=True) as conn:
            try:
                cur = conn.execute(query, params)
                return cur.fetchall() if cur.description else []
            except psycopg.Error as exc:
                raise SourceError(f"on {describe_connection(conn)}: "
                                  f"{first_line(exc)}") from None

    def _check_target(self, force: bool) -> bool:
        rows = self._admin(sql.SQL("SELECT 1 FROM pg_database WHERE datname = %s"), (self.name,))
        if not rows:
            return False
        with connect(self.dsn, autocommit=True) as conn:
            row = conn.execute(_USER_RELATIONS).fetchone()
        if row and row[0] and not force:
            raise UsageError(f"database {self.name!r} exists and is not empty; "
                             "use --force to replace it")
        return True

    def complete(self) -> None:
        if self.jobs is not None:
            self._restore_file()
            self._recreate_properties()
            return
        assert self.proc is not None and self.stderr is not None
        with suppress(BrokenPipeError):
            self.writer.close()
        code = self.proc.wait()
        if code != 0:
            raise SourceError(f"pg_restore into {self.name!r} failed (exit {code}): "
                              f"{self.stderr.text() or 'no message'}")
        self._recreate_properties()

    def _recreate_properties(self) -> None:
        """The snapshot's database properties, once pg_restore has finished.

        From inside the database, as pg_dump --create does: PostgreSQL keeps a
        comment or setting in the encoding of the database it was set from.
        """
        with connect(self.staging_dsn, autocommit=True) as conn:
            pg_database.byte_transparent(conn)
            self.recreate.apply(conn, self.staging)

    def _restore_file(self) -> None:
        """pg_restore --jobs from the verified scratch copy, which is freed afterwards.

        pg_restore and its workers open the copy as /proc/self/fd/N, the
        descriptor they inherit: it has no name anyone else could open.
        """
        assert self.dump_fd is not None
        try:
            self.writer.close()
            self.proc = subprocess.Popen(
                [*self.command, f"--jobs={self.jobs}", f"/proc/self/fd/{self.dump_fd}"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                pass_fds=(self.dump_fd,), env=child_env())
            self.stderr = StderrTail(self.proc)
            code = self.proc.wait()
        except OSError as exc:
            raise SourceError(f"restoring into {self.name!r} from the scratch copy: "
                              f"{exc.strerror or exc}") from None
        finally:
            self._close_dump_file()
        if code != 0:
            raise SourceError(f"pg_restore into {self.name!r} failed (exit {code}): "
                              f"{self.stderr.text() or 'no message'}")

    def commit(self) -> str:
        self._close_dump_file()
        if self.target_exists:
            self._admin(sql.SQL("DROP DATABASE {}").format(sql.Identifier(self.name)))
        self._admin(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
            sql.Identifier(self.staging), sql.Identifier(self.name)))
        return describe(self.dsn)

    def discard(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self._feed is not None:
            with suppress(OSError):  # the feeding thread ends on the closed pipe
                self._feed.close()
        self._close_dump_file()
        self._admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(self.staging)))
