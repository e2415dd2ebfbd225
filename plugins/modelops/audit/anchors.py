"""Anchors: the audit chain's head, signed and kept in write-once storage outside the audit database.

An :class:`Anchor` says "at ``anchored_at`` the log's record ``seq`` had hash ``record_hash``", with an
HMAC (under the audit keyring, see :mod:`modelops.audit.keys`) over the canonical JSON of those fields
and the signing key's id. Someone who can rewrite the audit database but not the anchor store cannot
make the log agree with the anchors again: deleting the newest records leaves an anchor naming a seq
past the log's end, rewriting records changes hashes that anchors name, emptying or replacing the
database leaves anchors no record matches. :meth:`AuditStore.verify <modelops.audit.chain.AuditStore.verify>`
compares them.

Two stores, each with ``put(anchor)`` (write once: an anchor already stored is never overwritten, and
re-anchoring the same head is a no-op) and ``list()`` (every stored anchor, readable or not):

- :class:`LocalFolderAnchorStore`, the default: one read-only file per anchor, created exclusively.
  It protects against someone with access to the audit database only; anyone who can delete files in
  the folder can delete anchors too (use ``chattr +a`` on the folder, or S3).
- :class:`S3ObjectLockAnchorStore`, for production: one object per anchor in a bucket with S3 Object
  Lock, each put with COMPLIANCE retention, so nobody (not even the account root) can delete or
  overwrite the stored version before it expires. A bucket without Object Lock is refused.

Both are named by a URI (``file:///folder`` or ``s3://bucket/prefix``): the CLI reads it from
``$MODELOPS_AUDIT_ANCHORS``; Airflow tasks read the connection ``modelops_audit_anchor`` (see
:func:`anchor_store_from_connection_fields`). Imports nothing of Airflow, and boto3 only when S3 is used.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

from modelops.audit.keys import AuditKeyring
from modelops.errors import ConfigurationError, ModelOpsError

ANCHORS_ENV = "MODELOPS_AUDIT_ANCHORS"
"""Environment variable naming the anchor store for processes outside Airflow (the CLI)."""

ANCHOR_CONN_ID = "modelops_audit_anchor"
DEFAULT_RETENTION_DAYS = 3650
ANCHOR_URI_EXAMPLE = "file:///var/lib/modelops/audit-anchors or s3://bucket/prefix"
CONNECTION_EXAMPLES = (
    '{"conn_type": "fs", "extra": {"path": "/var/lib/modelops/audit-anchors"}} or '
    '{"conn_type": "aws", "extra": {"anchor_uri": "s3://bucket/audit-anchors", "retention_days": 3650}}'
)

_NAME = re.compile(r"anchor-(\d{12})-([0-9a-f]{16})\.json")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# Anchor files are small; a much larger object under an anchor name is not ours and is not read whole.
_MAX_ANCHOR_BYTES = 4096


class AnchorError(ModelOpsError):
    """The anchor store cannot be read or written (unreachable, refused, or misconfigured)."""


def _canonical_json(value: Any) -> str:
    # The same serialisation as modelops.audit.chain.canonical_json (not imported: chain imports this).
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


@dataclass(frozen=True)
class Anchor:
    seq: int
    record_hash: str
    anchored_at: str
    key_id: str
    hmac: str

    @classmethod
    def sign(
        cls, *, seq: int, record_hash: str, keyring: AuditKeyring, anchored_at: datetime | None = None
    ) -> Anchor:
        """An anchor of record ``seq`` signed with the keyring's current key."""
        when = (anchored_at or datetime.now(UTC)).isoformat(timespec="microseconds")
        unsigned = cls(seq=seq, record_hash=record_hash, anchored_at=when, key_id=keyring.current, hmac="")
        return cls(**(asdict(unsigned) | {"hmac": keyring.sign(unsigned.signed_content())}))

    def signed_content(self) -> str:
        """What the HMAC covers: every field but the HMAC itself, as canonical JSON."""
        return _canonical_json({name: value for name, value in asdict(self).items() if name != "hmac"})

    def authentic(self, keyring: AuditKeyring) -> bool:
        """Whether the key it names signed exactly this content (False for a key not in the keyring)."""
        return keyring.check(self.signed_content(), self.hmac, key_id=self.key_id)

    @property
    def name(self) -> str:
        """Its file or object name: sorts by seq, and differs for two different heads at one seq."""
        return f"anchor-{self.seq:012d}-{self.record_hash[:16]}.json"

    def to_json(self) -> str:
        return _canonical_json(asdict(self))

    @classmethod
    def parse(cls, data: bytes) -> Anchor:
        """The anchor in ``data``; ValueError if it is not one (wrong JSON, fields or types)."""
        if len(data) > _MAX_ANCHOR_BYTES:
            raise ValueError(f"{len(data)} bytes, more than an anchor's {_MAX_ANCHOR_BYTES}")
        value = json.loads(data.decode("utf-8"))
        if not isinstance(value, dict) or set(value) != {
            "seq",
            "record_hash",
            "anchored_at",
            "key_id",
            "hmac",
        }:
            raise ValueError("not an object with exactly seq, record_hash, anchored_at, key_id and hmac")
        seq = value["seq"]
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
            raise ValueError(f"seq must be a positive integer, got {seq!r}")
        for name in ("record_hash", "anchored_at", "key_id", "hmac"):
            if not isinstance(value[name], str):
                raise ValueError(f"{name} must be a string")
        if not _SHA256_HEX.fullmatch(value["record_hash"]):
            raise ValueError("record_hash is not a sha256 hex digest")
        return cls(**value)


@dataclass(frozen=True)
class ListedAnchor:
    """One object found in an anchor store: where it is, the name it is stored under, and the anchor
    it holds (None when it holds none: ``error`` says why)."""

    location: str
    name: str
    anchor: Anchor | None
    error: str | None = None


def _listed(location: str, name: str, data: bytes) -> ListedAnchor:
    try:
        return ListedAnchor(location, name, Anchor.parse(data))
    except (ValueError, UnicodeDecodeError, TypeError) as exc:
        return ListedAnchor(location, name, None, f"not an anchor ({exc})")


class AnchorStore(Protocol):
    """Write-once storage of anchors."""

    uri: str

    def put(self, anchor: Anchor) -> bool:
        """Store ``anchor`` unless one of that name is stored already; True if it was written now."""
        ...

    def list(self) -> list[ListedAnchor]:
        """Every anchor object in the store, in name order."""
        ...


class LocalFolderAnchorStore:
    """One read-only file per anchor in a local folder (created on the first put)."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        if not self.folder.is_absolute():
            raise ConfigurationError(
                f"the audit anchor folder {str(folder)!r} is not an absolute path; name it as file:///folder"
            )
        self.uri = self.folder.as_uri()

    def put(self, anchor: Anchor) -> bool:
        final = self.folder / anchor.name
        if final.exists():
            return False
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            # Written aside, then hard-linked into place: the link is atomic and refuses to replace an
            # existing file, so a reader never sees half an anchor and a stored anchor is never
            # overwritten, even by two writers anchoring the same head at once.
            temporary = self.folder / f".{anchor.name}.{uuid.uuid4().hex}.tmp"
            fd = os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o444)
            try:
                with os.fdopen(fd, "wb") as file:
                    file.write(anchor.to_json().encode("utf-8"))
                    file.flush()
                    os.fsync(file.fileno())
                try:
                    os.link(temporary, final)
                except FileExistsError:
                    return False
            finally:
                temporary.unlink(missing_ok=True)
            self._sync_folder()
        except OSError as exc:
            raise AnchorError(
                f"cannot write the audit anchor {anchor.name} to {self.uri}: {exc.strerror or exc}; check "
                "that the folder exists or can be created and is writable by the task's user"
            ) from exc
        return True

    def _sync_folder(self) -> None:
        # The new directory entry must survive a crash as the file's content does.
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def list(self) -> list[ListedAnchor]:
        if not self.folder.is_dir():
            return []
        found = []
        try:
            for path in sorted(self.folder.glob("anchor-*.json")):
                found.append(_listed(path.as_uri(), path.name, path.read_bytes()[: _MAX_ANCHOR_BYTES + 1]))
        except OSError as exc:
            raise AnchorError(f"cannot read the audit anchors at {self.uri}: {exc}") from exc
        return found

    def __repr__(self) -> str:
        return f"LocalFolderAnchorStore({self.uri!r})"


class S3ObjectLockAnchorStore:
    """One object per anchor under ``s3://bucket/prefix``, put with COMPLIANCE Object Lock retention.

    ``client`` is a boto3 S3 client (inside Airflow: ``S3Hook(aws_conn_id=...).get_conn()``). The
    bucket is checked at construction: without Object Lock enabled it is refused.
    """

    def __init__(
        self, client: Any, bucket: str, prefix: str = "", *, retention_days: int = DEFAULT_RETENTION_DAYS
    ) -> None:
        if isinstance(retention_days, bool) or not isinstance(retention_days, int) or retention_days < 1:
            raise ConfigurationError(
                f"audit anchor retention_days must be a positive number of days, got {retention_days!r}"
            )
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.retention_days = retention_days
        self.uri = f"s3://{bucket}/{self.prefix}"
        self._require_object_lock()

    def _require_object_lock(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            configuration = self.client.get_object_lock_configuration(Bucket=self.bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "ObjectLockConfigurationNotFoundError":
                raise AnchorError(f"cannot read the Object Lock configuration of {self.uri}: {exc}") from exc
            configuration = {}
        except BotoCoreError as exc:
            raise AnchorError(f"cannot reach the audit anchor store {self.uri}: {exc}") from exc
        if configuration.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") != "Enabled":
            raise ConfigurationError(
                f"the S3 bucket {self.bucket!r} does not have Object Lock enabled, so audit anchors stored "
                "there could be overwritten or deleted; create a bucket with Object Lock enabled (aws s3api "
                f"create-bucket --bucket <name> --object-lock-enabled-for-bucket) and point {ANCHORS_ENV} "
                f"or the connection {ANCHOR_CONN_ID!r} at it"
            )

    def put(self, anchor: Anchor) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        retain_until = datetime.now(UTC) + timedelta(days=self.retention_days)
        try:
            self.client.put_object(
                Bucket=self.bucket,
                Key=self.prefix + anchor.name,
                Body=anchor.to_json().encode("utf-8"),
                ContentType="application/json",
                ObjectLockMode="COMPLIANCE",
                ObjectLockRetainUntilDate=retain_until,
                # Write once: S3 refuses the put if an object of that name exists (re-anchoring the
                # same head is then a no-op) instead of stacking a second version on it.
                IfNoneMatch="*",
            )
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code in {"PreconditionFailed", "ConditionalRequestConflict"}:
                return False
            raise AnchorError(f"S3 refused the audit anchor {anchor.name} at {self.uri}: {exc}") from exc
        except BotoCoreError as exc:
            raise AnchorError(f"cannot reach the audit anchor store {self.uri}: {exc}") from exc
        return True

    def list(self) -> list[ListedAnchor]:
        """Every version of every anchor object: a version hidden behind a delete marker or a newer
        version is still a stored anchor (Object Lock keeps it), so it is listed and checked too."""
        from botocore.exceptions import BotoCoreError, ClientError

        found = []
        try:
            paginator = self.client.get_paginator("list_object_versions")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + "anchor-"):
                for version in page.get("Versions", []):
                    key, version_id = version["Key"], version["VersionId"]
                    location = f"s3://{self.bucket}/{key}?versionId={version_id}"
                    if version.get("Size", 0) > _MAX_ANCHOR_BYTES:
                        found.append(ListedAnchor(location, key.rsplit("/", 1)[-1], None, "too large"))
                        continue
                    body = self.client.get_object(Bucket=self.bucket, Key=key, VersionId=version_id)["Body"]
                    found.append(_listed(location, key.rsplit("/", 1)[-1], body.read()))
        except (ClientError, BotoCoreError) as exc:
            raise AnchorError(f"cannot list the audit anchors at {self.uri}: {exc}") from exc
        return sorted(found, key=lambda listed: (listed.name, listed.location))

    def __repr__(self) -> str:
        return f"S3ObjectLockAnchorStore({self.uri!r})"


def _s3_location(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ConfigurationError(f"{uri!r} is not an s3://bucket/prefix URI")
    return parsed.netloc, parsed.path.lstrip("/")


def _default_s3_client() -> Any:
    # boto3's default credential chain and region; it honours AWS_ENDPOINT_URL (moto, MinIO).
    import boto3

    return boto3.client("s3")


def anchor_store_from_uri(
    uri: str,
    *,
    retention_days: int = DEFAULT_RETENTION_DAYS,
    s3_client: Callable[[], Any] = _default_s3_client,
) -> AnchorStore:
    """``file:///folder`` (a local folder) or ``s3://bucket/prefix`` (S3 with Object Lock)."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ConfigurationError(f"audit anchor URI {uri!r} names a host; use file:///absolute/folder")
        return LocalFolderAnchorStore(unquote(parsed.path))
    if parsed.scheme == "s3":
        bucket, prefix = _s3_location(uri)
        return S3ObjectLockAnchorStore(s3_client(), bucket, prefix, retention_days=retention_days)
    raise ConfigurationError(
        f"audit anchor URI {uri!r} is neither file:// nor s3://; e.g. {ANCHOR_URI_EXAMPLE}"
    )


def anchor_store_from_connection_fields(
    *, conn_type: str | None, extra: Mapping[str, Any], source: str, s3_client: Callable[[], Any]
) -> AnchorStore:
    """An Airflow connection's fields: ``fs`` with ``extra.path`` (a local folder), or ``aws`` with
    ``extra.anchor_uri`` = ``s3://bucket/prefix`` and optional ``extra.retention_days``; ``s3_client``
    makes the boto3 client from the same connection (its credentials and ``endpoint_url``)."""
    if conn_type == "fs":
        path = extra.get("path")
        if not isinstance(path, str) or not path:
            raise ConfigurationError(f"{source} (conn_type fs) needs extra.path, the anchor folder")
        return LocalFolderAnchorStore(path)
    if conn_type == "aws":
        anchor_uri = extra.get("anchor_uri")
        if not isinstance(anchor_uri, str) or not anchor_uri.startswith("s3://"):
            raise ConfigurationError(f"{source} (conn_type aws) needs extra.anchor_uri = s3://bucket/prefix")
        bucket, prefix = _s3_location(anchor_uri)
        retention_days = extra.get("retention_days", DEFAULT_RETENTION_DAYS)
        if isinstance(retention_days, str) and retention_days.strip().isdigit():
            retention_days = int(retention_days)  # a connection form or URI gives every extra as text
        return S3ObjectLockAnchorStore(s3_client(), bucket, prefix, retention_days=retention_days)
    raise ConfigurationError(
        f"{source} has conn_type {conn_type!r}; use fs or aws, e.g. {CONNECTION_EXAMPLES}"
    )
