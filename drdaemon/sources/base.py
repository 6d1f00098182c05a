"""What every source kind provides: a dump to back up, a sink to restore into, a drill's
scratch copy and its verification, and the facts other modules need (sources.kind_for)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from pyrage import x25519

from ..errors import DrError


@dataclass
class Dump:
    """A running dump of a source.

    `stream` yields the plaintext of a standard dump (pg_dump custom format,
    POSIX tar). `finish()` is called after the stream is drained: it waits for
    the producer and returns the facts drills need, or raises SourceError.
    """

    stream: BinaryIO
    consistency_time: datetime
    finish: Callable[[], dict[str, Any]]


class Sink(Protocol):
    """A staged restore target: written, then verified, then committed.

    Nothing appears at the final target before `commit`; `discard` removes
    everything staged, whatever state it is in.
    """

    writer: BinaryIO
    notes: list[str]  # what was neutralised on the way in, for the operator

    def complete(self) -> None:
        """Close the writer and wait for the consumer; raise if it failed."""

    def commit(self) -> str:
        """Move the staged copy into place; return where it went."""

    def discard(self) -> None:
        """Remove the staged copy."""


# -- what a kind reads -----------------------------------------------------------


class SourceSettings(Protocol):
    """The `[[sources]]` entry a kind works from (config.SourceConfig): its kind-specific
    keys are those the kind declares in `config_keys`."""

    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def dsn(self) -> str | None: ...
    @property
    def path(self) -> Path | None: ...
    @property
    def lock_wait_timeout(self) -> timedelta: ...
    @property
    def on_unreadable(self) -> str: ...
    @property
    def os_user(self) -> str | None: ...
    @property
    def wal_retention(self) -> str: ...


class Snapshot(Protocol):
    """What a kind reads of a snapshot's (authenticated) manifest (manifest.Manifest)."""

    @property
    def id(self) -> str: ...
    @property
    def plaintext_size(self) -> int: ...
    @property
    def facts(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class RestoreOptions:
    """How `drctl restore` asked for the copy. `jobs`, `no_owner`, `policy`, `start`
    (`start_port`: start the restored copy on that port), `owner` (the OS user a
    restored copy is given to) and `with_roles` (create the roles the snapshot names
    that the target lacks first; the snapshot's facts are then complete, its facts
    object's too) are options a kind takes only if it names them in `restore_options`."""

    force: bool = False
    jobs: int | None = None
    scratch_dir: Path | None = None
    no_owner: bool = False
    policy: Any = None  # the kind's own: what a target may lack (pg_recreate.Policy)
    identities: Sequence[x25519.Identity] = ()
    start_port: int | None = None
    owner: str | None = None
    with_roles: bool = False
    # A staging database's name starts with this (it names the restoring process,
    # drills/scratch.py); None: the kind's default.
    staging_prefix: str | None = None
    # Before staging, a kind that stages outside the target's folder removes there
    # what killed restores left, judged by this (drills/scratch.py).
    leftovers: LeftoverJudge | None = None


# -- drills --------------------------------------------------------------------

# Drill reason codes a kind's verification uses; every reason reads "<code>: <detail>"
# (README.md, "Drills", lists them all; the others are in drills/attempt.py).
MANIFEST_INVALID = "manifest-invalid"
NO_IDENTITY = "no-identity"
RESTORE_FAILED = "restore-failed"
COUNT_MISMATCH = "count-mismatch"
DIGEST_MISMATCH = "digest-mismatch"
CHECK_FAILED = "check-failed"
PROPERTY_MISMATCH = "property-mismatch"


class DrillFailure(DrError):
    """A drill's scratch cannot be made for a reason with its own code (e.g. no identity)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code, self.detail = code, detail


class SqlCheck(Protocol):
    """A `[[drills.checks]]` entry (config.DrillCheck)."""

    @property
    def sql(self) -> str: ...
    @property
    def min(self) -> float: ...
    @property
    def database(self) -> str | None:
        """The database it runs in, for a kind that holds several (None: the default)."""


@dataclass
class DrillPlace:
    """Where a drill may make its scratch copy; the names carry the drilling process
    (drills/scratch.py) so that a later run can remove what a killed drill left.

    `make_folder()` makes a fresh private folder in the scratch folder (removed by
    the drill, whatever happens); `database_prefix` starts a scratch database's
    name; `server_dsn` is `[drills] postgres_dsn` (None: the source's own server).
    """

    make_folder: Callable[[], Path]
    database_prefix: str
    server_dsn: str | None
    checks: Sequence[SqlCheck]


class DrillScratch(Protocol):
    """A drill's scratch copy: restored into through `sink` (never committed), then
    verified; the drill discards the sink afterwards, whatever happened."""

    @property
    def sink(self) -> Sink: ...
    @property
    def where(self) -> str:
        """The scratch copy, for the record (no password)."""
    @property
    def evidence(self) -> dict[str, Any]:
        """What the record shows of it before verification."""

    def verify(self, facts: dict[str, Any], evidence: dict[str, Any]) -> list[str]:
        """Compare the restored copy with the snapshot's facts: the reasons it fails
        ("<code>: <detail>"), [] if it matches; what was measured goes to `evidence`."""


class LeftoverJudge(Protocol):
    """drills/scratch.py's verdicts on scratch databases a killed drill may have left."""

    @property
    def database_like(self) -> str:
        """A LIKE pattern for every scratch database name."""

    def verdict(self, name: str, where: str) -> tuple[bool, str, str] | None:
        """(removable, who made it, why) for database `name`; None: not one to touch."""

    def kept(self, where: str, who: str, why: str) -> None: ...
    def removed(self, where: str, who: str, why: str) -> None: ...
    def error(self, text: str) -> None: ...


def whole_sizes(found: Mapping[str, Any]) -> dict[str, int]:
    """The measures that are whole non-negative numbers (a manifest may lack any)."""
    return {n: int(v) for n, v in found.items()
            if isinstance(v, int) and not isinstance(v, bool) and v >= 0}


class SourceWhere(Protocol):
    """Where a source's data is: all `data_place` reads (tenancy passes its own types)."""

    @property
    def dsn(self) -> str | None: ...
    @property
    def path(self) -> Path | None: ...


@dataclass(frozen=True)
class DataPlace:
    """Where a source reads its data, so that two sources on the same data are found
    (tenancy.overlaps): equal `key`s, or one's key among the other's `parents` (a tree
    inside another), hold the same data; `what` says so in a sentence."""

    key: tuple[str, ...]
    parents: tuple[tuple[str, ...], ...] = ()
    what: str = "the same data"


# A kind whose restore target is a data directory: `drctl restore --to-datadir`.
DATADIR = "data directory"


# -- the kind --------------------------------------------------------------------


class SourceKind(Protocol):
    """One kind of source (postgres, directory, ...): everything that differs between
    kinds, so that the services never ask which kind they hold (sources.kind_for)."""

    @property
    def name(self) -> str:
        """The `kind` of `[[sources]]` and of manifests."""
    @property
    def dump_format(self) -> str:
        """In data object names: sources/<s>/data/<id>.<format>.zst.age (layout.py)."""
    @property
    def config_keys(self) -> tuple[str, ...]:
        """The kind-specific [[sources]] keys it takes (config.py parses them)."""
    @property
    def restore_options(self) -> frozenset[str]:
        """The options of RestoreOptions it takes beyond `force`: "jobs", "no_owner",
        "policy", "start", "owner", "with_roles"."""
    @property
    def takes_sql_checks(self) -> bool:
        """Whether [[drills.checks]] may name its sources."""
    @property
    def detached_facts(self) -> tuple[str, ...]:
        """Facts kept in the facts object, not the manifest (facts.py)."""
    @property
    def target_noun(self) -> str:
        """What a restore target is: "database" (a name or DSN: `restore --to-db`),
        "folder" (a path) or DATADIR (a path: `restore --to-datadir`)."""
    @property
    def export_suffix(self) -> str:
        """The file name ending of its plaintext dump in a tenant export (export.py)."""

    def plaintext_problem(self, head: bytes) -> str | None:
        """Why the first 512 bytes of a decrypted dump are not this kind's format (None
        if they are): an export never hands a customer something else."""

    def customer_facts(self, facts: Mapping[str, Any]) -> dict[str, Any]:
        """The facts a tenant export's MANIFEST.json tells the customer (never a sealed
        or internal one)."""

    def load_instructions(self, file: str) -> list[str]:
        """How a customer loads that file with stock tools (README.txt lines)."""

    def data_place(self, source: SourceWhere) -> DataPlace | None:
        """Where `source` reads its data (None: nowhere comparable)."""

    def dump(self, source: SourceSettings, now: datetime | None,
             cancel: threading.Event | None) -> AbstractContextManager[Dump]:
        """Start a dump of `source`; `cancel` ends one that is stuck."""

    def seal_facts(self, facts: dict[str, Any],
                   recipients: Sequence[x25519.Recipient]) -> dict[str, Any]:
        """The facts as stored: any that may hold a secret encrypted to `recipients`."""

    def detached_summary(self, detached: dict[str, Any]) -> dict[str, Any]:
        """Small inline facts that stand in the manifest for the detached ones."""

    def measures(self, facts: Mapping[str, Any]) -> dict[str, int]:
        """The sizes of a snapshot's content that must not collapse (shrink.py)."""

    def check_target(self, source: SourceSettings, target: str) -> None:
        """Refuse a bad restore target (UsageError) before anything is read."""

    def open_sink(self, source: SourceSettings, snapshot: Snapshot, target: str,
                  options: RestoreOptions) -> Sink:
        """A staged restore target for `snapshot`."""

    def open_scratch(self, source: SourceSettings, snapshot: Snapshot, place: DrillPlace,
                     identities: Sequence[x25519.Identity]) -> DrillScratch:
        """A drill's scratch copy (DrillFailure, SourceError if it cannot be made)."""

    def clean_leftovers(self, sources: Sequence[SourceSettings], server_dsn: str | None,
                        judge: LeftoverJudge) -> None:
        """Remove the scratch of `sources` that killed drills left outside the scratch
        folder (which drills/scratch.py cleans for every kind)."""
