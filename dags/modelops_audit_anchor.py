"""
### Audit log anchor and prediction-log seals (every 15 minutes)

First seals the prediction log: the calls received more than a minute ago that no batch holds yet are
sealed in batches of up to 1,000, each batch's Merkle root recorded in the audit log
(`predictions.sealed`), so `modelops audit verify` detects any prediction record altered, deleted or
inserted after sealing, and `modelops audit prove REQUEST_ID` proves one record.

Then applies retention: every sealed batch whose newest call is older than `prediction_log_retention_days`
(`include/modelops.yaml`, default 365) is removed whole (its calls, their labels, its seal row), each after
an authentic `predictions.expired` audit record; a batch is never removed in part nor before its time.

Anchors the audit log's head (its newest record's seq and hash, signed with the audit key) to
write-once storage outside the audit database: the Airflow connection `modelops_audit_anchor`, a local
append-only folder by default or an S3 bucket with Object Lock in production. Every lifecycle decision
anchors the head as it is recorded; this run also catches records written outside a task and re-anchors
after an anchor store outage.

It then verifies the whole log: every record's hash, link and HMAC, key rotations, every anchor's HMAC,
and the log against the anchors. A broken chain, a truncated tail (records deleted, or the log restored
from an older backup), a rewritten, replaced or emptied log, or a forged or replayed anchor fails the
task without a retry, naming what was found; the task log shows how many records are not anchored yet.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import dag, task

from modelops.operators.sealing import ExpirePredictionBatchesOperator, SealPredictionLogOperator


@dag(
    dag_id="modelops_audit_anchor",
    schedule="*/15 * * * *",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["modelops", "audit"],
    default_args={"owner": "ml-platform", "retries": 1, "retry_delay": timedelta(minutes=2)},
    doc_md=__doc__,
)
def modelops_audit_anchor() -> None:
    # all_done: the chain is anchored and verified even when sealing failed.
    @task(task_id="anchor_and_verify", trigger_rule="all_done")
    def anchor_and_verify() -> dict[str, Any]:
        # Imported in the task: the dag-processor parses this file every few seconds.
        from airflow.sdk.exceptions import AirflowFailException

        from modelops.errors import AuditChainBroken
        from modelops.hooks.audit import AuditHook

        hook = AuditHook()
        try:
            hook.anchor_head()
        except AuditChainBroken:
            # The head itself does not verify, so it is not anchored; verify below names what was changed.
            pass
        result = hook.store.verify(hook.anchor_store)
        summary = {
            "records": result.count,
            "anchors": result.anchors_checked,
            "anchor_store": result.anchor_store,
            "newest_anchored_seq": result.newest_anchored_seq,
            "unanchored": result.unanchored,
            "key_ids": list(result.key_ids),
        }
        if not result.ok:
            # Deterministic: a retry would find the same log and the same anchors.
            raise AirflowFailException(f"the audit log does not verify ({result.attack}): {result.problem}")
        return summary

    seal = SealPredictionLogOperator(task_id="seal_predictions")
    expire = ExpirePredictionBatchesOperator(task_id="expire_predictions")
    # Sealed first, then expired, so the records written now are anchored and verified by the same run.
    seal >> expire >> anchor_and_verify()


modelops_audit_anchor()
