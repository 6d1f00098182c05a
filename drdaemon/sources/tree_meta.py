"""File metadata of tree entries: read from disk, carried in pax headers, applied on restore.

What is kept (docs/format.md, "Directory snapshots"): the permission bits
(setuid always removed on restore, setgid removed from files: neither is
data, both grant privileges), numeric owner and group (names alongside, for
people), the modification time in nanoseconds (pax `mtime`), extended
attributes of the `user.` namespace (pax `SCHILY.xattr.<name>`, as GNU tar
--xattrs writes them) and POSIX ACLs (pax `SCHILY.acl.access` and
`SCHILY.acl.default` in their text form with numeric ids, as GNU tar --acls
writes them).

Names are bytes on disk and may be any bytes but NUL and '/'; where they are
shown or stored as text (manifest, digest, notes) they go through `name_text`.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import pwd
import stat
import struct
import tarfile
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from functools import lru_cache

XATTR_PREFIX = "SCHILY.xattr."
ACL_ACCESS = "SCHILY.acl.access"
ACL_DEFAULT = "SCHILY.acl.default"
_ACL_XATTRS = {ACL_ACCESS: "system.posix_acl_access", ACL_DEFAULT: "system.posix_acl_default"}
# Bits never restored: they grant privileges rather than describe data.
STRIPPED_FILE_BITS = stat.S_ISUID | stat.S_ISGID
STRIPPED_DIR_BITS = stat.S_ISUID


@dataclass(frozen=True)
class Meta:
    """The metadata of one entry that drdaemon keeps."""

    mode: int  # permission bits, including setgid and sticky
    uid: int
    gid: int
    mtime_ns: int
    xattrs: tuple[tuple[str, bytes], ...] = ()  # user.* only, sorted by name
    acl_access: str = ""  # text form, numeric ids; "" when the entry has none
    acl_default: str = ""
    uname: str = ""
    gname: str = ""


def restorable_mode(mode: int, is_dir: bool) -> int:
    """The permission bits a restore sets for `mode` (the privilege bits removed)."""
    return stat.S_IMODE(mode) & ~(STRIPPED_DIR_BITS if is_dir else STRIPPED_FILE_BITS)


# -- names -------------------------------------------------------------------------


def name_text(name: bytes | str) -> str:
    """A name as text that round-trips any bytes: UTF-8 as is, a backslash doubled,
    each byte that is not part of valid UTF-8 as `\\xHH` (two lower-case hex)."""
    raw = os.fsencode(name)
    text = raw.decode("utf-8", "surrogateescape")
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif 0xDC80 <= ord(ch) <= 0xDCFF:
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        else:
            out.append(ch)
    return "".join(out)


def name_bytes(text: str) -> bytes:
    """The inverse of `name_text`."""
    out = bytearray()
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and text[i + 1:i + 2] == "\\":
            out += b"\\"
            i += 2
        elif ch == "\\" and text[i + 1:i + 2] == "x":
            out.append(int(text[i + 2:i + 4], 16))
            i += 4
        else:
            out += ch.encode()
            i += 1
    return bytes(out)


def short_name(name: bytes | str, limit: int = 80) -> str:
    """`name_text(name)`, its middle cut out when longer than `limit` (errors stay one line)."""
    return shorten(name_text(name), limit)


def shorten(text: str, limit: int = 80) -> str:
    """`text` on one line, control characters escaped (no terminal tricks), its
    middle cut out when longer than `limit`. For people only: not reversible."""
    text = "".join(f"\\x{ord(c):02x}" if ord(c) < 0x20 or ord(c) == 0x7F else c
                   for c in text)
    if len(text) <= limit:
        return text
    half = (limit - 1) // 2
    return f"{text[:half]}…{text[-half:]}"


def split_name(name: str) -> list[bytes] | None:
    """The components of an archive name; None for an absolute name or one with '..'."""
    raw = os.fsencode(name)
    if raw.startswith(b"/"):
        return None
    comps = [c for c in raw.split(b"/") if c not in (b"", b".")]
    if b".." in comps:
        return None
    return comps


# -- reading from disk ---------------------------------------------------------------


@lru_cache(maxsize=4096)
def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return ""


@lru_cache(maxsize=4096)
def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return ""


def read_meta(st: os.stat_result, target: int | str | None) -> Meta:
    """The metadata of an entry from its lstat and `target` (an open descriptor or a
    path to read its extended attributes from; None for a symbolic link)."""
    xattrs: list[tuple[str, bytes]] = []
    acls = {ACL_ACCESS: "", ACL_DEFAULT: ""}
    if target is not None:
        listed = _listxattr(target)
        for attr in sorted(listed):
            if attr.startswith("user."):
                value = _getxattr(target, attr)
                if value is not None:
                    xattrs.append((attr, value))
        for key, attr in _ACL_XATTRS.items():
            if attr in listed:  # listed by file systems that keep ACLs as xattrs (Linux)
                value = _getxattr(target, attr)
                if value:
                    acls[key] = acl_text(value)
    return Meta(stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns,
                tuple(xattrs), acls[ACL_ACCESS], acls[ACL_DEFAULT],
                _user(st.st_uid), _group(st.st_gid))


def _listxattr(target: int | str) -> list[str]:
    try:
        return os.listxattr(target)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.ENOENT):
            return []
        raise


def _getxattr(target: int | str, attr: str) -> bytes | None:
    try:
        return os.getxattr(target, attr)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.ENOENT):
            return None
        raise


# -- POSIX ACLs: Linux's xattr form <-> the text form tar stores -----------------------

_TAGS = {0x01: "user", 0x02: "user", 0x04: "group", 0x08: "group", 0x10: "mask",
         0x20: "other"}
_NAMED = {0x02, 0x08}
_UNDEFINED_ID = 0xFFFFFFFF


def acl_text(blob: bytes) -> str:
    """`user::rwx,user:1000:r--,group::r-x,mask::r-x,other::---` from system.posix_acl_*."""
    if len(blob) < 4 or (len(blob) - 4) % 8:
        return ""
    parts = []
    for off in range(4, len(blob), 8):
        tag, perm, ident = struct.unpack_from("<HHI", blob, off)
        if tag not in _TAGS:
            continue
        rwx = "".join(c if perm & bit else "-" for c, bit in (("r", 4), ("w", 2), ("x", 1)))
        qualifier = str(ident) if tag in _NAMED else ""
        parts.append(f"{_TAGS[tag]}:{qualifier}:{rwx}")
    return ",".join(parts)


def acl_blob(text: str) -> bytes:
    """The inverse of `acl_text` (ValueError on text it cannot read)."""
    entries = []
    for part in text.split(","):
        kind, qualifier, rwx = part.strip().split(":")
        perm = sum(bit for c, bit in (("r", 4), ("w", 2), ("x", 1)) if c in rwx)
        if kind in ("user", "group") and qualifier:
            tag, ident = (0x02 if kind == "user" else 0x08), int(qualifier)
        else:
            tag = {"user": 0x01, "group": 0x04, "mask": 0x10, "other": 0x20}[kind]
            ident = _UNDEFINED_ID
        entries.append((tag, ident, perm))
    entries.sort()  # the kernel wants them ordered by tag, then id
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", t, p, i)
                                           for t, i, p in entries)


# -- pax headers -------------------------------------------------------------------


def to_member(info: tarfile.TarInfo, meta: Meta) -> None:
    """Set `info`'s header fields and pax headers from `meta`."""
    info.mode, info.uid, info.gid = meta.mode, meta.uid, meta.gid
    info.uname, info.gname = meta.uname, meta.gname
    sec, ns = divmod(meta.mtime_ns, 1_000_000_000)
    info.mtime = sec
    pax = dict(info.pax_headers)
    if ns:
        pax["mtime"] = f"{sec}.{ns:09d}".rstrip("0")
    for attr, value in meta.xattrs:
        # Binary values travel like binary names: tarfile writes them with
        # hdrcharset=BINARY, and reads them back with surrogateescape.
        pax[XATTR_PREFIX + attr] = value.decode("utf-8", "surrogateescape")
    if meta.acl_access:
        pax[ACL_ACCESS] = meta.acl_access
    if meta.acl_default:
        pax[ACL_DEFAULT] = meta.acl_default
    info.pax_headers = pax


def _mtime_ns(member: tarfile.TarInfo) -> int:
    raw = member.pax_headers.get("mtime")
    if raw is not None:
        with contextlib.suppress(InvalidOperation, ValueError):
            return int(Decimal(raw).scaleb(9).to_integral_value(rounding="ROUND_FLOOR"))
    return int(member.mtime) * 1_000_000_000


def meta_of_member(member: tarfile.TarInfo) -> Meta:
    """The metadata an archive entry carries (privilege bits still in `mode`)."""
    xattrs = sorted((k[len(XATTR_PREFIX):], v.encode("utf-8", "surrogateescape"))
                    for k, v in member.pax_headers.items()
                    if k.startswith(XATTR_PREFIX + "user."))
    return Meta(stat.S_IMODE(member.mode), member.uid, member.gid, _mtime_ns(member),
                tuple(xattrs), member.pax_headers.get(ACL_ACCESS, ""),
                member.pax_headers.get(ACL_DEFAULT, ""), member.uname, member.gname)


# -- applying on restore -------------------------------------------------------------


def apply_meta(meta: Meta, fd: int | None, parent: int | None, name: bytes,
               missed: set[str], is_dir: bool = False) -> list[str]:
    """Apply `meta` to an entry just written: through `fd` (a file or folder), or by
    `name` in folder `parent` without following it (a symbolic link, fd None).

    Returns notes about this entry (privilege bits removed); what could not be
    applied for lack of privilege goes, once per kind, into `missed`.
    """
    notes = []
    _chown(meta, fd, parent, name, missed)
    if fd is not None:
        # Extended attributes before the mode (writing them needs write permission
        # on the file), ACLs before it too (a mode that came with its ACL leaves the
        # ACL as it is: its group bits are the ACL's mask).
        for attr, value in meta.xattrs:
            _setxattr(fd, attr, value, missed, "extended attributes")
        for key, attr in _ACL_XATTRS.items():
            text = meta.acl_access if key == ACL_ACCESS else meta.acl_default
            if text:
                try:
                    blob = acl_blob(text)
                except (ValueError, KeyError):
                    notes.append(f"unreadable ACL {text[:40]!r} not applied")
                    continue
                _setxattr(fd, attr, blob, missed, "POSIX ACLs")
        mode = restorable_mode(meta.mode, is_dir)
        if mode != meta.mode:
            notes.append("setuid/setgid bits removed")
        os.fchmod(fd, mode)
        os.utime(fd, ns=(meta.mtime_ns, meta.mtime_ns))
    else:
        os.utime(name, ns=(meta.mtime_ns, meta.mtime_ns), dir_fd=parent,
                 follow_symlinks=False)
    return notes


def _chown(meta: Meta, fd: int | None, parent: int | None, name: bytes,
           missed: set[str]) -> None:
    if (meta.uid, meta.gid) == (os.geteuid(), os.getegid()):
        return
    try:
        if fd is not None:
            os.fchown(fd, meta.uid, meta.gid)
        else:
            os.chown(name, meta.uid, meta.gid, dir_fd=parent, follow_symlinks=False)
    except PermissionError:
        missed.add("owners and groups: not applied (only root can give files away); "
                   "entries belong to the restoring user")


def _setxattr(fd: int, attr: str, value: bytes, missed: set[str], what: str) -> None:
    try:
        os.setxattr(fd, attr, value)
    except OSError as exc:
        if exc.errno not in (errno.ENOTSUP, errno.EPERM, errno.EACCES, errno.EINVAL):
            raise
        missed.add(f"{what}: not applied where the file system or privileges refused "
                   f"them ({exc.strerror})")
