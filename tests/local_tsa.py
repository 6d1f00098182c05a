"""A local RFC 3161 time-stamping authority for tests: `openssl ts -reply` behind a tiny
HTTP server in a thread, with a throw-away CA and a TSA certificate (timeStamping EKU).

`LocalTsa.url` answers `application/timestamp-query` POSTs like a real TSA;
`LocalTsa.ca` is the CA certificate a token must chain to; `failing = True`
makes it answer 503 (an authority that is down).
"""

from __future__ import annotations

import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

TSA_CONFIG = """\
[ tsa ]
default_tsa = tsa_config1

[ tsa_config1 ]
dir = {dir}
serial = $dir/serial
crypto_device = builtin
signer_cert = $dir/tsa.crt
certs = $dir/ca.crt
signer_key = $dir/tsa.key
signer_digest = sha256
default_policy = 1.2.3.4.1
digests = sha256
accuracy = secs:1
ordering = no
tsa_name = no
ess_cert_id_chain = no
ess_cert_id_alg = sha256
"""


def _run(*args: str, cwd: Path) -> None:
    subprocess.run(list(args), cwd=cwd, check=True, capture_output=True)


def make_ca(folder: Path, name: str = "Test TSA CA") -> Path:
    """A throw-away CA (key and certificate) in `folder`; the certificate's path."""
    folder.mkdir(parents=True, exist_ok=True)
    _run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-subj", f"/CN={name}", "-days", "2",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)
    return folder / "ca.crt"


def make_tsa_cert(folder: Path) -> None:
    """The TSA's key and certificate, signed by the CA in `folder`, for time-stamping only."""
    (folder / "ext.cnf").write_text("basicConstraints=CA:FALSE\n"
                                    "keyUsage=critical,digitalSignature\n"
                                    "extendedKeyUsage=critical,timeStamping\n")
    _run("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", "tsa.key", "-out", "tsa.csr", "-subj", "/CN=Test TSA", cwd=folder)
    _run("openssl", "x509", "-req", "-in", "tsa.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
         "-CAcreateserial", "-out", "tsa.crt", "-days", "2", "-extfile", "ext.cnf", cwd=folder)
    (folder / "serial").write_text("01\n")
    (folder / "tsa.cnf").write_text(TSA_CONFIG.format(dir=folder))


@dataclass
class LocalTsa:
    folder: Path
    url: str = ""
    failing: bool = False
    requests: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def ca(self) -> Path:
        return self.folder / "ca.crt"

    def reply(self, query: bytes) -> bytes:
        with self.lock, tempfile.TemporaryDirectory() as tmp:
            q = Path(tmp) / "q.tsq"
            q.write_bytes(query)
            done = subprocess.run(["openssl", "ts", "-reply", "-config",
                                   str(self.folder / "tsa.cnf"), "-queryfile", str(q)],
                                  capture_output=True, check=True)
            self.requests += 1
            return done.stdout


@contextmanager
def local_tsa(folder: Path) -> Iterator[LocalTsa]:
    make_ca(folder)
    make_tsa_cert(folder)
    tsa = LocalTsa(folder)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if tsa.failing or self.headers.get("Content-Type") != "application/timestamp-query":
                self.send_error(503 if tsa.failing else 415)
                return
            out = tsa.reply(body)
            self.send_response(200)
            self.send_header("Content-Type", "application/timestamp-reply")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    tsa.url = f"http://127.0.0.1:{server.server_address[1]}/tsa"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield tsa
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
