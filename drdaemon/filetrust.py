"""Files drdaemon trusts (the config, identities, the manifest key), checked before use.

The rule is OpenSSH's StrictModes, with one addition for sticky folders:

- the file is a regular file owned by the running user or root, and not
  writable by group or others; a private file (identity, manifest key) is not
  readable by them either (0600 or stricter);
- every folder above it, up to `/`, is owned by the running user or root and
  not writable by group or others, except a root-owned sticky folder such as
  `/tmp` (mode 1777): there nobody may rename or remove what another user owns,
  so the entry inside it must itself be owned by the running user or root;
- a symbolic link on the way is followed, but it must be owned by the running
  user or root, the folder holding it is checked like the others, and so are
  the real file and every folder above the real file.

So nobody but the running user and root can change what drdaemon reads, or
swap it between the check and the read (the file is opened without following
a link and checked again through its descriptor). Each refusal is one line.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import UsageError

MAX_TRUSTED_SIZE = 1 << 20  # a config or key file is small; refuse to read a huge one


class UntrustedFile(UsageError):
    """A config or key file (or a folder above it) others could have changed."""


def _owner_ok(uid: int, me: int) -> bool:
    return uid in (me, 0)


def _who(me: int) -> str:
    return "root" if me == 0 else f"the running user (id {me}) or root"


def folder_problem(st: os.stat_result, me: int) -> str | None:
    """Why a folder on the way to a trusted file is unsafe, or None (pure)."""
    if not _owner_ok(st.st_uid, me):
        return f"is owned by user id {st.st_uid}, not by {_who(me)}"
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022 and not (st.st_uid == 0 and mode & stat.S_ISVTX):
        return f"is writable by group or others (mode {mode:04o})"
    return None


def file_problem(st: os.stat_result, me: int, private: bool) -> str | None:
    """Why a trusted file itself is unsafe, or None (pure)."""
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if not _owner_ok(st.st_uid, me):
        return f"is owned by user id {st.st_uid}, not by {_who(me)}"
    mode = stat.S_IMODE(st.st_mode)
    if private and mode & 0o077:
        how = "readable" if mode & 0o044 else "open"
        return f"is {how} by group or others (mode {mode:04o}); it must be 0600"
    if mode & 0o022:
        return f"is writable by group or others (mode {mode:04o})"
    return None


def _check_chain(path: Path, shown: Path, what: str, me: int) -> None:
    """Check every component of the absolute `path` but the last, and the links on it."""
    parts = path.parts
    parent = Path(parts[0])
    parent_st = os.stat(parent)
    for name in parts[1:]:
        problem = folder_problem(parent_st, me)
        if problem:
            raise UntrustedFile(f"{what} {shown}: folder {parent} {problem}")
        here = parent / name
        st = os.lstat(here)
        sticky = parent_st.st_mode & stat.S_ISVTX and parent_st.st_mode & 0o002
        if (stat.S_ISLNK(st.st_mode) or sticky) and not _owner_ok(st.st_uid, me):
            kind = "symbolic link" if stat.S_ISLNK(st.st_mode) else "entry"
            raise UntrustedFile(f"{what} {shown}: {kind} {here} is owned by user id "
                                f"{st.st_uid}, not by {_who(me)}")
        # A link is followed by the kernel; its target is checked as the real path too.
        parent_st = os.stat(here) if stat.S_ISLNK(st.st_mode) else st
        parent = here


def read_trusted(path: Path, what: str, *, private: bool) -> bytes:
    """The bytes of `path` once it and every folder above it pass the rule above.

    Raises FileNotFoundError if it does not exist, UntrustedFile (one line, exit
    2) if it is unsafe, and OSError if it cannot be read.
    """
    me = os.geteuid()
    absolute = path.absolute()
    real = Path(os.path.realpath(absolute))
    if not real.exists():
        raise FileNotFoundError(str(path))
    for chain in dict.fromkeys((absolute, real)):
        _check_chain(chain, path, what, me)
    fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        problem = file_problem(os.fstat(fd), me, private)
        if problem:
            hint = f"; run: chmod 600 {path}" if private and "0600" in problem else ""
            raise UntrustedFile(f"{what} {path} {problem}{hint}")
        data = os.read(fd, MAX_TRUSTED_SIZE + 1)
        chunk = data
        while chunk and len(data) <= MAX_TRUSTED_SIZE:
            chunk = os.read(fd, MAX_TRUSTED_SIZE + 1 - len(data))
            data += chunk
    finally:
        os.close(fd)
    if len(data) > MAX_TRUSTED_SIZE:
        raise UntrustedFile(f"{what} {path} is larger than {MAX_TRUSTED_SIZE >> 20} MiB")
    return data


def check_folder_chain(folder: Path, what: str) -> None:
    """Refuse `folder` if a folder above it (not itself) breaks the rule above."""
    me = os.geteuid()
    absolute = folder.absolute()
    real = Path(os.path.realpath(absolute))
    for chain in dict.fromkeys((absolute, real)):
        _check_chain(chain, folder, what, me)
