"""The restore service: stream a snapshot back, verified, into a staged target.

download -> sha256/size check -> age decrypt -> zstd decompress (bounded by the
manifest's plaintext size) -> pg_restore or tar extraction into a staging
place -> verification -> commit (rename into place). If a region is
unreachable or its copy is corrupt, the next region is tried.
"""

from __future__ import annotations

import getpass
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, NoReturn, cast

import pyrage
import zstandard
from pyrage import x25519

from .catalog import read_manifest, resolve_ref
from .config import SourceConfig
from .errors import DrError, IntegrityError, UsageError
from .manifest import Manifest
from .runtime import Runtime
from .sources.base import Sink
from .sources.directory import DirectorySink
from .sources.postgres import PostgresSink
from .storage import ObjectStore
from .streams import LimitWriter, VerifyingReader, buffered, first_error

Progress = Callable[[int, int], None]  # (bytes just read, total bytes)


@dataclass
class RestoreResult:
    source: str
    snapshot_id: str
    region: str
    target: str
    bytes: int
    seconds: float
    failed_regions: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # "latest" with allow_older: the newer snapshots that no region could read, newest first
    skipped_unreadable: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def open_sink(source: SourceConfig, m: Manifest, target: str, force: bool,
              jobs: int | None = None, scratch_dir: Path | None = None) -> Sink:
    """A staged restore target for the snapshot's kind (`jobs`: parallel pg_restore)."""
    if m.kind != source.kind:
        raise UsageError(f"snapshot {m.id} is a {m.kind} snapshot, source {source.name} "
                         f"is {source.kind}")
    if source.kind == "postgres":
        assert source.dsn is not None
        return PostgresSink(source.dsn, target, force, jobs=jobs, scratch_dir=scratch_dir,
                            size_hint=m.plaintext_size)
    return DirectorySink(Path(target), m.id, m.facts)


def stream_into(store: ObjectStore, m: Manifest, identities: Sequence[x25519.Identity],
                sink: Sink, on_progress: Progress | None = None) -> None:
    """Stream one region's copy of snapshot `m` into `sink` and verify it completely.

    Raises IntegrityError (corrupt/replaced object), StorageError (region
    problem), SourceError (the target refused it) or UsageError (no identity fits).
    """
    what = f"snapshot {m.id} in region {store.name}"
    progress = (lambda n: on_progress(n, m.size)) if on_progress else None
    with store.open_read(m.data_name) as raw:
        reader = VerifyingReader(raw, m.size, m.sha256, what, on_read=progress)
        limit = LimitWriter(sink.writer, m.plaintext_size, what)
        plain = zstandard.ZstdDecompressor().stream_writer(cast(BinaryIO, limit),
                                                           write_size=1 << 20)
        try:
            pyrage.decrypt_io(buffered(reader), plain, list(identities))
            plain.flush()
        except pyrage.DecryptError as exc:
            if "no matching keys" in str(exc).lower():
                raise UsageError(f"no identity given can decrypt {what}; it is encrypted to "
                                 f"{', '.join(m.recipients)}") from None
            cause = first_error(reader, limit)
            if cause is None:
                raise DrError(f"{what} cannot be decrypted: {exc}") from None
            _raise_consumer_reason(sink, cause)
        except zstandard.ZstdError as exc:
            raise DrError(f"{what} cannot be decompressed: {exc}") from None
        except OSError as exc:
            cause = first_error(reader, limit)
            if cause is None:
                # Neither our reader nor our writer failed: this is age's own
                # chunk authentication ("decryption error"), i.e. corrupt data.
                raise IntegrityError(f"{what} is corrupt: age authentication failed "
                                     f"({exc})") from None
            _raise_consumer_reason(sink, cause)  # e.g. a broken pipe on the final flush
    if not reader.verified:
        reader.check()
    if limit.count != m.plaintext_size:
        raise DrError(f"{what} decompressed to {limit.count} bytes, manifest says "
                      f"{m.plaintext_size}")
    sink.complete()


def _raise_consumer_reason(sink: Sink, cause: BaseException) -> NoReturn:
    """A broken pipe only says the consumer (pg_restore, tar) stopped: its own error says why.

    Any other write error (e.g. a full scratch disk) is the reason itself.
    """
    if isinstance(cause, BrokenPipeError):
        sink.complete()  # raises the consumer's error, if it has one
    raise cause


def restore(rt: Runtime, identities: Sequence[x25519.Identity], source_name: str, ref: str,
            target: str, *, region: str | None = None, force: bool = False,
            jobs: int | None = None, scratch_dir: Path | None = None,
            on_progress: Progress | None = None, allow_older: bool = False) -> RestoreResult:
    """Restore snapshot `ref` of a source to `target`, falling back across regions.

    "latest" never falls back to an older snapshot silently: when the newest
    listed one cannot be read anywhere it refuses (catalog.NewestUnreadable),
    unless `allow_older`, and then the result names what it skipped.
    `jobs` (postgres only): the verified dump goes to a private file in
    `scratch_dir` (default: the state folder's `restore/`) for `pg_restore --jobs`.
    """
    source = rt.config.source(source_name)
    if jobs is not None and source.kind != "postgres":
        raise UsageError(f"--jobs applies to postgres sources only; {source.name} is a "
                         f"{source.kind} source")
    if scratch_dir is not None and jobs is None:
        raise UsageError("--scratch-dir is used only with --jobs")
    if allow_older and ref != "latest":
        raise UsageError("--allow-older applies to 'latest' only")
    scratch = scratch_dir or rt.config.daemon.state_dir / "restore"
    chosen = resolve_ref(rt, source.name, ref, allow_older=allow_older)
    entry = chosen.entry
    older = chosen.note()
    failed: dict[str, str] = {}
    for store in rt.ordered_stores(region):
        if store.name not in entry.regions:
            failed[store.name] = entry.problems.get(store.name, "does not hold this snapshot")
            continue
        started = time.monotonic()
        try:
            m = read_manifest(rt, store, source.name, entry.id)
            sink = open_sink(source, m, target, force, jobs, scratch)
        except UsageError:
            raise
        except DrError as exc:
            failed[store.name] = str(exc)
            continue
        try:
            stream_into(store, m, identities, sink, on_progress)
        except UsageError:
            sink.discard()
            raise
        except (DrError, OSError) as exc:
            sink.discard()
            failed[store.name] = str(exc) or exc.__class__.__name__
            continue
        except BaseException:  # e.g. Ctrl-C: nothing staged may stay behind
            sink.discard()
            raise
        try:
            # The copy is verified; a failure to move it into place is about the
            # target (e.g. clients still connected), so no other region would help.
            where = sink.commit()
        except BaseException:
            sink.discard()
            raise
        result = RestoreResult(source.name, m.id, store.name, where, m.size,
                               time.monotonic() - started, failed,
                               ([older] if older else []) + list(sink.notes),
                               [e.id for e in chosen.skipped])
        rt.record_event("restore", user=getpass.getuser(), host=socket.gethostname(),
                        **result.to_dict())
        return result
    rt.record_event("restore.failed", source=source.name, snapshot_id=entry.id, target=target,
                    failed_regions=failed)
    raise DrError(f"restore of {entry.id} failed in every region: " + "; ".join(
        f"{k}: {v}" for k, v in failed.items()))
