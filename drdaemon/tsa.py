"""RFC 3161 time-stamps with the standard tool: `openssl ts` builds the query and checks
the token, an HTTP POST asks the time-stamping authority (TSA).

A token is the TSA's signed statement that some bytes existed at its time; the
auditor checks it with `openssl ts -verify -data FILE -in FILE.tsr -CAfile CA`,
the same command `verify` runs. Used by anchors.py; no drdaemon state here.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

from .errors import DrError

MAX_TOKEN = 1 << 16  # a reply with its certificates is a few KiB
TIMEOUT = 30.0  # seconds for the TSA to answer


class TsaError(DrError):
    """The TSA could not be asked, or its answer is not a valid time-stamp."""


def _openssl(args: list[str], data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(["openssl", "ts", *args], input=data, capture_output=True,
                              timeout=TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TsaError(f"openssl ts could not run: {exc}") from None


def _said(done: subprocess.CompletedProcess[bytes]) -> str:
    text = (done.stderr or done.stdout).decode("utf-8", "replace").strip().splitlines()
    return text[-1] if text else f"exit {done.returncode}"


def query(data: bytes) -> bytes:
    """A time-stamp query (DER) for the sha256 of `data`, asking for the TSA's certificate."""
    done = _openssl(["-query", "-sha256", "-cert"], data)
    if done.returncode != 0 or not done.stdout:
        raise TsaError(f"openssl ts -query failed: {_said(done)}")
    return done.stdout


def request(url: str, data: bytes) -> bytes:
    """Ask the TSA at `url` to time-stamp `data`; its reply (DER TimeStampResp)."""
    req = urllib.request.Request(url, data=query(data), method="POST",
                                 headers={"Content-Type": "application/timestamp-query"})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
            reply: bytes = resp.read(MAX_TOKEN + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise TsaError(f"time-stamping authority {url} did not answer: {exc}") from None
    if len(reply) > MAX_TOKEN:
        raise TsaError(f"time-stamping authority {url} answered more than {MAX_TOKEN} bytes")
    return reply


def verify(data: bytes, token: bytes, ca_file: Path, untrusted: Path | None = None) -> str | None:
    """Why `token` is not a valid time-stamp of `data` by a TSA `ca_file` vouches for; None
    if it is (`openssl ts -verify`: the hash, the signature, the chain, the timeStamping use)."""
    with tempfile.TemporaryDirectory(prefix="drdaemon-ts-") as tmp:
        data_file, token_file = Path(tmp) / "data", Path(tmp) / "token.tsr"
        data_file.write_bytes(data)
        token_file.write_bytes(token)
        args = ["-verify", "-data", str(data_file), "-in", str(token_file),
                "-CAfile", str(ca_file)]
        if untrusted is not None:
            args += ["-untrusted", str(untrusted)]
        done = _openssl(args)
    if done.returncode == 0 and b"Verification: OK" in done.stdout:
        return None
    return f"openssl ts -verify: {_said(done)}"


# genTime in TSTInfo: the first GeneralizedTime of a reply (status and the encapsulated
# TSTInfo come before the certificates, whose dates are UTCTime until 2050).
_GEN_TIME = re.compile(rb"\x18([\x0f-\x1f])(\d{14}(?:\.\d{1,6})?Z)")


def stamp_time(token: bytes) -> str | None:
    """The TSA's time in a token (ISO 8601, UTC), for showing; None if none is found.

    Read for display only: whether the token is genuine is `verify`'s job.
    """
    for m in _GEN_TIME.finditer(token):
        if m.group(1)[0] != len(m.group(2)):
            continue
        text = m.group(2).decode("ascii").rstrip("Z")
        fmt = "%Y%m%d%H%M%S.%f" if "." in text else "%Y%m%d%H%M%S"
        try:
            return datetime.strptime(text, fmt).replace(tzinfo=UTC).isoformat()
        except ValueError:
            continue
    return None
