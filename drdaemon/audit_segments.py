"""The audit mirror's segments, pure: which records a region holds, what to write, how to read.

A region holds each chain of each host in its own folder (`audit/<host>/<chain>/`),
as segments named by the first and last record they hold, each written once
(under Object Lock where the bucket has it) and never rewritten; the older
layout's segments, named by their first record only and grown in place, are
still read. This module turns one listing into chain folders (`chain_folders`),
says how many records of the local log a region already holds (`held_records`)
and which new segments to write (`new_spans`), and puts a folder's segments back
together as one list of lines, naming gaps and forks (`assemble`). No I/O:
audit_mirror.py lists, reads and writes. The layout is in docs/format.md
("Audit log").
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from . import layout
from .audit_chain import SEGMENT_RECORDS


@dataclass(frozen=True)
class Segment:
    """One mirrored object of a chain: its name, records (`last` None: older layout), size."""

    name: str
    first: int
    last: int | None
    size: int


@dataclass(frozen=True)
class ChainFolder:
    """One chain of one host as a region's listing shows it."""

    host: str
    chain: str
    segments: tuple[Segment, ...]  # in record order

    @property
    def folder(self) -> str:
        return f"{layout.AUDIT_MIRROR}/{self.host}/{self.chain}"

    @property
    def named_records(self) -> int:
        """Records the names account for (the older layout's segments count as their
        first record only: their size, not their name, says how many they hold)."""
        return max((s.last + 1 if s.last is not None else s.first + 1
                    for s in self.segments), default=0)


def chain_folders(listing: Iterable[tuple[str, int]]) -> dict[str, ChainFolder]:
    """Every chain folder in a listing of `audit/` ((name, size) of each object), by folder
    name; other objects are left out."""
    found: dict[tuple[str, str], list[Segment]] = {}
    for name, size in listing:
        parsed = layout.parse_audit_segment(name)
        if parsed is not None:
            found.setdefault((parsed.host, parsed.chain), []).append(
                Segment(name, parsed.first, parsed.last, size))
    folders = (ChainFolder(host, chain, tuple(sorted(segs, key=_order)))
               for (host, chain), segs in found.items())
    return {f.folder: f for f in folders}


def _order(s: Segment) -> tuple[int, int, str]:
    return s.first, s.last if s.last is not None else s.first, s.name


def held_records(segments: Sequence[Segment], local: Sequence[bytes]) -> int:
    """How many records of the chain, from record 0, the region holds as far as the listing
    tells; more than len(local) when the region holds records the local log lost.

    A segment of the older layout is measured against the local log: it holds the
    local lines from its first record whose sizes add up to its own.
    """
    end = 0
    for s in segments:
        if s.last is not None:
            end = max(end, s.last + 1)
            continue
        n, total = 0, 0
        while s.first + n < len(local) and total + len(local[s.first + n]) <= s.size:
            total += len(local[s.first + n])
            n += 1
        if total < s.size and s.first + n >= len(local):
            end = max(end, len(local) + 1)  # bytes beyond the local log's end
        else:
            end = max(end, s.first + n)
    return end


def whole_blocks(segments: Iterable[Segment]) -> frozenset[int]:
    """The first record of each block of SEGMENT_RECORDS records held whole, in one segment."""
    return frozenset(s.first for s in segments if s.first % SEGMENT_RECORDS == 0
                     and (s.last is None or s.last == s.first + SEGMENT_RECORDS - 1))


def is_whole_block(first: int, last: int) -> bool:
    """Whether a span (first, last) is one whole block (see `whole_blocks`)."""
    return first % SEGMENT_RECORDS == 0 and last == first + SEGMENT_RECORDS - 1


def new_spans(segments: Sequence[Segment], held: int, count: int) -> list[tuple[int, int]]:
    """(first, last) of each segment to write so that the region holds records 0 to
    count - 1, in record order (`spans_to_write` over the segments' whole blocks)."""
    return spans_to_write(whole_blocks(segments), held, count)


def spans_to_write(whole: Iterable[int], held: int, count: int) -> list[tuple[int, int]]:
    """(first, last) of each segment to write so that a region holding records 0 to
    held - 1, and whole blocks beginning at `whole`, holds records 0 to count - 1.

    The records the region lacks (from `held` on), never more than
    SEGMENT_RECORDS in one segment nor across a multiple of it; and each block
    of SEGMENT_RECORDS records that is complete now but held only in smaller
    segments once more as one whole block, so that a reader reads one object
    per block (`to_read`), not one per mirror run.
    """
    spans = []
    first = held
    while first < count:
        last = min(count, _block_end(first)) - 1
        spans.append((first, last))
        first = last + 1
    held_whole = set(whole)
    blocks = [(b, b + SEGMENT_RECORDS - 1) for b in range(0, count - SEGMENT_RECORDS + 1,
                                                          SEGMENT_RECORDS)
              if b not in held_whole]
    return sorted(set(spans) | set(blocks))


def _block_end(seq: int) -> int:
    return (seq // SEGMENT_RECORDS + 1) * SEGMENT_RECORDS


def to_read(segments: Sequence[Segment]) -> list[Segment]:
    """The segments a reader needs: all but those inside a whole block written since."""
    blocks = {s.first for s in segments if s.last is not None
              and s.first % SEGMENT_RECORDS == 0 and s.last == s.first + SEGMENT_RECORDS - 1}
    return [s for s in segments
            if s.last is None or s.last - s.first + 1 == SEGMENT_RECORDS
            or s.first - s.first % SEGMENT_RECORDS not in blocks
            or _block_end(s.first) <= s.last]


def assemble(parts: Sequence[tuple[Segment, Sequence[bytes]]]) -> tuple[list[bytes], list[str]]:
    """A folder's segments (in record order, each with its lines) as one list of lines,
    and what is wrong with the folder.

    Segments that overlap with the same records are read once. Records missing
    between two segments, or a segment holding other records than one before it
    for the same sequence numbers (a fork: the chain was rewritten beside its
    older copy), are named; the segment's lines are then kept as they are, so
    that checking the lines fails at that point too.
    """
    lines: list[bytes] = []
    problems: list[str] = []
    for seg, seg_lines in parts:
        if seg.last is not None and len(seg_lines) != seg.last - seg.first + 1:
            problems.append(f"{seg.name} holds {len(seg_lines)} records, its name "
                            f"{seg.last - seg.first + 1}: it was rewritten")
        if seg.first > len(lines):
            problems.append(f"records {len(lines)} to {seg.first - 1} are missing: no "
                            f"segment holds them (before {seg.name})")
            lines += seg_lines
            continue
        overlap = lines[seg.first:seg.first + len(seg_lines)]
        if seg_lines[:len(overlap)] == overlap:
            lines += seg_lines[len(overlap):]
            continue
        at = seg.first + next(i for i, (a, b) in enumerate(zip(overlap, seg_lines, strict=False))
                              if a != b)
        problems.append(f"fork at record {at}: {seg.name} holds another record {at} than "
                        "the segment before it: the chain was rewritten beside its older copy")
        lines += seg_lines
    return lines, problems
