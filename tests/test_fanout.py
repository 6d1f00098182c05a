"""The backup fan-out when a region goes dark in the middle of a stream.

Real stores on both sides: a moto S3 region behind a proxy that is cut
mid-stream, and a local region. The dark region must be dropped without
holding up the stream, and the other must still get an exact copy.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from pathlib import Path
from urllib.parse import urlparse

import pyrage
import zstandard
from conftest import S3Region
from flaky_proxy import FlakyProxy
from pyrage import x25519

from drdaemon.pipeline import encrypt_and_upload
from drdaemon.storage.local import LocalStore
from drdaemon.storage.s3 import S3Store


def test_a_region_lost_mid_stream_is_dropped_and_the_others_finish(
        tmp_path: Path, s3_regions: list[S3Region]) -> None:
    eu = s3_regions[0]
    up = urlparse(eu.endpoint_url)
    proxy = FlakyProxy((up.hostname or "127.0.0.1", up.port or 80), every=1 << 30)
    dark = S3Store("eu", eu.bucket, region=eu.region, endpoint_url=proxy.url)
    local = LocalStore("local", tmp_path / "local")
    uploads = {"eu": dark.begin_upload("obj"), "local": local.begin_upload("obj")}
    data = os.urandom(40 << 20)  # incompressible: eight 5 MiB parts of ciphertext
    identity = x25519.Identity.generate()
    read = [0]
    cut = threading.Event()

    def progress(n: int) -> None:
        read[0] += n
        if read[0] >= 16 << 20 and not cut.is_set():
            cut.set()
            proxy.cut()

    try:
        stored = encrypt_and_upload(io.BytesIO(data), uploads, [str(identity.to_public())],
                                    level=1, threads=0, part_size=5 << 20,
                                    on_progress=progress)
    finally:
        proxy.close()
    assert cut.is_set()
    assert proxy.connections > 0, "no part reached the region before the cut: test is void"
    assert set(stored.failed) == {"eu"}, stored.failed
    assert stored.failed["eu"].startswith("region eu: cannot upload"), stored.failed

    uploads["local"].commit()
    blob = (tmp_path / "local" / "obj").read_bytes()
    assert len(blob) == stored.size
    assert hashlib.sha256(blob).hexdigest() == stored.sha256
    plain = zstandard.ZstdDecompressor().stream_reader(
        io.BytesIO(pyrage.decrypt(blob, [identity]))).read()
    assert plain == data
    # Nothing became visible in the region that went dark.
    assert eu.client().list_objects_v2(Bucket=eu.bucket).get("KeyCount", 0) == 0
