"""Object storage through Airflow's ``ObjectStoragePath``: a local folder by default, ``s3://`` in production.

The same code writes both; only ``storage_root`` (and ``storage_conn_id`` for S3 credentials) in
``include/modelops.yaml`` changes.
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from airflow.sdk import ObjectStoragePath

from modelops.errors import DatasetError
from modelops.settings import PlatformSettings, platform_settings

if TYPE_CHECKING:
    import pandas as pd

CHUNK_BYTES = 1024 * 1024


def as_storage_path(uri: str | Path, conn_id: str | None = None) -> ObjectStoragePath:
    """A URI or plain local path as an ``ObjectStoragePath`` (plain paths become absolute ``file://``).

    A remote URI that names no connection (``s3://bucket/key``, not ``s3://conn@bucket/key``) is read
    with the platform's ``storage_conn_id``: incoming folders, dataset and archive URIs in specs and
    params are written without one, and would otherwise fall back to the machine's default credentials
    (none on a worker: ``NoCredentialsError``, as ``make stack`` showed).
    """
    text = str(uri)
    if "://" not in text:
        text = Path(text).expanduser().resolve().as_uri()
    elif conn_id is None and not text.startswith("file://"):
        authority = text.split("://", 1)[1].split("/", 1)[0]
        if "@" not in authority:
            conn_id = platform_settings().storage_conn_id or None
    return ObjectStoragePath(text, conn_id=conn_id) if conn_id else ObjectStoragePath(text)


def storage_root(settings: PlatformSettings | None = None) -> ObjectStoragePath:
    settings = settings or platform_settings()
    return as_storage_path(settings.storage_root, settings.storage_conn_id or None)


@contextmanager
def _csv_errors(uri: str, columns: Sequence[str] | None = None) -> Iterator[None]:
    """Turn pandas' reading errors into a ``DatasetError`` that names the problem's kind and never quotes
    file content (a parser's message may)."""
    import pandas as pd

    try:
        yield
    except pd.errors.EmptyDataError as exc:
        raise DatasetError(
            f"dataset {uri} is empty (0 bytes or no header); it needs a header row and data"
        ) from exc
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DatasetError(f"dataset {uri} is not a readable CSV file ({type(exc).__name__})") from exc
    except ValueError as exc:
        if columns:
            raise DatasetError(
                f"dataset {uri} lacks some of the columns {list(columns)}: {exc}; "
                "check the model spec's features against the data"
            ) from exc
        raise DatasetError(f"dataset {uri} is not a readable CSV file ({type(exc).__name__})") from exc


def read_dataset(uri: str, *, columns: Sequence[str] | None = None, nrows: int | None = None) -> pd.DataFrame:
    """Read a CSV dataset, or only ``columns`` of its first ``nrows`` rows (deployment's smoke test reads
    20 rows, not the whole file). A missing, empty or unreadable file is a ``DatasetError`` saying so."""
    import pandas as pd

    path = as_storage_path(uri)
    if not path.exists():
        raise DatasetError(f"dataset not found at {uri}; check the dataset_uri param or drop the file there")
    with _csv_errors(uri, columns), path.open("rb") as stream:
        frame = pd.read_csv(stream, usecols=list(columns) if columns else None, nrows=nrows)
    if frame.empty:
        raise DatasetError(f"dataset {uri} has a header but no data rows; a dataset needs at least one row")
    return frame


def dataset_chunks(uri: str, chunk_rows: int) -> Iterator[pd.DataFrame]:
    """The rows of a CSV dataset, ``chunk_rows`` at a time, so a scan of every row keeps memory flat
    whatever the file's size (the PII scan reads this way on purpose, not from a frame in memory)."""
    import pandas as pd

    with _csv_errors(uri), as_storage_path(uri).open("rb") as stream:
        yield from pd.read_csv(stream, chunksize=chunk_rows)


def files_in(folder_uri: str, pattern: str) -> list[ObjectStoragePath]:
    """The files directly in ``folder_uri`` whose name matches ``pattern``, by name; none if it is absent.

    Names starting with a dot are skipped: writers (ours included) write ``.name.partial`` and rename.
    """
    folder = as_storage_path(folder_uri)
    if not folder.exists():
        return []
    found = [
        path
        for path in folder.iterdir()
        if path.is_file() and not path.name.startswith(".") and fnmatch.fnmatch(path.name, pattern)
    ]
    return sorted(found, key=lambda path: path.name)


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


class ObjectStorageFiles:
    """:class:`modelops.checks.EvidenceFiles` through ``ObjectStoragePath`` (inside Airflow)."""

    def exists(self, uri: str) -> bool:
        return bool(as_storage_path(uri).exists())

    def read_text(self, uri: str) -> str:
        return as_storage_path(uri).read_text()

    def read_table(self, uri: str) -> pd.DataFrame:
        return read_dataset(uri)

    def sha256(self, uri: str) -> str:
        return sha256_of(as_storage_path(uri))[0]
