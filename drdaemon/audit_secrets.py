"""The secret sweep: no value that looks like a secret is written into an audit record.

Pure. An event's fields come from everywhere (error messages from a server, DSNs
in a config): every string that looks like an age identity, a password in a DSN
or URL, or the hex of a key the runtime holds is withheld before the record is
signed, and the record lists where (`withheld`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .audit_chain import audit_key
from .keys import ManifestKey

WITHHELD = "[withheld: looks like a secret]"


_SECRET_PATTERNS = (
    re.compile(r"AGE-SECRET-KEY-", re.IGNORECASE),  # an age identity
    re.compile(r"\bpassword\s*[=:]\s*[^\s,;]", re.IGNORECASE),  # libpq keyword DSN
    re.compile(r"[a-z][a-z0-9+.-]*://[^/@\s:]*:[^/@\s]+@", re.IGNORECASE),  # user:password@
)


def looks_secret(text: str, known: Sequence[str] = ()) -> bool:
    """True for an age identity, a DSN or URL with a password, or a known key's hex."""
    lowered = text.lower()
    return (any(p.search(text) for p in _SECRET_PATTERNS)
            or any(k and k.lower() in lowered for k in known))


def scrub(value: Any, known: Sequence[str] = (), where: str = "") -> tuple[Any, list[str]]:
    """`value` with every string that looks like a secret withheld, and the paths withheld.

    The whole string goes, not just the part that matched: a pattern that
    finds a password has not proven it found all of it.
    """
    if isinstance(value, str):
        return (WITHHELD, [where or "value"]) if looks_secret(value, known) else (value, [])
    found: list[str] = []
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for n, (k, v) in enumerate(value.items()):
            name = str(k)
            path = f"{where}.{name}" if where else name
            if looks_secret(name, known):
                name, path = f"{WITHHELD} #{n}", f"{where}.#{n}" if where else f"#{n}"
                found.append(path)
            out[name], inner = scrub(v, known, path)
            found += inner
        return out, found
    if isinstance(value, list):
        items = []
        for n, v in enumerate(value):
            clean, inner = scrub(v, known, f"{where}[{n}]")
            items.append(clean)
            found += inner
        return items, found
    return value, []


def plain_fields(fields: Mapping[str, Any], known: Sequence[str] = ()) -> dict[str, Any]:
    """An event's fields as plain JSON values, secrets withheld (and listed in `withheld`)."""
    plain: dict[str, Any] = json.loads(json.dumps(dict(fields), default=str))
    clean, withheld = scrub(plain, known)
    if withheld:
        clean["withheld"] = withheld
    return dict(clean)


def known_secrets(manifest_key: ManifestKey) -> tuple[str, ...]:
    """Key material the runtime holds, which must never be written into a record."""
    return tuple(h for k in manifest_key.verifying_keys
                 for h in (k.secret.hex(), audit_key(k).hex()))
