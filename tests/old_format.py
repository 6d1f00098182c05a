"""Snapshots as drdaemon wrote them before tenant keys (manifest versions 1 and 2), and the
break-glass commands of runbooks/break-glass-restore.md, for tests of both formats."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import pyrage
from support import Setup
from test_runbooks import RUNBOOKS, sh_lines

from drdaemon import facts as facts_mod
from drdaemon import layout, manifest, tenant_keys
from drdaemon.keys import fingerprint, load_identities, load_manifest_key
from drdaemon.pipeline import parse_recipients
from drdaemon.runtime import load_config, open_runtime
from drdaemon.sources import pg_database

RUNBOOK = RUNBOOKS / "break-glass-restore.md"


def downgrade(setup: Setup, source: str, snap_id: str) -> manifest.Manifest:
    """Rewrite snapshot `snap_id` in every region, in place, as a version 1/2 snapshot:
    the same zstd stream encrypted to the global [keys] recipients, sealed settings too,
    and a manifest without `tenant_key` (exactly what the encryption path wrote then)."""
    mkey = load_manifest_key(setup.manifest_key)
    rt = open_runtime(load_config(str(setup.config)))
    first = rt.stores[0]
    m = manifest.parse(first.get_bytes(layout.manifest_object_name(source, snap_id),
                                       manifest.MAX_MANIFEST_BYTES), mkey)
    assert m.tenant_key is not None
    tenant = tenant_keys.unwrap(rt, m.tenant, m.tenant_key.key_id,
                                load_identities(setup.identity))
    compressed = pyrage.decrypt(first.get_bytes(m.data_name, m.size), [tenant])
    recipients = parse_recipients(rt.config.keys.recipients)
    data = pyrage.encrypt(compressed, recipients)
    facts = m.facts
    db = facts.get("database")
    if isinstance(db, dict) and pg_database.SEALED in db:
        facts = {**facts, "database": pg_database.seal(pg_database.unseal(db, [tenant]),
                                                       recipients)}
    # Snapshots of then carried no roles (pg_role_copy.py): nor does the facts object.
    facts = {k: v for k, v in facts.items() if k != "roles"}
    ref, encoded = m.facts_object, None
    if ref is not None:
        detached = facts_mod.decode(first.get_bytes(ref.name, ref.size), m)
        detached.pop("globals", None)
        encoded = facts_mod.encode(source, snap_id, detached)
        ref = encoded.ref
    old = dataclasses.replace(m, sha256=hashlib.sha256(data).hexdigest(), size=len(data),
                              recipients=tuple(fingerprint(r) for r in
                                               rt.config.keys.recipients),
                              facts=facts, tenant_key=None, facts_object=ref)
    assert old.version in (manifest.VERSION, manifest.FACTS_OBJECT_VERSION)
    for store in rt.stores:
        store.put_bytes(m.data_name, data)
        if encoded is not None:
            store.put_bytes(encoded.ref.name, encoded.blob)
        store.put_bytes(layout.manifest_object_name(source, snap_id),
                        manifest.serialize(old, mkey))
    return old


def sh(command: str, cwd: Path) -> None:
    """One runbook command, as on-call runs it (bash, pipefail)."""
    subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=cwd, check=True)


def break_glass_fetch(region: Any, source: str, snap_id: str, kind: str, work: Path) -> None:
    """Runbook step 1-2: the manifest and the data object, downloaded as manifest.json and
    snapshot.age (with the S3 client; the runbook uses `aws s3 cp`)."""
    client = region.client()
    client.download_file(region.bucket, layout.manifest_object_name(source, snap_id),
                         str(work / "manifest.json"))
    client.download_file(region.bucket, layout.data_object_name(source, snap_id, kind),
                         str(work / "snapshot.age"))


def runbook_command(start: str, **subs: str) -> str:
    """The command of runbooks/break-glass-restore.md (a ```sh line) that begins with
    `start`, with its placeholders replaced (`subs`: placeholder -> value)."""
    [line] = [ln.text for ln in sh_lines(RUNBOOK) if ln.text.startswith(start)]
    for placeholder, value in subs.items():
        assert placeholder in line, f"{placeholder!r} is not in the runbook's {line!r}"
        line = line.replace(placeholder, value)
    return line


def break_glass_unwrap(region: Any, identity: Path, work: Path) -> Path:
    """The runbook's step for a version-3 snapshot: find the tenant key by its name in the
    manifest, download it and unwrap it with `age` and the ops/escrow identity."""
    sh(runbook_command("jq -r") + " > key-name", work)
    name = (work / "key-name").read_text().strip()
    region.client().download_file(region.bucket, name, str(work / "tenant-key.age"))
    sh(runbook_command("(umask 077 && age -d", **{"identity.txt": str(identity)}), work)
    return work / "tenant.key"


def break_glass_restore(kind: str, identity: Path, work: Path, target: str,
                        pg_restore: str = "pg_restore") -> None:
    """The runbook's restore command, with `identity` (the unwrapped tenant key, or the
    operator identity for versions 1 and 2) into `target` (a DSN, or an empty folder)."""
    if kind == "postgres":
        sh(runbook_command("age -d -i tenant.key snapshot.age | zstd -d | pg_restore --exit",
                           **{"tenant.key": str(identity), "pg_restore": pg_restore,
                              "lms_restored": f"'{target}'"}), work)
    else:
        sh(runbook_command("age -d -i tenant.key snapshot.age | zstd -d | tar -x",
                           **{"tenant.key": str(identity), "restored": target}), work)


def manifest_version(work: Path) -> int:
    return int(json.loads((work / "manifest.json").read_text())["version"])
