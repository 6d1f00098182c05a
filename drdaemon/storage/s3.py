"""A region in an S3 bucket (AWS or compatible), via boto3.

Uploads are multipart: parts stream in as they are produced and the object
appears only on CompleteMultipartUpload; an abort leaves nothing behind. An
upload that gets only one part (data under the part size: most small
databases) is written at commit with one PutObject instead of three requests
(create, part, complete), as atomically and only at commit as before.
Credentials come from boto3's own chain; botocore's standard retry mode
absorbs throttling and transient 5xx per request.

Object Lock: where the bucket was created with Object Lock, objects written
with a `retain_until` are stored in COMPLIANCE mode until that date. S3 wants
a Content-MD5 or checksum on such writes; botocore's default (CRC32) checksums
satisfy it.
"""

from __future__ import annotations

import contextlib
import io
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, BinaryIO

from botocore.exceptions import BotoCoreError, ClientError

from .base import (
    AbortRule,
    NotFound,
    ObjectInfo,
    ObjectVersion,
    StorageError,
    check_name,
    read_bounded,
)

_MISSING = {"NoSuchKey", "404", "NotFound", "NoSuchUpload"}
LOCK_MODE = "COMPLIANCE"  # GOVERNANCE could be bypassed by whoever holds our credentials
_LOCK_RECHECK = 60.0  # seconds before a bucket that could not be asked is asked again

# One boto3 session for every region's client: a client from a new session loads S3's
# service model again (~0.12 s of interpreter each region, while a backup's dump waits for
# the keyring); from the same session it takes milliseconds. A session is not thread-safe,
# so clients are made from it under this lock (the clients themselves are).
_SESSION: Any = None
_SESSION_LOCK = threading.Lock()


def _new_client(**kwargs: Any) -> Any:
    """An S3 client from the process's one boto3 session (made on first use)."""
    global _SESSION
    import boto3

    with _SESSION_LOCK:
        if _SESSION is None:
            _SESSION = boto3.session.Session()
        return _SESSION.client("s3", **kwargs)


def _lock_date(until: datetime) -> datetime:
    """Whole seconds, rounded up: headers may drop the fraction, the lock must not shrink."""
    until = until.astimezone(UTC)
    whole = until.replace(microsecond=0)
    return whole + timedelta(seconds=1) if whole < until else whole


def _describe(exc: Exception) -> str:
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        return f"{err.get('Code', 'error')}: {err.get('Message', '')}".rstrip(": ")
    return exc.__class__.__name__ + (f": {exc}" if str(exc) else "")


class S3Upload:
    def __init__(self, store: S3Store, key: str, retain_until: datetime | None = None) -> None:
        self.store = store
        self.key = key
        self.retain_until = retain_until
        self.upload_id: str | None = None
        self.parts: list[dict[str, Any]] = []
        # The first part, held until a second one comes (then the multipart upload
        # begins with it) or the commit (then it is the whole object: one PutObject).
        # Costs one part of memory per region while the first two parts stream.
        self.first: bytes | None = None

    def write_part(self, data: bytes) -> None:
        if self.upload_id is None and self.first is None:
            self.first = data
            return
        s3 = self.store
        try:
            if self.upload_id is None:
                # The lock is asked for here, not in begin_upload, so that an
                # unreachable region fails once, on its first request.
                lock = s3.lock_args(self.retain_until)
                resp = s3.client.create_multipart_upload(Bucket=s3.bucket, Key=self.key,
                                                         **lock)
                self.upload_id = resp["UploadId"]
                first, self.first = self.first, None
                assert first is not None
                self._upload_part(first)
            self._upload_part(data)
        except (BotoCoreError, ClientError) as exc:
            raise s3.error("upload", self.key, exc) from None

    def _upload_part(self, data: bytes) -> None:
        s3 = self.store
        number = len(self.parts) + 1
        resp = s3.client.upload_part(Bucket=s3.bucket, Key=self.key, PartNumber=number,
                                     UploadId=self.upload_id, Body=data)
        self.parts.append({"PartNumber": number, "ETag": resp["ETag"]})

    def commit(self) -> None:
        s3 = self.store
        try:
            if self.upload_id is None:
                # One part or none: the whole object in one request, visible only once
                # it is complete, like a completed multipart upload.
                body, self.first = self.first or b"", None
                s3.client.put_object(Bucket=s3.bucket, Key=self.key, Body=body,
                                     **s3.lock_args(self.retain_until))
                return
            s3.client.complete_multipart_upload(
                Bucket=s3.bucket, Key=self.key, UploadId=self.upload_id,
                MultipartUpload={"Parts": self.parts})
            self.upload_id = None
            s3.ensure_retention(self.key, self.retain_until)
        except (BotoCoreError, ClientError) as exc:
            raise s3.error("complete upload of", self.key, exc) from None

    def abort(self) -> None:
        self.first = None
        if self.upload_id is None:
            return
        # Best effort: a region that is down now keeps a stale upload, which is
        # cleaned at the next start (see cleanup of incomplete uploads).
        with contextlib.suppress(BotoCoreError, ClientError):
            self.store.client.abort_multipart_upload(
                Bucket=self.store.bucket, Key=self.key, UploadId=self.upload_id)
        self.upload_id = None


class _Body(io.RawIOBase):
    """botocore's streaming body, with transport errors mapped to StorageError."""

    def __init__(self, store: S3Store, key: str, body: Any) -> None:
        self.store, self.key, self.body = store, key, body

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        try:
            data = self.body.read(len(buf))
        except (BotoCoreError, ClientError, OSError) as exc:
            raise self.store.error("read", self.key, exc) from None
        buf[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.body.close()
        super().close()


class S3Store:
    """Objects in `bucket` under `prefix`."""

    def __init__(self, name: str, bucket: str, prefix: str = "", region: str | None = None,
                 endpoint_url: str | None = None, client: Any = None) -> None:
        self.name = name
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        self.endpoint_url = endpoint_url
        self._object_lock: bool | None = None  # asked once, see object_lock_enabled
        self._lock_unknown_until = 0.0
        self.region = region
        self._client = client
        self._client_lock = threading.Lock()

    @property
    def client(self) -> Any:
        """The boto3 client, made on first use: a restore or a status that never
        touches this region does not pay for it (about 0.2 s each), and a command
        that touches no S3 region does not even import boto3 (about 0.3 s)."""
        with self._client_lock:
            if self._client is None:
                from botocore.config import Config as BotoConfig

                try:
                    self._client = _new_client(
                        region_name=self.region, endpoint_url=self.endpoint_url,
                        config=BotoConfig(retries={"mode": "standard", "max_attempts": 5},
                                          connect_timeout=10, read_timeout=60,
                                          s3={"addressing_style": "path"} if self.endpoint_url
                                          else None))
                except (BotoCoreError, ValueError) as exc:
                    raise StorageError(f"region {self.name}: cannot open an S3 client: "
                                       f"{_describe(exc)}") from None
            return self._client

    def describe(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"s3://{self.bucket}/{self.prefix}{where}"

    def error(self, action: str, name: str, exc: Exception) -> StorageError:
        code = exc.response.get("Error", {}).get("Code") if isinstance(exc, ClientError) else None
        cls = NotFound if code in _MISSING else StorageError
        return cls(f"region {self.name}: cannot {action} {name}: {_describe(exc)}")

    def _key(self, name: str) -> str:
        return self.prefix + check_name(name)

    def object_lock_enabled(self) -> bool:
        """Whether the bucket has Object Lock; asked once and remembered.

        An answer from the server is final: "no configuration", but also a
        refusal or an S3-compatible store that lacks the call, means no lock.
        An unreachable endpoint raises StorageError and is asked again later
        (after _LOCK_RECHECK seconds), so that a region that was down when the
        daemon started still gets locked objects once it is back.
        """
        if self._object_lock is not None:
            return self._object_lock
        if time.monotonic() < self._lock_unknown_until:
            raise StorageError(f"region {self.name}: cannot tell whether {self.bucket} has "
                               "Object Lock (endpoint unreachable a moment ago)")
        try:
            resp = self.client.get_object_lock_configuration(Bucket=self.bucket)
        except ClientError:
            self._object_lock = False
            return False
        except BotoCoreError as exc:
            self._lock_unknown_until = time.monotonic() + _LOCK_RECHECK
            raise self.error("read the Object Lock configuration of", self.bucket, exc) from None
        conf = resp.get("ObjectLockConfiguration", {})
        self._object_lock = conf.get("ObjectLockEnabled") == "Enabled"
        return self._object_lock

    def lock_args(self, retain_until: datetime | None) -> dict[str, Any]:
        """PutObject / CreateMultipartUpload arguments that lock until `retain_until`."""
        if retain_until is None or not self.object_lock_enabled():
            return {}
        return {"ObjectLockMode": LOCK_MODE,
                "ObjectLockRetainUntilDate": _lock_date(retain_until)}

    def ensure_retention(self, key: str, retain_until: datetime | None) -> None:
        """Check a completed upload carries its lock; set it where the server dropped it.

        Some S3-compatible servers (moto among them) ignore the lock headers of
        CreateMultipartUpload; PutObjectRetention then sets it on the object.
        Raises ClientError/BotoCoreError to the caller.
        """
        if retain_until is None or not self.object_lock_enabled():
            return
        until = _lock_date(retain_until)
        head = self.client.head_object(Bucket=self.bucket, Key=key)
        have = head.get("ObjectLockRetainUntilDate")
        if have is not None and have.astimezone(UTC) >= until:
            return
        self.client.put_object_retention(
            Bucket=self.bucket, Key=key,
            Retention={"Mode": LOCK_MODE, "RetainUntilDate": until})

    def retained_until(self, name: str) -> datetime | None:
        key = self._key(name)
        if not self.object_lock_enabled():
            return None
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=key)
        except (BotoCoreError, ClientError) as exc:
            err = self.error("stat", name, exc)
            if isinstance(err, NotFound):
                return None
            raise err from None
        until = head.get("ObjectLockRetainUntilDate")
        return until.astimezone(UTC) if until is not None else None

    def set_legal_hold(self, name: str, on: bool) -> bool:
        if not self.object_lock_enabled():
            return False
        try:
            self.client.put_object_legal_hold(Bucket=self.bucket, Key=self._key(name),
                                              LegalHold={"Status": "ON" if on else "OFF"})
        except (BotoCoreError, ClientError) as exc:
            raise self.error("set the legal hold of", name, exc) from None
        return True

    def begin_upload(self, name: str, retain_until: datetime | None = None) -> S3Upload:
        return S3Upload(self, self._key(name), retain_until)

    def put_bytes(self, name: str, data: bytes, retain_until: datetime | None = None) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data,
                                   **self.lock_args(retain_until))
        except (BotoCoreError, ClientError) as exc:
            raise self.error("write", name, exc) from None

    def open_read(self, name: str, length: int | None = None) -> BinaryIO:
        ranged = {} if length is None else {"Range": f"bytes=0-{max(length, 1) - 1}"}
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(name), **ranged)
        except (BotoCoreError, ClientError) as exc:
            raise self.error("read", name, exc) from None
        return io.BufferedReader(_Body(self, name, resp["Body"]), buffer_size=1 << 20)

    def get_bytes(self, name: str, max_size: int) -> bytes:
        return read_bounded(self, name, max_size)

    def stat(self, name: str) -> ObjectInfo:
        try:
            resp = self.client.head_object(Bucket=self.bucket, Key=self._key(name))
        except (BotoCoreError, ClientError) as exc:
            raise self.error("stat", name, exc) from None
        return ObjectInfo(name, int(resp["ContentLength"]), str(resp.get("ETag", "")))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                for obj in page.get("Contents", []):
                    yield ObjectInfo(obj["Key"][len(self.prefix):], int(obj["Size"]),
                                     str(obj.get("ETag", "")))
        except (BotoCoreError, ClientError) as exc:
            raise self.error("list", prefix or "/", exc) from None

    def cleanup_incomplete(self, should_abort: AbortRule) -> int:
        aborted = 0
        try:
            paginator = self.client.get_paginator("list_multipart_uploads")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
                for up in page.get("Uploads", []):
                    if should_abort(up["Key"][len(self.prefix):], up["Initiated"]):
                        self.client.abort_multipart_upload(
                            Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"])
                        aborted += 1
        except (BotoCoreError, ClientError) as exc:
            raise self.error("clean incomplete uploads in", self.prefix or "/", exc) from None
        return aborted

    def delete(self, name: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(name))
        except (BotoCoreError, ClientError) as exc:
            raise self.error("delete", name, exc) from None

    def list_versions(self, prefix: str) -> Iterator[ObjectVersion]:
        # An unversioned bucket answers too: each object once, version "null".
        paginator = self.client.get_paginator("list_object_versions")
        cut = len(self.prefix)
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                for v in page.get("Versions", []):
                    yield ObjectVersion(v["Key"][cut:], str(v["VersionId"]), int(v["Size"]),
                                        latest=bool(v.get("IsLatest")))
                for m in page.get("DeleteMarkers", []):
                    yield ObjectVersion(m["Key"][cut:], str(m["VersionId"]), 0,
                                        delete_marker=True, latest=bool(m.get("IsLatest")))
        except (BotoCoreError, ClientError) as exc:
            raise self.error("list the versions of", prefix or "/", exc) from None

    def delete_version(self, name: str, version_id: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(name),
                                      VersionId=version_id)
        except (BotoCoreError, ClientError) as exc:
            err = self.error(f"delete version {version_id} of", name, exc)
            if not isinstance(err, NotFound):
                raise err from None

    def version_retained_until(self, name: str, version_id: str) -> datetime | None:
        key = self._key(name)
        if not self.object_lock_enabled():
            return None
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=key, VersionId=version_id)
        except (BotoCoreError, ClientError) as exc:
            err = self.error(f"stat version {version_id} of", name, exc)
            if isinstance(err, NotFound):
                return None
            raise err from None
        until = head.get("ObjectLockRetainUntilDate")
        return until.astimezone(UTC) if until is not None else None
