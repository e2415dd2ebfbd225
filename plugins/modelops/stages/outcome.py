"""What every stage function returns: one decision with its evidence, for the operator to act on.

A stage decides; its operator records ``records`` in the audit log, then applies ``effects`` (the
registry changes the decision makes: tags, aliases), so no state changes before its record exists; then
it fails the task when ``refusal`` is set (after recording, so a rejection keeps its evidence), emits
``asset_extra`` as the Asset event and returns ``xcom()``. A stage that must record mid-way (deployment
records a promotion before moving the alias) is handed a recorder instead.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from modelops.vocabulary import AuditAction

_SHA256 = re.compile(r"[0-9a-f]{64}")


def dataset_evidence(sha256: str | None) -> dict[str, str]:
    """``{"dataset": sha256}`` when the value is a SHA-256 hex digest, else nothing.

    A version's ``train_data_sha256`` is a registry tag anyone with an MLflow client can set to anything;
    the record of the decision about such a version must still be writable (the gate's checks say the
    tag is missing or wrong), so a value that is no digest never reaches the evidence.
    """
    return {"dataset": sha256} if sha256 and _SHA256.fullmatch(sha256) else {}


def json_safe(value: Any) -> Any:
    """``value`` with only plain JSON types: vocabulary enums are str subclasses, and XCom and Asset event
    extras must hold plain values."""
    return json.loads(json.dumps(value, default=str))


def sha256_json(data: Any) -> str:
    """Hash of a JSON-safe object in canonical form: the evidence hash of a report or a policy."""
    return hashlib.sha256(
        json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()
    ).hexdigest()


Recorder = Callable[["AuditEntry"], dict[str, Any]]
"""Writes one entry to the audit log now and returns the record (the operator's, for mid-stage records)."""


@dataclass(frozen=True)
class AuditEntry:
    """One audit record a stage asks its operator to write."""

    action: AuditAction
    subject: str
    decision: str
    details: dict[str, Any] = field(default_factory=dict)
    evidence: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StageOutcome:
    """One stage's decision about one model (or dataset)."""

    decision: str
    summary: str
    """One line for the task log and the demo's summary."""
    details: dict[str, Any] = field(default_factory=dict)
    """JSON-safe facts: the XCom the next task reads."""
    records: tuple[AuditEntry, ...] = ()
    asset_extra: dict[str, Any] | None = None
    """The extra of the Asset event to emit on success; None emits nothing."""
    refusal: str | None = None
    """Set when the stage decided against its input: the task fails, without a retry, with this message."""
    effects: tuple[Callable[[], None], ...] = ()
    """Registry changes of the decision, applied in order after ``records`` are written; each must be safe
    to apply twice (a retried task finds its record already written and applies them again)."""

    def xcom(self) -> dict[str, Any]:
        return {**self.details, "decision": self.decision, "summary": self.summary}
