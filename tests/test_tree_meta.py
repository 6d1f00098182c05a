"""Pure parts of directory metadata: the name escape and the ACL text form (properties)."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from drdaemon.sources.tree_meta import acl_blob, acl_text, name_bytes, name_text, shorten


@given(st.binary(max_size=300))
def test_any_bytes_round_trip_through_the_name_escape(raw: bytes) -> None:
    text = name_text(raw)
    text.encode("utf-8")  # no lone surrogates: a manifest can carry it
    assert name_bytes(text) == raw


@given(st.text(max_size=100).filter(lambda t: "\\" not in t))
def test_utf8_names_without_backslash_are_kept_as_they_are(name: str) -> None:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return
    assert name_text(name.encode()) == name


@given(st.text(max_size=400), st.integers(min_value=20, max_value=120))
def test_shortened_text_is_one_line_and_bounded(text: str, limit: int) -> None:
    out = shorten(text, limit)
    assert "\n" not in out and "\x1b" not in out
    assert len(out) <= limit


_perm = st.integers(min_value=0, max_value=7)
_id = st.integers(min_value=0, max_value=2**31)


@given(_perm, _perm, _perm, _perm, st.lists(st.tuples(st.sampled_from([2, 8]), _perm, _id),
                                            max_size=6, unique_by=lambda e: (e[0], e[2])))
def test_acl_text_round_trips(user: int, group: int, mask: int, other: int,
                              named: list[tuple[int, int, int]]) -> None:
    no_id = 0xFFFFFFFF
    entries = sorted([(1, user, no_id), (4, group, no_id), (0x10, mask, no_id),
                      (0x20, other, no_id), *named], key=lambda e: (e[0], e[2]))
    blob = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", t, p, i) for t, p, i in entries)
    assert acl_blob(acl_text(blob)) == blob
