"""The restore service: stream a snapshot back, verified, into a staged target.

download -> sha256/size check -> age decrypt -> zstd decompress (bounded by the
manifest's plaintext size) -> pg_restore or tar extraction into a staging
place -> verification -> commit (rename into place). If a region is
unreachable or its copy is corrupt, the next region is tried; if the target
refuses an authentic copy (a missing role, no CREATEDB), the restore stops
at once and says what the target lacks.
"""

from __future__ import annotations

import dataclasses
import getpass
import re
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, NoReturn, cast

import pyrage
import zstandard
from pyrage import x25519

from . import facts as facts_object
from . import statefs, tenant_keys
from .catalog import Resolved, SnapshotEntry, read_manifest, resolve_ref
from .config import SourceConfig
from .drills import scratch as scratch_names
from .drills.scratch import Cleanup
from .erasure_records import refuse_if_erased
from .errors import DrError, IntegrityError, SourceError, UsageError
from .keys import describe_recipients
from .manifest import Manifest
from .runtime import Runtime
from .sources import kind_for, kinds
from .sources.base import LeftoverJudge, RestoreOptions, Sink
from .sources.pg_recreate import Policy
from .storage import NotFound, ObjectStore, StorageError
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
              jobs: int | None = None, scratch_dir: Path | None = None,
              no_owner: bool = False, policy: Policy | None = None,
              identities: Sequence[x25519.Identity] = (), start_port: int | None = None,
              owner: str | None = None, with_roles: bool = False,
              staging_prefix: str | None = None,
              leftovers: LeftoverJudge | None = None) -> Sink:
    """A staged restore target for the snapshot's kind (`jobs`: parallel pg_restore;
    `no_owner`: objects owned by the restoring role, no GRANT/REVOKE; `policy`: what a
    postgres target may lack of the recorded database properties; `identities` open
    their sealed settings; `start_port`: a restored cluster is started on that port;
    `owner`: the OS user a restored cluster is given to; `with_roles`: create the roles
    the snapshot names that the target lacks first, `m`'s facts then complete, its
    facts object's too; `staging_prefix`: names the staging after this process;
    `leftovers`: judges what killed restores left beside the target, removed first)."""
    if m.kind != source.kind:
        raise UsageError(f"snapshot {m.id} is a {m.kind} snapshot, source {source.name} "
                         f"is {source.kind}")
    options = RestoreOptions(force, jobs, scratch_dir, no_owner, policy, identities,
                             start_port=start_port, owner=owner, with_roles=with_roles,
                             staging_prefix=staging_prefix, leftovers=leftovers)
    return kind_for(source.kind).open_sink(source, m, target, options)


def _kinds_taking(option: str) -> str:
    """The kinds that take a restore option, for a message: "postgres"."""
    return " or ".join(k.name for k in kinds() if option in k.restore_options)


def stream_into(store: ObjectStore, m: Manifest, identities: Sequence[x25519.Identity],
                sink: Sink, on_progress: Progress | None = None,
                labels: Mapping[str, str] | None = None) -> None:
    """Stream one region's copy of snapshot `m` into `sink` and verify it completely.

    `labels` (Runtime.recipient_labels) names the recipients when no identity fits.

    Raises IntegrityError (corrupt/replaced object), StorageError (region
    problem), TargetError (the target refused an authentic copy) or
    UsageError (no identity fits).
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
                if m.tenant_key is not None:
                    # Given the very key the manifest names (tenant_keys.snapshot_identities):
                    # the object is not the one recorded, as its sha256 shows.
                    _read_to_the_end(reader)
                raise UsageError(f"no identity given can decrypt {what}; it is encrypted to "
                                 f"{describe_recipients(m.recipients, labels or {})}: "
                                 "give the identity of one of these") from None
            cause = first_error(reader, limit)
            if cause is None:
                raise DrError(f"{what} cannot be decrypted: {exc}") from None
            _raise_consumer_reason(sink, cause, reader)
        except zstandard.ZstdError as exc:
            raise DrError(f"{what} cannot be decompressed: {exc}") from None
        except OSError as exc:
            cause = first_error(reader, limit)
            if cause is None:
                # Neither our reader nor our writer failed: this is age's own
                # chunk authentication ("decryption error"), i.e. corrupt data.
                raise IntegrityError(f"{what} is corrupt: age authentication failed "
                                     f"({exc})") from None
            _raise_consumer_reason(sink, cause, reader)  # e.g. a broken pipe on the final flush
    if not reader.verified:
        reader.check()
    if limit.count != m.plaintext_size:
        raise DrError(f"{what} decompressed to {limit.count} bytes, manifest says "
                      f"{m.plaintext_size}")
    try:
        sink.complete()
    except SourceError as exc:  # the copy verified: the target refused it
        raise TargetError(str(exc)) from None


def _raise_consumer_reason(sink: Sink, cause: BaseException, reader: VerifyingReader) -> NoReturn:
    """Raise why the stream stopped: the region's copy, or the consumer (pg_restore, tar, disk).

    A broken pipe only says the consumer stopped: its own error says why. A
    consumer's failure is the target's (TargetError, no other region would
    help) only if the copy is authentic: an object replaced by another valid
    age file can make pg_restore fail before its sha256 is known, so the rest
    of it is read and checked first (IntegrityError if it does not match).
    """
    if cause is reader.error or isinstance(cause, IntegrityError):
        raise cause  # the region's copy: unreadable, corrupt, or larger than recorded
    try:
        if isinstance(cause, BrokenPipeError):
            sink.complete()  # raises the consumer's error, if it has one
        raise cause
    except (SourceError, OSError) as exc:
        reason = str(exc) if isinstance(exc, SourceError) else (exc.strerror or str(exc))
        _read_to_the_end(reader)
        raise TargetError(reason) from None


def _read_to_the_end(reader: VerifyingReader) -> None:
    """Read the rest of a stored object, discarding it: raises unless it matches its manifest."""
    while not reader.verified:
        reader.read(1 << 20)


class TargetError(DrError):
    """The restore target refused an authentic snapshot: another region's copy would not help."""


# What a target lacks, from its error text, and what the operator can do about it.
_TARGET_HINTS = (
    (re.compile(r'role "([^"]+)" does not exist'),
     'the target server has no role "{0}": create it (list the roles the snapshot needs '
     "with pg_restore -l, see runbooks/restore-one-database.md) or restore with --no-owner"),
    (re.compile(r"permission denied to create database"),
     "the target role lacks CREATEDB: grant it, or restore as a role that has it"),
    (re.compile(r'database "([^"]+)" is being accessed by other users'),
     'the target database "{0}" is in use: disconnect its clients, then restore again'),
    (re.compile(r"must be owner of|permission denied"),
     "the target role lacks a privilege the snapshot needs: restore as its owner or a "
     "superuser, or with --no-owner"),
)


def target_hint(text: str) -> str:
    """Pure: what the target lacks, from a target-side error text ("" if unknown)."""
    for pattern, hint in _TARGET_HINTS:
        m = pattern.search(text)
        if m:
            return hint.format(*m.groups())
    return ""


def _target_failure(rt: Runtime, entry: SnapshotEntry, source: str, target: str, region: str,
                    reason: str, failed: dict[str, str]) -> TargetError:
    """Record a restore the target refused; the error to raise (naming what it lacks)."""
    rt.record_event("restore.failed", source=source, snapshot_id=entry.id, target=target,
                    failed_regions=failed, target_failure=reason)
    hint = target_hint(reason)
    return TargetError(f"restore of {entry.id} failed on the target, not in region {region} "
                       f"(no other region would help): {reason}" + (f" ({hint})" if hint else ""))


def _region_problem(exc: DrError) -> str:
    """Why a region's copy could not be used, as the operator should read it."""
    if isinstance(exc, StorageError) and not isinstance(exc, NotFound):
        return f"unreachable: {exc}"
    return str(exc) or exc.__class__.__name__


def restore(rt: Runtime, identities: Sequence[x25519.Identity], source_name: str, ref: str,
            target: str, *, region: str | None = None, force: bool = False,
            no_owner: bool = False, with_roles: bool = False, jobs: int | None = None,
            scratch_dir: Path | None = None,
            on_progress: Progress | None = None, policy: Policy | None = None,
            allow_older: bool = False, start_port: int | None = None,
            owner: str | None = None) -> RestoreResult:
    """Restore snapshot `ref` of a source to `target`, falling back across regions.

    "latest" never falls back to an older snapshot silently: when the newest
    listed one cannot be read anywhere it refuses (catalog.NewestUnreadable),
    unless `allow_older`, and then the result names what it skipped.
    `region`: that region only; it fails, saying why, rather than using another.
    A failure on the target (a missing role, no CREATEDB, the database in use)
    stops at once: another region's copy would fail the same way.
    `no_owner` (postgres only): pg_restore --no-owner --no-privileges.
    `with_roles` (postgres only): first create the roles the snapshot carries that the
    target server lacks (pg_role_copy.py); the result's notes say what it did.
    `jobs` (postgres only): the verified dump goes to a private file in
    `scratch_dir` (default: the state folder's `restore/`) for `pg_restore --jobs`.
    `policy` (postgres only): what to do where the target lacks a role or locale
    the snapshot's database properties need (default: stop and say so).
    `start_port` (postgres-cluster only): start the restored cluster on 127.0.0.1 at
    that port; `owner` (postgres-cluster only): the OS user it is given to.
    """
    source = rt.config.source(source_name)
    refuse_if_erased(rt, source.tenant)  # whatever identity was given
    kind = kind_for(source.kind)
    for flag, option, given in (("--jobs", "jobs", jobs is not None),
                                ("--no-owner", "no_owner", no_owner),
                                ("--start", "start", start_port is not None),
                                ("--owner", "owner", owner is not None),
                                ("--with-roles", "with_roles", with_roles)):
        if given and option not in kind.restore_options:
            raise UsageError(f"{flag} applies to {_kinds_taking(option)} sources only; "
                             f"{source.name} is a {source.kind} source")
    if scratch_dir is not None and jobs is None:
        raise UsageError("--scratch-dir is used only with --jobs")
    if allow_older and ref != "latest":
        raise UsageError("--allow-older applies to 'latest' only")
    kind.check_target(source, target)  # a bad target (or one with a password) fails first
    state_dir = rt.config.daemon.state_dir
    scratch = scratch_dir or (statefs.ensure_folder(state_dir, statefs.RESTORE_SCRATCH)
                              if jobs is not None else state_dir / statefs.RESTORE_SCRATCH)
    stores = [rt.store(region)] if region is not None else list(rt.stores)
    chosen = resolve_ref(rt, source.name, ref, allow_older=allow_older)
    # What killed restores and drills left on the target's server goes (their
    # owners' liveness judged as drill scratch is); this restore's own staging is
    # kept from any other cleanup in this process while it runs.
    judge, cleaned = scratch_names.leftover_judge(rt)
    scratch_names.begin_use()
    try:
        return _restore_from(rt, identities, source, chosen, target, stores, force, no_owner,
                             jobs, scratch, on_progress, policy, region, judge, cleaned,
                             with_roles=with_roles, start_port=start_port, owner=owner)
    finally:
        scratch_names.end_use()


def _restore_from(rt: Runtime, identities: Sequence[x25519.Identity], source: SourceConfig,
                  chosen: Resolved, target: str, stores: list[ObjectStore], force: bool,
                  no_owner: bool, jobs: int | None, scratch: Path,
                  on_progress: Progress | None, policy: Policy | None, region: str | None,
                  judge: LeftoverJudge, cleaned: Cleanup, *, with_roles: bool,
                  start_port: int | None, owner: str | None) -> RestoreResult:
    entry = chosen.entry
    older = chosen.note()
    failed: dict[str, str] = {}
    for store in stores:
        if store.name not in entry.regions:
            failed[store.name] = entry.problems.get(store.name) or (
                f"unreachable: {entry.unreachable[store.name]}"
                if store.name in entry.unreachable else "does not hold this snapshot")
            continue
        started = time.monotonic()
        try:
            m = read_manifest(rt, store, source.name, entry.id)
        except DrError as exc:
            failed[store.name] = _region_problem(exc)
            continue
        try:
            # The identities that open this snapshot: a tenant key is unwrapped here.
            keys = tenant_keys.snapshot_identities(rt, m, identities)
        except DrError as exc:  # no identity fits (UsageError: stop), or no copy fits here
            if isinstance(exc, UsageError):
                raise
            failed[store.name] = _region_problem(exc)
            continue
        if with_roles:  # the sealed roles are in the facts object
            try:
                m = dataclasses.replace(m, facts=facts_object.full_facts(store, m))
            except DrError as exc:
                failed[store.name] = _region_problem(exc)
                continue
        try:
            sink = open_sink(source, m, target, force, jobs, scratch, no_owner, policy, keys,
                             start_port, owner, with_roles,
                             scratch_names.staging_prefix(scratch_names.this_process(
                                 rt.clock())), judge)
        except SourceError as exc:  # cannot connect, create the staging database, ...
            raise _target_failure(rt, entry, source.name, target, store.name, str(exc),
                                  failed) from None
        try:
            stream_into(store, m, keys, sink, on_progress, rt.recipient_labels())
        except TargetError as exc:
            sink.discard()
            raise _target_failure(rt, entry, source.name, target, store.name, str(exc),
                                  failed) from None
        except UsageError:
            sink.discard()
            raise
        except (DrError, OSError) as exc:
            sink.discard()
            failed[store.name] = (_region_problem(exc) if isinstance(exc, DrError)
                                  else str(exc) or exc.__class__.__name__)
            continue
        except BaseException:  # e.g. Ctrl-C: nothing staged may stay behind
            sink.discard()
            raise
        try:
            # The copy is verified; a failure to move it into place is about the
            # target (e.g. clients still connected), so no other region would help.
            where = sink.commit()
        except SourceError as exc:
            sink.discard()
            raise _target_failure(rt, entry, source.name, target, store.name, str(exc),
                                  failed) from None
        except BaseException:
            sink.discard()
            raise
        removed = [f"removed the {x.kind} {x.scratch} left by {x.owner} ({x.reason})"
                   for x in cleaned.removed]
        result = RestoreResult(source.name, m.id, store.name, where, m.size,
                               time.monotonic() - started, failed,
                               ([older] if older else []) + removed + list(sink.notes),
                               [e.id for e in chosen.skipped])
        rt.record_event("restore", user=getpass.getuser(), host=socket.gethostname(),
                        **result.to_dict())
        return result
    rt.record_event("restore.failed", source=source.name, snapshot_id=entry.id, target=target,
                    failed_regions=failed)
    reasons = "; ".join(f"{k}: {v}" for k, v in failed.items())
    if region is not None:
        raise DrError(f"restore of {entry.id} from region {region} failed: {reasons} "
                      "(leave out --region to use the other regions)")
    raise DrError(f"restore of {entry.id} failed in every region: {reasons}")
