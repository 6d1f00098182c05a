"""Scale figures (issue 16): many sources over two moto S3 regions. Not part of the test suite.

Starts a private PostgreSQL server and two moto S3 servers (bench/run.py's helpers), puts
a counting proxy (bench/s3proxy.py) on loopback in front of each moto server, makes
--sources small databases (copies of one template, each with its own rows) and
configures each as a postgres source, then measures:

  S   one day's snapshots: one `drctl backup` of every source (S3 requests counted);
      per snapshot: wall time, requests, and `pg_dump -Fc` alone of the same database;
      with --workers N also the cluster engine on this host: a `drdaemon run` scheduler
      and N `drdaemon worker` processes ([cluster] on the bench's PostgreSQL) snapshot
      the same sources under another region prefix (so every source is due, as on the
      first day), timed from their start to the last manifest
  L   with 0 and --latency-ms added to every S3 request: `drctl status` with an empty
      manifest cache (cold) and again (warm); a daemon's start to
      `drdaemon_state_complete 1` (cold cache); one /metrics scrape; one refresh of
      the metrics (in a process of its own, cold then warm) with its S3 requests
  H   `drctl backup` of one larger database (--size-gb) to the two moto regions against
      `pg_dump -Fc -Z0 | zstd -3 -T2 | age | tee FIFO | aws s3 cp -` to both regions
      (awscli from --aws, e.g. a throw-away venv's bin/aws), --rounds rounds alternated

and appends a Markdown table to bench/results/<YYYY-MM-DD>.md.

    .venv/bin/python bench/scale.py --sources 50 --size-gb 0.05 --rounds 1   # quick check
    .venv/bin/python bench/scale.py --sources 100 --workers 3 --skip L,H      # three workers
    .venv/bin/python bench/scale.py                                          # 1,000 sources
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import boto3

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import run  # noqa: E402  (bench/run.py: servers, timing, machine)
from run import MIB, VENV_BIN  # noqa: E402

from drdaemon.keys import generate_identity, generate_manifest_key  # noqa: E402
from drdaemon.statefs import MANIFEST_CACHE  # noqa: E402

REGIONS = [("eu-central-1", "europe"), ("us-east-1", "north-america")]
TEMPLATE = """
CREATE TABLE courses (id int PRIMARY KEY, title text NOT NULL, syllabus text);
CREATE TABLE grades (course_id int REFERENCES courses, student text, grade numeric(5,2));
INSERT INTO courses SELECT i, 'Course ' || i, repeat('Week ' || i || ': reading. ', 20)
  FROM generate_series(1, 50) i;
INSERT INTO grades SELECT 1 + i % 50, 'student' || i, (i % 600) / 6.0
  FROM generate_series(1, 500) i;
"""
REFRESH = """
import json, sys, time, urllib.request
from drdaemon import config, metrics, metrics_feed
from drdaemon.runtime import open_runtime
def counts():
    return [json.load(urllib.request.urlopen(u + "/__proxy/counts")) for u in sys.argv[2:]]
rt = open_runtime(config.load(sys.argv[1]))
st = metrics.MetricsState.from_config(rt.config)
out = []
for _ in range(2):
    before, t = counts(), time.monotonic()
    metrics_feed.refresh(rt, st)
    secs, after = time.monotonic() - t, counts()
    out.append([secs, sum(sum(a.values()) - sum(b.values()) for a, b in zip(after, before))])
print(json.dumps(out))
"""


class Proxy:
    """bench/s3proxy.py in its own process, in front of one moto server."""

    def __init__(self, upstream_port: int) -> None:
        self.port = run.find_free_port()
        self.proc = subprocess.Popen(
            [sys.executable, str(BENCH / "s3proxy.py"), str(self.port), str(upstream_port)],
            stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ok":
            raise RuntimeError("s3proxy did not start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def call(self, what: str, method: str = "GET") -> dict[str, int]:
        req = urllib.request.Request(f"{self.url}/__proxy/{what}", method=method)
        with urllib.request.urlopen(req, timeout=30) as resp:
            counts: dict[str, int] = json.load(resp)
            return counts

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


class Counting:
    """S3 requests over both proxies between reset() and counts()."""

    def __init__(self, proxies: list[Proxy]) -> None:
        self.proxies = proxies

    def reset(self) -> None:
        for p in self.proxies:
            p.call("reset", "POST")

    def latency(self, ms: float) -> None:
        for p in self.proxies:
            p.call(f"latency?ms={ms}", "POST")

    def counts(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for p in self.proxies:
            for k, v in p.call("counts").items():
                total[k] = total.get(k, 0) + v
        return total


def fmt_counts(c: dict[str, int]) -> str:
    return f"{sum(c.values())} (" + ", ".join(f"{k} {v}" for k, v in sorted(c.items())) + ")"


def make_databases(pg: run.Pg, n: int) -> list[str]:
    """`n` small databases: copies of one template, each then given rows of its own (so every
    dump differs). Returns their names."""
    import psycopg
    pg.admin("CREATE DATABASE scale_tmpl")
    with psycopg.connect(pg.dsn("scale_tmpl"), autocommit=True) as conn:
        conn.execute(TEMPLATE)
    names = [f"scale_{i:04d}" for i in range(n)]
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        for name in names:
            conn.execute(f"CREATE DATABASE {name} TEMPLATE scale_tmpl STRATEGY FILE_COPY")
    for name in names:
        with psycopg.connect(pg.dsn(name), autocommit=True) as conn:
            conn.execute("INSERT INTO grades VALUES (1, %s, 1)", (name,))
    return names


def make_buckets(moto: list[run.MotoServerProcess]) -> list[str]:
    buckets = []
    for i, (server, (region, _)) in enumerate(zip(moto, REGIONS, strict=True)):
        create: dict[str, Any] = {"Bucket": f"bench-{i}"}
        if region != "us-east-1":
            create["CreateBucketConfiguration"] = {"LocationConstraint": region}
        boto3.client("s3", endpoint_url=server.endpoint_url, region_name=region,
                     aws_access_key_id="bench", aws_secret_access_key="bench"
                     ).create_bucket(**create)
        buckets.append(f"bench-{i}")
    return buckets


def write_config(path: Path, work: Path, endpoints: list[str], sources: dict[str, str],
                 metrics_port: int, prefix: str = "", extra: str = "",
                 state: Path | None = None) -> None:
    """A config with the two S3 regions at `endpoints` (under `prefix`) and postgres
    `sources` (name -> dsn), `extra` tables; keys under work/keys (made once)."""
    keys = work / "keys"
    if not (keys / "identity.txt").exists():
        recipient = generate_identity(keys / "identity.txt")
        (keys / "recipient.txt").write_text(recipient)
        generate_manifest_key(keys / "manifest.key")
    recipient = (keys / "recipient.txt").read_text()
    regions = "".join(
        f'[[regions]]\nname = "s3-{i}"\nkind = "s3"\ncontinent = "{cont}"\n'
        f'bucket = "bench-{i}"\nregion = "{region}"\nendpoint_url = "{url}"\n'
        f'prefix = "{prefix}"\n\n'
        for i, (url, (region, cont)) in enumerate(zip(endpoints, REGIONS, strict=True)))
    srcs = "".join(f'[[sources]]\nname = "{n}"\nkind = "postgres"\ntenant = "bench"\n'
                   f'tier = "paid"\ndsn = "{dsn}"\n\n' for n, dsn in sources.items())
    path.write_text(
        f'[daemon]\nstate_dir = "{state or work / "state"}"\n'
        f'metrics_address = "127.0.0.1:{metrics_port}"\n\n' + extra +
        f'[keys]\nrecipients = ["{recipient}"]\nidentity_file = "{keys / "identity.txt"}"\n'
        f'manifest_key_file = "{keys / "manifest.key"}"\n\n'
        '\n[pipeline]\nzstd_level = 3\nzstd_threads = 2\n\n' + regions + srcs)


def wall(cmd: list[str] | str, env: dict[str, str], shell: bool = False) -> tuple[float, str]:
    t = time.monotonic()
    argv: Any = ["bash", "-o", "pipefail", "-c", cmd] if shell else cmd
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    secs = time.monotonic() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{str(cmd)[:200]} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return secs, proc.stdout


def scrape(port: int) -> tuple[float, str]:
    t = time.monotonic()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as resp:
        body = resp.read().decode()
    return time.monotonic() - t, body


@contextlib.contextmanager
def daemon(config: Path, env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "ab") as out:
        proc = subprocess.Popen([str(VENV_BIN / "drdaemon"), "--config", str(config), "run"],
                                stdout=out, stderr=out, env=env)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def daemon_start(config: Path, env: dict[str, str], port: int, log: Path,
                 timeout: float) -> dict[str, Any]:
    """Seconds from the daemon's start to `drdaemon_state_complete 1`, and one scrape then."""
    t = time.monotonic()
    with daemon(config, env, log) as proc:
        first = None
        while time.monotonic() - t < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"drdaemon exited ({proc.returncode}); see {log}")
            try:
                _, body = scrape(port)
            except OSError:
                time.sleep(0.05)
                continue
            first = first or time.monotonic() - t
            if "\ndrdaemon_state_complete 1" in "\n" + body:
                break
            time.sleep(0.1)
        else:
            raise RuntimeError(f"no drdaemon_state_complete 1 within {timeout:.0f}s; see {log}")
        complete = time.monotonic() - t
        scrapes = [scrape(port) for _ in range(5)]
    return {"complete": complete, "serving": first,
            "scrape": statistics.median(s for s, _ in scrapes),
            "scrape_bytes": len(scrapes[0][1])}


def listing_round(latency: float, counting: Counting, drctl: list[str], env: dict[str, str],
                  state: Path, config: Path, port: int, work: Path,
                  profile: Path | None) -> dict[str, Any]:
    # As an install leaves it: drdaemon's bytecode compiled (where PYTHONDONTWRITEBYTECODE
    # is set, every command would otherwise compile its ~230 modules, ~0.4 s).
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(run.ROOT / "drdaemon")],
                   check=True, env={k: v for k, v in env.items()
                                    if k != "PYTHONDONTWRITEBYTECODE"})
    counting.latency(latency)
    row: dict[str, Any] = {"latency": latency}
    for label in ("cold", "warm"):
        if label == "cold":
            shutil.rmtree(state / MANIFEST_CACHE, ignore_errors=True)
        counting.reset()
        row[f"status_{label}"], _ = wall([*drctl, "status", "--json"], env)
        row[f"status_{label}_req"] = counting.counts()
        print(f"  {latency:.0f} ms: status {label} {row[f'status_{label}']:.2f}s "
              f"{fmt_counts(row[f'status_{label}_req'])}", flush=True)
    if profile is not None:
        profile.mkdir(parents=True, exist_ok=True)
        spy = [str(VENV_BIN / "py-spy"), "record", "--format", "raw", "--rate", "200",
               "--idle", "-o", str(profile / f"status-warm-{latency:.0f}ms.txt"), "--"]
        wall([*spy, *drctl, "status", "--json"], env)
        shutil.rmtree(state / MANIFEST_CACHE, ignore_errors=True)
        wall([*spy[:-2], str(profile / f"status-cold-{latency:.0f}ms.txt"), "--",
              *drctl, "status", "--json"], env)
    shutil.rmtree(state / MANIFEST_CACHE, ignore_errors=True)
    counting.reset()
    row.update(daemon_start(config, env, port, work / "daemon.log", timeout=600))
    row["start_req"] = counting.counts()
    print(f"  {latency:.0f} ms: daemon serving after {row['serving']:.2f}s, complete after "
          f"{row['complete']:.2f}s, scrape {row['scrape'] * 1000:.0f} ms, "
          f"{fmt_counts(row['start_req'])}", flush=True)
    # A restart: the state folder's manifest cache is as the first daemon left it.
    counting.reset()
    again = daemon_start(config, env, port, work / "daemon.log", timeout=600)
    row["restart"], row["restart_req"] = again["complete"], counting.counts()
    print(f"  {latency:.0f} ms: daemon restart complete after {row['restart']:.2f}s, "
          f"{fmt_counts(row['restart_req'])}", flush=True)
    _, out = wall([str(VENV_BIN / "python"), "-c", REFRESH, str(config),
                   *(p.url for p in counting.proxies)], env)
    (row["refresh_cold"], row["refresh_cold_req"]), (row["refresh_warm"],
                                                     row["refresh_warm_req"]) = json.loads(out)
    print(f"  {latency:.0f} ms: refresh cold {row['refresh_cold']:.2f}s "
          f"{row['refresh_cold_req']} req, warm {row['refresh_warm']:.2f}s "
          f"{row['refresh_warm_req']} req", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sources", type=int, default=1000)
    ap.add_argument("--latency-ms", type=float, default=20)
    ap.add_argument("--size-gb", type=float, default=0.3,
                    help="the database of the drctl-against-hand-pipeline comparison (H)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of H")
    ap.add_argument("--aws", default=shutil.which("aws") or "/var/tmp/awscli-venv/bin/aws",
                    help="the aws command (awscli), for H")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: S,L,H "
                    "(L needs S: it lists S's snapshots)")
    ap.add_argument("--profile", type=Path, default=None,
                    help="py-spy (raw stacks) of drctl status (idle included) and of one "
                    "drctl backup of H (native frames, by thread) into this folder")
    ap.add_argument("--workers", type=int, default=0,
                    help="S also with a scheduler and this many `drdaemon worker` processes")
    ap.add_argument("--worker-concurrency", type=int, default=2,
                    help="[cluster] max_concurrent_snapshots of each worker")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--hold", type=Path, default=None,
                    help="after S, keep the servers and repeat L on request: each file "
                    "HOLD/go (JSON: latencies, note, append) runs L rounds with the current "
                    "code and writes HOLD/result-N.md (appended to the results file too if "
                    "append is true); HOLD/quit ends")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    if "H" not in skip and not Path(args.aws).exists():
        sys.exit(f"{args.aws}: no awscli (python3 -m venv /var/tmp/awscli-venv && "
                 "/var/tmp/awscli-venv/bin/pip install awscli), or --skip H")
    work = Path(tempfile.mkdtemp(prefix="drbench-scale-", dir=args.workdir or "/var/tmp"))
    os.chmod(work, 0o755)
    t0 = time.monotonic()
    print(f"workdir {work}", flush=True)
    os.environ.setdefault("MOTO_S3_DEFAULT_KEY_BUFFER_SIZE", str(64 << 30))
    moto = [run.MotoServerProcess(log_path=work / f"moto-{i}.log") for i in range(2)]
    proxies: list[Proxy] = []
    try:
        for server in moto:
            server.start()
        proxies = [Proxy(server.port) for server in moto]
        pgbase = work / "pg"
        pgbase.mkdir()
        with run.postgres_server(pgbase) as pg:
            _bench(args, skip, work, pg, moto, proxies, t0)
    finally:
        for p in proxies:
            p.close()
        for server in moto:
            server.close()
        shutil.rmtree(work, ignore_errors=True)


def _bench(args: argparse.Namespace, skip: set[str], work: Path, pg: run.Pg,
           moto: list[run.MotoServerProcess], proxies: list[Proxy], t0: float) -> None:
    load_start = os.getloadavg()
    make_buckets(moto)
    counting = Counting(proxies)
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
           "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}
    results: dict[str, Any] = {}
    port = run.find_free_port()
    config = work / "scale.toml"
    if "S" not in skip:
        t = time.monotonic()
        names = make_databases(pg, args.sources)
        print(f"{len(names)} databases made in {time.monotonic() - t:.0f}s", flush=True)
        write_config(config, work, [p.url for p in proxies],
                     {n.replace("_", "-"): pg.dsn(n) for n in names}, port)
        drctl = [str(VENV_BIN / "drctl"), "--config", str(config)]
        counting.latency(0)
        counting.reset()
        secs, out = wall([*drctl, "backup", "--json"], env)
        done = json.loads(out)
        assert len(done) == len(names) and all(r["ok"] for r in done), out[-2000:]
        reqs = counting.counts()
        sample = names[: min(20, len(names))]
        dump, _ = wall(" && ".join(f"pg_dump -Fc '{pg.dsn(n)}' > /dev/null" for n in sample),
                       env, shell=True)
        results["S"] = {"n": len(names), "secs": secs, "req": reqs,
                        "dump": dump / len(sample),
                        "bytes": statistics.mean(int(r["size"]) for r in done)}
        print(f"S: {len(names)} snapshots in {secs:.1f}s ({secs / len(names):.3f}s each), "
              f"{fmt_counts(reqs)}; pg_dump alone {dump / len(sample):.3f}s each", flush=True)
        if args.workers:
            results["W"] = cluster_round(args, work, pg, moto, proxies, counting, env,
                                         {n.replace("_", "-"): pg.dsn(n) for n in names})
        if args.hold is not None:
            hold(args, results, counting, drctl, env, work, config, port, t0, load_start)
            return
        if "L" not in skip:
            results["L"] = [listing_round(ms, counting, drctl, env, work / "state", config,
                                          port, work, args.profile)
                            for ms in (0, args.latency_ms)]
            counting.latency(0)
    if "H" not in skip:
        results["H"] = hand_rounds(args, work, pg, moto, env)
    report(args, results, t0, load_start)


def cluster_round(args: argparse.Namespace, work: Path, pg: run.Pg,
                  moto: list[run.MotoServerProcess], proxies: list[Proxy], counting: Counting,
                  env: dict[str, str], sources: dict[str, str]) -> dict[str, Any]:
    """The same sources by the cluster engine: a scheduler (working on no job itself) and
    `--workers` worker processes, each with its own state folder, under the region prefix
    `w/` (nothing there yet: every source is due at the scheduler's start)."""
    pg.admin("CREATE DATABASE queue")
    cluster = (f'[cluster]\ndsn = "{pg.dsn("queue")}"\n'
               f'max_concurrent_snapshots = {args.worker_concurrency}\n'
               'scheduler_works = false\n')
    procs = []
    for i in range(args.workers + 1):
        config = work / f"cluster-{i}.toml"
        write_config(config, work, [p.url for p in proxies], sources, run.find_free_port(),
                     prefix="w", extra=cluster, state=work / f"state-w{i}")
        procs.append([str(VENV_BIN / "drdaemon"), "--config", str(config),
                      "run" if i == 0 else "worker"])
    clients = [boto3.client("s3", endpoint_url=server.endpoint_url, region_name=region,
                            aws_access_key_id="bench", aws_secret_access_key="bench")
               for server, (region, _) in zip(moto, REGIONS, strict=True)]

    def committed() -> int:
        # Straight to moto, not through the counting proxies.
        return min(sum(1 for page in c.get_paginator("list_objects_v2").paginate(
                           Bucket=f"bench-{i}", Prefix="w/sources/")
                       for o in page.get("Contents", []) if "/manifests/" in o["Key"])
                   for i, c in enumerate(clients))

    counting.latency(0)
    counting.reset()
    t = time.monotonic()
    running = []
    try:
        for i, argv in enumerate(procs):
            with open(work / f"cluster-{i}.log", "ab") as out:
                running.append(subprocess.Popen(argv, stdout=out, stderr=out, env=env))
        while (done := committed()) < len(sources):
            if any(p.poll() is not None for p in running):
                raise RuntimeError(f"a cluster process exited; see {work}/cluster-*.log")
            if time.monotonic() - t > 3600:
                raise RuntimeError(f"{done} of {len(sources)} after an hour; see {work}")
            time.sleep(0.5)
        secs = time.monotonic() - t
    finally:
        for p in running:
            p.send_signal(signal.SIGTERM)
        for p in running:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    reqs = counting.counts()
    print(f"W: {len(sources)} snapshots by {args.workers} workers in {secs:.1f}s "
          f"({secs / len(sources):.3f}s each), {fmt_counts(reqs)}", flush=True)
    return {"n": len(sources), "secs": secs, "req": reqs, "workers": args.workers,
            "concurrency": args.worker_concurrency}


def hold(args: argparse.Namespace, results: dict[str, Any], counting: Counting,
         drctl: list[str], env: dict[str, str], work: Path, config: Path, port: int,
         t0: float, load_start: tuple[float, ...]) -> None:
    """Part L again and again on the same snapshots (S is the slow part; the commands run
    from this venv, so each round measures the code as it is then)."""
    args.hold.mkdir(parents=True, exist_ok=True)
    (args.hold / "ready").write_text(str(work))
    n = 0
    while not (args.hold / "quit").exists():
        go = args.hold / "go"
        if not go.exists():
            time.sleep(1)
            continue
        req = json.loads(go.read_text() or "{}")
        go.unlink()
        n += 1
        load_start = os.getloadavg()  # this round's, not the run's
        rows = [listing_round(ms, counting, drctl, env, work / "state", config, port, work,
                              Path(req["profile"]) if req.get("profile") else None)
                for ms in req.get("latencies", [0, args.latency_ms])]
        counting.latency(0)
        args.note = req.get("note", "")
        text = report(args, {"S": results["S"], "L": rows}, t0, load_start,
                      append=bool(req.get("append")), tables={"L"})
        (args.hold / f"result-{n}.md").write_text(text)


def hand_rounds(args: argparse.Namespace, work: Path, pg: run.Pg,
                moto: list[run.MotoServerProcess], env: dict[str, str]) -> dict[str, Any]:
    t = time.monotonic()
    size = run.create_database(pg, "bench", args.size_gb)
    print(f"database built in {time.monotonic() - t:.0f}s: {size / MIB:.0f} MiB", flush=True)
    config = work / "one.toml"
    write_config(config, work, [s.endpoint_url for s in moto], {"bench-db": pg.dsn("bench")},
                 run.find_free_port())
    recipient = config.read_text().split('recipients = ["', 1)[1].split('"', 1)[0]
    drctl = [str(VENV_BIN / "drctl"), "--config", str(config)]
    fifo = work / "tee.fifo"
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
        out = args.profile / "backup-H.txt"
        wall([str(VENV_BIN / "py-spy"), "record", "--format", "raw", "--rate", "200",
              "--native", "--threads", "-o", str(out), "--", *drctl, "backup", "--json"], env)
        print(f"  profiled drctl backup (H): {out}", flush=True)
    a, b = [], []
    for rnd in range(args.rounds):
        secs, _ = wall([*drctl, "backup", "--json"], env)
        a.append(secs)
        with contextlib.suppress(FileNotFoundError):
            fifo.unlink()
        os.mkfifo(fifo)
        s3 = [f"{args.aws} s3 cp - s3://bench-{i}/hand/r{rnd}.pgdump.zst.age "
              f"--endpoint-url {s.endpoint_url} --region {region} --only-show-errors"
              for i, (s, (region, _)) in enumerate(zip(moto, REGIONS, strict=True))]
        cmd = (f"{s3[0]} < {fifo} & up=$!; pg_dump -Fc -Z0 '{pg.dsn('bench')}' | zstd -q -3 -T2 "
               f"| age -r {recipient} | tee {fifo} | {s3[1]}; wait $up")
        secs, _ = wall(cmd, env, shell=True)
        b.append(secs)
        print(f"  H round {rnd + 1}: drctl {a[-1]:.1f}s, hand {b[-1]:.1f}s", flush=True)
    return {"size": size, "drctl": a, "hand": b}


def report(args: argparse.Namespace, r: dict[str, Any], t0: float,
           load_start: tuple[float, ...], append: bool = True,
           tables: set[str] | None = None) -> str:
    """The Markdown of `r` (parts in `tables`, all by default), appended to the results file
    if `append`."""
    lines = [f"## Scale: {args.sources} sources, {args.latency_ms:g} ms — "
             f"{datetime.now():%Y-%m-%d %H:%M}", "", "Produced by `bench/scale.py`.", ""]
    if args.note:
        lines += [args.note, ""]
    lines += ["| machine | |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in run.machine().items()]
    lines += [f"| load (1-min avg) | {load_start[0]:.2f} at start, "
              f"{os.getloadavg()[0]:.2f} at end |", ""]
    if "S" in r and (tables is None or "S" in tables):
        s = r["S"]
        n, total = s["n"], sum(s["req"].values())
        lines += [f"One day's snapshots of {n} small databases (stored {s['bytes'] / 1024:.1f} "
                  "KiB each on average), one `drctl backup` on one host, no added latency:", "",
                  "| what | value | target |", "| --- | ---: | --- |",
                  f"| wall time, all | {s['secs']:.1f} s | |",
                  f"| wall time per snapshot | {s['secs'] / n:.3f} s | <= 0.5 s |",
                  f"| of which `pg_dump -Fc` alone | {s['dump']:.3f} s | |",
                  f"| S3 requests per snapshot (both regions) | {total / n:.1f} | <= 10 |",
                  f"| S3 requests, all | {fmt_counts(s['req'])} | |", ""]
    if "W" in r:
        s, w = r["S"], r["W"]
        n, total = w["n"], sum(w["req"].values())
        lines += [f"The same {n} databases by the cluster engine on this one host: a "
                  f"`drdaemon run` scheduler (taking no job) and {w['workers']} `drdaemon "
                  f"worker` processes ({w['concurrency']} jobs each at once) on a PostgreSQL "
                  f"job queue, each snapshot its first (region prefix `w/`), next to the "
                  f"one-host `drctl backup` above. This machine has {os.cpu_count()} CPU "
                  "core(s), shared by the workers, moto, PostgreSQL and pg_dump: the "
                  "workers cannot scale past them here.", "",
                  "| what | one host, `drctl backup` | cluster, "
                  f"{w['workers']} workers | target |", "| --- | ---: | ---: | --- |",
                  f"| wall time, all | {s['secs']:.1f} s | {w['secs']:.1f} s | |",
                  f"| wall time per snapshot | {s['secs'] / s['n']:.3f} s | "
                  f"{w['secs'] / n:.3f} s | <= 0.5 s |",
                  f"| S3 requests per snapshot (both regions) | "
                  f"{sum(s['req'].values()) / s['n']:.1f} | {total / n:.1f} | <= 10 |",
                  f"| S3 requests, all | {fmt_counts(s['req'])} | {fmt_counts(w['req'])} | |",
                  "", "The cluster's wall time runs from starting the processes to the last "
                  "manifest in both regions (their start, the scheduler's first look and "
                  "catch-up included).", ""]
    if "L" in r:
        lines += [f"Listing {r['S']['n']} sources (one snapshot each, two regions: "
                  f"{2 * r['S']['n']} manifests and {2 * r['S']['n']} data objects):", "",
                  "| added latency | status cold | status warm | daemon start to complete "
                  "| restart to complete | scrape | refresh, new process | refresh again |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for row in r["L"]:
            def req(key: str, row: dict[str, Any] = row) -> str:
                v = row[key]
                return str(v if isinstance(v, int) else sum(v.values()))
            lines.append(
                f"| {row['latency']:g} ms | {row['status_cold']:.2f} s ({req('status_cold_req')} "
                f"req) | {row['status_warm']:.2f} s ({req('status_warm_req')} req) | "
                f"{row['complete']:.2f} s ({req('start_req')} req) | "
                f"{row['restart']:.2f} s ({req('restart_req')} req) | "
                f"{row['scrape'] * 1000:.0f} ms ({row['scrape_bytes'] / 1024:.0f} KiB) | "
                f"{row['refresh_cold']:.2f} s ({req('refresh_cold_req')} req) | "
                f"{row['refresh_warm']:.2f} s ({req('refresh_warm_req')} req) |")
        lines += ["", "Cold: the state folder's manifest cache emptied first (the daemon "
                  "starts cold too; a restart finds the cache its predecessor left). The "
                  "refreshes run after the daemon, in a process of their own: the disk "
                  "cache is full, the process's memory is not.", "",
                  "Targets: status < 2 s, scrape < 200 ms, start to complete < 10 s, "
                  "about one request per thousand objects per refresh.", "",
                  "Requests by kind: " + "; ".join(
                      f"{row['latency']:g} ms status cold {fmt_counts(row['status_cold_req'])}, "
                      f"daemon start {fmt_counts(row['start_req'])}" for row in r["L"]), ""]
    if "H" in r:
        h = r["H"]
        med_a, med_b = statistics.median(h["drctl"]), statistics.median(h["hand"])
        paired = statistics.median(x / y for x, y in zip(h["drctl"], h["hand"], strict=True))
        lines += [f"`drctl backup` against the hand pipeline, {h['size'] / MIB:.0f} MiB "
                  f"(pg_database_size), two moto regions (no proxy), {len(h['drctl'])} "
                  "round(s):", "",
                  "| what | median s | min-max s |", "| --- | ---: | ---: |",
                  f"| drctl backup -> 2 S3 regions | {med_a:.1f} | {min(h['drctl']):.1f}-"
                  f"{max(h['drctl']):.1f} |",
                  "| pg_dump -Fc -Z0 \\| zstd -3 -T2 \\| age \\| tee FIFO \\| aws s3 cp - "
                  f"(x2) | {med_b:.1f} | {min(h['hand']):.1f}-{max(h['hand']):.1f} |", "",
                  f"Ratio {med_a / med_b:.2f} (paired {paired:.2f}); target <= 1.0.", ""]
    lines += [f"Whole run: {(time.monotonic() - t0) / 60:.1f} min.", "", ""]
    text = "\n".join(lines)
    print(text)
    if append:
        run.append_results(text, args.out)
    return text


if __name__ == "__main__":
    main()
