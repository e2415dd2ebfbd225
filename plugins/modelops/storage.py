"""Object storage through Airflow's ``ObjectStoragePath``: a local folder by default, ``s3://`` in production.

The same code writes both; only ``storage_root`` (and ``storage_conn_id`` for S3 credentials) in
``include/modelops.yaml`` changes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from airflow.sdk import ObjectStoragePath

from modelops.settings import platform_settings

CHUNK_BYTES = 1024 * 1024


def as_storage_path(uri: str | Path, conn_id: str | None = None) -> ObjectStoragePath:
    """A URI or plain local path as an ``ObjectStoragePath`` (plain paths become absolute ``file://``)."""
    text = str(uri)
    if "://" not in text:
        text = Path(text).expanduser().resolve().as_uri()
    return ObjectStoragePath(text, conn_id=conn_id) if conn_id else ObjectStoragePath(text)


def storage_root() -> ObjectStoragePath:
    settings = platform_settings()
    return as_storage_path(settings.storage_root, settings.storage_conn_id or None)


def sha256_of(path: ObjectStoragePath, chunk_bytes: int = CHUNK_BYTES) -> tuple[str, int]:
    """SHA-256 and size of a file, streamed in fixed-size chunks so memory stays flat for any size."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as stream:
        while chunk := stream.read(chunk_bytes):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def copy_file(source: ObjectStoragePath, target: ObjectStoragePath, chunk_bytes: int = CHUNK_BYTES) -> str:
    """Stream ``source`` to ``target`` (any two filesystems) and return the sha256 of what was written.

    Written to a temporary name first and renamed, so a crash never leaves a half file under the
    final name that a later reader would trust.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.parent / f".{target.name}.partial"
    digest = hashlib.sha256()
    with source.open("rb") as reader, partial.open("wb") as writer:
        while chunk := reader.read(chunk_bytes):
            digest.update(chunk)
            writer.write(chunk)
    partial.rename(target)
    return digest.hexdigest()
