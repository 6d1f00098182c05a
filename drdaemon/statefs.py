"""Files in the state folder, opened so that nothing planted there is followed.

Everything drdaemon keeps locally (the audit log, drill records, locks, each
source's last outcome, in-flight markers, prune's sightings and gauges) goes
through here. Each access walks from the state folder one name at a time with
`O_NOFOLLOW` relative to the folder above (openat), so a symbolic link planted
as a file or a folder is refused, never followed; temp-then-rename writes
happen inside the folder descriptor, so a swapped folder cannot redirect them.

The state folder and every folder in it must be owned by the running user and
not writable by group or others (new ones are made 0700, files 0600); the
folders above it follow the rule of filetrust.py. A refusal is one line
(`UnsafeState`, exit 2) naming the path and what to do.

The names inside the state folder are defined here once (docs/format.md, "The
state folder"); the modules that own each file say what is in it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import stat
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path, PurePosixPath

from .errors import UsageError
from .filetrust import check_folder_chain

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

# -- the state folder's layout ---------------------------------------------------

AUDIT_LOG = "audit/audit.jsonl"  # the tamper-evident log (audit.py)
AUDIT_MIRROR_LOCK = "audit/mirror.lock"  # one copy to the regions at a time
DRILL_RECORDS = "drills/drills.jsonl"  # one JSON line per drill (drills/records.py)
DRILL_SCRATCH = "drills/scratch"  # drills restore here unless [drills] scratch_dir
INFLIGHT = "inflight"  # a marker per snapshot being uploaded (state.py)
ORPHAN_SIGHTINGS = "prune/orphans.json"  # when each orphan was first seen (orphans.py)
ORPHAN_METRICS = "prune/orphan-metrics.json"  # the last prune's orphan gauges (metrics)
MANIFEST_CACHE = "cache/manifests"  # manifests as stored, by region (manifest_cache.py)
RESTORE_SCRATCH = "restore"  # the scratch copy of `drctl restore --jobs`
RECOVERY = "recovery"  # what each `drctl recovery run` finished (recovery.py)
OUTCOMES = "sources"  # each source's last outcome (state.py)
TENANTS = "tenants"  # each tenant's lifecycle, keys and erasures
ERASURE_JOURNAL = "journal.jsonl"  # an erasure begun and not finished (erasure.py)


def lock_file(name: str) -> str:
    """The lock file of one kind of work (locks.py)."""
    return f"locks/{name}.lock"


def outcome_file(source: str) -> str:
    """The last outcome of one source's snapshots (state.py)."""
    return f"{OUTCOMES}/{source}.json"


def tenant_lifecycle_file(tenant: str) -> str:
    """A tenant's offboarding, hold and erasure state (lifecycle.py); `tenant` is a
    validated name."""
    return f"tenants/{tenant}/lifecycle.json"


def tenant_lifecycle_lock(tenant: str) -> str:
    """The flock of read-modify-writes of that state (lifecycle.update)."""
    return f"tenants/{tenant}/lifecycle.lock"


def tenant_keys_folder(tenant: str) -> str:
    """The state folder's copies of a tenant's wrapped keys (tenant_keys.py)."""
    return f"tenants/{tenant}/keys"


def erasure_folder(tenant: str) -> str:
    """A tenant's erasure certificates and its erasure journal (erasure.py)."""
    return f"tenants/{tenant}/erasure"


def inflight_marker(snapshot_id: str) -> str:
    """The marker of one snapshot's uploads in flight (state.py)."""
    return f"{INFLIGHT}/{snapshot_id}"


class UnsafeState(UsageError):
    """The state folder, or something in it, could have been changed by someone else."""


def state_problem(st: os.stat_result, me: int, folder: bool) -> str | None:
    """Why an entry of the state folder is unsafe, or None (pure)."""
    if folder and not stat.S_ISDIR(st.st_mode):
        return "is not a folder"
    if not folder and not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_uid != me:
        return f"is owned by user id {st.st_uid}, not by the running user (id {me})"
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        return f"is writable by group or others (mode {mode:04o}); run: chmod go-w"
    return None


def _refuse_if(st: os.stat_result, path: Path, folder: bool) -> None:
    problem = state_problem(st, os.geteuid(), folder)
    if problem:
        raise UnsafeState(f"state folder: {path} {problem}")


def _parts(rel: str) -> list[str]:
    parts = PurePosixPath(rel).parts
    if not parts or any(p in ("", ".", "..", "/") for p in parts):
        raise ValueError(f"not a relative path inside the state folder: {rel!r}")
    return list(parts)


def prepare(state_dir: Path) -> None:
    """Make the state folder (0700) if it is missing, and refuse it if it is unsafe.

    Called once when a runtime opens; every access below checks again.
    """
    with suppress(FileExistsError):
        state_dir.mkdir(mode=0o700, parents=True)
    check_folder_chain(state_dir, "state folder")
    with _open_root(state_dir):
        pass


@contextmanager
def _open_root(state_dir: Path, create: bool = False) -> Iterator[int]:
    # The configured path itself may be reached through links (the operator
    # chose it); below it nothing is followed.
    if create:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _refuse_if(os.fstat(fd), state_dir, folder=True)
        yield fd
    finally:
        os.close(fd)


def _open_child_dir(parent: int, name: str, path: Path, create: bool) -> int:
    for _ in range(2):
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise
            with suppress(FileExistsError):  # made meanwhile by another process: open it
                os.mkdir(name, 0o700, dir_fd=parent)
            continue
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise UnsafeState(f"state folder: {path} is a symbolic link or not a folder; "
                                  "refusing to follow it (remove it)") from None
            raise
        try:
            _refuse_if(os.fstat(fd), path, folder=True)
        except BaseException:
            os.close(fd)
            raise
        return fd
    raise FileNotFoundError(errno.ENOENT, "vanished while being made", str(path))


@contextmanager
def folder(state_dir: Path, rel: str | None, create: bool = True) -> Iterator[int]:
    """A descriptor of `state_dir/rel` (the state folder itself if `rel` is None).

    Folders missing on the way are made 0700 if `create`, else FileNotFoundError.
    """
    with _open_root(state_dir, create) as root:
        fd = os.dup(root)
        path = state_dir
        try:
            for name in _parts(rel) if rel else []:
                path = path / name
                child = _open_child_dir(fd, name, path, create)
                os.close(fd)
                fd = child
            yield fd
        finally:
            os.close(fd)


def _split(rel: str) -> tuple[str | None, str]:
    parts = _parts(rel)
    return ("/".join(parts[:-1]) or None), parts[-1]


def _open_in(dfd: int, name: str, path: Path, flags: int, mode: int) -> int:
    try:
        # O_NONBLOCK: a FIFO planted here must not hang the open.
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode,
                     dir_fd=dfd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeState(f"state folder: {path} is a symbolic link; refusing to follow "
                              "it (remove it)") from None
        raise
    try:
        _refuse_if(os.fstat(fd), path, folder=False)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_file(state_dir: Path, rel: str, flags: int, mode: int = 0o600) -> int:
    """An fd of the state file `rel` (e.g. "audit/audit.jsonl"), opened with O_NOFOLLOW.

    With O_CREAT the folders on the way are made (0700) and a new file gets
    `mode`; without it a missing file or folder raises FileNotFoundError.
    """
    parent, name = _split(rel)
    with folder(state_dir, parent, create=bool(flags & os.O_CREAT)) as dfd:
        return _open_in(dfd, name, state_dir / rel, flags, mode)


def read_bytes(state_dir: Path, rel: str) -> bytes:
    """The content of the state file `rel`; FileNotFoundError if there is none."""
    fd = open_file(state_dir, rel, os.O_RDONLY)
    with os.fdopen(fd, "rb") as fh:
        return fh.read()


def read_many(state_dir: Path, rel: str, names: Iterable[str]) -> dict[str, bytes]:
    """The content of each of `names` in the state folder `rel` that exists, read through
    one descriptor of the folder (the folders above it are opened and checked once, not
    once a file); none if the folder does not exist. Each file is checked as
    `read_bytes` checks it."""
    found: dict[str, bytes] = {}
    try:
        with folder(state_dir, rel, create=False) as dfd:
            for name in names:
                try:
                    fd = _open_in(dfd, name, state_dir / rel / name, os.O_RDONLY, 0)
                except FileNotFoundError:
                    continue
                with os.fdopen(fd, "rb") as fh:
                    found[name] = fh.read()
    except FileNotFoundError:
        pass
    return found


def read_all(fd: int) -> bytes:
    """Everything in the open file `fd` (as long as it was when the read began)."""
    size = os.fstat(fd).st_size
    chunks, offset = [], 0
    while offset < size:
        chunk = os.pread(fd, min(1 << 20, size - offset), offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to `fd` (os.write may write less than asked)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


@contextmanager
def locked(state_dir: Path, rel: str, flags: int, lock: int = fcntl.LOCK_EX) -> Iterator[int]:
    """An fd of the state file `rel` (made if missing) holding flock `lock` until the
    block ends; closing it releases the lock."""
    fd = open_file(state_dir, rel, flags | os.O_CREAT)
    try:
        fcntl.flock(fd, lock)
        yield fd
    finally:
        os.close(fd)


@contextmanager
def appending(state_dir: Path, rel: str) -> Iterator[int]:
    """An fd to append to the state file `rel` under an exclusive flock.

    The daemon and any number of drctl processes append in turn, so lines are
    never interleaved; what the block wrote is fsynced before the lock goes, so
    a record is durable before the caller goes on.
    """
    with locked(state_dir, rel, os.O_RDWR | os.O_APPEND) as fd:
        yield fd
        os.fsync(fd)


def read_shared(state_dir: Path, rel: str) -> bytes:
    """The content of the state file `rel`, read under a shared flock so that no
    half-written append shows; FileNotFoundError if there is none."""
    fd = open_file(state_dir, rel, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        return read_all(fd)
    finally:
        os.close(fd)


def write_atomic(state_dir: Path, rel: str, data: bytes, *, durable: bool = True) -> None:
    """Replace the state file `rel` with `data`: readers see the old or the new file.

    The temp file is made and renamed inside the folder's descriptor, so a
    folder swapped for a link meanwhile cannot redirect the write. `durable`:
    fsync the file and the folder (a cache whose entries are checked on every
    read can do without, and a crash then costs it an entry at most).
    """
    parent, name = _split(rel)
    with folder(state_dir, parent) as dfd:
        tmp = f".{name}.{secrets.token_hex(6)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=dfd)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                if durable:
                    os.fsync(fh.fileno())
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dfd)
            raise
        if durable:
            os.fsync(dfd)


def write_many(state_dir: Path, rel: str, files: Mapping[str, bytes]) -> None:
    """Replace each file `name` of the state folder `rel` with its bytes, as write_atomic
    does but not durably (no fsync), through one descriptor of the folder: for caches
    whose entries are checked on every read."""
    if not files:
        return
    for name in files:
        if len(_parts(name)) != 1:
            raise ValueError(f"not a file name: {name!r}")
    with folder(state_dir, rel) as dfd:
        for name, data in files.items():
            tmp = f".{name}.{secrets.token_hex(6)}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=dfd)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except BaseException:
                with suppress(FileNotFoundError):
                    os.unlink(tmp, dir_fd=dfd)
                raise


def unlink(state_dir: Path, rel: str) -> None:
    """Remove the state file `rel` (the link itself, if it is one); missing is fine."""
    parent, name = _split(rel)
    try:
        with folder(state_dir, parent, create=False) as dfd:
            os.unlink(name, dir_fd=dfd)
    except FileNotFoundError:
        pass


def list_names(state_dir: Path, rel: str) -> list[str]:
    """The names in the state folder `rel` (none if it does not exist), sorted."""
    try:
        with folder(state_dir, rel, create=False) as dfd:
            return sorted(os.listdir(dfd))
    except FileNotFoundError:
        return []


def ensure_folder(state_dir: Path, rel: str) -> Path:
    """Make `state_dir/rel` (0700) if missing, refusing links and unsafe folders on the way.

    For folders handed to other code by path (scratch copies): once every
    folder on the way is the running user's alone, nobody else can swap one.
    """
    with folder(state_dir, rel):
        pass
    return state_dir / rel
