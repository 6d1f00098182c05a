"""The fixed cost of a snapshot (issue 16): what a snapshot asks of each region, and what a
process remembers between snapshots without skipping a check a snapshot needs.

Real stores (moto S3 servers, local folders), requests counted by botocore's own event
hooks or the counting proxy of tests/counting_store.py; a real PostgreSQL server and the
real pg_dumpall behind a wrapper that notes each run.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import S3Region
from counting_store import count_calls, reset
from support import Setup, directory_source, drctl, local_region, make_setup

from drdaemon import audit_mirror, key_rotation, statefs, tenant_keys
from drdaemon.backup import snapshot
from drdaemon.config import load as load_config
from drdaemon.errors import UsageError
from drdaemon.keys import load_identities
from drdaemon.runtime import Runtime, open_runtime
from drdaemon.sources import pg_role_copy
from drdaemon.storage import NotFound
from drdaemon.storage.s3 import S3Store


def _requests(rt: Runtime) -> dict[str, Counter[tuple[str, str]]]:
    """(operation, key or prefix) of every S3 request each region's client makes from now."""
    seen: dict[str, Counter[tuple[str, str]]] = {}
    for store in rt.stores:
        assert isinstance(store, S3Store)
        counter: Counter[tuple[str, str]] = Counter()
        seen[store.name] = counter

        def note(params: dict[str, Any], event_name: str, counter: Counter[
                tuple[str, str]] = counter, **_: Any) -> None:
            what = str(params.get("Key") or params.get("Prefix") or "")
            counter[(event_name.rsplit(".", 1)[-1], what)] += 1

        store.client.meta.events.register("provide-client-params.s3", note)
    return seen


def _tree(tmp_path: Path, files: int) -> Path:
    tree = tmp_path / "tree"
    tree.mkdir(exist_ok=True)
    for i in range(files):
        (tree / f"f{i}.txt").write_text(f"file {i}\n" * 50)
    return tree


def test_a_small_snapshot_is_one_put_per_region_and_the_next_lists_only_its_manifests(
        tmp_path: Path, s3_regions: list[S3Region]) -> None:
    setup = make_setup(tmp_path, [r.toml() for r in s3_regions],
                       [directory_source("files", _tree(tmp_path, 5))])
    rt = open_runtime(load_config(setup.config))
    seen = _requests(rt)
    assert snapshot(rt, rt.config.sources[0]).ok
    for region, calls in seen.items():
        data = {op: n for (op, key), n in calls.items() if "/data/" in key}
        assert data == {"PutObject": 1}, (region, calls)  # not create, part, complete
        calls.clear()

    second = snapshot(rt, rt.config.sources[0])
    assert second.ok
    for region, calls in seen.items():
        lists = sorted(key for (op, key), n in calls.items() if op == "ListObjectsV2")
        # The shrink guard's look at the source's manifests, nothing else: the keyring
        # and the audit chain are known from the first snapshot.
        assert lists == ["sources/files/manifests/"], (region, calls)
        assert not [k for (op, k) in calls if op == "GetObject"], (region, calls)
        puts = Counter(k.split("/")[0] for (op, k), n in calls.items() if op == "PutObject")
        assert puts == {"sources": puts["sources"], "audit": 1}, (region, calls)
        assert sum(calls.values()) <= 5, (region, calls)
    assert audit_mirror.verify_mirror(rt, s3_regions[0].name).ok


def test_s3_uploads_of_one_part_are_one_put_and_longer_ones_stay_multipart(
        s3_regions: list[S3Region]) -> None:
    eu = s3_regions[0]
    store = S3Store(eu.name, eu.bucket, "", eu.region, eu.endpoint_url)
    raw = eu.client()

    def open_uploads() -> list[str]:
        return [u["Key"] for u in raw.list_multipart_uploads(Bucket=eu.bucket).get(
            "Uploads", [])]

    small = store.begin_upload("small")
    small.write_part(b"one part")
    assert open_uploads() == []  # nothing is open for an abort to find, nothing visible
    with pytest.raises(NotFound):
        store.stat("small")
    small.commit()
    assert store.get_bytes("small", 100) == b"one part"

    dropped = store.begin_upload("dropped")
    dropped.write_part(b"x")
    dropped.abort()
    with pytest.raises(NotFound):
        store.stat("dropped")

    big = store.begin_upload("big")
    first = os.urandom(5 << 20)
    big.write_part(first)
    big.write_part(b"tail")
    assert open_uploads() == ["big"]
    with pytest.raises(NotFound):
        store.stat("big")
    big.commit()
    assert open_uploads() == []
    assert store.get_bytes("big", 6 << 20) == first + b"tail"


def test_the_mirror_lists_once_then_puts_and_verify_still_catches_a_bad_segment(
        tmp_path: Path) -> None:
    setup = make_setup(tmp_path, [local_region("eu", tmp_path / "eu", "europe"),
                                  local_region("us", tmp_path / "us", "north-america")],
                       [directory_source("files", _tree(tmp_path, 1))])
    rt = open_runtime(load_config(setup.config))
    proxies = count_calls(rt)
    rt.record_event("test.first", n=0)
    for p in proxies.values():
        assert p.count("list", "audit/") == 1
    reset(proxies)
    for n in range(1, 4):
        rt.record_event("test.next", n=n)
    for p in proxies.values():
        assert p.count("list", "audit/") == 0 and p.count("put_bytes", "audit/") == 3

    # Another process on this host mirrors meanwhile: this one, not knowing, writes
    # records the regions hold again; readers take them once.
    other = open_runtime(load_config(setup.config))
    other.record_event("test.other", n=4)
    rt.record_event("test.next", n=5)
    for region in ("eu", "us"):
        check = audit_mirror.verify_mirror(rt, region)
        assert check.ok and check.records == len(_lines(setup.state)), check

    segments = sorted((tmp_path / "eu" / "audit").rglob("*.jsonl"))
    assert len(segments) >= 3
    tampered = segments[1]
    text = tampered.read_bytes()
    tampered.chmod(stat.S_IRUSR | stat.S_IWUSR)
    tampered.write_bytes(text.replace(b'"n":', b'"n": ', 1))
    assert not audit_mirror.verify_mirror(rt, "eu").ok
    [middle] = (tmp_path / "us" / "audit").rglob("000000000001-000000000001.jsonl")
    middle.unlink()
    rt.record_event("test.after", n=6)  # the remembered mirror does not hide the gap
    us = audit_mirror.verify_mirror(rt, "us")
    assert not us.ok and any("records 1 to 1 are missing" in p for p in us.problems), us


def test_the_scheduled_check_mirrors_from_a_fresh_listing(tmp_path: Path) -> None:
    """A region whose copy is gone (its bucket made anew) gets it back from the daemon's
    check, although this process remembers having written it."""
    setup = make_setup(tmp_path, [local_region("eu", tmp_path / "eu", "europe"),
                                  local_region("us", tmp_path / "us", "north-america")],
                       [directory_source("files", _tree(tmp_path, 1))])
    rt = open_runtime(load_config(setup.config))
    for n in range(3):
        rt.record_event("test.record", n=n)
    shutil.rmtree(tmp_path / "us" / "audit")
    check = audit_mirror.verify_everywhere(rt)
    assert check.regions["us"].ok and check.regions["us"].records == len(_lines(setup.state))
    assert check.ok, check


def _lines(state: Path) -> list[bytes]:
    from drdaemon import audit
    return audit.read_lines(state)


def test_the_shrink_guard_compares_with_a_newer_snapshot_another_process_wrote(
        tmp_path: Path) -> None:
    tree = _tree(tmp_path, 4)
    setup = make_setup(tmp_path, [local_region("eu", tmp_path / "eu", "europe"),
                                  local_region("us", tmp_path / "us", "north-america")],
                       [directory_source("files", tree)])
    here = open_runtime(load_config(setup.config))
    assert snapshot(here, here.config.sources[0]).ok  # known here: 4 files
    _tree(tmp_path, 40)
    elsewhere = open_runtime(load_config(setup.config))  # another host's process
    newer = snapshot(elsewhere, elsewhere.config.sources[0])
    assert newer.ok
    for extra in range(4, 40):
        (tree / f"f{extra}.txt").unlink()  # back to 4 files: -90 % against the newer one
    refused = snapshot(here, here.config.sources[0])
    assert refused.error_kind == "shrunk", refused
    assert f"against snapshot {newer.snapshot_id}" in (refused.error or "")


def test_a_key_rotated_by_another_process_on_the_host_is_used_at_once(tmp_path: Path) -> None:
    setup = make_setup(tmp_path, [local_region("eu", tmp_path / "eu", "europe"),
                                  local_region("us", tmp_path / "us", "north-america")],
                       [directory_source("files", _tree(tmp_path, 2))])
    rt = open_runtime(load_config(setup.config))
    proxies = count_calls(rt)
    first = snapshot(rt, rt.config.sources[0])
    assert first.ok and first.manifest is not None and first.manifest.tenant_key
    reset(proxies)
    again = snapshot(rt, rt.config.sources[0])
    assert again.manifest is not None and again.manifest.tenant_key == first.manifest.tenant_key
    assert not any(p.count("list", "tenants/") for p in proxies.values())  # remembered

    rotation = key_rotation.rotate_key(open_runtime(load_config(setup.config)), "uni-a")
    after = snapshot(rt, rt.config.sources[0])
    assert after.manifest is not None and after.manifest.tenant_key is not None
    assert after.manifest.tenant_key.key_id == rotation.key_id


def test_roles_are_dumped_again_only_when_they_changed(
        tmp_path: Path, pg_database: str, monkeypatch: pytest.MonkeyPatch) -> None:
    real = shutil.which("pg_dumpall")
    assert real is not None
    runs = tmp_path / "runs"
    wrapper = tmp_path / "bin" / "pg_dumpall"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\necho run >> "{runs}"\nexec "{real}" "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper.parent}:{os.environ['PATH']}")
    role = f"owner_{tmp_path.name[-8:].lower().replace('-', '_')}"

    def count() -> int:
        return len(runs.read_text().splitlines()) if runs.exists() else 0

    with psycopg.connect(pg_database, autocommit=True) as conn:
        dbname = conn.info.dbname

        def capture() -> dict[str, Any]:
            return pg_role_copy.capture(conn, pg_database, dbname)

        try:
            capture()
            before = count()
            assert capture() == capture() and count() == before  # unchanged: not run
            conn.execute(f"CREATE ROLE {role} NOLOGIN")
            conn.execute(f"CREATE TABLE t (i int); ALTER TABLE t OWNER TO {role}")
            got = capture()
            assert count() == before + 1 and role in got["roles"]
            conn.execute(f"ALTER ROLE {role} CONNECTION LIMIT 7")
            assert "CONNECTION LIMIT 7" in capture()["sql"] and count() == before + 2
            conn.execute(f"COMMENT ON ROLE {role} IS 'grades'")
            assert "grades" in capture()["sql"] and count() == before + 3
        finally:
            conn.execute("DROP TABLE IF EXISTS t")
            conn.execute(f"DROP ROLE IF EXISTS {role}")


def test_a_key_erased_by_another_host_is_never_used_from_memory(
        tmp_path: Path, pg_server) -> None:
    """Two hosts of one cluster (`lock_dsn`: the shared state): host B erases the tenant
    while host A remembers its key; A's next snapshot is refused, not encrypted to a key
    that no longer exists anywhere."""
    setup = make_setup(tmp_path, [local_region("eu", tmp_path / "eu", "europe"),
                                  local_region("us", tmp_path / "us", "north-america")],
                       [directory_source("files", _tree(tmp_path, 2))],
                       daemon=f'lock_dsn = "{pg_server.dsn()}"\nlock_name = "memo-erased"\n')
    rt = open_runtime(load_config(setup.config))
    assert snapshot(rt, rt.config.sources[0]).ok  # host A now remembers uni-a's key
    other = tmp_path / "host-b.toml"
    other.write_text(setup.config.read_text().replace(
        f'state_dir = "{setup.state}"', f'state_dir = "{tmp_path / "state-b"}"'))
    erased = drctl(["--config", str(other), "tenant", "erase", "uni-a", "--json"])
    assert erased.exit_code == 0, erased.stderr
    after = snapshot(rt, rt.config.sources[0])
    assert not after.ok and after.error is not None and "was erased" in after.error, after


def _moved_to_a_cluster(tmp_path: Path, pg_server: Any,
                        name: str) -> tuple[Setup, Runtime, Path, list[str]]:
    """A host that made uni-a's key alone, then moved to `lock_dsn` (cluster `name`): its
    setup, runtime, own keyring folder and the names in it."""
    dsn = f'lock_dsn = "{pg_server.dsn()}"\nlock_name = "{name}"\n'
    setup = make_setup(tmp_path, [local_region("eu", tmp_path / "eu", "europe"),
                                  local_region("us", tmp_path / "us", "north-america")],
                       [directory_source("files", _tree(tmp_path, 2))], daemon=dsn)
    alone = tmp_path / "alone.toml"
    alone.write_text(setup.config.read_text().replace(dsn, ""))
    assert snapshot(open_runtime(load_config(alone)), load_config(alone).sources[0]).ok
    own = setup.state / "tenants" / "uni-a" / "keys"
    kept = sorted(p.name for p in own.iterdir())
    assert kept, "the key was made in the host's state folder"
    rt = open_runtime(load_config(setup.config))
    assert sorted(rt.state.children("tenants/uni-a/keys")) == kept, "imported"
    return setup, rt, own, kept


def test_an_erasure_on_a_moved_host_destroys_the_cluster_copy_and_its_own_old_one(
        tmp_path: Path, pg_server) -> None:
    """`drctl tenant erase` on a host that moved to `lock_dsn` destroys the cluster's copy
    and the one its own folder kept from before the move; the certificate lists them."""
    setup, rt, own, kept = _moved_to_a_cluster(tmp_path, pg_server, "own-erase")
    cert = setup.drctl_json("tenant", "erase", "uni-a")
    assert cert["ok"], cert
    assert rt.state.children("tenants/uni-a/keys") == [] and not list(own.iterdir())
    assert {c["name"] for c in cert["key_copies"] if c["where"] == "state folder"} \
        == {f"tenants/uni-a/keys/{n}" for n in kept}


def test_a_key_copy_left_in_a_hosts_own_folder_is_removed_after_an_erasure_not_repaired(
        tmp_path: Path, pg_server, caplog: pytest.LogCaptureFixture) -> None:
    """Host A made uni-a's key before it moved to `lock_dsn`: its state folder's copy is
    imported into the cluster state (one keyring for the cluster) and stays on A's disk.
    Host B erases the tenant; A's next snapshot removes its own old copy (a warning, an
    audit record) and is refused, and no region gets the key back."""
    setup, rt, own, kept = _moved_to_a_cluster(tmp_path, pg_server, "own-copy")
    other = tmp_path / "host-b.toml"
    other.write_text(setup.config.read_text().replace(
        f'state_dir = "{setup.state}"', f'state_dir = "{tmp_path / "state-b"}"'))
    erased = drctl(["--config", str(other), "tenant", "erase", "uni-a", "--json"])
    assert erased.exit_code == 0, erased.stderr
    assert rt.state.children("tenants/uni-a/keys") == [], "the cluster's copy is gone"
    wrapped = {n: (own / n).read_bytes() for n in kept}
    kid = kept[0].split(".")[0]
    with pytest.raises(UsageError, match="was erased"):  # a restore's unwrap, or a drill's
        tenant_keys.unwrap(rt, "uni-a", kid, load_identities(setup.identity))
    assert not list(own.iterdir()), "removed by the refused unwrap"
    for n, blob in wrapped.items():  # left again: now a snapshot finds it
        (own / n).write_bytes(blob)
    after = snapshot(rt, rt.config.sources[0])
    assert not after.ok and after.error is not None and "was erased" in after.error, after
    assert not list(own.iterdir()), "A's own old copy is removed"
    assert "key file(s) of erased tenant uni-a" in caplog.text
    assert b"tenant_key.erased_copy_removed" in rt.state.read_log(statefs.AUDIT_LOG)
    note = tenant_keys.repair(rt, "uni-a")  # replica repair puts nothing back either
    assert note is not None and "was erased" in note
    for region in ("eu", "us"):
        assert not list(rt.store(region).list("tenants/uni-a/keys/")), region
