"""Drill scratch space: names that say who made them, and removal of what killed drills left.

A drill restores into scratch space and removes it afterwards, even when it
fails (drills/attempt.py, `Scratch`). A drill process that is killed (kill -9, OOM,
power loss) cannot: its scratch database or folder would stay forever. So
every scratch name carries its owner,

    drdaemon_drill_<yymmdd>_<incarnation>_<pid>_<start>_<12 hex>             database
    drdaemon-drill-<yymmdd>_<incarnation>_<pid>_<start>-<source>-<8 random>  folder in scratch_dir

- `yymmdd`: the UTC day it was made;
- `incarnation`: 8 hex of sha256(host name, boot id, pid namespace) of the
  drilling process: equal only on this host, in this boot, in this container;
- `pid`, `start`: its process id and start time (clock ticks after boot, field
  22 of /proc/<pid>/stat), so that a reused pid is never taken for the owner;

and `clean_leftovers`, which every drill run calls first, removes those whose
owner is gone (`judge`):

- made here (same incarnation): removed when no process with that pid and
  start time runs (a zombie counts as gone); made by this very process, when it
  runs no drill at the moment (a daemon's drill whose cleanup failed);
- made elsewhere (another host, an earlier boot, another container): the owner
  cannot be checked, so only once it is older than `unknown_owner_age`;
- a database is also kept while anyone is connected to it (pg_stat_activity),
  and dropped without FORCE, so a connection that arrives meanwhile makes the
  drop fail rather than being cut off;
- a folder must be a real folder (not a link) owned by this user;
- names of earlier versions: folders `drdaemon-drill-<source>-<8 random>` that
  hold nothing but a drill's staging folder count as made elsewhere, dated by
  their mtime; databases `drdaemon_drill_<12 hex>` carry no owner and no date
  and are only reported (kept): drop them by hand when no drill runs.

Nothing that does not match these patterns is ever touched. Each removal is
logged and recorded in the audit log (`drill.scratch_removed`); the run's
result lists what was removed and kept (`Cleanup`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import stat
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

from .. import statefs
from ..config import Config, SourceConfig
from ..runtime import Runtime
from ..sources import kind_for
from ..sources.base import LeftoverJudge
from ..sources.directory import remove_tree
from ..units import format_duration

log = logging.getLogger("drdaemon")

SCRATCH_DB_PREFIX = "drdaemon_drill_"
STAGING_DB_PREFIX = "drdaemon_restore_"  # `drctl restore`'s staging database (pg_sink.py)
SCRATCH_DIR_PREFIX = "drdaemon-drill-"
# A drill of another host or boot cannot be checked: its scratch is removed
# only once older than twice the slowest tier's RTO target, and never sooner.
MIN_UNKNOWN_OWNER_AGE = timedelta(days=2)

_TOKEN = r"(?P<day>\d{6})_(?P<inc>[0-9a-f]{8})_(?P<pid>\d{1,7})_(?P<start>\d{1,11})"
_SOURCE = r"(?P<source>[a-z0-9][a-z0-9._-]{0,62})"
_TOKEN_RE = re.compile(_TOKEN)
_DB_RE = re.compile(rf"drdaemon_drill_{_TOKEN}_[0-9a-f]{{12}}")
_LEGACY_DB_RE = re.compile(r"drdaemon_drill_[0-9a-f]{12}")
# Staging names of earlier versions (drdaemon_restore_<12 hex>) tell nothing: untouched.
_STAGING_RE_DB = re.compile(rf"drdaemon_restore_{_TOKEN}_[0-9a-f]{{10,12}}")
_DIR_RE = re.compile(rf"drdaemon-drill-{_TOKEN}-{_SOURCE}-[a-z0-9_]{{8}}")
_LEGACY_DIR_RE = re.compile(rf"drdaemon-drill-{_SOURCE}-[a-z0-9_]{{8}}")
# What a directory drill writes into its folder: DirectorySink's staging folder.
_STAGING_RE = re.compile(r"\.tree\.drdaemon-.+\.partial")


# -- owners ---------------------------------------------------------------------


@dataclass(frozen=True)
class Owner:
    """The drill process a scratch name points to (see the module's docstring)."""

    day: date
    incarnation: str
    pid: int
    start: int

    @property
    def token(self) -> str:
        return f"{self.day:%y%m%d}_{self.incarnation}_{self.pid}_{self.start}"

    @classmethod
    def from_token(cls, token: str) -> Owner | None:
        """The owner a `token` names (None if it is not one)."""
        match = _TOKEN_RE.fullmatch(token)
        return cls.parse(match) if match else None

    @classmethod
    def parse(cls, match: re.Match[str]) -> Owner | None:
        try:
            day = datetime.strptime(match["day"], "%y%m%d").date()
        except ValueError:
            return None
        return cls(day, match["inc"], int(match["pid"]), int(match["start"]))


def incarnation() -> str:
    """This host, boot and pid namespace, as 8 hex (equal only where pids compare)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    try:
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_ns = ""
    text = "\0".join((socket.gethostname(), boot, pid_ns))
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def process_start(pid: int) -> int | None:
    """Start time of process `pid` (clock ticks after boot); None if none runs (or a zombie)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = raw[raw.rindex(b")") + 2:].split()  # the name, in parentheses, may hold spaces
    if not fields or fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def this_process(now: datetime) -> Owner:
    """The owner that scratch made by this process now names."""
    pid = os.getpid()
    return Owner(now.astimezone(UTC).date(), incarnation(), pid, process_start(pid) or 0)


def database_prefix(owner: Owner) -> str:
    """Scratch database names start with this; PostgresSink adds 12 hex (63 bytes at most)."""
    return f"{SCRATCH_DB_PREFIX}{owner.token}_"


def staging_prefix(owner: Owner) -> str:
    """A restore's staging database names start with this; PostgresSink adds 10 hex."""
    return f"{STAGING_DB_PREFIX}{owner.token}_"


def folder_prefix(owner: Owner, source: str) -> str:
    """Scratch folder names start with this; mkdtemp adds 8 random characters."""
    return f"{SCRATCH_DIR_PREFIX}{owner.token}-{source}-"


# Drills of this process holding a scratch now: a scratch this process made is
# in use exactly while one runs (the daemon drills several tiers in threads).
_drilling = 0
_drilling_lock = threading.Lock()


def begin_use() -> None:
    """Called before a drill makes its scratch; `end_use` once it is removed."""
    global _drilling
    with _drilling_lock:
        _drilling += 1


def end_use() -> None:
    global _drilling
    with _drilling_lock:
        _drilling -= 1


def _drilling_here() -> bool:
    with _drilling_lock:
        return _drilling > 0


# -- the verdict (pure) -----------------------------------------------------------


def unknown_owner_age(config: Config) -> timedelta:
    """How old a scratch whose owner cannot be checked must be before it is removed."""
    slowest = max((t.rto for t in config.tiers.values()), default=timedelta(0))
    return max(MIN_UNKNOWN_OWNER_AGE, 2 * slowest)


def judge(owner: Owner, here: Owner, running: int | None, drilling_here: bool,
          now: datetime, min_age: timedelta) -> tuple[bool, str, str]:
    """(removable, who made it, why) for a scratch made by `owner`, seen from `here`.

    `running` is the start time of the process that has `owner.pid` on this
    host now (None: none, or a zombie); `drilling_here` whether `here` runs a
    drill at the moment.
    """
    if owner.incarnation == here.incarnation:
        if (owner.pid, owner.start) == (here.pid, here.start):
            who = f"this process (pid {owner.pid})"
            if drilling_here:
                return False, who, "this process is running a drill"
            return True, who, "this process runs no drill now"
        who = f"pid {owner.pid} on this host"
        if running == owner.start:
            return False, who, "its process is running"
        return True, who, "its process has ended"
    made = datetime.combine(owner.day + timedelta(days=1), time(), UTC)  # the day's end
    removable, why = by_age(f"made on {owner.day}", made, now, min_age)
    return removable, f"another host, boot or container ({owner.incarnation})", why


def by_age(made_text: str, made: datetime, now: datetime,
           min_age: timedelta) -> tuple[bool, str]:
    """(removable, why) for a scratch whose owner cannot be checked, made by `made`."""
    if now - made >= min_age:
        return True, f"{made_text}, more than {format_duration(min_age)} ago; " \
                     "its process cannot be checked from here"
    return False, f"{made_text}; its process cannot be checked from here, so it is kept " \
                  f"until it is {format_duration(min_age)} old"


# -- the cleanup (shell) --------------------------------------------------------


@dataclass
class Leftover:
    """One scratch found before a drill run, and what became of it."""

    kind: str  # "database" or "folder"
    scratch: str  # postgres://host:port/name (no password) or the folder's path
    owner: str  # who made it, as far as can be told
    reason: str  # why it was removed, or kept

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Cleanup:
    """What `clean_leftovers` removed, kept (with why) and could not check."""

    removed: list[Leftover] = field(default_factory=list)
    kept: list[Leftover] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"removed": [x.to_dict() for x in self.removed],
                "kept": [x.to_dict() for x in self.kept], "errors": list(self.errors)}


def scratch_root(config: Config) -> Path:
    return config.drills.scratch_dir or config.daemon.state_dir / statefs.DRILL_SCRATCH


def ensure_scratch_root(config: Config) -> Path:
    """The scratch folder, made 0700 if missing; in the state folder, through no link."""
    if config.drills.scratch_dir is None:
        return statefs.ensure_folder(config.daemon.state_dir, statefs.DRILL_SCRATCH)
    config.drills.scratch_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return config.drills.scratch_dir


def leftover_judge(rt: Runtime) -> tuple[LeftoverJudge, Cleanup]:
    """For a restore: the judge of the scratch and staging databases killed drills and
    restores left on its target's server (sources.base.RestoreOptions.leftovers), and
    what it removed and kept."""
    now = rt.clock()
    here = this_process(now)
    if process_start(here.pid) is None:  # no /proc: nothing here can be checked
        here = replace(here, incarnation="")
    out = Cleanup()
    return _Databases(_Context(rt, here, now, unknown_owner_age(rt.config), out)), out


def clean_leftovers(rt: Runtime, sources: Sequence[SourceConfig]) -> Cleanup:
    """Remove the scratch that killed drills left: in the scratch folder, and where
    the kinds of `sources` keep theirs (postgres: the drill servers). Never raises
    for what it cannot check or remove: that is logged and listed in `errors`."""
    cfg = rt.config
    now = rt.clock()
    here = this_process(now)
    if process_start(here.pid) is None:  # no /proc: nothing here can be checked
        here = replace(here, incarnation="")
    out = Cleanup()
    ctx = _Context(rt, here, now, unknown_owner_age(cfg), out)
    by_kind: dict[str, list[SourceConfig]] = {}
    for s in sources:
        by_kind.setdefault(s.kind, []).append(s)
    for kind, of_kind in by_kind.items():
        kind_for(kind).clean_leftovers(of_kind, cfg.drills.postgres_dsn, _Databases(ctx))
    _clean_folders(ctx, scratch_root(cfg))
    return out


@dataclass
class _Context:
    rt: Runtime
    here: Owner
    now: datetime
    min_age: timedelta
    out: Cleanup

    def verdict(self, owner: Owner) -> tuple[bool, str, str]:
        same = owner.incarnation == self.here.incarnation
        running = process_start(owner.pid) if same else None
        return judge(owner, self.here, running, _drilling_here(), self.now, self.min_age)

    def removed(self, item: Leftover) -> None:
        staging = item.kind.startswith("restore")
        log.warning("removed %s %s left by %s: %s",
                    "restore staging" if staging else "drill scratch", item.scratch,
                    item.owner, item.reason)
        self.rt.record_event("restore.staging_removed" if staging else "drill.scratch_removed",
                             **item.to_dict())
        self.out.removed.append(item)

    def kept(self, item: Leftover) -> None:
        log.info("kept drill scratch %s of %s: %s", item.scratch, item.owner, item.reason)
        self.out.kept.append(item)

    def error(self, text: str) -> None:
        log.warning("%s", text)
        self.out.errors.append(text)


class _Databases:
    """The verdicts a kind asks for on the scratch databases it finds (base.LeftoverJudge):
    drills' scratch databases and `drctl restore`'s staging databases, by the same rules."""

    # SCRATCH_DB_PREFIX and STAGING_DB_PREFIX: names that match neither pattern
    # (verdict None) are never touched.
    database_like = "drdaemon\\_%"

    def __init__(self, ctx: _Context) -> None:
        self.ctx = ctx
        self.kind = "database"

    def verdict(self, name: str, where: str) -> tuple[bool, str, str] | None:
        staging = name.startswith(STAGING_DB_PREFIX)
        # What kept/removed, called next for this name, report it as.
        self.kind = "restore staging database" if staging else "database"
        match = (_STAGING_RE_DB if staging else _DB_RE).fullmatch(name)
        owner = Owner.parse(match) if match else None
        if owner is None:
            if not staging and _LEGACY_DB_RE.fullmatch(name):
                self.kept(where, "unknown (a name of an earlier version)",
                          "the name tells neither its process nor its age: drop it by "
                          "hand when no drill runs")
            return None
        return self.ctx.verdict(owner)

    def kept(self, where: str, who: str, why: str) -> None:
        self.ctx.kept(Leftover(self.kind, where, who, why))

    def removed(self, where: str, who: str, why: str) -> None:
        self.ctx.removed(Leftover(self.kind, where, who, why))

    def error(self, text: str) -> None:
        self.ctx.error(text)


def _clean_folders(ctx: _Context, root: Path) -> None:
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return
    except OSError as exc:
        ctx.error(f"cannot look for leftover drill scratch in {root}: {exc.strerror or exc}")
        return
    for name in names:
        if name.startswith(SCRATCH_DIR_PREFIX):
            _clean_folder(ctx, root / name)


def _clean_folder(ctx: _Context, path: Path) -> None:
    match = _DIR_RE.fullmatch(path.name)
    owner = Owner.parse(match) if match else None
    legacy = owner is None and _LEGACY_DIR_RE.fullmatch(path.name) is not None
    if owner is None and not legacy:
        return
    try:
        st = path.lstat()
        if not stat.S_ISDIR(st.st_mode):
            return  # a file or a link: drills make neither
        # A folder of an earlier version is taken for a drill's only if it holds
        # nothing but what a directory drill writes.
        if legacy and not all(_STAGING_RE.fullmatch(n) for n in os.listdir(path)):
            return
    except OSError:
        return
    if st.st_uid != os.getuid():
        ctx.kept(Leftover("folder", str(path), f"user id {st.st_uid}",
                          "it belongs to another user"))
        return
    if owner is not None:
        removable, who, why = ctx.verdict(owner)
    else:
        made = datetime.fromtimestamp(st.st_mtime, UTC)
        who = "unknown (a name of an earlier version)"
        removable, why = by_age(f"last changed {made:%Y-%m-%d %H:%M} UTC", made, ctx.now,
                                ctx.min_age)
    if not removable:
        ctx.kept(Leftover("folder", str(path), who, why))
        return
    try:
        remove_tree(path)
    except OSError as exc:
        ctx.error(f"cannot delete drill scratch {path} ({why}): {exc.strerror or exc}")
        return
    ctx.removed(Leftover("folder", str(path), who, why))
