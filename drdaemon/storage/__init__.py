"""Region storage backends behind one small protocol (see base.py)."""

from __future__ import annotations

from ..config import RegionConfig
from .base import (
    NotFound,
    ObjectInfo,
    ObjectStore,
    ObjectVersion,
    StorageError,
    TooLarge,
    Upload,
    check_name,
    read_head,
)
from .local import LocalStore
from .s3 import S3Store

__all__ = ["NotFound", "ObjectInfo", "ObjectStore", "ObjectVersion", "StorageError", "TooLarge",
           "Upload", "check_name", "open_store",
           "read_head"]


def open_store(region: RegionConfig) -> ObjectStore:
    """The store for one configured region."""
    if region.kind == "local":
        assert region.path is not None
        return LocalStore(region.name, region.path, region.prefix)
    assert region.bucket is not None
    return S3Store(region.name, region.bucket, region.prefix, region.region, region.endpoint_url)
