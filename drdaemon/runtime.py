"""Opening the resources every service needs, in one place.

The CLI and the daemon both build a Runtime from a config path and hand it to
the same service functions; nothing else opens stores or reads key files.
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import audit, shared_state, statefs, tenancy
from . import config as config_mod
from . import keys as keys_mod
from .audit_mirror import MirrorState, mirror
from .config import Config
from .keys import (
    ManifestKeySet,
    ensure_generated_keys,
    fingerprint,
    load_identities,
    load_manifest_key,
    read_unrecorded,
    recipient_labels,
    unrecorded_path,
)
from .manifest import Manifest
from .manifest_cache import ManifestCache
from .signing import SigningKey, generate_signing_key, load_signing_keys
from .storage import ObjectStore, open_store
from .tenant_key_record import KnownKey

log = logging.getLogger("drdaemon")

# Inside an audit batch, the log is mirrored at most this often (seconds) while
# records arrive, so that hours of drills or repairs do not wait for the end.
AUDIT_BATCH_MIRROR_INTERVAL = 60.0


def whoami() -> str:
    """The running user's name (the uid where there is none)."""
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry and no LOGNAME (a bare container)
        return f"uid {os.getuid()}"


_USER = whoami()
_HOST = socket.gethostname()


def current_user() -> str:
    """Who this process runs as, as audit records name them."""
    return _USER


def utcnow() -> datetime:
    """The wall clock, in UTC. Services take a clock so tests can inject one."""
    return datetime.now(UTC)


@dataclass
class Runtime:
    """A config with its regions opened; its secret keys are read when first used, so a
    check that needs none (`drctl audit verify --public-key`) never reads them."""

    config: Config
    stores: list[ObjectStore]
    clock: Callable[[], datetime] = field(default=utcnow)
    # Set when the daemon is asked to stop: streams in flight abort cleanly.
    stopping: threading.Event = field(default_factory=threading.Event)
    # Regions whose audit mirror failed are tried again later, not on every event.
    audit_mirror: MirrorState = field(default_factory=MirrorState)
    # Called right before a manifest commit or a deletion, with what is about to be
    # done: the daemon's cluster lock check (locks.ClusterLock.fence) raises Fenced
    # once this host no longer holds the lock; a no-op without `[daemon] lock_dsn`.
    fence: Callable[[str], None] = field(default=lambda _what: None)
    # Manifests the daemon's metrics refresh and watchdog authenticated before
    # (manifest_cache.ManifestCache); every other reader goes to storage.
    manifest_cache: ManifestCache = field(default_factory=ManifestCache)
    # What this process learnt while taking snapshots, so that the next snapshot need
    # not ask every region again: each tenant's key as found stored everywhere
    # (tenant_keys.ensure_key: looked at again after a while, or when the state
    # folder's keyring changes) and each source's newest manifest it wrote or read
    # (backup's shrink baseline: still listed every time, only not read again).
    known_keys: dict[str, KnownKey] = field(default_factory=dict)
    known_newest: dict[str, Manifest] = field(default_factory=dict)
    # False in a [cluster]'s processes: the chain lives in the lock database, every
    # record is durable there at once, and the active scheduler mirrors it to the
    # regions on an interval (cluster/daemon.py) instead of every job doing it.
    mirror_each_record: bool = True
    # This thread's audit batch (see audit_batch): depth, records not yet
    # mirrored, when it last mirrored.
    _audit_batch: threading.local = field(default_factory=threading.local, init=False,
                                          repr=False, compare=False)
    # The config file as it is on disk now, if it changed since it was loaded
    # (see configs_in_force): (stat key, config or None if it does not load).
    _on_disk: tuple[tuple[int, int, int], Config | None] | None = field(
        default=None, init=False, repr=False, compare=False)
    _on_disk_lock: threading.Lock = field(default_factory=threading.Lock, init=False,
                                          repr=False, compare=False)
    # The key files as loaded (see manifest_key, signing_key): once per runtime.
    _keys: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)
    _keys_lock: threading.Lock = field(default_factory=threading.Lock, init=False,
                                       repr=False, compare=False)

    @property
    def manifest_key(self) -> ManifestKeySet:
        """The manifest keys ([keys] manifest_key_file): the current one signs, retired
        ones verify."""
        with self._keys_lock:
            if "manifest" not in self._keys:
                self._keys["manifest"] = load_manifest_key(self.config.keys.manifest_key_file)
            key: ManifestKeySet = self._keys["manifest"]
        return key

    @property
    def signing_key(self) -> SigningKey | None:
        """The Ed25519 key that signs the audit log ([keys] signing_key_file), if any."""
        keys = self._signing_keys()
        return keys[0] if keys else None

    @property
    def retired_signing_keys(self) -> tuple[SigningKey, ...]:
        """Earlier signing keys kept after the current one in its file: one of them
        signs the audit log's handover to the current key."""
        return self._signing_keys()[1:]

    def _signing_keys(self) -> tuple[SigningKey, ...]:
        path = self.config.keys.signing_key_file
        if path is None:
            return ()
        with self._keys_lock:
            if "signing" not in self._keys:
                self._keys["signing"] = tuple(load_signing_keys(path))
            keys: tuple[SigningKey, ...] = self._keys["signing"]
        return keys

    def configs_in_force(self) -> list[Config]:
        """The loaded config, plus the config file as it reads now if it changed since.

        For the residency gate (tenancy.check_upload): a residency added to the
        file under a running daemon binds it at once, before any reload. A file
        that does not load now is passed over (and logged): `config check`
        reports it, and one typo must not stop every backup.
        """
        path = self.config.path
        try:
            st = os.stat(path)
        except OSError:
            return [self.config]
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._on_disk_lock:
            if self._on_disk is None or self._on_disk[0] != key:
                self._on_disk = (key, self._reload())
            fresh = self._on_disk[1]
        return [self.config] if fresh is None or fresh == self.config else [self.config, fresh]

    def check_residency(self, source: str, region: str, tenant_label: str) -> None:
        """Defence in depth, called right before an upload to `region` begins: refuse
        it (tenancy.ResidencyError, recorded in the audit log) unless the residency
        allows it both in the loaded config and in the config file as it reads now."""
        try:
            for cfg in self.configs_in_force():
                tenancy.check_upload(cfg, source, region, tenant_label)
        except tenancy.ResidencyError as exc:
            self.record_event("residency.refused", source=source, region=region,
                              tenant=tenant_label, error=str(exc))
            raise

    def _reload(self) -> Config | None:
        try:
            return config_mod.load(self.config.path)
        except Exception as exc:  # a config being edited: the loaded one still holds
            log.warning("the config file %s does not load now (%s); the residency "
                        "gate uses the loaded config", self.config.path, exc)
            return None

    @property
    def state(self) -> shared_state.StateStore:
        """Where the state that survives a failover lives (shared_state.py)."""
        return shared_state.at(self.config.daemon.state_dir)

    def recipient_labels(self) -> dict[str, str]:
        """How messages name each configured recipient, by fingerprint (keys.recipient_labels)."""
        return recipient_labels(self.config.keys.recipients, self.config.keys.names)

    def store(self, region: str) -> ObjectStore:
        """The store of one configured region (validated by name)."""
        self.config.region(region)
        return next(s for s in self.stores if s.name == region)

    def ordered_stores(self, first: str | None = None) -> list[ObjectStore]:
        """Stores in config order, with `first` (if given) moved to the front."""
        if first is None:
            return list(self.stores)
        chosen = self.store(first)
        return [chosen] + [s for s in self.stores if s is not chosen]

    def record_event(self, event: str, **fields: Any) -> None:
        """Append one record to the tamper-evident audit log, then mirror the log.

        Records are hash-chained and signed (audit.py, docs/format.md "Audit
        log"); values that look like secrets are withheld. Mirroring is best
        effort: a region that is down never makes this fail (and in a [cluster]'s
        processes it is the active scheduler's, on an interval). Inside an
        :meth:`audit_batch` of this thread the record is appended at once, as
        always, and the mirror waits for the batch to end (or for
        AUDIT_BATCH_MIRROR_INTERVAL since the batch last mirrored).
        """
        audit.append(self, event, self._attributed(fields))
        if not self.mirror_each_record:
            return
        batch = self._audit_batch
        if not getattr(batch, "depth", 0):
            mirror(self)
            return
        batch.pending = True
        if time.monotonic() - batch.mirrored_at >= AUDIT_BATCH_MIRROR_INTERVAL:
            self._mirror_batch(batch)

    def _attributed(self, fields: dict[str, Any]) -> dict[str, Any]:
        """`fields` with who acted (user, host) and whose data it touched (tenant,
        from the config's source; tenants for a record naming several sources),
        unless the event gave them: `drctl tenant access` reads them, and a record
        keeps the tenant of a source that is later removed from the config."""
        out = dict(fields)
        out.setdefault("user", _USER)
        out.setdefault("host", _HOST)
        owners = {s.name: s.tenant for s in self.config.sources}
        if "tenant" not in out and isinstance(out.get("source"), str) \
                and out["source"] in owners:
            out["tenant"] = owners[out["source"]]
        if "tenants" not in out and isinstance(out.get("sources"), list):
            out["tenants"] = sorted({t for n in out["sources"] if n in owners
                                     for t in tenancy.label_tenants(owners[n])})
        return out

    @contextmanager
    def audit_batch(self) -> Iterator[None]:
        """Mirror the audit log once for every record this thread makes in the block.

        For runs that record many events (a prune, a repair, a drill run):
        each record is still appended to the local log at once (it is the
        record), but the copy to the regions, a PUT per region (and a LIST
        where the runtime does not know what the region holds yet),
        happens when the outermost batch ends, also on an exception, instead
        of after every record. A long batch also mirrors when a record comes
        AUDIT_BATCH_MIRROR_INTERVAL after its last mirror. Batches nest; they
        are per thread, so another thread's records are mirrored as usual.
        """
        batch = self._audit_batch
        depth = getattr(batch, "depth", 0)
        if depth == 0:
            batch.pending, batch.mirrored_at = False, time.monotonic()
        batch.depth = depth + 1
        try:
            yield
        except BaseException:
            batch.depth = depth
            if depth == 0 and batch.pending:
                try:
                    self._mirror_batch(batch)
                except Exception:  # do not hide the exception that ended the batch
                    log.exception("cannot mirror the audit log")
            raise
        batch.depth = depth
        if depth == 0 and batch.pending:
            self._mirror_batch(batch)

    def _mirror_batch(self, batch: threading.local) -> None:
        batch.pending, batch.mirrored_at = False, time.monotonic()
        mirror(self)


def load_config(path: str | None, *, key_files: bool = True) -> Config:
    """Load the config named by --config, $DRDAEMON_CONFIG or the embedded default
    (`key_files=False`: its key files need not exist, see config.load)."""
    return config_mod.load(config_mod.resolve_config_path(path), key_files=key_files)


def open_runtime(config: Config, clock: Callable[[], datetime] = utcnow, *,
                 secrets: bool = True) -> Runtime:
    """Generate first-run keys where the config asks for it, load them, then open every
    region. With `secrets=False`, no key is made or read (an auditor's check): the
    runtime reads a key only if something uses it."""
    # First: the demo config keeps its generated keys in the state folder.
    statefs.prepare(config.daemon.state_dir)
    # Then where the shared state lives (with lock_dsn: in PostgreSQL, begun once),
    # before anything is recorded.
    begun = shared_state.begin(config.daemon)
    made = _keys_to_generate(config) if secrets else []
    if secrets:
        config = ensure_generated_keys(config)
        signing = config.keys.signing_key_file
        if "signing-key" in made and signing is not None:
            generate_signing_key(signing)
    stores = [open_store(r) for r in config.regions]
    rt = Runtime(config, stores, clock)
    if not secrets:
        return rt
    _ = (rt.manifest_key, rt.signing_key)  # a bad key file fails here, at once
    if begun is not None and begun.imported is not None and any(begun.imported.values()):
        rt.record_event("state.imported", where=begun.where, imported=begun.imported,
                        state_dir=str(config.daemon.state_dir))
    if made:
        _record_generated_keys(rt, made)
    record_first_use(rt)
    return rt


def _keys_to_generate(config: Config) -> list[str]:
    """The key files `ensure_generated_keys` is about to create."""
    keys = config.keys
    if not keys.generate:
        return []
    files = {"identity": keys.identity_file, "manifest-key": keys.manifest_key_file,
             "signing-key": keys.signing_key_file}
    return [what for what, path in files.items() if path is not None and not path.exists()]


def _record_generated_keys(rt: Runtime, made: list[str]) -> None:
    """Audit the creation of keys with their public facts only: the recipient, the key id."""
    fields: dict[str, Any] = {"generated": made}
    if "identity" in made and rt.config.keys.identity_file is not None:
        fields["recipient"] = ", ".join(str(i.to_public()) for i in
                                        load_identities(rt.config.keys.identity_file))
    if "manifest-key" in made:
        fields["manifest_key_id"] = rt.manifest_key.key_id
    if "signing-key" in made and rt.signing_key is not None:
        fields["signing_key"] = rt.signing_key.fingerprint
    rt.record_event("key.generated", **fields)


def record_first_use(rt: Runtime) -> None:
    """Record the key files of this config that `drctl keys` made without a loadable
    config (a note beside them, keys.note_unrecorded): `key.generated` with the
    maker's user, host and time, then the note is removed (a crash in between
    records the key twice, never not at all)."""
    keys = rt.config.keys
    for what, path in (("identity", keys.identity_file),
                       ("manifest-key", keys.manifest_key_file),
                       ("signing-key", keys.signing_key_file)):
        note = read_unrecorded(path) if path is not None else None
        if path is None or note is None:
            continue
        if what == "identity":
            recipient = ", ".join(str(i.to_public()) for i in load_identities(path))
            record_key_generation(rt, what, path, recipient=recipient, note=note)
        elif what == "manifest-key":
            record_key_generation(rt, what, path, manifest_key_id=rt.manifest_key.key_id,
                                  note=note)
        elif rt.signing_key is not None:
            record_key_generation(rt, what, path, signing_key=rt.signing_key.fingerprint,
                                  note=note)
        unrecorded_path(path).unlink(missing_ok=True)


def record_key_generation(rt: Runtime, what: str, path: Path, *, recipient: str | None = None,
                          manifest_key_id: str | None = None, signing_key: str | None = None,
                          note: dict[str, str] | None = None) -> None:
    """Audit a key that `drctl keys` made: its public facts and where it was written.

    `what` is "identity" (with its `recipient`), "manifest-key" (with its key
    id) or "signing-key" (with its fingerprint); never the key itself. The
    record is signed with this runtime's keys, which need not be the key just made.
    `note`: the key was made earlier without a loadable config, by the user on
    the host at the time it names; recorded now, at its first use.
    """
    fields: dict[str, Any] = {"generated": [what], "path": str(path.absolute()),
                              "user": getpass.getuser(), "host": socket.gethostname()}
    if note is not None:
        fields.update(note)
        fields["recorded"] = "at first use: made without a loadable config"
    if recipient is not None:
        fields["recipient"] = recipient
        fields["fingerprint"] = fingerprint(recipient)
    if manifest_key_id is not None:
        fields["manifest_key_id"] = manifest_key_id
    if signing_key is not None:
        fields["signing_key"] = signing_key
    rt.record_event("key.generated", **fields)


def rotate_manifest_key(rt: Runtime, out: Path) -> ManifestKeySet:
    """Write to `out` a key set with a new current key and this runtime's keys retired,
    and record `key.rotated` with the old and new key ids.

    The record is authenticated by this runtime, i.e. with the old key (or the
    signing key): the audit chain crosses the rotation, and what the old key
    signed keeps verifying with the new set.
    """
    old = rt.manifest_key
    new = keys_mod.rotate_manifest_key(old, out, rt.clock())
    rt.record_event("key.rotated", old_key_id=old.key_id, new_key_id=new.key_id,
                    retired=[k.key_id for k in new.retired], path=str(out.absolute()))
    return new
