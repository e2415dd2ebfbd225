"""Where a file is, spelled so that "is it under this folder?" can be answered without opening it.

Plain Python (no Airflow, no fsspec): the settings catalog and the validation stage both use it.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote, urlparse


def normalised_location(uri: str | Path) -> str:
    """``uri`` spelled so that containment can be checked by prefix, without opening anything.

    A local path (plain or ``file://``) is made absolute with ``..`` and symlinks resolved, so a link or a
    ``../..`` cannot lead out of a folder unnoticed. Any other URI keeps its scheme and bucket, with ``.``,
    ``..`` and doubled slashes in its key collapsed. No trailing slash.
    """
    text = str(uri)
    if text.startswith("file:"):
        parsed = urlparse(text)
        if parsed.netloc not in ("", "localhost"):
            # A file on another host is never under a local root.
            return f"file://{parsed.netloc}{posixpath.normpath('/' + unquote(parsed.path))}".rstrip("/")
        text = unquote(parsed.path)
    if "://" not in text:
        return str(Path(text).expanduser().resolve()).rstrip("/") or "/"
    scheme, _, rest = text.partition("://")
    authority, _, key = rest.partition("/")
    key = posixpath.normpath("/" + key) if key else ""
    # ObjectStoragePath spells the connection it reads with into the URI (s3://conn@bucket/key), and a URI
    # without one is read with the platform's storage connection (modelops.storage.as_storage_path): both
    # spellings of one place compare equal, and a bucket reached through another connection (perhaps
    # another endpoint) is another place.
    conn, _, bucket = authority.rpartition("@")
    conn = conn or _default_storage_conn()
    return f"{scheme.lower()}://{f'{conn}@' if conn else ''}{bucket}{key}".rstrip("/")


def _default_storage_conn() -> str:
    from modelops.settings import platform_settings  # settings imports this module

    return platform_settings().storage_conn_id or ""


def is_within(uri: str | Path, roots: Sequence[str]) -> bool:
    """Whether ``uri`` is one of ``roots`` or under one (compared normalised, a root ending in '/')."""
    location = normalised_location(uri)
    for root in roots:
        folder = normalised_location(root)
        if location == folder or location.startswith(folder.rstrip("/") + "/"):
            return True
    return False
