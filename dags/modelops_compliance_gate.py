"""
### Stage 3 · Compliance gate

Runs when a version is registered (`modelops_model_candidate`), once per model the events name (one
mapped task per model, named after it). Evaluates the model's compliance policy (picked by its risk tier
in `include/policies/risk_tiers.yaml`, or its spec's override) in full: required lineage tags, that the
version was trained from this model's spec, holdout metric bounds for its task kind plus the spec's own,
and that the training data hash is a validated version of the model's own dataset. The gate report
(JSON) is logged as an MLflow artifact of the version's run and the decision goes to the audit log.

- **Approved:** tag `compliance_status=approved`, alias `challenger`, Asset event `modelops_model_approved`
  (starts deployment).
- **Rejected:** tag `compliance_status=rejected`, no alias moves, the task fails listing every failed check.

**Trigger form** (a manual run): `model`, `model_version` (empty = the model's alias `candidate`).
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import dag

from modelops.assets import MODEL_APPROVED, MODEL_CANDIDATE
from modelops.operators.compliance import ComplianceGateOperator
from modelops.operators.planning import StagePlanOperator
from modelops.params import model_param, version_param


@dag(
    dag_id="modelops_compliance_gate",
    schedule=[MODEL_CANDIDATE],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    render_template_as_native_obj=True,
    tags=["modelops", "stage-3", "compliance"],
    default_args={"owner": "ml-platform", "retries": 1, "retry_delay": timedelta(seconds=30)},
    doc_md=__doc__,
    params={
        "model": model_param("The model to gate (Asset-triggered runs gate the events' versions)."),
        "model_version": version_param("Empty: the model's alias candidate."),
    },
)
def modelops_compliance_gate() -> None:
    plan = StagePlanOperator(task_id="plan_gate", stage="gate")

    ComplianceGateOperator.partial(
        task_id="evaluate_policy",
        outlets=[MODEL_APPROVED],
        map_index_template="{{ task.model }}",
    ).expand_kwargs(plan.output)


modelops_compliance_gate()
