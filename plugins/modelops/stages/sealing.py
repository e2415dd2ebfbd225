"""Sealing the prediction log on a schedule: the stage behind the ``seal_predictions`` task.

Each batch's root is recorded as it is sealed (through the operator's recorder, which stamps the task
run and anchors the head), so the stage returns no records of its own; see :mod:`modelops.audit.seals`.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from modelops.audit.seals import DEFAULT_BATCH_SIZE, DEFAULT_SETTLE, Recorder, seal
from modelops.stages.outcome import StageOutcome
from modelops.vocabulary import Decision

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from modelops.audit import AuditStore


def seal_prediction_log(
    *,
    engine: Engine,
    audit: AuditStore,
    record: Recorder,
    now: datetime,
    batch_size: int = DEFAULT_BATCH_SIZE,
    settle: timedelta = DEFAULT_SETTLE,
) -> StageOutcome:
    """Seal every prediction row older than ``now - settle`` that no batch holds yet."""
    run = seal(engine, audit, record, now=now, batch_size=batch_size, settle=settle)
    return StageOutcome(
        decision=Decision.SEALED,
        summary=run.summary,
        details={
            "batches": list(run.batches),
            "records": run.records,
            "restored": list(run.restored),
            "cutoff": run.cutoff,
            "newest_batch": run.newest_batch,
        },
    )


def expire_prediction_log(
    *,
    engine: Engine,
    audit: AuditStore,
    record: Recorder,
    now: datetime,
    retention_days: int,
) -> StageOutcome:
    """Remove whole every sealed batch whose newest call is older than ``retention_days``, each after its
    authentic ``predictions.expired`` record (see :mod:`modelops.audit.retention`)."""
    from modelops.audit.retention import expire_batches

    run = expire_batches(engine, audit, record, now, timedelta(days=retention_days))
    return StageOutcome(
        decision=Decision.EXPIRED,
        summary=run.summary,
        details={
            "expired": list(run.expired),
            "records": run.records,
            "labels": run.labels,
            "completed": list(run.completed),
            "held": [{"batch_id": batch_id, "reason": why} for batch_id, why in run.held],
            "retention_days": run.retention_days,
            "next_due": run.next_due,
        },
    )
