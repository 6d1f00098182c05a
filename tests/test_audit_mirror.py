"""Every chain in the regions is checked: segments written once, older layouts still read,
a chain rewritten beside the old one and a wiped local log found against the regions.

The attacks are made with every secret the operator holds (the manifest key, so the
audit key): only the regions' copies, written once, give them away.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from forgery import rechain
from hypothesis import given
from hypothesis import strategies as st
from support import Setup, directory_source, local_region, make_setup

from drdaemon import audit, audit_chain, audit_mirror, audit_segments, layout, metrics_feed
from drdaemon.config import load as load_config
from drdaemon.keys import load_manifest_key
from drdaemon.runtime import Runtime, open_runtime

REGIONS = ("eu-local", "us-local")


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "grades.csv").write_text("student,grade\nada,6\n")
    return make_setup(tmp_path, [local_region("eu-local", tmp_path / "eu", "europe"),
                                 local_region("us-local", tmp_path / "us", "north-america")],
                      [directory_source("files", tree)])


def runtime(setup: Setup) -> Runtime:
    return open_runtime(load_config(setup.config))


def log_file(setup: Setup) -> Path:
    return setup.state / "audit" / "audit.jsonl"


def record_events(rt: Runtime, n: int) -> None:
    for i in range(n):
        rt.record_event("drill" if i == 2 else "test.event", n=i,
                        **({"ok": False} if i == 2 else {}))


def audit_key_of(setup: Setup) -> bytes:
    return audit_chain.audit_key(load_manifest_key(setup.manifest_key))


def folder_of(lines: list[bytes]) -> str:
    return audit_chain.mirror_folder(socket.gethostname(), lines[0])


def test_a_chain_rewritten_beside_the_old_one_is_found(setup: Setup, tmp_path: Path) -> None:
    rt = runtime(setup)
    record_events(rt, 5)
    original = audit.read_lines(setup.state)
    assert all(audit_mirror.verify_mirror(rt, r).ok for r in REGIONS)

    # Rewritten in place (record 0 kept, so the same folder): the locked segments
    # still hold the failed drill, and the region holds more than the rewritten log.
    key = audit_key_of(setup)
    log_file(setup).write_bytes(b"".join(rechain(original, key, drop=2)))
    assert audit.verify(rt).ok  # alone, the rewritten log is sound
    assert set(audit_mirror.mirror(rt)) == set(REGIONS)  # never written over the evidence
    check = audit_mirror.verify_mirror(rt, "eu-local")
    assert not check.ok and check.first_bad == 2 and "differs" in (check.reason or "")

    # Rewritten with record 0 changed too, so it lands in a new folder beside the old
    # one in every region: the old chain there is another chain of this host.
    rewritten = rechain(original, key, drop=2, first_time="2031-01-01T00:00:00+00:00")
    log_file(setup).write_bytes(b"".join(rewritten))
    rt = runtime(setup)  # the failed regions above are left alone for a while
    assert audit.verify(rt).ok
    assert audit_mirror.mirror(rt) == {}
    for region in REGIONS:
        check = audit_mirror.verify_mirror(rt, region)
        assert check.chain.ok and check.chain.records == 4  # the new folder, on its own
        assert not check.ok and check.other_chains == (folder_of(original),)
        assert "another chain of this host" in check.problems[0]
        assert "5 records" in check.problems[0] and "rewritten" in check.problems[0]
    out = setup.drctl("audit", "verify", "--region", "us-local")
    assert out.exit_code == 1
    assert out.stdout.startswith("FAILED: region us-local: 4 records verified")
    assert f"another chain of this host in region us-local: {folder_of(original)}/" in out.stdout
    doc = json.loads(setup.drctl("audit", "verify", "--region", "eu-local", "--json").stdout)
    assert doc["ok"] is False and doc["other_chains"] == [folder_of(original)]

    # The daemon's check says so too, and its metric counts the other chain.
    check_all = audit_mirror.verify_everywhere(rt)
    assert check_all.local.ok and not check_all.ok
    run = metrics_feed.audit_run(check_all)
    assert {r: c.other_chains for r, c in run.regions.items()} == {r: 1 for r in REGIONS}


def test_a_wiped_local_log_is_found_against_the_regions(setup: Setup) -> None:
    rt = runtime(setup)
    record_events(rt, 3)
    old = folder_of(audit.read_lines(setup.state))
    log_file(setup).unlink()

    # Wiped: the local log is empty, the regions hold this host's chain.
    check = audit_mirror.verify_mirror(rt, "eu-local")
    assert not check.ok and check.other_chains == (old,)
    assert check.problems[0].endswith("the local log was wiped")
    out = setup.drctl("audit", "verify", "--region", "eu-local")
    assert out.exit_code == 1 and "the local log was wiped" in out.stdout

    # ... and begun anew (the daemon restarted and recorded an event): a sound new chain,
    # which on its own verifies, and the old one beside it in every region.
    rt = runtime(setup)
    rt.record_event("daemon.started")
    assert audit.verify(rt).ok and audit.verify(rt).records == 1
    check_all = audit_mirror.verify_everywhere(rt)
    assert check_all.local.ok and not check_all.ok
    for region in REGIONS:
        found = check_all.regions[region]
        assert found.chain.ok and found.other_chains == (old,)
        assert "wiped and begun anew" in found.problems[0]
    assert not json.loads(setup.drctl("audit", "verify", "--region", "us-local",
                                      "--json").stdout)["ok"]


def test_older_layout_segments_still_verify_and_are_never_rewritten(setup: Setup,
                                                                    tmp_path: Path) -> None:
    """A bucket written by the older layout: whole 100-record segments and a partial one,
    named by their first record. They are read as they are; new records go beside them."""
    key = audit_key_of(setup)
    lines, prev = [], audit_chain.GENESIS
    for seq in range(130):
        line = audit_chain.make_line(seq, f"2031-03-01T02:{seq // 60:02d}:{seq % 60:02d}+00:00",
                                     "test.event", {"n": seq}, prev, key)
        lines.append(line)
        prev = audit_chain.line_hash(line)
    folder = folder_of(lines)
    for root in ("eu", "us"):
        where = tmp_path / root / folder
        where.mkdir(parents=True)
        (where / "000000000000.jsonl").write_bytes(b"".join(lines[:100]))
        (where / "000000000100.jsonl").write_bytes(b"".join(lines[100:120]))
    log_file(setup).parent.mkdir(parents=True, exist_ok=True)
    log_file(setup).write_bytes(b"".join(lines[:120]))
    rt = runtime(setup)
    for region in REGIONS:
        check = audit_mirror.verify_mirror(rt, region)
        assert check.ok and check.records == 120, check.to_dict()

    log_file(setup).write_bytes(b"".join(lines))
    assert audit_mirror.mirror(rt) == {}
    names = sorted(p.name for p in (tmp_path / "eu" / folder).iterdir())
    assert names == ["000000000000.jsonl", "000000000100.jsonl",
                     "000000000120-000000000129.jsonl"]
    assert (tmp_path / "eu" / folder / "000000000100.jsonl").read_bytes() == \
        b"".join(lines[100:120])
    for region in REGIONS:
        assert audit_mirror.read_mirror(rt.store(region), folder) == lines
        assert audit_mirror.verify_mirror(rt, region).records == 130


# -- the pure core --------------------------------------------------------------------


def info(name: str, data: bytes) -> tuple[str, int]:
    return name, len(data)


@given(st.lists(st.integers(1, 60), min_size=1, max_size=8))
def test_any_mirror_history_reads_back_as_the_log(growth: list[int]) -> None:
    """Whatever the log grew by between mirror runs, the region holds it once, each
    segment written once, and reading the segments a reader needs gives the log."""
    lines = [b'{"n":%d}\n' % i for i in range(sum(growth))]
    folder = "audit/h/0123456789abcdef"
    region: dict[str, bytes] = {}
    count = 0
    for step in growth:
        count += step
        segs = audit_segments.chain_folders(info(n, d) for n, d in region.items())
        held = segs[folder].segments if folder in segs else ()
        have = audit_segments.held_records(held, lines[:count])
        assert have == (count - step)
        for first, last in audit_segments.new_spans(held, have, count):
            name = layout.audit_span_name(folder, first, last)
            assert name not in region  # never rewritten
            region[name] = b"".join(lines[first:last + 1])
    [chain] = audit_segments.chain_folders(info(n, d) for n, d in region.items()).values()
    needed = audit_segments.to_read(chain.segments)
    parts = [(s, audit_chain.split_lines(region[s.name])) for s in needed]
    assert audit_segments.assemble(parts) == (lines, [])
    assert len(needed) <= count // 100 + len(growth)


def test_gaps_and_forks_are_named() -> None:
    a = [b"a0\n", b"a1\n", b"a2\n"]
    seg = audit_segments.Segment
    lines, problems = audit_segments.assemble([
        (seg("f/000000000000-000000000001.jsonl", 0, 1, 6), a[:2]),
        (seg("f/000000000001-000000000002.jsonl", 1, 2, 6), [b"b1\n", b"b2\n"])])
    assert lines == [*a[:2], b"b1\n", b"b2\n"]
    assert problems == ["fork at record 1: f/000000000001-000000000002.jsonl holds another "
                        "record 1 than the segment before it: the chain was rewritten beside "
                        "its older copy"]
    _, problems = audit_segments.assemble([
        (seg("f/000000000000-000000000000.jsonl", 0, 0, 3), a[:1]),
        (seg("f/000000000002-000000000002.jsonl", 2, 2, 3), a[2:])])
    assert problems == ["records 1 to 1 are missing: no segment holds them "
                        "(before f/000000000002-000000000002.jsonl)"]
    assert layout.parse_audit_segment("audit/anchors/h/0123456789abcdef/000000000001.json") \
        is None
    assert layout.parse_audit_segment("audit/h/0123456789abcdef/000000000003-000000000001.jsonl") \
        is None
    assert layout.parse_audit_segment("audit/h/0123456789abcdef/000000000001.jsonl") == \
        layout.AuditSegmentName("h", "0123456789abcdef", 1, None)


def test_an_earlier_chain_accepted_after_an_incident_is_no_longer_reported(
        setup: Setup, tmp_path: Path) -> None:
    rt = runtime(setup)
    record_events(rt, 2)
    old = folder_of(audit.read_lines(setup.state))
    log_file(setup).unlink()
    rt = runtime(setup)
    rt.record_event("daemon.started")
    assert not audit_mirror.verify_mirror(rt, "eu-local").ok

    bad = setup.drctl("audit", "accept-chain", old, "--region", "eu-local", "--reason", " ")
    assert bad.exit_code == 2
    done = setup.drctl("audit", "accept-chain", old + "/", "--region", "eu-local",
                       "--reason", "INC-42: state disk lost")
    assert done.exit_code == 0, done.output + done.stderr
    assert done.stdout.startswith(f"accepted: {old}/ in region eu-local: 2 records")
    [accepted] = [json.loads(line) for line in audit.read_lines(setup.state)
                  if b"audit.chain.accepted" in line]
    assert accepted["reason"] == "INC-42: state disk lost" and accepted["records"] == 2
    for region in REGIONS:
        check = audit_mirror.verify_mirror(rt, region)
        assert check.ok and check.other_chains == (), check.to_dict()

    # The accepted chain changes afterwards (a record added to it): reported again.
    segment = tmp_path / "us" / old / "000000000002-000000000002.jsonl"
    lines = [p.read_bytes() for p in sorted((tmp_path / "us" / old).iterdir())]
    prev = audit_chain.line_hash(lines[-1])
    segment.write_bytes(audit_chain.make_line(2, "2031-01-01T00:00:00+00:00", "test.event", {},
                                              prev, audit_key_of(setup)))
    check = audit_mirror.verify_mirror(rt, "us-local")
    assert not check.ok and check.other_chains == (old,)
    assert audit_mirror.verify_mirror(rt, "eu-local").ok
    refused = setup.drctl("audit", "accept-chain", folder_of(audit.read_lines(setup.state)),
                          "--region", "eu-local", "--reason", "x")
    assert refused.exit_code == 2 and "own chain" in refused.stderr
