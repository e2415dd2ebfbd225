"""
### Stage 3 · Compliance gate

Runs when a version is registered (`modelops_model_candidate`). Evaluates the policy in
`include/policies/compliance.yaml` in full: required lineage tags, holdout metric thresholds, and that
the training data hash passed validation. The gate report (JSON) is logged as an MLflow artifact of the
version's run and the decision goes to the audit log.

- **Approved:** tag `compliance_status=approved`, alias `challenger`, Asset event `modelops_model_approved`
  (starts deployment).
- **Rejected:** tag `compliance_status=rejected`, no alias moves, the task fails listing every failed check.

**Trigger form:** `model_version` (blank = the triggering event, else alias `candidate`).
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag

from modelops.assets import MODEL_APPROVED, MODEL_CANDIDATE
from modelops.operators.compliance import ComplianceGateOperator


@dag(
    dag_id="modelops_compliance_gate",
    schedule=[MODEL_CANDIDATE],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["modelops", "stage-3", "compliance"],
    default_args={"owner": "ml-platform", "retries": 1, "retry_delay": timedelta(seconds=30)},
    doc_md=__doc__,
    params={
        "model_version": Param(
            "", type=["string", "integer"], title="Model version", description="Blank: alias candidate."
        ),
        "model": Param("", type="string", title="Model spec", description="Blank: the platform default."),
    },
)
def modelops_compliance_gate() -> None:
    ComplianceGateOperator(
        task_id="evaluate_policy",
        model_version="{{ params.model_version }}",
        model="{{ params.model }}",
        outlets=[MODEL_APPROVED],
    )


modelops_compliance_gate()
