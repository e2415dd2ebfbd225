"""The tamper-evident audit log every lifecycle stage appends to (see :mod:`modelops.audit.chain`), its
signing keys (:mod:`modelops.audit.keys`) and the anchors of its head (:mod:`modelops.audit.anchors`)."""

from __future__ import annotations

from modelops.audit.anchors import (
    Anchor,
    AnchorError,
    AnchorStore,
    LocalFolderAnchorStore,
    S3ObjectLockAnchorStore,
    anchor_store_from_uri,
)
from modelops.audit.chain import (
    GENESIS_HASH,
    TABLE_NAME,
    AuditRecord,
    AuditStore,
    ChainVerification,
    Finding,
    Problem,
    compute_record_hash,
)
from modelops.audit.keys import AuditKeyring

__all__ = [
    "GENESIS_HASH",
    "TABLE_NAME",
    "Anchor",
    "AnchorError",
    "AnchorStore",
    "AuditKeyring",
    "AuditRecord",
    "AuditStore",
    "ChainVerification",
    "Finding",
    "LocalFolderAnchorStore",
    "Problem",
    "S3ObjectLockAnchorStore",
    "anchor_store_from_uri",
    "compute_record_hash",
]
