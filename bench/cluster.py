"""Physical snapshots of a whole cluster: drdaemon's postgres-cluster kind against pgBackRest
(issue 17). Not part of the test suite.

Starts a private PostgreSQL server (bench/run.py's helper, as the tests' unprivileged
user when root), builds a database of --size-gb, turns on WAL archiving to pgBackRest
(what pgBackRest needs to make a consistent backup), then alternates --rounds rounds of:

  P1  drctl backup of a postgres-cluster source -> 2 local regions (zstd 3, age)
  P2  pgbackrest backup --type=full (zst level 3, aes-256-cbc, process-max 2)
  Q1  drctl restore --to-datadir (verified: started privately once, then stopped)
  Q2  pgbackrest restore into an empty folder
  Q3  pgbackrest restore, then pg_ctl start -w and stop (what Q1 does beyond Q2)

and appends a Markdown table to bench/results/<YYYY-MM-DD>.md. Peak RSS is each
process's VmHWM (bench/run.py's sampler). A second, larger database (--rss-size-gb)
is backed up and restored once by drctl to show that its memory stays flat.

    .venv/bin/python bench/cluster.py --size-gb 0.3 --rounds 1     # estimate
    .venv/bin/python bench/cluster.py                              # 1 GB, 2 rounds
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date, datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import run  # noqa: E402  (bench/run.py: servers, sampler, machine)
from run import MIB, ROOT, VENV_BIN, Scenario, fmt_cpu, fmt_rss, timed  # noqa: E402

from drdaemon.keys import generate_identity, generate_manifest_key  # noqa: E402

STANZA = "bench"


def as_user(pg: run.Pg, argv: list[str]) -> list[str]:
    if pg.as_user is None:
        return argv
    return ["setpriv", f"--reuid={pg.as_user.pw_uid}", f"--regid={pg.as_user.pw_gid}",
            "--clear-groups", "--", *argv]


def pgbackrest_setup(pg: run.Pg, work: Path) -> Path:
    """A pgBackRest repository and stanza for the server, with WAL archiving on."""
    repo, spool = work / "pgbr-repo", work / "pgbr-spool"
    for d in (repo, spool, work / "pgbr-log"):
        d.mkdir()
        if pg.as_user is not None:
            os.chown(d, pg.as_user.pw_uid, pg.as_user.pw_gid)
    conf = work / "pgbackrest.conf"
    conf.write_text(
        f"[global]\nrepo1-path={repo}\nrepo1-retention-full=99\nlog-path={work / 'pgbr-log'}\n"
        f"spool-path={spool}\nlock-path={spool}\n"
        "compress-type=zst\ncompress-level=3\nprocess-max=2\nstart-fast=y\n"
        "repo1-cipher-type=aes-256-cbc\nrepo1-cipher-pass=bench-only-not-a-secret\n"
        "log-level-console=warn\n\n"
        f"[{STANZA}]\npg1-path={pg.data}\npg1-port={pg.port}\n"
        f"pg1-socket-path={pg.data.parent}\npg1-user=postgres\n")
    conf.chmod(0o644)
    with open(pg.data / "postgresql.conf", "a") as f:
        f.write(f"\narchive_mode = on\narchive_command = 'pgbackrest --config={conf} "
                f"--stanza={STANZA} archive-push %p'\n")
    pg_ctl = str(pg.bin_dir / "pg_ctl")
    subprocess.run(as_user(pg, [pg_ctl, "restart", "-D", str(pg.data), "-w", "-m", "fast",
                                "-l", str(pg.data.parent / "server.log")]),
                   check=True, capture_output=True, env=pg.env)
    subprocess.run(as_user(pg, ["pgbackrest", f"--config={conf}", f"--stanza={STANZA}",
                                "stanza-create"]), check=True, capture_output=True)
    return conf


def write_config(work: Path, pg: run.Pg) -> Path:
    keys = work / "keys"
    recipient = generate_identity(keys / "identity.txt")
    generate_manifest_key(keys / "manifest.key")
    regions = "".join(
        f'[[regions]]\nname = "local-{i}"\nkind = "local"\ncontinent = "{c}"\n'
        f'path = "{work / f"local-{i}"}"\n\n' for i, c in enumerate(["europe", "north-america"]))
    user = f'os_user = "{pg.as_user.pw_name}"\n' if pg.as_user is not None else ""
    config = work / "drdaemon.toml"
    config.write_text(
        f'[daemon]\nstate_dir = "{work / "state"}"\n\n'
        f'[keys]\nrecipients = ["{recipient}"]\nidentity_file = "{keys / "identity.txt"}"\n'
        f'manifest_key_file = "{keys / "manifest.key"}"\n\n'
        '[pipeline]\nzstd_level = 3\nzstd_threads = 2\n\n' + regions
        + f'[[sources]]\nname = "cluster"\nkind = "postgres-cluster"\ntenant = "bench"\n'
          f'tier = "paid"\ndsn = "{pg.dsn()}"\n{user}\n')
    return config


def fresh_dir(pg: run.Pg, parent: Path, name: str) -> Path:
    path = parent / name
    path.mkdir(mode=0o700)
    if pg.as_user is not None:
        os.chown(path, pg.as_user.pw_uid, pg.as_user.pw_gid)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--rss-size-gb", type=float, default=2.0,
                    help="a further database added before one more drctl backup and restore, "
                         "to compare peak RSS (0 to skip)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    if shutil.which("pgbackrest") is None:
        sys.exit("pgbackrest is not installed (Debian: apt-get install pgbackrest)")
    work = Path(tempfile.mkdtemp(prefix="drbench-cluster-", dir=args.workdir or "/var/tmp"))
    os.chmod(work, 0o755)
    t0 = time.monotonic()
    print(f"workdir {work}", flush=True)
    try:
        pgbase = work / "pg"
        pgbase.mkdir()
        with run.postgres_server(pgbase) as pg:
            _bench(args, work, pg, t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _bench(args: argparse.Namespace, work: Path, pg: run.Pg, t0: float) -> None:
    t = time.monotonic()
    db_size = run.create_database(pg, "bench", args.size_gb)
    print(f"database built in {time.monotonic() - t:.0f}s: {db_size / MIB:.0f} MiB", flush=True)
    conf = pgbackrest_setup(pg, work)
    config = write_config(work, pg)
    servers = {"postgres (server)": pg.postmaster_pid()}
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    drctl = [str(VENV_BIN / "drctl"), "--config", str(config)]
    pgbr = as_user(pg, ["pgbackrest", f"--config={conf}", f"--stanza={STANZA}"])
    pg_ctl = str(pg.bin_dir / "pg_ctl")
    targets = fresh_dir(pg, work, "targets")
    sc = {k: Scenario(k, title) for k, title in [
        ("P1", "drctl backup (postgres-cluster) -> 2 local regions"),
        ("P2", "pgbackrest backup --type=full (zst 3, aes-256-cbc, process-max 2)"),
        ("Q1", "drctl restore --to-datadir (verified by a private start)"),
        ("Q2", "pgbackrest restore"),
        ("Q3", "pgbackrest restore + pg_ctl start -w + stop"),
    ]}
    stored: dict[str, int] = {}
    for rnd in range(args.rounds):
        print(f"round {rnd + 1}/{args.rounds} (load {os.getloadavg()[0]:.2f})", flush=True)
        secs, peaks, out = timed([*drctl, "backup", "--json"], servers, env)
        sc["P1"].add(secs, peaks)
        stored["drdaemon"] = int(json.loads(out)[0]["size"])
        print(f"  P1 {secs:7.1f}s  {fmt_rss(peaks)}", flush=True)
        secs, peaks, _ = timed([*pgbr, "--type=full", "backup"], servers, env)
        sc["P2"].add(secs, peaks)
        print(f"  P2 {secs:7.1f}s  {fmt_rss(peaks)}", flush=True)
        target = targets / f"q1-{rnd}"
        secs, peaks, _ = timed([*drctl, "restore", "latest", "--source", "cluster",
                                "--to-datadir", str(target), "--region", "local-0", "--json"],
                               servers, env)
        sc["Q1"].add(secs, peaks)
        print(f"  Q1 {secs:7.1f}s  {fmt_rss(peaks)}", flush=True)
        shutil.rmtree(target)
        target = fresh_dir(pg, targets, f"q2-{rnd}")
        secs, peaks, _ = timed([*pgbr, f"--pg1-path={target}", "restore"], servers, env)
        sc["Q2"].add(secs, peaks)
        print(f"  Q2 {secs:7.1f}s  {fmt_rss(peaks)}", flush=True)
        shutil.rmtree(target)
        target = fresh_dir(pg, targets, f"q3-{rnd}")
        port = run.find_free_port()
        start = " ".join(as_user(pg, [pg_ctl, "start", "-D", str(target), "-w", "-t", "600",
                                      "-l", str(targets / f"q3-{rnd}.log"), "-o",
                                      f"'-p {port} -c archive_mode=off -k {targets}'"]))
        stop = " ".join(as_user(pg, [pg_ctl, "stop", "-D", str(target), "-m", "fast", "-w"]))
        restore = " ".join(f"'{a}'" for a in [*pgbr, f"--pg1-path={target}", "restore"])
        secs, peaks, _ = timed(f"{restore} && {start} && {stop}", servers, env, shell=True)
        sc["Q3"].add(secs, peaks)
        print(f"  Q3 {secs:7.1f}s  {fmt_rss(peaks)}", flush=True)
        shutil.rmtree(target)
    rss: list[tuple[int, float, float]] = []
    if args.rss_size_gb > 0:
        extra = run.create_database(pg, "bench_rss", args.rss_size_gb)
        _, bpeaks, _ = timed([*drctl, "backup", "--json"], servers, env)
        _, rpeaks, _ = timed([*drctl, "restore", "latest", "--source", "cluster",
                              "--to-datadir", str(targets / "rss"), "--region", "local-0",
                              "--json"], servers, env)
        rss.append((db_size + extra, bpeaks.get("drctl", 0) / 1024,
                    rpeaks.get("drctl", 0) / 1024))
    report(args, sc, db_size, rss, stored, t0)


def report(args: argparse.Namespace, sc: dict[str, Scenario], db_size: int,
           rss: list[tuple[int, float, float]], stored: dict[str, int], t0: float) -> None:
    mib = db_size / MIB
    lines = [f"## Physical (postgres-cluster vs pgBackRest): {args.size_gb} GB, "
             f"{args.rounds} round(s) — {datetime.now():%Y-%m-%d %H:%M}", ""]
    if args.note:
        lines += [args.note, ""]
    machine: dict[str, Any] = run.machine()
    machine["pgbackrest"] = subprocess.run(["pgbackrest", "version"], capture_output=True,
                                           text=True).stdout.strip()
    lines += ["| machine | |", "| --- | --- |", *[f"| {k} | {v} |" for k, v in machine.items()],
              "", f"Database: {mib:.0f} MiB (pg_database_size of the bench database; the "
              "cluster adds its other databases and the WAL of the backup).", "",
              "| scenario | median s | min-max s | MiB/s | CPU s (command; postgres; moto) "
              "| peak RSS (MiB) | load |", "| --- | ---: | ---: | ---: | --- | --- | ---: |"]
    for s in sc.values():
        if s.seconds:
            lines.append(f"| {s.key} {s.title} | {s.median:.1f} | {min(s.seconds):.1f}-"
                         f"{max(s.seconds):.1f} | {mib / s.median:.0f} | {fmt_cpu(s.cpu)} | "
                         f"{fmt_rss(s.rss_kib)} | {statistics.mean(s.load):.2f} |")

    def ratio(a: str, b: str) -> str:
        paired = statistics.median(x / y for x, y in zip(sc[a].seconds, sc[b].seconds,
                                                         strict=False))
        return f"{sc[a].median / sc[b].median:.2f} (paired {paired:.2f})"

    lines += ["", "| ratio | value | target |", "| --- | ---: | --- |",
              f"| P1/P2 backup vs pgBackRest | {ratio('P1', 'P2')} | <= 1.20 |",
              f"| Q1/Q2 restore (verified) vs pgBackRest restore | {ratio('Q1', 'Q2')} | "
              "<= 1.20 |",
              f"| Q1/Q3 restore (verified) vs pgBackRest restore + start | {ratio('Q1', 'Q3')} "
              "| <= 1.20 |", ""]
    big = (db_size, sc["P1"].rss_kib.get("drctl", 0) / 1024,
           sc["Q1"].rss_kib.get("drctl", 0) / 1024)
    lines += ["| databases | drctl backup peak RSS (MiB) | drctl restore peak RSS (MiB) |",
              "| ---: | ---: | ---: |"]
    lines += [f"| {size / MIB:.0f} MiB | {b:.0f} | {r:.0f} |" for size, b, r in [big, *rss]]
    if stored:
        lines += ["", f"Stored by drdaemon: {stored['drdaemon'] / MIB:.1f} MiB."]
    lines += ["", f"Whole run: {(time.monotonic() - t0) / 60:.1f} min.", "", ""]
    text = "\n".join(lines)
    print(text)
    out = args.out or ROOT / "bench" / "results" / f"{date.today():%Y-%m-%d}.md"
    with open(out, "a") as f:
        if f.tell() == 0:
            f.write(f"# Benchmark results {date.today():%Y-%m-%d}\n\n"
                    "Produced by `bench/run.py` and `bench/cluster.py` (see bench/README.md).\n\n")
        f.write(text)


if __name__ == "__main__":
    main()
