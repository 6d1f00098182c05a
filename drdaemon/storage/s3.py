"""A region in an S3 bucket (AWS or compatible), via boto3.

Uploads are multipart: parts stream in as they are produced and the object
appears only on CompleteMultipartUpload; an abort leaves nothing behind.
Credentials come from boto3's own chain; botocore's standard retry mode
absorbs throttling and transient 5xx per request.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from datetime import datetime
from typing import Any, BinaryIO

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from .base import NotFound, ObjectInfo, StorageError, check_name

_MISSING = {"NoSuchKey", "404", "NotFound", "NoSuchUpload"}


def _describe(exc: Exception) -> str:
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        return f"{err.get('Code', 'error')}: {err.get('Message', '')}".rstrip(": ")
    return exc.__class__.__name__ + (f": {exc}" if str(exc) else "")


class S3Upload:
    def __init__(self, store: S3Store, key: str) -> None:
        self.store = store
        self.key = key
        self.upload_id: str | None = None
        self.parts: list[dict[str, Any]] = []

    def write_part(self, data: bytes) -> None:
        s3 = self.store
        try:
            if self.upload_id is None:
                resp = s3.client.create_multipart_upload(Bucket=s3.bucket, Key=self.key)
                self.upload_id = resp["UploadId"]
            number = len(self.parts) + 1
            resp = s3.client.upload_part(Bucket=s3.bucket, Key=self.key, PartNumber=number,
                                         UploadId=self.upload_id, Body=data)
            self.parts.append({"PartNumber": number, "ETag": resp["ETag"]})
        except (BotoCoreError, ClientError) as exc:
            raise s3.error("upload", self.key, exc) from None

    def commit(self) -> None:
        s3 = self.store
        try:
            if self.upload_id is None:
                s3.client.put_object(Bucket=s3.bucket, Key=self.key, Body=b"")
                return
            s3.client.complete_multipart_upload(
                Bucket=s3.bucket, Key=self.key, UploadId=self.upload_id,
                MultipartUpload={"Parts": self.parts})
        except (BotoCoreError, ClientError) as exc:
            raise s3.error("complete upload of", self.key, exc) from None
        self.upload_id = None

    def abort(self) -> None:
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
        self.client = client or boto3.session.Session().client(
            "s3", region_name=region, endpoint_url=endpoint_url,
            config=BotoConfig(retries={"mode": "standard", "max_attempts": 5},
                              connect_timeout=10, read_timeout=60,
                              s3={"addressing_style": "path"} if endpoint_url else None))

    def describe(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"s3://{self.bucket}/{self.prefix}{where}"

    def error(self, action: str, name: str, exc: Exception) -> StorageError:
        code = exc.response.get("Error", {}).get("Code") if isinstance(exc, ClientError) else None
        cls = NotFound if code in _MISSING else StorageError
        return cls(f"region {self.name}: cannot {action} {name}: {_describe(exc)}")

    def _key(self, name: str) -> str:
        return self.prefix + check_name(name)

    def begin_upload(self, name: str) -> S3Upload:
        return S3Upload(self, self._key(name))

    def put_bytes(self, name: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data)
        except (BotoCoreError, ClientError) as exc:
            raise self.error("write", name, exc) from None

    def open_read(self, name: str) -> BinaryIO:
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(name))
        except (BotoCoreError, ClientError) as exc:
            raise self.error("read", name, exc) from None
        return io.BufferedReader(_Body(self, name, resp["Body"]), buffer_size=1 << 20)

    def get_bytes(self, name: str, max_size: int) -> bytes:
        with self.open_read(name) as fh:
            data = fh.read(max_size + 1)
        if len(data) > max_size:
            raise StorageError(f"region {self.name}: {name} is larger than {max_size} bytes")
        return data

    def stat(self, name: str) -> ObjectInfo:
        try:
            resp = self.client.head_object(Bucket=self.bucket, Key=self._key(name))
        except (BotoCoreError, ClientError) as exc:
            raise self.error("stat", name, exc) from None
        return ObjectInfo(name, int(resp["ContentLength"]))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                for obj in page.get("Contents", []):
                    yield ObjectInfo(obj["Key"][len(self.prefix):], int(obj["Size"]))
        except (BotoCoreError, ClientError) as exc:
            raise self.error("list", prefix or "/", exc) from None

    def cleanup_incomplete(self, older_than: datetime) -> int:
        aborted = 0
        try:
            paginator = self.client.get_paginator("list_multipart_uploads")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
                for up in page.get("Uploads", []):
                    if up["Initiated"] < older_than:
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
