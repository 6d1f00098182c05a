"""Loading and validation of drdaemon's TOML configuration.

Everything is checked up front so that a daemon never discovers a typo at
3 a.m.: unknown keys, wrong types, bad durations and cron expressions, unknown
tiers, duplicate names, missing files and too few regions are each reported as
one line naming the file, the key and what was expected.

Why this module is long (about 600 lines): it is the one parser of the whole
file, a table per section, each checked key by key. What grows with a new
feature goes beside it: the generic table reader in config_table.py, the
`[[tenants]]` tables in config_tenants.py, and the rules between tenants,
sources and regions (residency, overlaps) in tenancy.py.
"""

from __future__ import annotations

import os
import re
import tomllib
import zoneinfo
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlparse

from . import config_tenants, cron, tenancy
from .config_cluster import ClusterConfig, parse_cluster
from .config_standbys import StandbyConfig, parse_standbys
from .config_table import NAME_HINT, NAME_RE, Said, Table
from .errors import ConfigError
from .filetrust import read_trusted
from .slo import Targets
from .sources import is_kind, kind_for, kinds
from .tenancy import TenantConfig
from .units import format_duration, parse_duration, parse_size

DEFAULT_TIERS = {
    "paid": (timedelta(hours=24), timedelta(hours=24)),
    "free": (timedelta(hours=24), timedelta(hours=48)),
}
# Tiers restored after the paid ones by default (`[tiers.NAME] paid` overrides).
UNPAID_TIERS = frozenset({"free", "trial"})
ENV_CONFIG = "DRDAEMON_CONFIG"
# Orphan data objects (orphans.py) are deleted once an earlier prune saw them
# orphaned this long ago. Never shorter: a backup on another host may be about
# to commit what looks orphaned. Never longer than the 4 weeks within which
# every copy of a departed institution's data must be gone.
ORPHAN_GRACE = timedelta(days=1)
MIN_ORPHAN_GRACE = timedelta(hours=1)
MAX_ORPHAN_GRACE = timedelta(days=28)

T = TypeVar("T")


@dataclass(frozen=True)
class DaemonConfig:
    state_dir: Path
    metrics_address: str
    timezone: str
    max_concurrent_snapshots: int = 2
    jitter: timedelta = timedelta(minutes=5)  # random delay spreading sources on one cron
    shutdown_grace: timedelta = timedelta(seconds=30)
    retry_backoff: timedelta = timedelta(minutes=5)  # first retry; doubles, capped at 1h
    prune_schedule: str = "30 4 * * *"
    replicate_schedule: str = "0 */6 * * *"
    verify_schedule: str = "0 5 * * 0"
    # The audit log and its copy in every region are checked daily (and at start).
    audit_schedule: str = "45 5 * * *"
    # The identity the daemon holds is proven daily (and at start): proof_log.py.
    prove_schedule: str = "15 5 * * *"
    # Optional: an advisory lock in this PostgreSQL database, so that daemons on
    # two hosts with the same config never both run jobs.
    lock_dsn: str | None = None
    lock_name: str = "drdaemon"
    # With lock_dsn: how often a standby tries the lock and the active checks it
    # holds it (the takeover bound is about two of these), and how long a deleting
    # command waits for another host's deletions (`<lock_name>:deletions`).
    takeover_interval: timedelta = timedelta(seconds=5)
    deletions_lock_wait: timedelta = timedelta(minutes=1)


@dataclass(frozen=True)
class RetentionConfig:
    """Retention policy and its safety net; `[retention]` with per-source overrides."""

    daily: int = 7
    weekly: int = 4
    monthly: int = 3
    min_age: timedelta = timedelta(hours=1)
    max_delete_fraction: float = 0.5  # a run never deletes more without --force
    trash_days: int = 7  # pruned snapshots stay undoable this long
    min_retention: timedelta = timedelta(days=90)  # S3 Object Lock retain-until horizon
    orphan_grace: timedelta = ORPHAN_GRACE  # orphan data objects wait this long (orphans.py)

    def lock_until(self, started: datetime) -> datetime | None:
        """The Object Lock retain-until date of a snapshot begun at `started` (none if 0)."""
        return started + self.min_retention if self.min_retention > timedelta(0) else None


@dataclass(frozen=True)
class KeysConfig:
    recipients: tuple[str, ...]
    identity_file: Path | None
    manifest_key_file: Path
    # Only the embedded demo config sets this: make an identity and a manifest
    # key on first run instead of failing on their absence.
    generate: bool
    names: dict[str, str] = field(default_factory=dict)  # recipient -> its name, if given
    # The Ed25519 key that signs the audit log (signing.py); None: HMAC only, and
    # nobody without the manifest key can check the evidence.
    signing_key_file: Path | None = None
    # A recipient not proven (drctl keys prove) for longer than this alerts.
    proof_max_age: timedelta = timedelta(days=90)


@dataclass(frozen=True)
class PipelineConfig:
    zstd_level: int
    zstd_threads: int
    part_size: int


@dataclass(frozen=True)
class TierConfig(Targets):
    """A tier's recovery objectives (slo.Targets, the one type every judgement takes)."""

    name: str = ""
    # Restored first on the worst day (recovery_plan.py): every tier but the
    # unpaid ones ("free", "trial") unless `[tiers.NAME] paid` says otherwise.
    paid: bool = True


@dataclass(frozen=True)
class RegionConfig:
    name: str
    kind: str
    continent: str
    bucket: str | None = None
    region: str | None = None
    endpoint_url: str | None = None
    prefix: str = ""
    path: Path | None = None


@dataclass(frozen=True)
class AuditConfig:
    """[audit]: where the audit log's head is anchored outside the operator's reach
    (anchors.py): an RFC 3161 time-stamping authority and/or a witness bucket."""

    tsa_url: str | None = None
    tsa_ca_file: Path | None = None  # the CA certificate(s) a token must chain to
    tsa_certs_file: Path | None = None  # intermediates, untrusted (openssl -untrusted)
    witness: RegionConfig | None = None  # [audit.witness]: a bucket another account owns
    anchor_every: timedelta = timedelta(hours=1)

    @property
    def anchoring(self) -> bool:
        return self.tsa_url is not None or self.witness is not None


@dataclass(frozen=True)
class SourceConfig:
    name: str
    kind: str
    tenant: str
    tier: str
    schedule: str
    dsn: str | None = None
    path: Path | None = None
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    # A snapshot whose files/bytes or rows/size fall by more than this fraction
    # against the newest committed one is refused (shrink.py); 1 turns it off.
    max_shrink: float = 0.5
    # postgres: how long pg_dump and the row count wait for a table another
    # session has locked before the snapshot fails, naming the table and holder.
    lock_wait_timeout: timedelta = timedelta(minutes=5)
    on_unreadable: str = "fail"  # directory: "fail" or "skip" (and list) unreadable entries
    # postgres-cluster: the OS user a restored copy is given to and runs as when
    # drdaemon runs as root (None: "postgres"); how the server keeps the backup's WAL.
    os_user: str | None = None
    wal_retention: str = "slot"
    standby_dsn: str | None = None  # postgres: its server's hot standby (config_standbys.py)
    # Every tenant whose data the source holds: (tenant,), or several for a shared
    # source, whose `tenant` is then their label "a+b" (tenancy.shared_label).
    tenants: tuple[str, ...] = ()


@dataclass(frozen=True)
class DrillCheck:
    """A scalar SQL query run in a drill's restored copy of `source`; must return >= `min`."""

    source: str
    sql: str
    min: float
    database: str | None = None  # postgres-cluster: the database it runs in ("postgres")


@dataclass(frozen=True)
class DrillsConfig:
    """`[drills]`: restore drills that measure RPO/RTO against the tiers' targets."""

    postgres_dsn: str | None = None  # drill server; None: the source's own server
    schedule: str = "0 6 * * mon"
    tier_schedules: dict[str, str] = field(default_factory=dict)  # [drills.tiers.NAME]
    checks: tuple[DrillCheck, ...] = ()
    scratch_dir: Path | None = None  # None: <state_dir>/drills/scratch

    def schedule_for(self, tier: str) -> str:
        return self.tier_schedules.get(tier, self.schedule)


@dataclass(frozen=True)
class Config:
    path: str
    daemon: DaemonConfig
    keys: KeysConfig
    pipeline: PipelineConfig
    tiers: dict[str, TierConfig]
    regions: tuple[RegionConfig, ...]
    sources: tuple[SourceConfig, ...]
    warnings: tuple[str, ...] = field(default=())
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    drills: DrillsConfig = field(default_factory=DrillsConfig)
    # [[tenants]] by name, plus an implicit entry for each tenant a source names
    # without one (tenancy.TenantConfig.implicit).
    tenants: dict[str, TenantConfig] = field(default_factory=dict)
    standbys: tuple[StandbyConfig, ...] = ()  # [[standbys]] and the sources' standby_dsn
    audit: AuditConfig = field(default_factory=AuditConfig)
    # [cluster]: the PostgreSQL job queue (cluster/); None: the embedded single-host engine.
    cluster: ClusterConfig | None = None

    def source(self, name: str) -> SourceConfig:
        """The source called `name`, or a UsageError listing the known ones."""
        for src in self.sources:
            if src.name == name:
                return src
        known = ", ".join(s.name for s in self.sources) or "none"
        raise ConfigError(f"no source named {name!r} in {self.path} (known: {known})")

    def pick_sources(self, names: Iterable[str] | None) -> list[SourceConfig]:
        """The sources a person named (each checked by :meth:`source`, in the order
        named, once), or every configured source when none is named."""
        if names:
            return [self.source(n) for n in dict.fromkeys(names)]
        return list(self.sources)

    def region(self, name: str) -> RegionConfig:
        """The region called `name`, or a UsageError listing the known ones."""
        for reg in self.regions:
            if reg.name == name:
                return reg
        known = ", ".join(r.name for r in self.regions)
        raise ConfigError(f"no region named {name!r} in {self.path} (known: {known})")


def default_config_path() -> Path:
    """The embedded demo configuration shipped inside the package."""
    return Path(str(resources.files("drdaemon") / "defaults" / "drdaemon.toml"))


def resolve_config_path(explicit: str | None) -> Path:
    """--config, else $DRDAEMON_CONFIG, else the embedded default."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(ENV_CONFIG)
    return Path(env) if env else default_config_path()


def load(path: str | os.PathLike[str], *, key_files: bool = True) -> Config:
    """Read and validate a configuration file; raise ConfigError on any problem.

    `key_files=False`: do not require the key files to exist (a check that reads
    no secret, such as an auditor's `drctl audit verify --public-key`)."""
    path = Path(path)
    try:
        # Owned by the running user or root, nobody else can write it or a folder
        # above it, links checked to the real file (filetrust.py). utf-8-sig: a byte-order
        # mark (Windows editors write one) is not a TOML error.
        raw = tomllib.loads(read_trusted(path, "config file", private=False).decode("utf-8-sig"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return _Parser(path, key_files).config(raw)


class _Parser:
    def __init__(self, path: Path, key_files: bool = True) -> None:
        self.path = path
        self.key_files = key_files
        self.base = path.resolve().parent
        self.warnings: list[str] = []

    def fail(self, key: str, expected: str, got: Any, detail: str = "") -> NoReturn:
        """Raise the one-line error; `got` is shown with repr unless it is a Said."""
        shown = got if isinstance(got, Said) else "a table" if isinstance(got, dict) else repr(got)
        msg = f"{self.path}: {key}: expected {expected}, got {shown}"
        if expected.startswith("no such key"):
            msg = f"{self.path}: {key}: unknown key"
        if detail and detail not in msg:
            msg += f" ({detail})"
        raise ConfigError(msg)

    def resolve(self, value: str) -> Path:
        """Paths are relative to the config file's folder; `~` is expanded."""
        p = Path(os.path.expanduser(value))
        return p if p.is_absolute() else self.base / p

    def config(self, raw: dict[str, Any]) -> Config:
        top = Table(self, "", raw)
        daemon = self.daemon(Table(self, "daemon", top.take("daemon", dict, {})))
        keys = self.keys(Table(self, "keys", top.take("keys", dict, what="a [keys] table")))
        pipeline = self.pipeline(Table(self, "pipeline", top.take("pipeline", dict, {})))
        tiers = self.tiers(Table(self, "tiers", top.take("tiers", dict, {})))
        retention = self.retention(Table(self, "retention", top.take("retention", dict, {})),
                                   RetentionConfig())
        regions = self.regions(top.take("regions", list, what="a [[regions]] list"))
        tenants = config_tenants.parse_tenants(self, top.take("tenants", list, []), tiers,
                                               regions)
        sources = self.sources(top.take("sources", list, []), tiers, daemon.timezone, retention,
                               tenants)
        drills = self.drills(Table(self, "drills", top.take("drills", dict, {})), tiers,
                             sources, daemon.timezone)
        standbys = parse_standbys(self, top.take("standbys", list, []), sources,
                                  _dsn_without_password)
        audit = self.audit(Table(self, "audit", top.take("audit", dict, {})))
        cluster = None
        if "cluster" in top.data:
            cluster = parse_cluster(Table(self, "cluster", top.take("cluster", dict)),
                                    _dsn_without_password)
            if daemon.lock_dsn is None:
                # One DSN for the cluster: the active/standby lock and the shared state
                # live in the queue's database unless [daemon] lock_dsn says otherwise.
                daemon = replace(daemon, lock_dsn=cluster.dsn)
        top.done()
        tenants = config_tenants.implicit_tenants([s.tenants for s in sources], tenants)
        cfg = Config(str(self.path), daemon, keys, pipeline, tiers, regions, sources,
                     (), retention, drills, tenants, standbys=standbys, audit=audit,
                     cluster=cluster)
        problems = tenancy.config_problems(cfg)
        if problems:
            raise ConfigError(f"{self.path}: {problems[0]}")
        self.warnings.extend(f"{self.path}: {w}" for w in tenancy.config_warnings(cfg))
        return replace(cfg, warnings=tuple(self.warnings))

    def daemon(self, t: Table) -> DaemonConfig:
        state_dir = self.resolve(t.take("state_dir", str, "~/.local/state/drdaemon"))
        metrics = t.take("metrics_address", str, "127.0.0.1:9467")
        if not re.match(r"^[^\s:]*:\d{1,5}$", metrics):
            self.fail(t.key("metrics_address"), "host:port", metrics)
        tz = t.convert("timezone", _zone, "UTC", what="an IANA time zone like Europe/Berlin")
        d = DaemonConfig(state_dir, metrics, tz)
        concurrent = t.take("max_concurrent_snapshots", int, d.max_concurrent_snapshots)
        if not 1 <= concurrent <= 64:
            self.fail(t.key("max_concurrent_snapshots"), "an integer from 1 to 64", concurrent)
        what = "a duration like 90m, 24h or 14d"
        jitter = t.convert("jitter", parse_duration, d.jitter, what=what)
        grace = t.convert("shutdown_grace", parse_duration, d.shutdown_grace, what=what)
        backoff = t.convert("retry_backoff", parse_duration, d.retry_backoff, what=what)
        cron_what = "a cron expression like '0 2 * * *'"
        def cron(name: str) -> str:
            return t.convert(name, lambda v: _cron(v, tz), getattr(d, name), what=cron_what)

        lock_dsn = t.convert("lock_dsn", _dsn_without_password, None,
                             what="a libpq DSN without a password", echo=False)
        lock_name = t.take("lock_name", str, d.lock_name)
        takeover = t.convert("takeover_interval", parse_duration, d.takeover_interval,
                             what=what)
        if not timedelta(seconds=1) <= takeover <= timedelta(minutes=5):
            self.fail(t.key("takeover_interval"), "a duration from 1s to 5m",
                      format_duration(takeover))
        deletions_wait = t.convert("deletions_lock_wait", parse_duration,
                                   d.deletions_lock_wait, what=what)
        d = replace(d, lock_dsn=lock_dsn, lock_name=lock_name, takeover_interval=takeover,
                    deletions_lock_wait=deletions_wait)
        d = replace(d, max_concurrent_snapshots=concurrent, jitter=jitter, shutdown_grace=grace,
                    retry_backoff=backoff,
                    prune_schedule=cron("prune_schedule"),
                    replicate_schedule=cron("replicate_schedule"),
                    verify_schedule=cron("verify_schedule"),
                    audit_schedule=cron("audit_schedule"),
                    prove_schedule=cron("prove_schedule"))
        t.done()
        return d

    def retention(self, t: Table, base: RetentionConfig) -> RetentionConfig:
        counts = {}
        for name in ("daily", "weekly", "monthly", "trash_days"):
            counts[name] = t.take(name, int, getattr(base, name))
            if not 0 <= counts[name] <= 10000:
                self.fail(t.key(name), "an integer from 0 to 10000", counts[name])
        if counts["daily"] + counts["weekly"] + counts["monthly"] == 0:
            self.fail(t.key("daily"), "at least one of daily, weekly, monthly above 0", 0)
        what = "a duration like 90m, 24h or 14d"
        min_age = t.convert("min_age", parse_duration, base.min_age, what=what)
        min_retention = t.convert("min_retention", parse_duration, base.min_retention,
                                  what=what)
        fraction = t.convert("max_delete_fraction", _fraction, base.max_delete_fraction,
                             what="a number from 0 to 1")
        orphan_grace = t.convert("orphan_grace", _orphan_grace, base.orphan_grace,
                                 what="a duration from 1h to 28d, like 1d")
        t.done()
        return RetentionConfig(counts["daily"], counts["weekly"], counts["monthly"], min_age,
                               fraction, counts["trash_days"], min_retention, orphan_grace)

    def keys(self, t: Table) -> KeysConfig:
        generate = t.take("generate", bool, False)
        entries = t.take("recipients", list, [])
        recipients: list[str] = []
        names: dict[str, str] = {}
        for i, rec in enumerate(entries):
            # A plain "age1..." string, or { recipient = "age1...", name = "ops" }:
            # the name is what error messages call the key.
            if isinstance(rec, dict):
                entry = Table(self, f"keys.recipients[{i}]", rec)
                name = entry.take("name", str, what="a short name such as ops or escrow")
                rec = entry.take("recipient", str, what="an age X25519 recipient (age1...)")
                entry.done()
                names[rec] = name
            if not isinstance(rec, str) or not _valid_recipient(rec):
                self.fail(f"keys.recipients[{i}]", "an age X25519 recipient (age1...) or "
                          "{ recipient = \"age1...\", name = \"ops\" }", rec)
            recipients.append(rec)
        if not recipients and not generate:
            self.fail("keys.recipients", "at least one age recipient", "an empty list")
        max_age = t.convert("proof_max_age", parse_duration, timedelta(days=90),
                            what="a duration like 90d")
        if max_age <= timedelta(0):
            self.fail(t.key("proof_max_age"), "a positive duration like 90d", max_age)
        identity = t.take("identity_file", str, None)
        identity_path = self.resolve(identity) if identity else None
        mkey = self.resolve(t.take("manifest_key_file", str, what="a path to the manifest key"))
        if not generate and self.key_files:
            if identity_path is not None and not identity_path.exists():
                self.fail("keys.identity_file", "an existing file", str(identity_path))
            if not mkey.exists():
                self.fail("keys.manifest_key_file", "an existing file "
                          "(make one with: drctl keys manifest-key --out FILE)", str(mkey))
        signing = t.take("signing_key_file", str, None)
        signing_path = self.resolve(signing) if signing else None
        if not generate and self.key_files and signing_path is not None \
                and not signing_path.exists():
            self.fail("keys.signing_key_file", "an existing file "
                      "(make one with: drctl keys signing-key --out FILE)", str(signing_path))
        t.done()
        return KeysConfig(tuple(recipients), identity_path, mkey, generate, names,
                          signing_path, max_age)

    def pipeline(self, t: Table) -> PipelineConfig:
        level = t.take("zstd_level", int, 3)
        if not 1 <= level <= 19:
            self.fail(t.key("zstd_level"), "an integer from 1 to 19", level)
        threads = t.take("zstd_threads", int, 2)
        if not 0 <= threads <= 64:
            self.fail(t.key("zstd_threads"), "an integer from 0 to 64", threads)
        part = t.convert("part_size", parse_size, 8 << 20, what="a size like 8MiB")
        if not (5 << 20) <= part <= (1 << 30):
            self.fail(t.key("part_size"), "a size from 5MiB to 1GiB (S3's part limits)", part)
        t.done()
        return PipelineConfig(level, threads, part)

    def tiers(self, t: Table) -> dict[str, TierConfig]:
        tiers = {name: TierConfig(rpo, rto, name, name not in UNPAID_TIERS)
                 for name, (rpo, rto) in DEFAULT_TIERS.items()}
        for name in list(t.data):
            sub = Table(self, f"tiers.{name}", t.take(name, dict))
            if not NAME_RE.match(name):
                self.fail(f"tiers.{name}", NAME_HINT, name)
            rpo_d, rto_d = DEFAULT_TIERS.get(name, (None, None))
            what = "a duration like 90m, 24h or 14d"
            rpo = sub.convert("rpo", parse_duration, rpo_d if rpo_d else ..., what=what)
            rto = sub.convert("rto", parse_duration, rto_d if rto_d else ..., what=what)
            paid = sub.take("paid", bool, name not in UNPAID_TIERS)
            sub.done()
            tiers[name] = TierConfig(rpo, rto, name, paid)
        return tiers

    def drills(self, t: Table, tiers: dict[str, TierConfig],
               sources: tuple[SourceConfig, ...], tz: str) -> DrillsConfig:
        d = DrillsConfig()
        dsn = t.convert("postgres_dsn", _dsn_without_password, None,
                        what="a libpq DSN of the drill server without a password", echo=False)
        cron_what = "a cron expression like '0 6 * * mon'"
        schedule = t.convert("schedule", lambda v: _cron(v, tz), d.schedule, what=cron_what)
        scratch = t.take("scratch_dir", str, None)
        per_tier: dict[str, str] = {}
        overrides = Table(self, t.key("tiers"), t.take("tiers", dict, {}))
        for name in list(overrides.data):
            sub = Table(self, overrides.key(name), overrides.take(name, dict))
            if name not in tiers:
                self.fail(overrides.key(name), f"one of the tiers {sorted(tiers)}", name)
            per_tier[name] = sub.convert("schedule", lambda v: _cron(v, tz), what=cron_what)
            sub.done()
        checks = []
        checked = sorted(s.name for s in sources if kind_for(s.kind).takes_sql_checks)
        for i, item in enumerate(t.take("checks", list, [])):
            c = Table(self, f"{t.key('checks')}[{i}]", item)
            source = c.take("source", str)
            if source not in checked:
                takers = " or ".join(k.name for k in kinds() if k.takes_sql_checks)
                self.fail(c.key("source"), f"the name of a {takers} source {checked}", source)
            query = c.take("sql", str, what="a scalar SQL query")
            if not query.strip():
                self.fail(c.key("sql"), "a scalar SQL query", query)
            minimum = c.convert("min", _number, 1.0, what="a number")
            database = c.take("database", str, None)
            c.done()
            checks.append(DrillCheck(source, query, minimum, database))
        t.done()
        return DrillsConfig(dsn, schedule, per_tier, tuple(checks),
                            self.resolve(scratch) if scratch else None)

    def audit(self, t: Table) -> AuditConfig:
        url = t.take("tsa_url", str, None)
        if url is not None and not re.match(r"^https?://[^\s/]+", url):
            self.fail(t.key("tsa_url"), "an http:// or https:// URL", url)
        ca = t.take("tsa_ca_file", str, None)
        certs = t.take("tsa_certs_file", str, None)
        if url is not None and ca is None:
            self.fail(t.key("tsa_ca_file"), "the TSA's CA certificate file (PEM) with tsa_url",
                      Said("nothing"))
        every = t.convert("anchor_every", parse_duration, timedelta(hours=1),
                          what="a duration like 30m, 1h or 6h")
        if every < timedelta(minutes=1):
            self.fail(t.key("anchor_every"), "at least 1m", every)
        witness = None
        if "witness" in t.data:
            w = Table(self, t.key("witness"), t.take("witness", dict))
            witness = self.region_table(w, "witness", w.take("kind", str), "")
        t.done()
        return AuditConfig(url, self.resolve(ca) if ca else None,
                           self.resolve(certs) if certs else None, witness, every)

    def region_table(self, t: Table, name: str, kind: str, continent: str) -> RegionConfig:
        """The rest of a region's table (or the witness's): where its objects are."""
        if kind == "s3":
            endpoint = t.take("endpoint_url", str, None)
            if endpoint is not None:
                self.check_endpoint(t.key("endpoint_url"), endpoint)
            reg = RegionConfig(name, kind, continent, bucket=t.take("bucket", str),
                               region=t.take("region", str, None), endpoint_url=endpoint,
                               prefix=self.prefix(t))
        elif kind == "local":
            reg = RegionConfig(name, kind, continent, path=self.resolve(t.take("path", str)),
                               prefix=self.prefix(t))
        else:
            self.fail(t.key("kind"), "'s3' or 'local'", kind)
        t.done()
        return reg

    def regions(self, items: list[Any]) -> tuple[RegionConfig, ...]:
        regions = []
        for i, item in enumerate(items):
            t = Table(self, f"regions[{i}]", item)
            name = self.name(t)
            kind = t.take("kind", str)
            continent = t.convert("continent", tenancy.continent,
                                  what=f"one of {', '.join(tenancy.CONTINENTS)}")
            regions.append(self.region_table(t, name, kind, continent))
        self.unique("regions", [r.name for r in regions])
        if len(regions) < 2:
            self.fail("regions", "at least two [[regions]] (copies on two continents)",
                      f"{len(regions)} region(s)")
        return tuple(regions)

    def sources(self, items: list[Any], tiers: dict[str, TierConfig],
                tz: str, retention: RetentionConfig,
                tenants: dict[str, TenantConfig]) -> tuple[SourceConfig, ...]:
        sources = []
        for i, item in enumerate(items):
            t = Table(self, f"sources[{i}]", item)
            name = self.name(t)
            kind = t.take("kind", str)
            owners = config_tenants.source_owners(self, t)
            tenant = owners[0] if len(owners) == 1 else tenancy.shared_label(owners)
            tier = config_tenants.source_tier(self, t, owners, tenants, tiers)
            schedule = t.convert("schedule", lambda s: _cron(s, tz), "0 2 * * *",
                                 what="a cron expression like '0 2 * * *'")
            own = self.retention(Table(self, t.key("retention"), t.take("retention", dict, {})),
                                 retention)
            max_shrink = t.convert("max_shrink", _fraction, 0.5,
                                   what="a fraction from 0 to 1 (1: never refuse a shrink)")
            if not is_kind(kind):
                self.fail(t.key("kind"), " or ".join(repr(k.name) for k in kinds()), kind)
            # The kind names the keys it takes beyond the common ones.
            own_keys = {key: self.source_key(t, key) for key in kind_for(kind).config_keys}
            src = SourceConfig(name, kind, tenant, tier, schedule, retention=own,
                               max_shrink=max_shrink, tenants=owners, **own_keys)
            t.done()
            sources.append(src)
        self.unique("sources", [s.name for s in sources])
        return tuple(sources)

    def source_key(self, t: Table, key: str) -> Any:
        """One kind-specific key of a [[sources]] entry (SourceKind.config_keys)."""
        if key == "standby_dsn":
            return t.convert("standby_dsn", _dsn_without_password, None,
                             what="a libpq DSN of the hot standby without a password",
                             echo=False)
        if key == "dsn":
            return t.convert("dsn", _dsn_without_password,
                             what="a libpq DSN without a password (use PGPASSFILE "
                                  "or a service file)", echo=False)
        if key == "lock_wait_timeout":
            return t.convert("lock_wait_timeout", _lock_wait, timedelta(minutes=5),
                             what="a duration from 1s to 24h, like 5m")
        if key == "path":
            path = self.resolve(t.take("path", str))
            if not path.is_dir():
                # Not fatal: one unmounted tree must not stop every other
                # source; its snapshots fail, loudly, with this reason.
                self.warnings.append(f"{self.path}: WARNING: {t.key('path')}: "
                                     f"{path} is not a directory (yet)")
            return path
        if key == "on_unreadable":
            on_unreadable = t.take("on_unreadable", str, "fail")
            if on_unreadable not in ("fail", "skip"):
                self.fail(t.key("on_unreadable"), "'fail' or 'skip'", on_unreadable)
            return on_unreadable
        if key == "os_user":
            return t.take("os_user", str, None)
        if key == "wal_retention":
            retention = t.take("wal_retention", str, "slot")
            if retention not in ("slot", "wal_keep_size"):
                self.fail(t.key("wal_retention"), "'slot' or 'wal_keep_size'", retention)
            return retention
        raise AssertionError(f"a source kind takes {key!r}, which the schema does not know")

    def name(self, t: Table) -> str:
        name = t.take("name", str)
        if not NAME_RE.match(name):
            self.fail(t.key("name"), NAME_HINT, name)
        return name

    def prefix(self, t: Table) -> str:
        prefix = t.take("prefix", str, "").strip("/")
        if prefix and any(p in ("", ".", "..") for p in prefix.split("/")):
            self.fail(t.key("prefix"), "a key prefix without empty, '.' or '..' parts", prefix)
        return prefix

    def check_endpoint(self, key: str, url: str) -> None:
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            self.fail(key, "an http(s) URL", url)
        host = parsed.hostname or ""
        loopback = host in ("localhost", "::1") or host.startswith("127.")
        if parsed.scheme == "http" and not loopback:
            self.warnings.append(f"{self.path}: WARNING: {key} uses plain http; the policy "
                                 "requires TLS in transit")

    def unique(self, where: str, names: list[str]) -> None:
        seen: set[str] = set()
        for i, name in enumerate(names):
            if name in seen:
                self.fail(f"{where}[{i}].name", "a unique name", f"duplicate {name!r}")
            seen.add(name)


def _zone(value: str) -> str:
    if not isinstance(value, str):
        raise TypeError("not a string")
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError("unknown time zone") from None
    return value


def _fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError("out of range")
    return float(value)


def _orphan_grace(value: Any) -> timedelta:
    grace = parse_duration(value)
    if not MIN_ORPHAN_GRACE <= grace <= MAX_ORPHAN_GRACE:
        raise ValueError("out of range")
    return grace


def _lock_wait(value: Any) -> timedelta:
    wait = parse_duration(value)
    if not timedelta(seconds=1) <= wait <= timedelta(hours=24):
        raise ValueError("out of range")
    return wait


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError("not a number")
    return float(value)


def _cron(value: Any, tz: str) -> str:
    if not isinstance(value, str):
        raise TypeError("not a string")
    cron.trigger(value, zoneinfo.ZoneInfo(tz))
    return value


def _dsn_without_password(value: Any) -> str:
    from .sources.pg_session import parse_dsn  # its error never echoes a password

    if not isinstance(value, str) or not value.strip():
        raise TypeError("not a string")
    params = parse_dsn(value)
    if "password" in params:
        raise ValueError("a password must not be written in the config") from None
    return value


def _valid_recipient(text: str) -> bool:
    from pyrage import x25519

    try:
        x25519.Recipient.from_str(text)
    except Exception:
        return False
    return True
