"""drctl tenant export: the return copy, end to end (real PostgreSQL, two moto S3 regions,
the real pg_restore, tar, sha256sum and age)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from datetime import datetime
from pathlib import Path

import psycopg
import pytest
from conftest import PgServer, S3Region
from hypothesis import given
from hypothesis import strategies as st
from lms import TABLES, populate, table_rows
from support import (
    Setup,
    directory_source,
    flip_byte,
    local_region,
    make_setup,
    postgres_source,
    stored_key,
)
from test_directory_roundtrip import assert_same_tree, make_tree

from drdaemon import audit
from drdaemon.errors import DrError
from drdaemon.export import export
from drdaemon.export_doc import check_magic, kept_facts, sha256sums
from drdaemon.export_files import verify_written
from drdaemon.keys import generate_identity, load_identities
from drdaemon.runtime import load_config, open_runtime

# Distinctive plaintext: in a file of the tenant's tree and in a row of its database.
FILE_MARKER = b"EXPORT-MARKER-FILE-7f3a9c"
ROW_MARKER = "EXPORT-MARKER-ROW-51d2e8"


@pytest.fixture
def lms_dsn(pg_database: str) -> str:
    populate(pg_database)
    with psycopg.connect(pg_database, autocommit=True) as conn:
        conn.execute("UPDATE users SET display_name = %s WHERE id = 7", (ROW_MARKER,))
    return pg_database


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = make_tree(tmp_path / "tree")
    (root / "uploads" / "marker.txt").write_bytes(FILE_MARKER * 3)
    return root


@pytest.fixture
def setup(tmp_path: Path, lms_dsn: str, tree: Path, s3_regions: list[S3Region]) -> Setup:
    other = tmp_path / "other-tree"
    (other / "x").mkdir(parents=True)
    (other / "x" / "f.txt").write_text("another tenant\n")
    return make_setup(tmp_path, [r.toml() for r in s3_regions],
                      [postgres_source("lms-db", lms_dsn),
                       directory_source("lms-files", tree),
                       directory_source("other-files", other, tenant="uni-b")])


def backup(setup: Setup) -> dict[str, str]:
    """Back up every source; {source: snapshot id}."""
    done = setup.drctl_json("backup")
    assert all(r["ok"] and not r["degraded"] for r in done), done
    return {r["source"]: r["snapshot_id"] for r in done}


def sha256sum_check(folder: Path, sums: str = "SHA256SUMS") -> str:
    out = subprocess.run(["sha256sum", "--strict", "-c", sums], cwd=folder,
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def pg_restore_into(pg: PgServer, name: str, archive: Path) -> str:
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    subprocess.run([str(pg.bin("pg_restore")), "--exit-on-error", "--no-owner",
                    f"--dbname={pg.dsn(name)}", str(archive)], check=True)
    return pg.dsn(name)


def audit_records(setup: Setup, event: str) -> list[dict]:
    return [r for r in audit.parse_records(audit.read_lines(setup.state)) if r["event"] == event]


def all_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def test_export_loads_with_stock_tools(setup: Setup, lms_dsn: str, tree: Path,
                                       pg_server: PgServer, tmp_path: Path) -> None:
    ids = backup(setup)
    out = tmp_path / "return-copy"
    result = setup.drctl_json("tenant", "export", "uni-a", "--to", str(out))
    assert result["tenant"] == "uni-a" and not result["encrypted"]
    assert sorted(p.name for p in out.iterdir()) == [
        "MANIFEST.json", "README.txt", "SHA256SUMS", "lms-db.dump", "lms-files.tar"]
    checked = sha256sum_check(out)
    assert checked.count(": OK") == 4  # both dumps, MANIFEST.json, README.txt

    # The archive loads into a fresh database and matches row for row.
    dsn = pg_restore_into(pg_server, "exported_lms", out / "lms-db.dump")
    assert table_rows(dsn) == table_rows(lms_dsn)
    # The tar extracts to the same tree.
    extracted = tmp_path / "extracted"
    extracted.mkdir()
    subprocess.run(["tar", "-xpf", str(out / "lms-files.tar"), "-C", str(extracted)], check=True)
    assert_same_tree(tree, extracted)

    manifest = json.loads((out / "MANIFEST.json").read_text())
    assert manifest["tenant"] == "uni-a" and manifest["encrypted_to"] is None
    by_source = {s["source"]: s for s in manifest["sources"]}
    assert {k: v["snapshot_id"] for k, v in by_source.items()} == {
        "lms-db": ids["lms-db"], "lms-files": ids["lms-files"]}
    counts = {t["table"]: t["rows"] for t in by_source["lms-db"]["facts"]["tables"]}
    with psycopg.connect(lms_dsn) as conn:
        for table in TABLES:
            assert counts[table] == conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    assert by_source["lms-db"]["size"] == (out / "lms-db.dump").stat().st_size
    assert by_source["lms-files"]["facts"]["files"] > 0
    shown = setup.drctl_json("snapshots", "show", ids["lms-db"])
    assert datetime.fromisoformat(by_source["lms-db"]["consistency_time"]) == \
        datetime.fromisoformat(shown["consistency_time"])
    readme = (out / "README.txt").read_text()
    assert "pg_restore" in readme and "tar -xpf" in readme and "age -d" not in readme
    # The plaintext is really there (what the encrypted test scans for).
    assert FILE_MARKER in (out / "lms-files.tar").read_bytes()
    assert ROW_MARKER.encode() in (out / "lms-db.dump").read_bytes()
    # Nothing else was left next to it, and the other tenant's data is not in it.
    assert sorted(p.name for p in tmp_path.iterdir() if "partial" in p.name) == []
    assert b"another tenant" not in (out / "lms-files.tar").read_bytes()

    [record] = audit_records(setup, "tenant.export")
    assert record["tenant"] == "uni-a" and record["destination"] == str(out)
    assert sorted(record["snapshot_ids"]) == sorted([ids["lms-db"], ids["lms-files"]])
    assert record["recipient_fingerprint"] is None and record["user"] and record["host"]


def test_encrypted_export_leaves_no_plaintext(setup: Setup, lms_dsn: str, pg_server: PgServer,
                                              tmp_path: Path) -> None:
    backup(setup)
    customer_key = tmp_path / "customer" / "key.txt"
    customer = generate_identity(customer_key)
    out = tmp_path / "return-copy"
    result = setup.drctl_json("tenant", "export", "uni-a", "--to", str(out),
                              "--recipient", customer)
    assert result["encrypted"] and result["recipient_fingerprint"].startswith("sha256:")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["CONTENTS.SHA256SUMS.age", "MANIFEST.json.age", "README.txt",
                     "SHA256SUMS", "lms-db.dump.age", "lms-files.tar.age"]
    # No plaintext of the tenant's data anywhere under the test's folder but the sources.
    for path in all_files(tmp_path):
        if path.is_relative_to(tmp_path / "tree"):
            continue
        body = path.read_bytes()
        assert FILE_MARKER not in body, path
        assert ROW_MARKER.encode() not in body, path
    sha256sum_check(out)
    # The customer decrypts with stock age and checks the plaintext.
    plain = tmp_path / "decrypted"
    plain.mkdir()
    for enc in out.glob("*.age"):
        subprocess.run(["age", "-d", "-i", str(customer_key), "-o",
                        str(plain / enc.name.removesuffix(".age")), str(enc)], check=True)
    checked = sha256sum_check(plain, "CONTENTS.SHA256SUMS")
    assert checked.count(": OK") == 3
    dsn = pg_restore_into(pg_server, "exported_encrypted", plain / "lms-db.dump")
    assert table_rows(dsn) == table_rows(lms_dsn)
    manifest = json.loads((plain / "MANIFEST.json").read_text())
    assert manifest["encrypted_to"] == result["recipient_fingerprint"]
    assert "age -d" in (out / "README.txt").read_text()
    [record] = audit_records(setup, "tenant.export")
    assert record["recipient_fingerprint"] == result["recipient_fingerprint"]


def test_snapshot_option_picks_an_older_snapshot(setup: Setup, lms_dsn: str,
                                                 pg_server: PgServer, tmp_path: Path) -> None:
    first = backup(setup)
    before = table_rows(lms_dsn)
    with psycopg.connect(lms_dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM submissions WHERE id > 100")
    second = backup(setup)
    out = tmp_path / "old"
    result = setup.drctl_json("tenant", "export", "uni-a", "--to", str(out),
                              "--snapshot", first["lms-db"])
    picked = {s["source"]: s["snapshot_id"] for s in result["sources"]}
    # The named snapshot for its source; the newest for the tenant's other source.
    assert picked == {"lms-db": first["lms-db"], "lms-files": second["lms-files"]}
    dsn = pg_restore_into(pg_server, "exported_old", out / "lms-db.dump")
    assert table_rows(dsn) == before


def test_tampered_object_fails_and_leaves_nothing(setup: Setup, s3_regions: list[S3Region],
                                                  tmp_path: Path) -> None:
    ids = backup(setup)
    for region in s3_regions:
        flip_byte(region, stored_key(region, ".pgdump.zst.age"), at=-200)
    out = tmp_path / "return-copy"
    result = setup.drctl("tenant", "export", "uni-a", "--to", str(out))
    assert result.exit_code == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "failed in every region" in result.stderr and ids["lms-db"] in result.stderr
    assert result.stderr.count("sha256") == 2, result.stderr  # both copies named corrupt
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []
    [failed] = audit_records(setup, "tenant.export.failed")
    assert failed["tenant"] == "uni-a" and "every region" in failed["error"]
    assert audit_records(setup, "tenant.export") == []


def test_a_corrupt_region_falls_back_to_the_other(setup: Setup, lms_dsn: str,
                                                  s3_regions: list[S3Region], tmp_path: Path,
                                                  pg_server: PgServer) -> None:
    backup(setup)
    flip_byte(s3_regions[0], stored_key(s3_regions[0], ".pgdump.zst.age"))
    out = tmp_path / "return-copy"
    result = setup.drctl("tenant", "export", "uni-a", "--to", str(out))
    assert result.exit_code == 0, result.stderr
    assert f"region {s3_regions[0].name} skipped" in result.stderr
    sha256sum_check(out)
    assert table_rows(pg_restore_into(pg_server, "fell_back", out / "lms-db.dump")) == \
        table_rows(lms_dsn)


def test_bad_requests_exit_2_with_one_line(setup: Setup, tmp_path: Path) -> None:
    ids = backup(setup)
    out = tmp_path / "return-copy"
    cases = [
        (["tenant", "export", "uni-z", "--to", str(out)], "no tenant 'uni-z'"),
        (["tenant", "export", "uni-a", "--to", str(out), "--snapshot", ids["other-files"]],
         "belongs to source other-files of tenant uni-b"),
        (["tenant", "export", "uni-a", "--to", str(out), "--snapshot",
          "20200101T000000Z-00000000"], "no snapshot 20200101T000000Z-00000000"),
        (["tenant", "export", "uni-a", "--to", str(out), "--snapshot", "nonsense"],
         "invalid snapshot id"),
        (["tenant", "export", "uni-a", "--to", str(out), "--recipient", "age1nope"],
         "not an age X25519 public key"),
        (["tenant", "export", "uni-a", "--to", str(out), "--snapshot", ids["lms-db"],
          "--snapshot", ids["lms-db"]], "two snapshots of source lms-db"),
    ]
    stranger = tmp_path / "stranger.txt"
    generate_identity(stranger)
    cases.append((["tenant", "export", "uni-a", "--to", str(out), "--identity", str(stranger)],
                  "no identity given can unwrap tenant uni-a's key"))
    for args, said in cases:
        result = setup.drctl(*args)
        assert result.exit_code == 2, (args, result.stderr)
        assert said in result.stderr and len(result.stderr.strip().splitlines()) == 1, \
            result.stderr
        assert not out.exists()
        assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []
    out.mkdir()
    (out / ".keep").write_text("")
    result = setup.drctl("tenant", "export", "uni-a", "--to", str(out))
    assert result.exit_code == 2 and "not an empty folder" in result.stderr
    assert [p.name for p in out.iterdir()] == [".keep"]
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    result = setup.drctl("tenant", "export", "uni-a", "--to", str(a_file))
    assert result.exit_code == 2 and "not an empty folder" in result.stderr
    assert audit_records(setup, "tenant.export") == []


def test_an_empty_folder_is_accepted(setup: Setup, tmp_path: Path) -> None:
    backup(setup)
    out = tmp_path / "empty"
    out.mkdir()
    setup.drctl_json("tenant", "export", "uni-b", "--to", str(out))
    assert sorted(p.name for p in out.iterdir()) == [
        "MANIFEST.json", "README.txt", "SHA256SUMS", "other-files.tar"]
    sha256sum_check(out)
    for path in (out, *out.iterdir()):  # the tenant's data: private
        assert os.stat(path).st_mode & 0o077 == 0, path


# -- pure parts -------------------------------------------------------------------------

@given(st.dictionaries(st.from_regex(r"[a-z0-9][a-z0-9._-]{0,20}", fullmatch=True),
                       st.binary(min_size=32, max_size=32).map(bytes.hex), max_size=8))
def test_sha256sums_lines_are_sorted_and_complete(files: dict[str, str]) -> None:
    text = sha256sums(files)
    lines = text.splitlines()
    assert len(lines) == len(files) and (text.endswith("\n") or not files)
    parsed = [ln.split("  ", 1) for ln in lines]
    assert {name: sha for sha, name in parsed} == files
    assert [name for _, name in parsed] == sorted(files)


def test_check_magic() -> None:
    assert check_magic("postgres", b"PGDMP\x01\x0f") is None
    assert "pg_dump" in (check_magic("postgres", b"\x00" * 600) or "")
    tar = b"\x00" * 257 + b"ustar\x0000" + b"\x00" * 250
    assert check_magic("directory", tar) is None
    assert "tar" in (check_magic("directory", b"PGDMP" + b"\x00" * 600) or "")


def test_kept_facts_tells_rows_not_sealed_properties() -> None:
    facts = {"database": {"sealed": "x"}, "server_version": "15.4", "database_size": 10,
             "tables": [{"schema": "public", "table": "t", "rows": 3},
                        {"schema": "public", "table": "u", "rows": 4}]}
    kept = kept_facts("postgres", facts)
    assert "database" not in kept
    assert kept["table_count"] == 2 and kept["row_total"] == 7
    assert kept_facts("directory", {"files": 2, "bytes": 9, "digest": "sha256:x",
                                    "changed_during_backup": []}) == {
        "files": 2, "bytes": 9, "digest": "sha256:x"}


def test_read_back_catches_a_file_that_changed_on_disk(tmp_path: Path) -> None:
    (tmp_path / "a.dump").write_bytes(b"PGDMP written")
    (tmp_path / "SHA256SUMS").write_bytes(b"sums")
    written = {"a.dump": hashlib.sha256(b"PGDMP written").hexdigest(),
               "SHA256SUMS": hashlib.sha256(b"sums").hexdigest()}
    verify_written(tmp_path, written)
    (tmp_path / "a.dump").write_bytes(b"PGDMP wrItten")
    with pytest.raises(DrError, match=r"a\.dump read back does not match"):
        verify_written(tmp_path, written)
    (tmp_path / "a.dump").write_bytes(b"PGDMP written")
    (tmp_path / "stray").write_bytes(b"")
    with pytest.raises(DrError, match="holds"):
        verify_written(tmp_path, written)


def test_an_interrupted_export_leaves_nothing(setup: Setup, tmp_path: Path) -> None:
    backup(setup)
    customer = generate_identity(tmp_path / "customer.txt")
    rt = open_runtime(load_config(str(setup.config)))
    seen: list[int] = []

    def interrupt(n: int, total: int) -> None:  # Ctrl-C once the data is flowing
        seen.append(n)
        if sum(seen) > 1 << 16:
            raise KeyboardInterrupt

    out = tmp_path / "return-copy"
    with pytest.raises(KeyboardInterrupt):
        export(rt, load_identities(setup.identity), "uni-a", out, recipient=customer,
               on_progress=interrupt)
    assert seen and not out.exists()
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


def test_the_staging_folder_of_a_killed_export_is_removed_by_the_next(
        setup: Setup, tmp_path: Path) -> None:
    backup(setup)
    out = tmp_path / "return-copy"
    dead = subprocess.Popen(["true"])  # a process id that has ended
    dead.wait()
    killed = tmp_path / f".return-copy.drdaemon-export-{dead.pid}-0123abcd.partial"
    killed.mkdir(mode=0o700)
    (killed / "lms-db.dump").write_bytes(b"PGDMP plaintext a kill -9 left behind")
    running = tmp_path / f".return-copy.drdaemon-export-{os.getpid()}-4567cdef.partial"
    running.mkdir(mode=0o700)  # an export still running (this process): left alone
    other = tmp_path / f".elsewhere.drdaemon-export-{dead.pid}-89abcdef.partial"
    other.mkdir(mode=0o700)  # another destination's: not this export's business
    result = export(open_runtime(load_config(str(setup.config))),
                    load_identities(setup.identity), "uni-a", out)
    assert not killed.exists() and running.exists() and other.exists()
    assert f"removed {killed.name}: the staging folder of an export that was killed" in (
        result.notes)


def test_a_shared_source_is_refused_or_left_out_and_listed(tmp_path: Path) -> None:
    own, shared = tmp_path / "own", tmp_path / "shared"
    for folder in (own, shared):
        folder.mkdir()
        (folder / "a.txt").write_text(f"{folder.name}\n")
    s = make_setup(tmp_path, [local_region("eu", tmp_path / "eu", "europe"),
                              local_region("us", tmp_path / "us", "north-america")],
                   [directory_source("own-files", own, tenant="uni-a"),
                    '[[sources]]\nname = "shared-files"\nkind = "directory"\n'
                    f'tenants = ["uni-a", "uni-b"]\ntier = "paid"\npath = "{shared}"\n'])
    backup(s)
    copy = tmp_path / "copy"
    refused = s.drctl("tenant", "export", "uni-a", "--to", str(copy))
    assert refused.exit_code == 2
    assert "shared source(s) shared-files" in refused.stderr
    assert not copy.exists()
    out = s.drctl_json("tenant", "export", "uni-a", "--to", str(copy), "--without-shared")
    assert [x["source"] for x in out["sources"]] == ["own-files"]
    assert any("shared-files: NOT INCLUDED" in n for n in out["notes"])
    doc = json.loads((copy / "MANIFEST.json").read_text())
    assert [n["source"] for n in doc["not_included"]] == ["shared-files"]
    assert sorted(p.name for p in copy.iterdir()) == [
        "MANIFEST.json", "README.txt", "SHA256SUMS", "own-files.tar"]
