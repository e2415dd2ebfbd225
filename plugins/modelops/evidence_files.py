"""Reading the files audit records point at (validated snapshots, data cards) without Airflow.

Inside Airflow, stages read through ``ObjectStoragePath`` (:class:`modelops.storage.ObjectStorageFiles`),
which takes S3 credentials from an Airflow connection. The CLI runs outside Airflow, so it reads the same
URIs through fsspec, the library ``ObjectStoragePath`` is built on, with the environment's credentials.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

_CHUNK = 1 << 20


def without_connection(uri: str) -> str:
    """``uri`` without the connection id ``ObjectStoragePath`` writes before the bucket (``s3://conn@b/k``):
    outside Airflow the credentials come from the environment, and fsspec would take ``conn@b`` for the
    bucket."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


class FsspecFiles:
    """:class:`modelops.checks.EvidenceFiles` over fsspec: local paths, ``file://`` and ``s3://``."""

    @staticmethod
    def _resolve(uri: str) -> tuple[Any, str]:
        import fsspec.core

        text = without_connection(uri) if "://" in uri else Path(uri).expanduser().resolve().as_uri()
        return fsspec.core.url_to_fs(text)

    def exists(self, uri: str) -> bool:
        fs, path = self._resolve(uri)
        return bool(fs.exists(path))

    def read_text(self, uri: str) -> str:
        fs, path = self._resolve(uri)
        with fs.open(path, "rb") as handle:
            return handle.read().decode("utf-8")

    def read_table(self, uri: str) -> pd.DataFrame:
        import pandas as pd

        fs, path = self._resolve(uri)
        with fs.open(path, "rb") as handle:
            return pd.read_csv(handle)

    def sha256(self, uri: str) -> str:
        fs, path = self._resolve(uri)
        digest = hashlib.sha256()
        with fs.open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()
