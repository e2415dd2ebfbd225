"""The tamper-evident audit log every lifecycle stage appends to (see :mod:`modelops.audit.chain`)."""

from __future__ import annotations

from modelops.audit.chain import (
    GENESIS_HASH,
    TABLE_NAME,
    AuditRecord,
    AuditStore,
    ChainVerification,
    compute_record_hash,
)

__all__ = [
    "GENESIS_HASH",
    "TABLE_NAME",
    "AuditRecord",
    "AuditStore",
    "ChainVerification",
    "compute_record_hash",
]
