"""Crypto-shredding a tenant (drctl tenant erase, erasure.py), end to end on real storage.

Two tenants back up small trees to two moto regions whose buckets have Object
Lock (and so versioning). Their keys are the real ones their first backup made
(tenants/<t>/keys/<key_id>.age|.json in every region and the state folder), with
a second version and a rotated-away key under a delete marker added. Locks are set
on chosen objects with a real, short retain-until date, since moto judges
locks by the wall clock.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from conftest import S3Region
from support import Clock, Setup, directory_source, local_region, lock_buckets, make_setup

from drdaemon import backup, erasure_cert, erasure_records, layout, lifecycle, statefs, tenant_keys
from drdaemon.cli.drctl import cli as drctl_cli
from drdaemon.config import load as load_config
from drdaemon.keys import generate_identity
from drdaemon.runtime import Runtime, open_runtime
from drdaemon.scheduler import Daemon

A, B = "uni-a", "uni-b"
SRC_A, SRC_B = "a-files", "b-files"
DAY = timedelta(days=1)


@dataclasses.dataclass
class World:
    setup: Setup
    rt: Runtime
    clock: Clock
    regions: list[S3Region]
    ids: dict[str, list[str]]
    keys: dict[str, str]  # tenant -> key id

    def drctl(self, *args: str) -> Result:
        return CliRunner().invoke(drctl_cli, ["--config", str(self.setup.config), *args],
                                  obj={"runtime": self.rt}, catch_exceptions=False)

    def versions(self, prefix: str) -> set[tuple[str, str, str]]:
        """(region, key, version id) of every version and delete marker under `prefix`."""
        out = set()
        for r in self.regions:
            resp = r.client().list_object_versions(Bucket=r.bucket, Prefix=prefix)
            out |= {(r.name, v["Key"], v["VersionId"])
                    for v in resp.get("Versions", []) + resp.get("DeleteMarkers", [])}
        return out


def plant_keys(rt: Runtime, tenant: str, regions: list[S3Region] | None = None) -> str:
    """The tenant's real key (made by its first backup, tenant_keys.py), with what a
    versioned bucket gathers over time: a second version of the wrapped key, and a
    rotated-away key's object under a delete marker. Returns the key id."""
    key_id = tenant_keys.ensure_key(rt, tenant).key_id
    age_name = layout.tenant_key_object(tenant, key_id)
    for r in regions or []:
        c = r.client()
        body = c.get_object(Bucket=r.bucket, Key=age_name)["Body"].read()
        c.put_object(Bucket=r.bucket, Key=age_name, Body=body)  # two versions
        stale = layout.tenant_key_object(tenant, "0123456789abcdef")
        c.put_object(Bucket=r.bucket, Key=stale, Body=b"rotated away")
        c.delete_object(Bucket=r.bucket, Key=stale)  # a version under a delete marker
    return key_id


def trees(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "tree-a", tmp_path / "tree-b"
    for t, text in ((a, "alpha"), (b, "beta")):
        t.mkdir()
        (t / "notes.md").write_text(f"# {text}\n" * 40)
    return a, b


RETENTION = '[sources.retention]\nmin_retention = "0d"\nmax_delete_fraction = 1.0\n'


def make_world(tmp_path: Path, regions: list[S3Region], snaps: int = 3,
               start: datetime | None = None) -> World:
    a, b = trees(tmp_path)
    setup = make_setup(tmp_path, [r.toml() for r in regions],
                       [directory_source(SRC_A, a, tenant=A) + RETENTION,
                        directory_source(SRC_B, b, tenant=B) + RETENTION])
    start = start or datetime.now(UTC) - snaps * DAY
    clock = Clock(start)
    rt = open_runtime(load_config(setup.config), clock=clock)
    ids: dict[str, list[str]] = {SRC_A: [], SRC_B: []}
    for i in range(snaps):
        clock.now = start + i * DAY
        for src in rt.config.sources:
            (Path(str(src.path)) / f"day{i}.txt").write_text(f"day {i}\n")
            result = backup.snapshot(rt, src)
            assert result.ok and result.snapshot_id, result.error or result.failed_regions
            ids[src.name].append(result.snapshot_id)
    clock.now = datetime.now(UTC)
    keys = {t: plant_keys(rt, t, regions) for t in (A, B)}
    return World(setup, rt, clock, regions, ids, keys)


def lock_snapshot(w: World, source: str, snap_id: str, until: datetime) -> set[str]:
    """Lock every object of one snapshot in every region until `until`; their names."""
    names = set()
    for r in w.regions:
        c = r.client()
        resp = c.list_objects_v2(Bucket=r.bucket, Prefix=layout.source_prefix(source))
        for o in resp.get("Contents", []):
            parsed = layout.parse_object_name(o["Key"])
            if parsed and parsed.snapshot_id == snap_id:
                c.put_object_retention(Bucket=r.bucket, Key=o["Key"], Retention={
                    "Mode": "COMPLIANCE", "RetainUntilDate": until})
                names.add(o["Key"])
    return names


def state_keys(w: World, tenant: str) -> list[str]:
    return statefs.list_names(w.setup.state, statefs.tenant_keys_folder(tenant))


@pytest.fixture
def world(tmp_path: Path, s3_regions: list[S3Region]) -> World:
    return make_world(tmp_path, lock_buckets(s3_regions))


def test_erase_destroys_every_key_copy_deletes_unlocked_and_certifies_it(
        world: World, tmp_path: Path) -> None:
    w = world
    newest = w.ids[SRC_A][-1]
    until = (datetime.now(UTC) + timedelta(seconds=25)).replace(microsecond=0)
    locked_names = lock_snapshot(w, SRC_A, newest, until)
    assert locked_names
    keys_before = w.versions(layout.tenant_keys_prefix(A))
    objects_before = w.versions(layout.source_prefix(SRC_A))
    other_before = (w.versions(layout.source_prefix(SRC_B))
                    | w.versions(layout.tenant_keys_prefix(B)))
    assert len(keys_before) == 2 * 5  # per region: 2 versions, a record, a version + marker
    # Before the erasure, break-glass works: unwrap the tenant key with the ops identity
    # (runbooks/break-glass-restore.md), then open the data object with it.
    r0 = w.regions[0]
    wrapped = tmp_path / "wrapped-key.age"
    wrapped.write_bytes(r0.client().get_object(
        Bucket=r0.bucket, Key=layout.tenant_key_object(A, w.keys[A]))["Body"].read())
    tenant_identity = tmp_path / "tenant-key.txt"
    subprocess.run(["age", "-d", "-i", str(w.setup.identity), "-o", str(tenant_identity),
                    str(wrapped)], check=True, capture_output=True, timeout=60)
    blob = tmp_path / "locked.tar.zst.age"
    blob.write_bytes(r0.client().get_object(
        Bucket=r0.bucket, Key=layout.data_object_name(SRC_A, newest, "directory"))["Body"].read())
    opened = subprocess.run(["age", "-d", "-i", str(tenant_identity), str(blob)],
                            capture_output=True, timeout=60, check=False)
    assert opened.returncode == 0 and opened.stdout
    tenant_identity.unlink()

    result = w.drctl("tenant", "erase", A, "--json")
    assert result.exit_code == 0, result.output + result.stderr
    cert = json.loads(result.stdout)

    # 1 + 3: no key copy anywhere, in any version, nor in the state folder
    assert w.versions(layout.tenant_keys_prefix(A)) == set()
    assert state_keys(w, A) == []
    assert cert["check"]["ok"] and cert["ok"]
    assert cert["check"]["places"] == [r.name for r in w.regions] + ["state folder"]
    assert {(o["where"], o["name"], o["version_id"]) for o in cert["key_copies"]} == (
        keys_before | {("state folder", f"tenants/{A}/keys/{w.keys[A]}.{ext}", "")
                       for ext in ("age", "json")})
    kid = w.keys[A]
    assert [k["key_id"] for k in cert["keys"]] == sorted([kid, "0123456789abcdef"])
    mine = next(k for k in cert["keys"] if k["key_id"] == kid)
    assert mine["verified"] and mine["fingerprint"].startswith("sha256:")
    # 2: the unlocked objects are gone, in every version; the locked ones stay, dated
    left = w.versions(layout.source_prefix(SRC_A))
    assert {k for _, k, _ in left} == locked_names
    deleted = {(o["where"], o["name"], o["version_id"]) for o in cert["deleted"]}
    assert deleted == objects_before - left
    assert {(o["where"], o["name"], o["version_id"]) for o in cert["locked"]} == left
    assert {o["retain_until"] for o in cert["locked"]} == {until.strftime("%Y-%m-%dT%H:%M:%SZ")}
    # the other tenant is untouched
    assert (w.versions(layout.source_prefix(SRC_B))
            | w.versions(layout.tenant_keys_prefix(B))) == other_before
    assert len(state_keys(w, B)) == 2
    # 4: the certificate everywhere, authenticated; HTML beside it; an audit record
    stamp = layout.stamp(datetime.fromisoformat(cert["started_at"].replace("Z", "+00:00")))
    name = layout.erasure_certificate_object(A, stamp)
    for r in w.regions:
        raw = r.client().get_object(Bucket=r.bucket, Key=name)["Body"].read()
        assert erasure_cert.parse(raw, w.rt.manifest_key, A).body() == cert
        head = r.client().head_object(Bucket=r.bucket, Key=name)
        assert "ObjectLockRetainUntilDate" not in head
    folder = w.setup.state / statefs.erasure_folder(A)
    assert sorted(p.name for p in folder.iterdir()) == [f"{stamp}.html", f"{stamp}.json"]
    html = (folder / f"{stamp}.html").read_text()
    assert kid in html and newest in html and "Complete" in html
    audit = [json.loads(x) for x in (w.setup.state / "audit" / "audit.jsonl").read_text()
             .splitlines()]
    record = next(e for e in audit if e["event"] == "tenant.erase")
    assert record["tenant"] == A and record["ok"] and kid in record["key_ids"]

    # restores of the erased tenant fail with one line naming the erasure; B restores
    note = erasure_records.erasure_note(w.rt, A)
    assert note is not None and name in note and "was erased on" in note
    assert erasure_records.erasure_note(w.rt, B) is None
    escrow = tmp_path / "escrow.txt"
    generate_identity(escrow)
    for ident in ([], ["--identity", str(w.setup.identity)], ["--identity", str(escrow)]):
        failed = w.drctl("restore", "--source", SRC_A, "latest", "--to",
                         str(tmp_path / "back-a"), *ident)
        assert failed.exit_code == 2 and failed.stderr.strip() == f"drctl: error: {note}"
    drill = w.drctl("drill", "run", "--source", SRC_A, "--json")
    assert drill.exit_code == 1
    assert f"tenant-erased: {note}" in json.dumps(json.loads(drill.stdout))
    ok = w.drctl("restore", "--source", SRC_B, "latest", "--to", str(tmp_path / "back-b"))
    assert ok.exit_code == 0, ok.output + ok.stderr
    assert (tmp_path / "back-b" / "notes.md").read_text().startswith("# beta")

    # break-glass with stock tools fails now: the wrapped key it starts from is gone (no
    # version left, above), and the locked data object, encrypted to the tenant key alone,
    # opens with no identity the operators hold.
    for identity in (w.setup.identity, escrow):
        glass = subprocess.run(["age", "-d", "-i", str(identity), str(blob)],
                               capture_output=True, timeout=60, check=False)
        assert glass.returncode != 0 and glass.stdout == b""
        assert b"no identity matched" in glass.stderr

    # prune: the locked objects stay while locked; once the lock ends they go, although
    # retention (7 daily) would keep every one of them, the newest first of all
    w.clock.now = datetime.now(UTC)
    first = w.drctl("prune", "--json")
    assert first.exit_code == 0, first.output
    assert {k for _, k, _ in w.versions(layout.source_prefix(SRC_A))} == locked_names
    time.sleep(max(0.0, (until - datetime.now(UTC)).total_seconds()) + 1.5)
    w.clock.now = datetime.now(UTC)
    # a host whose state folder was rebuilt still knows the erasure from the regions
    shutil.rmtree(w.setup.state / statefs.erasure_folder(A))
    assert erasure_records.erasure_note(w.rt, A) == note
    other = w.drctl("prune", "--source", SRC_B, "--json")  # a prune of chosen sources only
    assert other.exit_code == 0, other.output
    assert {k for _, k, _ in w.versions(layout.source_prefix(SRC_A))} == locked_names
    pruned = w.drctl("prune", "--json")
    assert pruned.exit_code == 0, pruned.output
    assert w.versions(layout.source_prefix(SRC_A)) == set()
    erased = [c for c in json.loads(pruned.stdout)["changes"] if c["action"] == "erased"]
    assert {(c["region"], c["status"]) for c in erased} == {(r.name, "done") for r in w.regions}
    assert all(c["snapshot_id"] == newest for c in erased)
    assert (w.versions(layout.source_prefix(SRC_B))
            | w.versions(layout.tenant_keys_prefix(B))) == other_before


def test_dry_run_lists_everything_and_changes_nothing(world: World) -> None:
    w = world
    before = w.versions("")
    state_before = sorted(p.relative_to(w.setup.state).as_posix()
                          for p in w.setup.state.rglob("*") if "audit" not in p.parts)
    result = w.drctl("tenant", "erase", A, "--dry-run")
    assert result.exit_code == 0, result.output + result.stderr
    out = result.stdout
    assert "dry run: nothing was changed" in out
    assert out.count("WOULD DESTROY key copy") == 12  # 5 per region, 2 in the state folder
    for snap_id in w.ids[SRC_A]:
        assert f"WOULD DELETE {w.regions[0].name}: sources/{SRC_A}/manifests/{snap_id}.json" in out
    assert SRC_B not in out
    assert w.versions("") == before
    assert sorted(p.relative_to(w.setup.state).as_posix()
                  for p in w.setup.state.rglob("*") if "audit" not in p.parts) == state_before
    assert erasure_records.erasure_note(w.rt, A) is None
    as_json = w.drctl("tenant", "erase", A, "--dry-run", "--json")
    assert json.loads(as_json.stdout)["dry_run"] is True


def test_a_shared_source_refuses_erasure_naming_it_and_the_age_out_date(tmp_path: Path) -> None:
    tree = tmp_path / "shared"
    (tree / "b").mkdir(parents=True)
    (tmp_path / "own-a").mkdir()
    setup = make_setup(tmp_path, [local_region("eu", tmp_path / "eu", "europe"),
                                  local_region("us", tmp_path / "us", "north-america")],
                       [directory_source(SRC_A, tmp_path / "own-a", tenant=A),
                        f'[[sources]]\nname = "{SRC_B}"\nkind = "directory"\n'
                        f'tenants = ["{A}", "{B}"]\ntier = "paid"\npath = "{tree}"\n'])
    result = CliRunner().invoke(drctl_cli, ["--config", str(setup.config), "tenant", "erase",
                                            A], obj={}, catch_exceptions=False)
    assert result.exit_code == 2
    *warnings, line = result.stderr.strip().splitlines()
    # The config's up-front warning about the promise, then the refusal.
    assert any("its data sits in" in w for w in warnings)
    assert line.startswith(f"drctl: error: tenant {A} cannot be crypto-shredded alone")
    assert f"{SRC_B} (with {B})" in line and f"{SRC_A} (with" not in line
    # 7 daily + 4 weekly + 3 monthly (31 days) = 128 days, then 7 in the trash
    by = (datetime.now(UTC) + timedelta(days=135)).strftime("%Y-%m-%d")
    assert f"age out under retention by {by}" in line
    assert "\n" not in line


def test_an_unknown_or_invalid_tenant_is_a_usage_error(tmp_path: Path) -> None:
    setup = make_setup(tmp_path, [local_region("eu", tmp_path / "eu", "europe"),
                                  local_region("us", tmp_path / "us", "north-america")],
                       [directory_source(SRC_A, tmp_path / "tree", tenant=A)])
    for name, says in (("uni-z", "no source of tenant 'uni-z'"), ("../x", "invalid tenant")):
        r = CliRunner().invoke(drctl_cli, ["--config", str(setup.config), "tenant", "erase",
                                           name], obj={}, catch_exceptions=False)
        assert r.exit_code == 2 and says in r.stderr


# -- a real kill in the middle, then a rerun ------------------------------------------------

class HoldingProxy:
    """Forwards to a moto server; holds the `hold_at`-th DELETE of an object version
    forever (never forwarded), so the process sending it can be killed mid-erasure at a
    known point, whatever the machine's speed."""

    def __init__(self, upstream: str, hold_at: int) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.hold_at = hold_at
        self.deletes = 0
        self.holding = threading.Event()
        self.passthrough = False
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self.upstream)

        def back() -> None:
            try:
                while data := upstream.recv(65536):
                    client.sendall(data)
            except OSError:
                pass
            finally:
                client.close()

        threading.Thread(target=back, daemon=True).start()
        try:
            while data := client.recv(65536):
                if data.startswith(b"DELETE ") and b"versionId=" in data.split(b"\r\n")[0]:
                    with self.lock:
                        self.deletes += 1
                        hold = not self.passthrough and self.deletes == self.hold_at
                    if hold:
                        self.holding.set()
                        while client.recv(65536):  # until the killed client's socket closes
                            pass
                        return
                upstream.sendall(data)
        except OSError:
            pass
        finally:
            upstream.close()

    def close(self) -> None:
        self.listener.close()


def test_an_erasure_killed_mid_way_is_finished_by_the_daemons_next_start(
        tmp_path: Path, s3_regions: list[S3Region]) -> None:
    buckets = lock_buckets(s3_regions)
    # key copies: 5 versions in the first region; the 8th version delete is mid step 2
    proxy = HoldingProxy(buckets[0].endpoint_url, hold_at=8)
    try:
        w = make_world(tmp_path, buckets, snaps=3)
        config = w.setup.config.read_text().replace(
            f'endpoint_url = "{buckets[0].endpoint_url}"', f'endpoint_url = "{proxy.url}"')
        w.setup.config.write_text(config)
        keys_before = w.versions(layout.tenant_keys_prefix(A))
        objects_before = w.versions(layout.source_prefix(SRC_A))
        drctl = str(Path(sys.executable).parent / "drctl")
        env = dict(os.environ, DRDAEMON_CONFIG=str(w.setup.config))
        proc = subprocess.Popen([drctl, "tenant", "erase", A, "--json"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proxy.holding.wait(120), proc.communicate(timeout=5)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        # mid-way: the journal is there, some objects went, restores already refuse
        assert erasure_records.erasure_in_progress(w.rt, A)
        remaining = w.versions(layout.source_prefix(SRC_A))
        assert remaining and remaining != objects_before
        note = erasure_records.erasure_note(w.rt, A)
        assert note is not None and "not finished" in note

        proxy.passthrough = True
        # The daemon's next start finishes it: the tenant was offboarded, its deadline
        # is past, and the erasure job runs at start (scheduler.Daemon.erasure_job).
        end = (datetime.now(UTC) - 40 * DAY).date()
        lifecycle.save(w.rt, lifecycle.TenantState(A, end, lifecycle.deadline(end),
                                                   final_snapshot_done=True))
        daemon = Daemon(open_runtime(load_config(w.setup.config)))
        assert daemon.erasure_job() == [A]
        assert lifecycle.load(w.rt, A).erased
        [finished] = erasure_records.certificates(w.rt, A)
        cert = finished.body()
        assert cert["ok"] and cert["locked"] == []
        assert w.versions(layout.tenant_keys_prefix(A)) == set()
        assert w.versions(layout.source_prefix(SRC_A)) == set()
        # the certificate covers both runs: everything there was, each once
        copies = [(o["where"], o["name"], o["version_id"]) for o in cert["key_copies"]]
        assert sorted(copies) == sorted(keys_before | {
            ("state folder", f"tenants/{A}/keys/{w.keys[A]}.{ext}", "") for ext in ("age",
                                                                                  "json")})
        deleted = [(o["where"], o["name"], o["version_id"]) for o in cert["deleted"]]
        assert sorted(deleted) == sorted(objects_before)
        assert not erasure_records.erasure_in_progress(w.rt, A)
        assert "was erased on" in (erasure_records.erasure_note(w.rt, A) or "")
        # the runbook drops the erased sources from the config: a rerun still knows them
        w.setup.config.write_text(config.replace(directory_source(SRC_A, tmp_path / "tree-a",
                                                                  tenant=A) + RETENTION, ""))
        assert f'"{SRC_A}"' not in w.setup.config.read_text()
        again = subprocess.run([drctl, "tenant", "erase", A, "--dry-run"], env=env,
                               capture_output=True, text=True, timeout=300, check=False)
        assert again.returncode == 0, again.stderr
        assert f"sources: {SRC_A}" in again.stdout and "0 key copies" in again.stdout
    finally:
        proxy.close()


def test_a_key_copy_that_cannot_be_destroyed_fails_the_check_loudly_until_a_rerun(
        world: World) -> None:
    w = world
    r = w.regions[1]
    name = layout.tenant_key_object(A, w.keys[A])
    until = (datetime.now(UTC) + timedelta(seconds=12)).replace(microsecond=0)
    # as a bucket's default retention would do: the key object itself under a lock
    version = r.client().put_object_retention(
        Bucket=r.bucket, Key=name, Retention={"Mode": "COMPLIANCE", "RetainUntilDate": until})
    assert version
    result = w.drctl("tenant", "erase", A, "--json")
    assert result.exit_code == 1, result.output
    cert = json.loads(result.stdout)
    assert not cert["ok"] and not cert["check"]["ok"]
    assert [(o["where"], o["name"]) for o in cert["check"]["remaining"]] == [(r.name, name)]
    assert any(f"cannot delete {name}" in e for e in cert["errors"])
    note = erasure_records.erasure_note(w.rt, A)
    assert note is not None and "not complete" in note
    text = w.drctl("tenant", "erase", A)
    assert text.exit_code == 1 and "check FAILED" in text.stdout
    assert "erasure NOT complete" in text.stdout

    time.sleep(max(0.0, (until - datetime.now(UTC)).total_seconds()) + 1.5)
    w.clock.now = datetime.now(UTC)
    done = w.drctl("tenant", "erase", A, "--json")
    assert done.exit_code == 0, done.output
    final = json.loads(done.stdout)
    assert final["ok"] and final["started_at"] == cert["started_at"]  # the same erasure
    assert (r.name, name) in {(o["where"], o["name"]) for o in final["key_copies"]}
    assert w.versions(layout.tenant_keys_prefix(A)) == set()
    assert not erasure_records.erasure_in_progress(w.rt, A)


def test_repair_never_copies_an_erased_tenants_locked_snapshot_back(
        tmp_path: Path, s3_regions: list[S3Region]) -> None:
    locked_region = lock_buckets(s3_regions)[:1]
    a, _ = trees(tmp_path)
    local = tmp_path / "local-region"
    setup = make_setup(tmp_path, [locked_region[0].toml(),
                                  local_region("us-local", local, "north-america")],
                       [directory_source(SRC_A, a, tenant=A) + RETENTION])
    rt = open_runtime(load_config(setup.config))
    result = backup.snapshot(rt, rt.config.sources[0])
    assert result.ok and result.snapshot_id
    w = World(setup, rt, Clock(datetime.now(UTC)), locked_region, {SRC_A: [result.snapshot_id]},
              {A: plant_keys(rt, A, locked_region)})
    rt.clock = w.clock
    lock_snapshot(w, SRC_A, result.snapshot_id, datetime.now(UTC) + timedelta(hours=1))
    erased = w.drctl("tenant", "erase", A, "--json")
    assert erased.exit_code == 0, erased.output
    # the local region (no lock) lost its copy, the S3 one keeps its locked copy
    assert not list((local / "sources").rglob("*.json"))
    assert not list((local / "tenants" / A / "keys").iterdir())
    assert w.versions(layout.source_prefix(SRC_A))
    repaired = w.drctl("replicate", "--repair", "--json")
    assert repaired.exit_code == 1
    assert "was erased on" in repaired.stdout
    assert not [p for p in (local / "sources").rglob("*") if p.is_file()]  # none came back
