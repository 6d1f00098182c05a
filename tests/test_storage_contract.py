"""One contract suite for every ObjectStore backend (after restic's backend tests and borgstore).

Each test runs against real storage: a LocalStore in a temporary folder (bare and with a
prefix) and an S3Store on each of the two moto-server regions (one with a prefix).  Every
case also looks at the backing storage directly (the folder tree, or the bucket and its
pending multipart uploads) to check what the store leaves behind.

S3 refuses non-last parts under 5 MiB, so the suite honours that limit for every backend
(the pipeline's configured part size is at least 5 MiB too).
"""

from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from botocore.config import Config as BotoConfig
from conftest import S3Region

from drdaemon.errors import UsageError
from drdaemon.storage import NotFound, ObjectInfo, ObjectStore, StorageError, read_head
from drdaemon.storage.local import LocalStore
from drdaemon.storage.s3 import S3Store

MiB = 1 << 20
MIN_PART = 5 * MiB  # S3's minimum size of every part but the last

INVALID_NAMES = ["", "/abs", "a/../b", "a//b", "./a", "a/", ".", "..", "a/./b", "a\\b", "a\0b"]

# Every ObjectStore method that takes an object name, with its other arguments.
NAME_TAKING_CALLS: list[tuple[str, tuple[object, ...]]] = [
    ("begin_upload", ()), ("put_bytes", (b"data",)), ("open_read", ()),
    ("get_bytes", (100,)), ("stat", ()), ("delete", ()),
    ("delete_version", ("",)), ("version_retained_until", ("",)),
]

CASES = ["local", "local-prefixed", "s3-eu", "s3-us", "s3-eu-prefixed"]


def blob(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


@dataclass
class Case:
    """A store under test plus a direct view of the storage behind it."""

    id: str
    store: ObjectStore
    prefix: str = ""
    base: Path | None = None  # local: the folder the store's root lives in
    region: S3Region | None = None
    foreign: set[str] = field(default_factory=set)  # raw objects outside the store's prefix
    _raw_client: Any = None

    @property
    def raw(self) -> Any:
        """A plain boto3 client on the region, to look behind the store."""
        assert self.region is not None
        if self._raw_client is None:
            self._raw_client = self.region.client()
        return self._raw_client

    @property
    def is_s3(self) -> bool:
        return self.region is not None

    def raw_key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def raw_objects(self) -> set[str]:
        """Every object / file in the backing storage, temp files included."""
        if self.region is not None:
            pages = self.raw.get_paginator("list_objects_v2").paginate(Bucket=self.region.bucket)
            return {obj["Key"] for page in pages for obj in page.get("Contents", [])}
        assert self.base is not None
        return {p.relative_to(self.base).as_posix() for p in self.base.rglob("*") if p.is_file()}

    def raw_tree(self) -> set[str]:
        """Everything in the backing storage (local: directories too)."""
        if self.base is None:
            return self.raw_objects()
        return {p.relative_to(self.base).as_posix() for p in self.base.rglob("*")}

    def pending_uploads(self) -> list[str]:
        """S3: keys with an unfinished multipart upload. Local: none by construction."""
        if self.region is None:
            return []
        resp = self.raw.list_multipart_uploads(Bucket=self.region.bucket)
        return [u["Key"] for u in resp.get("Uploads", [])]

    def assert_stored_exactly(self, names: set[str]) -> None:
        """The backing storage holds exactly these committed objects: no temp files,
        no stray keys, no pending multipart uploads."""
        assert self.raw_objects() == {self.raw_key(n) for n in names} | self.foreign
        assert self.pending_uploads() == []


def _put_raw(case: Case, key: str, data: bytes) -> None:
    if case.region is not None:
        case.raw.put_object(Bucket=case.region.bucket, Key=key, Body=data)
    else:
        assert case.base is not None
        path = case.base / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    case.foreign.add(key)


@pytest.fixture(params=CASES)
def case(request: pytest.FixtureRequest, tmp_path: Path) -> Case:
    kind = request.param
    prefix = "tenant-a/dr" if kind.endswith("-prefixed") else ""
    c: Case
    if kind.startswith("local"):
        base = tmp_path / "region"
        base.mkdir()
        c = Case(kind, LocalStore("local-1", base, prefix), prefix=prefix, base=base)
    else:
        regions: list[S3Region] = request.getfixturevalue("s3_regions")
        region = regions[0] if kind.startswith("s3-eu") else regions[1]
        # A client from boto3's default session (S3Store's own constructor builds a fresh
        # session each time, which costs ~0.1 s; it is exercised in the S3-only tests below).
        client = region.client(config=BotoConfig(retries={"mode": "standard", "max_attempts": 5},
                                                 s3={"addressing_style": "path"}))
        store = S3Store(region.name, region.bucket, prefix, client=client)
        c = Case(kind, store, prefix=prefix, region=region)
    if prefix:
        # Objects beside the store's prefix, including one whose key merely starts with it:
        # the store must never see them.
        _put_raw(c, "foreign.txt", b"not ours")
        _put_raw(c, "tenant-a/dr-sibling/x", b"not ours either")
        _put_raw(c, "tenant-a/drx", b"nor this")
    return c


def names_of(infos: Iterator[ObjectInfo]) -> dict[str, int]:
    out: dict[str, int] = {}
    for info in infos:
        assert isinstance(info, ObjectInfo)
        assert info.name not in out, f"{info.name} listed twice"
        out[info.name] = info.size
    return out


def assert_absent(store: ObjectStore, name: str) -> None:
    with pytest.raises(NotFound):
        store.stat(name)
    with pytest.raises(NotFound):
        store.open_read(name)
    with pytest.raises(NotFound):
        store.get_bytes(name, 1 << 30)
    assert name not in names_of(store.list(""))


def read_streamed(store: ObjectStore, name: str, chunk: int = 100_003) -> bytes:
    out = bytearray()
    with store.open_read(name) as fh:
        while piece := fh.read(chunk):
            out += piece
    return bytes(out)


# --------------------------------------------------------------------------------------------
# uploads
# --------------------------------------------------------------------------------------------


def test_upload_is_invisible_until_commit_then_byte_exact(case: Case) -> None:
    """A multi-part upload of ~11 MiB in 5 MiB parts: nothing under the name (nor anything
    listed) while parts stream in; after commit the object reads back byte for byte."""
    store = case.store
    name = "sources/lms/data/20240101T000000Z-0badcafe.tar.zst.age"
    parts = [blob(MIN_PART, 1), blob(MIN_PART, 2), blob(MiB + 12_345, 3)]
    expected = b"".join(parts)

    up = store.begin_upload(name)
    assert_absent(store, name)
    for part in parts:
        up.write_part(part)
        assert_absent(store, name)
        assert names_of(store.list("sources/")) == {}
    up.commit()

    assert store.stat(name) == ObjectInfo(name, len(expected))
    assert store.get_bytes(name, len(expected)) == expected
    assert read_streamed(store, name) == expected
    assert names_of(store.list("")) == {name: len(expected)}
    case.assert_stored_exactly({name})


def test_upload_replaces_an_existing_object_only_at_commit(case: Case) -> None:
    store = case.store
    store.put_bytes("obj", b"old contents")
    up = store.begin_upload("obj")
    up.write_part(blob(MIN_PART, 4))
    up.write_part(b"tail")
    assert store.get_bytes("obj", 100) == b"old contents"
    assert store.stat("obj").size == len(b"old contents")
    up.commit()
    assert store.get_bytes("obj", 2 * MIN_PART) == blob(MIN_PART, 4) + b"tail"
    case.assert_stored_exactly({"obj"})


def test_single_small_part_upload(case: Case) -> None:
    """One part may be of any size (it is the last one)."""
    up = case.store.begin_upload("small/one")
    up.write_part(b"hello")
    up.commit()
    assert case.store.get_bytes("small/one", 5) == b"hello"
    case.assert_stored_exactly({"small/one"})


def test_abort_leaves_nothing(case: Case) -> None:
    store = case.store
    up = store.begin_upload("deep/dir/aborted")
    up.write_part(blob(MIN_PART, 5))
    up.write_part(b"more")
    up.abort()
    assert_absent(store, "deep/dir/aborted")
    assert names_of(store.list("")) == {}
    case.assert_stored_exactly(set())
    up.abort()  # a second abort is harmless


def test_abort_before_any_part_and_of_a_replacement(case: Case) -> None:
    store = case.store
    store.begin_upload("never-written").abort()
    assert_absent(store, "never-written")

    store.put_bytes("kept", b"original")
    up = store.begin_upload("kept")
    up.write_part(b"replacement")
    up.abort()
    assert store.get_bytes("kept", 100) == b"original"
    case.assert_stored_exactly({"kept"})


def test_empty_upload_makes_an_empty_object(case: Case) -> None:
    store = case.store
    up = store.begin_upload("empty/obj")
    up.commit()
    assert store.stat("empty/obj") == ObjectInfo("empty/obj", 0)
    assert store.get_bytes("empty/obj", 0) == b""
    assert read_streamed(store, "empty/obj") == b""
    assert names_of(store.list("empty/")) == {"empty/obj": 0}
    case.assert_stored_exactly({"empty/obj"})


# --------------------------------------------------------------------------------------------
# small objects, stat, list, delete
# --------------------------------------------------------------------------------------------


ROUNDTRIP_NAMES = ["a", "sources/lms/manifests/x.json", "with space/ünï-cødé.bin"]
ROUNDTRIP_DATA = [b"", b"\x00\xff" * 7, blob(70_000, 6)]


def test_put_get_roundtrip(case: Case) -> None:
    store = case.store
    for i, name in enumerate(ROUNDTRIP_NAMES):
        for data in ROUNDTRIP_DATA:
            store.put_bytes(name, data)  # also overwrites the previous value
            assert store.get_bytes(name, len(data)) == data
            assert store.get_bytes(name, len(data) + 1000) == data
            assert read_streamed(store, name, chunk=4096) == data
            assert store.stat(name) == ObjectInfo(name, len(data))
        case.assert_stored_exactly(set(ROUNDTRIP_NAMES[: i + 1]))


def test_get_bytes_refuses_an_object_larger_than_max_size(case: Case) -> None:
    store = case.store
    store.put_bytes("big", b"x" * 1000)
    with pytest.raises(StorageError, match="larger than 999 bytes") as exc_info:
        store.get_bytes("big", 999)
    assert not isinstance(exc_info.value, NotFound)
    with pytest.raises(StorageError):
        store.get_bytes("big", 0)
    store.put_bytes("one", b"1")
    with pytest.raises(StorageError):
        store.get_bytes("one", 0)


def test_read_head_returns_the_first_bytes_only(case: Case) -> None:
    store, data = case.store, blob(300_000, seed=7)
    store.put_bytes("big", data)
    store.put_bytes("small", b"tiny")
    seen: list[dict[str, Any]] = []
    if isinstance(store, S3Store):  # the bytes asked for, not the object: a ranged GET
        store.client.meta.events.register(
            "before-call.s3.GetObject", lambda params, **_: seen.append(params))
    assert read_head(store, "big", 1000) == data[:1000]
    assert read_head(store, "small", 1000) == b"tiny"
    assert [p["headers"].get("Range") for p in seen] == (
        ["bytes=0-999"] * 2 if isinstance(store, S3Store) else [])
    with pytest.raises(NotFound):
        read_head(store, "absent", 10)


def test_an_object_written_again_has_a_new_version(case: Case) -> None:
    """What the daemon's manifest cache relies on: a rewrite of the same size shows."""
    store = case.store
    store.put_bytes("v/obj", b"first contents")
    first = store.stat("v/obj")
    [listed] = store.list("v/")
    assert first.version and listed.version == first.version
    store.put_bytes("v/obj", b"other contents")  # same size
    again = store.stat("v/obj")
    assert again.size == first.size and again.version != first.version
    assert [i.version for i in store.list("v/")] == [again.version]


def test_stat_reports_size(case: Case) -> None:
    store = case.store
    for size in (0, 1, 4097, 300_000):
        store.put_bytes(f"s/{size}", blob(size, size))
    for size in (0, 1, 4097, 300_000):
        assert store.stat(f"s/{size}") == ObjectInfo(f"s/{size}", size)
    with pytest.raises(NotFound):
        store.stat("s/missing")


def test_list_returns_exactly_the_names_under_a_prefix(case: Case) -> None:
    store = case.store
    objects = {
        "sources/lms/manifests/20240101T000000Z-00000001.json": 11,
        "sources/lms/manifests/20240102T000000Z-00000002.json": 12,
        "sources/lms/data/20240101T000000Z-00000001.pgdump.zst.age": 1000,
        "sources/lms-files/manifests/20240101T000000Z-00000003.json": 13,
        "sources/other/manifests/20240101T000000Z-00000004.json": 14,
        "top-level": 0,
    }
    for name, size in objects.items():
        store.put_bytes(name, blob(size, size))

    def under(prefix: str) -> dict[str, int]:
        return {n: s for n, s in objects.items() if n.startswith(prefix)}

    assert names_of(store.list("")) == objects
    for prefix in ("sources/", "sources/lms/", "sources/lms/manifests/", "sources/lms-files/",
                   "sources/other/manifests/"):
        assert names_of(store.list(prefix)) == under(prefix), prefix
    assert names_of(store.list("sources/lms/manifests/")) == {
        "sources/lms/manifests/20240101T000000Z-00000001.json": 11,
        "sources/lms/manifests/20240102T000000Z-00000002.json": 12,
    }
    assert names_of(store.list("nothing/here/")) == {}
    assert names_of(store.list("")) == objects  # listing again gives the same answer
    case.assert_stored_exactly(set(objects))


def test_delete_then_not_found(case: Case) -> None:
    store = case.store
    store.put_bytes("dir/victim", b"data")
    store.put_bytes("dir/survivor", b"other")
    store.delete("dir/victim")
    assert_absent(store, "dir/victim")
    assert names_of(store.list("dir/")) == {"dir/survivor": 5}
    case.assert_stored_exactly({"dir/survivor"})


def test_versions_of_an_unversioned_store_are_its_objects_and_go_for_good(case: Case) -> None:
    store = case.store
    store.put_bytes("keys/a.age", b"aaa")
    store.put_bytes("keys/b.json", b"bb")
    store.put_bytes("other/c", b"c")
    versions = sorted(store.list_versions("keys/"), key=lambda v: v.name)
    assert [(v.name, v.size, v.delete_marker, v.latest) for v in versions] == [
        ("keys/a.age", 3, False, True), ("keys/b.json", 2, False, True)]
    assert all(store.version_retained_until(v.name, v.version_id) is None for v in versions)
    for v in versions:
        store.delete_version(v.name, v.version_id)
    store.delete_version(versions[0].name, versions[0].version_id)  # missing: fine
    assert list(store.list_versions("keys/")) == []
    case.assert_stored_exactly({"other/c"})


def test_deleting_a_missing_object_is_not_an_error(case: Case) -> None:
    store = case.store
    store.put_bytes("gone", b"x")
    store.delete("gone")
    store.delete("gone")
    store.delete("never/existed/at-all")
    case.assert_stored_exactly(set())


def test_a_prefix_of_stored_names_is_not_an_object(case: Case,
                                                   request: pytest.FixtureRequest) -> None:
    """`d` is not an object just because `d/x` is: stat/read say NotFound, delete is a no-op."""
    store = case.store
    store.put_bytes("d/x", b"x")
    with pytest.raises(NotFound):
        store.stat("d")
    with pytest.raises(NotFound):
        store.open_read("d")
    with pytest.raises(NotFound):
        store.get_bytes("d", 100)
    store.delete("d")
    assert store.get_bytes("d/x", 1) == b"x"


def test_a_name_below_an_object_is_not_found(case: Case, request: pytest.FixtureRequest) -> None:
    """With `f` stored, `f/x` does not exist: NotFound (a StorageError), never a raw OSError."""
    store = case.store
    store.put_bytes("f", b"file")
    with pytest.raises(NotFound):
        store.stat("f/x")
    with pytest.raises(NotFound):
        store.open_read("f/x")
    store.delete("f/x")  # missing: not an error
    assert store.get_bytes("f", 10) == b"file"


# --------------------------------------------------------------------------------------------
# names
# --------------------------------------------------------------------------------------------


def test_invalid_names_are_refused_before_touching_storage(case: Case) -> None:
    store = case.store
    store.put_bytes("a/b", b"present")
    before = case.raw_tree()
    for name in INVALID_NAMES:
        for method, args in NAME_TAKING_CALLS:
            with pytest.raises(UsageError) as exc_info:
                getattr(store, method)(name, *args)
            assert not isinstance(exc_info.value, StorageError), (method, name)
    assert case.raw_tree() == before
    assert case.pending_uploads() == []


# --------------------------------------------------------------------------------------------
# S3 only
# --------------------------------------------------------------------------------------------


def _fast_fail_client(region: S3Region) -> Any:
    return region.client(config=BotoConfig(retries={"max_attempts": 1}, connect_timeout=2,
                                           read_timeout=5, s3={"addressing_style": "path"}))


def test_s3_objects_live_under_the_prefix_in_the_bucket(s3_regions: list[S3Region]) -> None:
    eu = s3_regions[0]
    store = S3Store(eu.name, eu.bucket, "tenant-a/dr", eu.region, eu.endpoint_url)
    store.put_bytes("sources/x", b"1")
    up = store.begin_upload("sources/y")
    up.write_part(b"22")
    up.commit()
    keys = {o["Key"] for o in eu.client().list_objects_v2(Bucket=eu.bucket)["Contents"]}
    assert keys == {"tenant-a/dr/sources/x", "tenant-a/dr/sources/y"}
    assert "tenant-a/dr" in store.describe() and eu.bucket in store.describe()


def test_s3_undersized_middle_part_fails_as_storage_error(s3_regions: list[S3Region]) -> None:
    """S3 refuses non-last parts under 5 MiB at completion: a StorageError naming the region,
    and an abort afterwards leaves no multipart upload behind."""
    eu = s3_regions[0]
    store = S3Store(eu.name, eu.bucket, "", eu.region, eu.endpoint_url)
    up = store.begin_upload("too-small")
    up.write_part(b"a" * 1000)
    up.write_part(b"b")
    with pytest.raises(StorageError, match=eu.name):
        up.commit()
    up.abort()
    assert eu.client().list_multipart_uploads(Bucket=eu.bucket).get("Uploads", []) == []
    with pytest.raises(NotFound):
        store.stat("too-small")


def test_s3_region_down_raises_storage_error_naming_the_region(
    moto_region_factory: Callable[[str, str, str], S3Region],
) -> None:
    region = moto_region_factory("ap-lost", "ap-southeast-2", "asia-pacific")
    store = S3Store(region.name, region.bucket, "p", client=_fast_fail_client(region))
    store.put_bytes("sources/kept", b"kept")
    pending = store.begin_upload("sources/pending")
    pending.write_part(b"part")

    region.server.stop()

    def fails(call: Callable[[], object]) -> StorageError:
        with pytest.raises(StorageError) as exc_info:
            call()
        exc = exc_info.value
        assert type(exc) is StorageError, f"{type(exc).__name__}: {exc}"  # not NotFound
        assert "ap-lost" in str(exc)
        return exc

    fails(lambda: store.put_bytes("sources/new", b"x"))
    fails(lambda: list(store.list("sources/")))
    fails(lambda: list(store.list("")))
    fails(lambda: store.open_read("sources/kept"))
    fails(lambda: store.get_bytes("sources/kept", 100))
    fails(lambda: store.stat("sources/kept"))
    fails(lambda: store.delete("sources/kept"))
    fails(lambda: pending.write_part(b"more"))
    fails(lambda: pending.commit())
    other = store.begin_upload("sources/other")
    other.write_part(b"x")  # one part so far: held for a PutObject at commit
    fails(lambda: other.commit())
    two = store.begin_upload("sources/two")
    two.write_part(b"x")
    fails(lambda: two.write_part(b"y"))  # a second part begins the multipart upload
    fails(lambda: store.begin_upload("sources/empty").commit())
    pending.abort()  # best effort: must not raise while the region is down
    # Names are checked before any network call, even with the region down.
    with pytest.raises(UsageError):
        store.put_bytes("a//b", b"x")

    region.server.start()
    assert store.get_bytes("sources/kept", 100) == b"kept"
    assert names_of(store.list("")) == {"sources/kept": 4}


def test_boto3_is_imported_only_when_an_s3_region_is_used() -> None:
    # About 0.3 s of every command's start-up: a restore from a local region,
    # `--help` or `keys` should not pay it.
    code = ("import sys, drdaemon.cli.drctl, drdaemon.cli.daemon\n"
            "from drdaemon.storage.s3 import S3Store\n"
            "s = S3Store('eu', 'bucket', region='eu-central-1', endpoint_url='http://127.0.0.1:9')\n"
            "print('boto3' in sys.modules)\n"
            "s.client\n"
            "print('boto3' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]


def test_s3_regions_share_one_boto3_session() -> None:
    # A client from a new session loads S3's service model again (~0.12 s of interpreter
    # per region, while a backup's dump waits on the keyring read): every region's client
    # comes from the process's one session, each with its own region and endpoint.
    code = ("from drdaemon.storage.s3 import S3Store\n"
            "a = S3Store('eu', 'b', region='eu-central-1', endpoint_url='http://127.0.0.1:9')\n"
            "b = S3Store('us', 'b', region='us-east-1', endpoint_url='http://127.0.0.1:10')\n"
            "print(a.client._loader is b.client._loader, a.client.meta.region_name,\n"
            "      b.client.meta.region_name, a.client.meta.endpoint_url,\n"
            "      b.client.meta.endpoint_url)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "eu-central-1", "us-east-1", "http://127.0.0.1:9",
                                  "http://127.0.0.1:10"]
