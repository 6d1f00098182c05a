"""Helpers shared by tests: writing configs with real keys, running the CLIs."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result

from drdaemon.cli.daemon import cli as daemon_cli
from drdaemon.cli.drctl import cli as drctl_cli
from drdaemon.keys import generate_identity, generate_manifest_key


@dataclass
class Setup:
    """A config on disk with its key files: two operator recipients, as recommended,
    ops (`identity`, the config's identity_file) and an offline escrow one (`escrow`)."""

    config: Path
    identity: Path
    manifest_key: Path
    recipient: str
    state: Path
    escrow: Path
    escrow_recipient: str

    def drctl(self, *args: str) -> Result:
        return drctl([ "--config", str(self.config), *args])

    def drctl_json(self, *args: str) -> Any:
        result = self.drctl(*args, "--json")
        assert result.exit_code == 0, result.output + result.stderr
        return json.loads(result.stdout)


def drctl(args: list[str]) -> Result:
    """Run drctl in-process (the real click app), stderr kept apart."""
    return CliRunner().invoke(drctl_cli, args, obj={}, catch_exceptions=False)


def drdaemon(args: list[str]) -> Result:
    return CliRunner().invoke(daemon_cli, args, obj={}, catch_exceptions=False)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a console script as a real process, to see exit codes and stderr as a user does."""
    bindir = Path(sys.executable).parent
    return subprocess.run([str(bindir / args[0]), *args[1:]], capture_output=True, text=True,
                          env=env, timeout=300, check=False)


def make_setup(tmp: Path, regions: list[str], sources: list[str], extra: str = "",
               daemon: str = "") -> Setup:
    """Write a config with a fresh identity and manifest key under `tmp`."""
    keys = tmp / "keys"
    identity = keys / "identity.txt"
    mkey = keys / "manifest.key"
    escrow = keys / "escrow.txt"
    recipient = generate_identity(identity)
    escrow_recipient = generate_identity(escrow)
    generate_manifest_key(mkey)
    state = tmp / "state"
    text = (
        f'[daemon]\nstate_dir = "{state}"\n{daemon}\n'
        f'[keys]\nrecipients = [{{ recipient = "{recipient}", name = "ops" }}, '
        f'{{ recipient = "{escrow_recipient}", name = "escrow" }}]\n'
        f'identity_file = "{identity}"\n'
        f'manifest_key_file = "{mkey}"\n\n'
        '[pipeline]\nzstd_level = 3\nzstd_threads = 0\npart_size = "5MiB"\n\n'
        + extra + "\n" + "\n".join(regions) + "\n" + "\n".join(sources)
    )
    config = tmp / "drdaemon.toml"
    config.write_text(text)
    return Setup(config, identity, mkey, recipient, state, escrow, escrow_recipient)


def directory_source(name: str, path: Path, tier: str = "paid", tenant: str = "uni-a") -> str:
    return (f'[[sources]]\nname = "{name}"\nkind = "directory"\ntenant = "{tenant}"\n'
            f'tier = "{tier}"\npath = "{path}"\n')


def postgres_source(name: str, dsn: str, tier: str = "paid", tenant: str = "uni-a") -> str:
    return (f'[[sources]]\nname = "{name}"\nkind = "postgres"\ntenant = "{tenant}"\n'
            f'tier = "{tier}"\ndsn = "{dsn}"\n')


def local_region(name: str, path: Path, continent: str) -> str:
    return (f'[[regions]]\nname = "{name}"\nkind = "local"\ncontinent = "{continent}"\n'
            f'path = "{path}"\n')


def snapshot_keys(client: Any, bucket: str) -> list[str]:
    """Object keys of a bucket outside the audit mirror (audit/ records failures too) and
    the tenants' keyrings (tenants/: made at a tenant's first backup, failed or not)."""
    return [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])
            if not o["Key"].startswith(("audit/", "tenants/"))]


def stored_key(region: Any, suffix: str) -> str:
    """The first object key in a test region's bucket ending with `suffix`."""
    objs = region.client().list_objects_v2(Bucket=region.bucket)["Contents"]
    return next(o["Key"] for o in objs if o["Key"].endswith(suffix))


def flip_byte(region: Any, key: str, at: int | None = None) -> None:
    """Corrupt one stored object in place: flip the byte at `at` (default: the middle)."""
    client = region.client()
    body = bytearray(client.get_object(Bucket=region.bucket, Key=key)["Body"].read())
    body[len(body) // 2 if at is None else at] ^= 0xFF
    client.put_object(Bucket=region.bucket, Key=key, Body=bytes(body))


class Clock:
    """A runtime clock (open_runtime(clock=...)) that the test moves by setting `now`."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def lock_buckets(regions: list[Any]) -> list[Any]:
    """The test regions (conftest.S3Region), each with a fresh bucket made with Object
    Lock (so also versioned)."""
    out = []
    for r in regions:
        locked = replace(r, bucket=r.bucket + "-lock")
        create: dict[str, Any] = {"Bucket": locked.bucket, "ObjectLockEnabledForBucket": True}
        if r.region != "us-east-1":
            create["CreateBucketConfiguration"] = {"LocationConstraint": r.region}
        r.client().create_bucket(**create)
        out.append(locked)
    return out


def kill_left_running(procs: Iterable[subprocess.Popen[bytes] | None]) -> None:
    """Kill (and reap) what a test started and left running: daemons, workers."""
    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
