"""drdaemon's benchmark: backup and restore against the stock-tool pipelines (issue 7).

Not part of the test suite. Starts a private PostgreSQL server and two moto S3
servers on loopback (the same helpers as tests/conftest.py), builds a database
of --size-gb (pgbench tables plus LMS-like tables with text and bytea), then
alternates --rounds rounds of:

  A   drctl backup -> 2 moto S3 regions + 2 local regions
  B   pg_dump -Fc -Z0 | zstd -3 -T2 | age -r R > file
  C   pg_dump -Fc -Z0 > /dev/null
  R1  drctl restore (from a local region)
  R2  createdb NEWDB && age -d -i ID file | zstd -d | pg_restore -d NEWDB
  R3  drctl restore --jobs N (from a local region)
  R4  createdb NEWDB && pg_restore -j N -d NEWDB dump-file (plain -Fc file made once)

and prints / appends a Markdown table to bench/results/<YYYY-MM-DD>.md.
Peak RSS is each process's VmHWM read from /proc while it runs (every 0.2 s).

    .venv/bin/python bench/run.py --size-gb 0.3 --rounds 1        # estimate
    .venv/bin/python bench/run.py                                 # 1.5 GB, 3 rounds
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

import psutil
import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
# The test fixtures' own helpers: a real PostgreSQL as an unprivileged user, moto per process.
import file_counts  # noqa: E402  (bench/file_counts.py, beside this file)
from conftest import (  # noqa: E402
    MotoServerProcess,
    _run,
    _unprivileged_user,
    find_free_port,
    newest_pg_bin_dir,
)
from lms import SCHEMA  # noqa: E402  (the test suite's LMS tables)

from drdaemon.keys import generate_identity, generate_manifest_key  # noqa: E402

VENV_BIN = Path(sys.executable).parent
MIB = 1 << 20

LMS_SCHEMA = SCHEMA + """
INSERT INTO institutions (name, tier) VALUES ('Université de Genève', 'paid'),
  ('北京大学', 'paid'), ('Springfield Community College', 'free');
INSERT INTO users (institution_id, email, display_name, created_at)
  SELECT 1 + i % 3, 'user' || i || '@example.edu', 'Student ' || i || ' — ñ',
         '2026-01-01'::timestamptz + i * interval '1 minute' FROM generate_series(1, 50000) i;
INSERT INTO courses (institution_id, title, syllabus)
  SELECT 1 + i % 3, 'Course ' || i, repeat('Week ' || i || ': reading and exercises. ', 40)
  FROM generate_series(1, 2000) i;
INSERT INTO enrolments SELECT u.id, c.id, CASE WHEN u.id % 17 = 0 THEN 'teacher'
  ELSE 'student' END FROM users u JOIN courses c ON (u.id + c.id) % 200 = 0;
"""
# ~1.5 KB of essay text (compressible, varied) and 1 KiB of random bytes per submission.
LMS_BATCH = """
INSERT INTO submissions (user_id, course_id, body, attachment, grade, submitted_at)
SELECT 1 + (i::bigint * 7919) %% 50000, 1 + i %% 2000,
       'Essay ' || i || ': ' || repeat('lorem ipsum ' || md5(i::text) || ' dolor sit amet ', 30),
       (SELECT decode(string_agg(md5(random()::text || i || g), ''), 'hex')
          FROM generate_series(1, 64) g),
       (i %% 10000) / 100.0, now() - i * interval '1 second'
FROM generate_series(%s, %s) i
"""


# -- measuring ----------------------------------------------------------------

def _hwm_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _label(p: psutil.Process) -> str:
    try:
        name = p.name()
        if name.startswith("python"):
            cmd = " ".join(p.cmdline()[1:3])
            name = "drctl" if "drctl" in cmd else ("moto" if "moto" in cmd else name)
        return name
    except psutil.Error:
        return "?"


class PeakSampler:
    """Peak RSS (VmHWM) per process label, over our child tree and the servers' processes."""

    def __init__(self, roots: list[int], servers: dict[str, int], interval: float = 0.2):
        self.roots = roots
        self.servers = servers  # label -> pid (its children too, e.g. postgres backends)
        self.peaks: dict[str, int] = defaultdict(int)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._labels: dict[int, str] = {}

    def _sample(self) -> None:
        procs: list[tuple[str, psutil.Process]] = []
        for pid in self.roots:
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(pid)
                procs += [("", p) for p in [root, *root.children(recursive=True)]]
        for label, pid in self.servers.items():
            with contextlib.suppress(psutil.Error):
                srv = psutil.Process(pid)
                procs += [(label, p) for p in [srv, *srv.children(recursive=True)]]
        for prefix, p in procs:
            if p.pid not in self._labels:
                self._labels[p.pid] = prefix or _label(p)
            label = self._labels[p.pid]
            if label in ("bash", "sh", "time"):
                continue
            self.peaks[label] = max(self.peaks[label], _hwm_kib(p.pid))

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self._sample()

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Scenario:
    key: str
    title: str
    seconds: list[float] = field(default_factory=list)
    rss_kib: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    load: list[float] = field(default_factory=list)
    cpu: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    def add(self, secs: float, peaks: dict[str, int]) -> None:
        self.seconds.append(secs)
        for k, v in CPU.items():
            self.cpu[k].append(v)
        for k, v in peaks.items():
            self.rss_kib[k] = max(self.rss_kib[k], v)
        self.load.append(os.getloadavg()[0])

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def server_cpu(pid: int) -> float:
    """CPU seconds a server and its children (live and reaped) have used so far."""
    try:
        root = psutil.Process(pid)
        t = root.cpu_times()
        total = t.user + t.system + t.children_user + t.children_system
        for child in root.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                c = child.cpu_times()
                total += c.user + c.system
        return total
    except psutil.Error:
        return 0.0


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


CPU: dict[str, float] = {}  # the last timed() run's CPU seconds: "command" and each server


def timed(cmd: list[str] | str, servers: dict[str, int], env: dict[str, str] | None = None,
          shell: bool = False) -> tuple[float, dict[str, int], str]:
    """Run one command, returning wall seconds, peak RSS per process and its stdout.

    CPU seconds of the command's whole process tree and of each server during
    the run are left in CPU (wall time on 2 cores is shared by all of them).
    """
    argv: Any = ["bash", "-o", "pipefail", "-c", cmd] if shell else cmd
    cpu_before = {label: server_cpu(pid) for label, pid in servers.items()}
    cmd_before = _children_cpu()
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            text=True)
    sampler = PeakSampler([proc.pid], servers)
    sampler.roots = [proc.pid]
    with sampler:
        out, err = proc.communicate()
    secs = time.monotonic() - started
    CPU.clear()
    CPU["command"] = _children_cpu() - cmd_before
    for label, pid in servers.items():
        CPU[label.strip()] = CPU.get(label.strip(), 0.0) + server_cpu(pid) - cpu_before[label]
    if proc.returncode != 0:
        raise RuntimeError(f"{argv!r} failed ({proc.returncode}): {err[-2000:]}")
    return secs, dict(sampler.peaks), out


# -- the servers ----------------------------------------------------------------

@dataclass
class Pg:
    port: int
    data: Path
    env: dict[str, str]
    as_user: Any
    bin_dir: Path

    def dsn(self, db: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={db}"

    def postmaster_pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def admin(self, query: str | sql.Composed) -> None:
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(query)

    def scalar(self, db: str, query: str) -> Any:
        with psycopg.connect(self.dsn(db)) as conn:
            row = conn.execute(query).fetchone()
            return row[0] if row else None


@contextlib.contextmanager
def postgres_server(base: Path) -> Iterator[Pg]:
    bin_dir = newest_pg_bin_dir()
    as_user = _unprivileged_user() if os.geteuid() == 0 else None
    data = base / "pgdata"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(HOME=str(base), LC_ALL="C", TZ="UTC")
    if as_user is not None:
        os.chown(base, as_user.pw_uid, as_user.pw_gid)
    _run([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
          "-E", "UTF8", "--no-locale", "--no-sync"], as_user=as_user, env=env)
    port = find_free_port()
    with open(data / "postgresql.conf", "a") as conf:
        conf.write(f"\nlisten_addresses = '127.0.0.1'\nport = {port}\n"
                   f"unix_socket_directories = '{base}'\n"
                   "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                   "shared_buffers = 512MB\nmaintenance_work_mem = 256MB\n"
                   "max_wal_size = 4GB\nmax_connections = 50\n")
    pg_ctl = str(bin_dir / "pg_ctl")
    _run([pg_ctl, "start", "-D", str(data), "-l", str(base / "server.log"), "-w", "-t", "60"],
         as_user=as_user, env=env, log=base / "server.log")
    try:
        yield Pg(port, data, env, as_user, bin_dir)
    finally:
        _run([pg_ctl, "stop", "-D", str(data), "-m", "fast", "-w"], as_user=as_user, env=env)


def create_database(pg: Pg, name: str, size_gb: float) -> int:
    """pgbench tables (~60 %) plus LMS-like tables with text and bytea up to `size_gb`."""
    target = int(size_gb * (1 << 30))
    pg.admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    scale = max(1, round(target * 0.6 / (15.5 * MIB)))
    subprocess.run([str(pg.bin_dir / "pgbench"), "-i", "-q", "-s", str(scale), pg.dsn(name)],
                   check=True, capture_output=True)
    with psycopg.connect(pg.dsn(name), autocommit=True) as conn:
        conn.execute(LMS_SCHEMA)
        start, batch = 1, 40000
        while True:
            size = conn.execute("SELECT pg_database_size(current_database())").fetchone()
            assert size is not None
            if size[0] >= target:
                break
            conn.execute(LMS_BATCH, (start, start + batch - 1))
            start += batch
        conn.execute("VACUUM ANALYZE")
        final = conn.execute("SELECT pg_database_size(current_database())").fetchone()
    assert final is not None
    return int(final[0])


# -- the run --------------------------------------------------------------------

def machine() -> dict[str, str]:
    def out(cmd: list[str]) -> str:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (r.stdout or r.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                .splitlines() if ln.startswith("model name")), platform.processor())
    disk = out(["findmnt", "-n", "-o", "SOURCE,FSTYPE", "-T", tempfile.gettempdir()])
    rota = "?"
    with contextlib.suppress(OSError, IndexError):
        dev = disk.split()[0].rsplit("/", 1)[-1]
        rota = Path(f"/sys/block/{dev}/queue/rotational").read_text().strip()
    import pyrage
    import zstandard
    return {
        "cpu": cpu, "cores": str(os.cpu_count()),
        "memory": f"{psutil.virtual_memory().total / (1 << 30):.1f} GiB",
        "disk": f"{disk} (rotational={rota}), {shutil.disk_usage('/').free >> 30} GiB free",
        "kernel": platform.release(),
        "postgres": out([str(newest_pg_bin_dir() / "postgres"), "--version"]),
        "pg_dump": out(["pg_dump", "--version"]), "zstd": out(["zstd", "--version"]),
        "age": out(["age", "--version"]), "python": sys.version.split()[0],
        "python-zstandard": zstandard.__version__, "pyrage": getattr(pyrage, "__version__", "?"),
    }


def write_config(work: Path, pg: Pg, moto: list[MotoServerProcess], dbs: dict[str, str],
                 jobs: int) -> tuple[Path, Path, str]:
    keys = work / "keys"
    identity = keys / "identity.txt"
    recipient = generate_identity(identity)
    generate_manifest_key(keys / "manifest.key")
    regions = ""
    for i, (server, (region, cont)) in enumerate(zip(
            moto, [("eu-central-1", "europe"), ("us-east-1", "north-america")], strict=True)):
        bucket = f"bench-{i}"
        import boto3
        create: dict[str, Any] = {"Bucket": bucket}
        if region != "us-east-1":
            create["CreateBucketConfiguration"] = {"LocationConstraint": region}
        boto3.client("s3", endpoint_url=server.endpoint_url, region_name=region,
                     aws_access_key_id="bench", aws_secret_access_key="bench"
                     ).create_bucket(**create)
        regions += (f'[[regions]]\nname = "s3-{i}"\nkind = "s3"\ncontinent = "{cont}"\n'
                    f'bucket = "{bucket}"\nregion = "{region}"\n'
                    f'endpoint_url = "{server.endpoint_url}"\n\n')
    for i, cont in enumerate(["europe", "north-america"]):
        regions += (f'[[regions]]\nname = "local-{i}"\nkind = "local"\ncontinent = "{cont}"\n'
                    f'path = "{work / f"local-{i}"}"\n\n')
    sources = "".join(f'[[sources]]\nname = "{n}"\nkind = "postgres"\ntenant = "bench"\n'
                      f'tier = "paid"\ndsn = "{pg.dsn(db)}"\n\n' for n, db in dbs.items())
    config = work / "drdaemon.toml"
    config.write_text(
        f'[daemon]\nstate_dir = "{work / "state"}"\n\n'
        f'[keys]\nrecipients = ["{recipient}"]\nidentity_file = "{identity}"\n'
        f'manifest_key_file = "{keys / "manifest.key"}"\n\n'
        '[pipeline]\nzstd_level = 3\nzstd_threads = 2\n\n' + regions + sources)
    return config, identity, recipient


def fmt_cpu(cpu: dict[str, list[float]]) -> str:
    """Median CPU seconds of the command tree, the PostgreSQL server and the moto servers."""
    def med(key: str) -> str:
        return f"{statistics.median(cpu[key]):.1f}" if cpu.get(key) else "-"
    return f"{med('command')}; {med('postgres (server)')}; {med('moto (server)')}"


def fmt_rss(kib: dict[str, int]) -> str:
    return ", ".join(f"{k} {v / 1024:.0f}" for k, v in sorted(kib.items(), key=lambda kv: -kv[1])
                     if v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=1.5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=2, help="pg_restore -j / drctl restore --jobs")
    ap.add_argument("--rss-sizes-gb", default="0.5,3",
                    help="comma-separated sizes of further databases backed up and restored "
                         "once each, to compare drdaemon's peak RSS ('' to skip)")
    ap.add_argument("--rss-file-counts", default="30000,300000,1000000",
                    help="comma-separated numbers of files of directory trees backed up and "
                         "restored once each, to compare drdaemon's peak RSS ('' to skip; "
                         "bench/file_counts.py)")
    ap.add_argument("--skip", default="", help="comma-separated scenario keys to skip, e.g. R3,R4")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where the server, dumps and local regions go (default: /var/tmp)")
    ap.add_argument("--out", type=Path, default=None,
                    help="results file (default: bench/results/<YYYY-MM-DD>.md; appended)")
    ap.add_argument("--profile", type=Path, default=None,
                    help="first record py-spy profiles (collapsed stacks) of one drctl backup "
                         "and restore into this folder")
    ap.add_argument("--note", default="", help="a line to add to the results (e.g. the change)")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    work = Path(tempfile.mkdtemp(prefix="drbench-", dir=args.workdir or "/var/tmp"))
    os.chmod(work, 0o755)
    t0 = time.monotonic()
    load_start = os.getloadavg()
    print(f"workdir {work}", flush=True)
    # moto spills every object over ~5 MiB (each 8 MiB part) to a temporary file;
    # on this machine's disk that made the stand-in for S3 cost more than the
    # backup. Kept in memory it is closer to an S3 that costs the client nothing.
    os.environ.setdefault("MOTO_S3_DEFAULT_KEY_BUFFER_SIZE", str(64 << 30))
    moto = [MotoServerProcess(log_path=work / f"moto-{i}.log") for i in range(2)]
    try:
        for server in moto:
            server.start()
        pgbase = work / "pg"
        pgbase.mkdir()
        with postgres_server(pgbase) as pg:
            _bench(args, skip, work, pg, moto, t0, load_start)
    finally:
        for server in moto:
            server.close()
        shutil.rmtree(work, ignore_errors=True)


def _bench(args: argparse.Namespace, skip: set[str], work: Path, pg: Pg,
           moto: list[MotoServerProcess], t0: float, load_start: tuple[float, ...]) -> None:
    rss_sizes = [float(x) for x in args.rss_sizes_gb.split(",") if x.strip()]
    dbs = {"bench-db": "bench"}
    dbs.update({f"rss-{i}": f"bench_rss_{i}" for i in range(len(rss_sizes))})
    t = time.monotonic()
    db_size = create_database(pg, "bench", args.size_gb)
    print(f"database built in {time.monotonic() - t:.0f}s: {db_size / MIB:.0f} MiB", flush=True)
    config, identity, recipient = write_config(work, pg, moto, dbs, args.jobs)
    servers = {"moto (server)": moto[0]._proc.pid if moto[0]._proc else 0,
               "moto (server) ": moto[1]._proc.pid if moto[1]._proc else 0,
               "postgres (server)": pg.postmaster_pid()}
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
           "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}
    pg_only = {"postgres (server)": servers["postgres (server)"]}
    drctl = [str(VENV_BIN / "drctl"), "--config", str(config)]
    # The same config without the S3 regions: what moto's own CPU costs the backup.
    local_cfg = work / "drdaemon-local.toml"
    text = config.read_text()
    head, _, rest = text.partition("[[regions]]")
    local_cfg.write_text(head + "[[regions]]" + rest.split("[[regions]]", 2)[2])
    drctl_local = [str(VENV_BIN / "drctl"), "--config", str(local_cfg)]
    if args.profile:
        profile(args.profile, drctl, pg_only, env)
    plain = work / "plain.pgdump"
    subprocess.run(["pg_dump", "-Fc", "-Z0", "-f", str(plain), pg.dsn("bench")], check=True)
    hand = work / "hand.pgdump.zst.age"
    jobs = args.jobs
    sc = {k: Scenario(k, title) for k, title in [
        ("A", "drctl backup -> 2 moto S3 + 2 local regions"),
        ("A2", "drctl backup -> 2 local regions only"),
        ("B", "pg_dump -Fc -Z0 | zstd -3 -T2 | age > file"),
        ("C", "pg_dump -Fc -Z0 > /dev/null"),
        ("R1", "drctl restore (local region)"),
        ("R2", "age -d | zstd -d | pg_restore"),
        ("R3", f"drctl restore --jobs {jobs} (local region)"),
        ("R4", f"pg_restore -j {jobs} from a -Fc file"),
    ]}
    stored = {}
    scratch = work / "scratch"
    def createdb(db: str) -> str:
        # Timed with the hand-written restores: drctl creates its target too.
        return f"psql -q '{pg.dsn()}' -c 'CREATE DATABASE {db}'"

    for rnd in range(args.rounds):
        print(f"round {rnd + 1}/{args.rounds} (load {os.getloadavg()[0]:.2f})", flush=True)
        steps: list[tuple[str, Any]] = [
            ("A", lambda: timed([*drctl, "backup", "--source", "bench-db", "--json"], servers,
                                env)),
            ("A2", lambda: timed([*drctl_local, "backup", "--source", "bench-db", "--json"],
                                 pg_only, env)),
            ("B", lambda: timed(f"pg_dump -Fc -Z0 '{pg.dsn('bench')}' | zstd -3 -T2 -q | "
                                f"age -r {recipient} > {hand}", pg_only, env, shell=True)),
            ("C", lambda: timed(f"pg_dump -Fc -Z0 '{pg.dsn('bench')}' > /dev/null", pg_only,
                                env, shell=True)),
        ]
        for key, run in steps:
            if key in skip:
                continue
            secs, peaks, out = run()
            sc[key].add(secs, peaks)
            if key == "A":
                stored["drdaemon"] = json.loads(out)[0]["size"]
            if key == "B":
                stored["hand"] = hand.stat().st_size
            print(f"  {key} {secs:7.1f}s  {fmt_rss(peaks)}", flush=True)
        restores: list[tuple[str, str, Any]] = [
            ("R1", f"r1_{rnd}", lambda db: timed(
                [*drctl, "restore", "latest", "--source", "bench-db", "--to", db,
                 "--region", "local-0", "--json"], pg_only, env)),
            ("R2", f"r2_{rnd}", lambda db: timed(
                f"{createdb(db)} && age -d -i {identity} {hand} | zstd -d -q | "
                f"pg_restore --exit-on-error --no-password -d '{pg.dsn(db)}'", pg_only, env,
                shell=True)),
            ("R3", f"r3_{rnd}", lambda db: timed(
                [*drctl, "restore", "latest", "--source", "bench-db", "--to", db,
                 "--region", "local-0", "--jobs", str(jobs), "--scratch-dir", str(scratch),
                 "--json"], pg_only, env)),
            ("R4", f"r4_{rnd}", lambda db: timed(
                f"{createdb(db)} && pg_restore -j {jobs} --exit-on-error --no-password "
                f"-d '{pg.dsn(db)}' {plain}", pg_only, env, shell=True)),
        ]
        for key, db, run in restores:
            if key in skip or (key == "R2" and not hand.exists()):
                continue
            secs, peaks, _ = run(db)
            sc[key].add(secs, peaks)
            print(f"  {key} {secs:7.1f}s  {fmt_rss(peaks)}", flush=True)
            pg.admin(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(db)))
    # Memory must be flat in the source size: one backup and one restore per size.
    rss: list[tuple[int, float, float]] = []
    for i, size_gb in enumerate(rss_sizes):
        size = create_database(pg, f"bench_rss_{i}", size_gb)
        _, backup_peaks, _ = timed([*drctl, "backup", "--source", f"rss-{i}", "--json"],
                                   servers, env)
        _, restore_peaks, _ = timed([*drctl, "restore", "latest", "--source", f"rss-{i}",
                                     "--to", f"rss_r{i}", "--region", "local-0", "--json"],
                                    servers, env)
        rss.append((size, backup_peaks.get("drctl", 0) / 1024,
                    restore_peaks.get("drctl", 0) / 1024))
        print(f"  {size / MIB:.0f} MiB: drctl peak RSS backup {rss[-1][1]:.0f} MiB, "
              f"restore {rss[-1][2]:.0f} MiB", flush=True)
        for db in (f"bench_rss_{i}", f"rss_r{i}"):
            pg.admin(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(db)))
    # ... and flat in the number of files of a tree.
    counts = [int(x) for x in args.rss_file_counts.split(",") if x.strip()]
    files = file_counts.measure(work / "file-counts", counts) if counts else []
    report(args, sc, db_size, rss, stored, t0, load_start, files)


def profile(folder: Path, drctl: list[str], servers: dict[str, int],
            env: dict[str, str]) -> None:
    """py-spy (native frames, subprocesses, idle excluded) of one backup and one restore."""
    folder.mkdir(parents=True, exist_ok=True)
    spy = [str(VENV_BIN / "py-spy"), "record", "--format", "raw", "--rate", "200", "--native"]
    for name, cmd in [("backup", [*drctl, "backup", "--source", "bench-db", "--json"]),
                      ("restore", [*drctl, "restore", "latest", "--source", "bench-db", "--to",
                                   "profiled", "--region", "local-0", "--json"])]:
        secs, _, _ = timed([*spy, "-o", str(folder / f"{name}.txt"), "--", *cmd], servers, env)
        print(f"  profiled {name}: {secs:.1f}s -> {folder / (name + '.txt')}", flush=True)


def report(args: argparse.Namespace, sc: dict[str, Scenario], db_size: int,
           rss: list[tuple[int, float, float]], stored: dict[str, int], t0: float,
           load_start: tuple[float, ...], files: list[file_counts.Row]) -> None:
    mib = db_size / MIB
    lines = [f"## {args.size_gb} GB, {args.rounds} round(s) — {datetime.now():%Y-%m-%d %H:%M}",
             ""]
    if args.note:
        lines += [args.note, ""]
    lines += ["| machine | |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in machine().items()]
    lines += [f"| load (1-min avg) | {load_start[0]:.2f} at start, "
              f"{os.getloadavg()[0]:.2f} at end; per scenario below |", "",
              f"Database: pg_database_size = {mib:.0f} MiB. MB/s = that size / median (MiB/s). "
              "Peak RSS = VmHWM in MiB, the largest over rounds (postgres server includes its "
              "shared buffers; moto keeps every object in memory).", "",
              "| scenario | median s | min-max s | MiB/s | CPU s (command; postgres; moto) "
              "| peak RSS (MiB) | load |",
              "| --- | ---: | ---: | ---: | --- | --- | ---: |"]
    for s in sc.values():
        if not s.seconds:
            continue
        title = s.title.replace("|", "\\|")
        lines.append(f"| {s.key} {title} | {s.median:.1f} | {min(s.seconds):.1f}-"
                     f"{max(s.seconds):.1f} | {mib / s.median:.0f} | {fmt_cpu(s.cpu)} | "
                     f"{fmt_rss(s.rss_kib)} | "
                     f"{statistics.mean(s.load):.2f} |")
    lines.append("")

    def ratio(a: str, b: str) -> str:
        """Ratio of medians, and the median of the per-round ratios: scenarios of one
        round run minutes apart, so pairing them cancels much of a VM's drift."""
        if not (sc[a].seconds and sc[b].seconds):
            return "n/a"
        paired = statistics.median(x / y for x, y in zip(sc[a].seconds, sc[b].seconds,
                                                         strict=False))
        return f"{sc[a].median / sc[b].median:.2f} (paired {paired:.2f})"

    lines += ["| ratio | value | target |", "| --- | ---: | --- |",
              f"| A/B backup vs hand pipeline | {ratio('A', 'B')} | <= 1.10 |",
              f"| A/C backup vs pg_dump alone | {ratio('A', 'C')} | <= 1.25 |",
              f"| A2/B backup to local regions vs hand pipeline | {ratio('A2', 'B')} | "
              "<= 1.10 |",
              f"| A2/C backup to local regions vs pg_dump alone | {ratio('A2', 'C')} | "
              "<= 1.25 |",
              f"| B/C hand pipeline vs pg_dump alone | {ratio('B', 'C')} | — |",
              f"| R1/R2 restore vs hand pipeline | {ratio('R1', 'R2')} | <= 1.00 |",
              f"| R3/R2 restore --jobs vs hand pipeline | {ratio('R3', 'R2')} | < 1.00 |",
              f"| R3/R4 restore --jobs vs pg_restore -j from a file | {ratio('R3', 'R4')} | — |",
              ""]
    big = {k: sc[k].rss_kib.get("drctl", 0) / 1024 for k in ("A", "R1", "R3")}
    sizes = sorted([*rss, (db_size, big["A"], big["R1"])])
    lines += ["| database | drctl backup peak RSS (MiB) | drctl restore peak RSS (MiB) |",
              "| ---: | ---: | ---: |"]
    lines += [f"| {size / MIB:.0f} MiB | {b:.0f} | {r:.0f} |" for size, b, r in sizes if b]
    for col, what in ((1, "backup"), (2, "restore")):
        vals = [row[col] for row in sizes if row[col]]
        if len(vals) > 1:
            lines.append(f"\ndrctl {what} peak RSS spread across sizes: "
                         f"{(max(vals) / min(vals) - 1) * 100:.1f} % (target: within 10 %, "
                         f"each <= 150 MiB).")
    lines += [f"\ndrctl restore --jobs peak RSS: {big['R3']:.0f} MiB.", ""]
    if files:
        lines += ["Directory trees of small files (1,000 per folder), two local regions:", "",
                  *file_counts.table(files), ""]
    if stored:
        d, h = stored.get("drdaemon", 0), stored.get("hand", 0)
        rel = f" ({d / h:.3f}x)" if h else ""
        lines += [f"Stored size at zstd level 3: drdaemon {d / MIB:.1f} MiB, hand pipeline "
                  f"{h / MIB:.1f} MiB{rel}.", ""]
    lines += [f"Whole run: {(time.monotonic() - t0) / 60:.1f} min.", "", ""]
    text = "\n".join(lines)
    print(text)
    append_results(text, args.out)


def append_results(text: str, out: Path | None = None) -> None:
    """Append `text` to the day's results file (or `out`), headed when it is new; the one
    writer of bench/results/ for run.py and its siblings."""
    out = out or ROOT / "bench" / "results" / f"{date.today():%Y-%m-%d}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        if f.tell() == 0:
            f.write(f"# Benchmark results {date.today():%Y-%m-%d}\n\n"
                    "Produced by `bench/run.py` and its siblings (see bench/README.md).\n\n")
        f.write(text)


if __name__ == "__main__":
    main()
