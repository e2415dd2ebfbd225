"""
### Stage 3 · Compliance gate

Runs when a version is registered (`modelops_model_candidate`), once per model the events name (one
mapped task per model, named after it). Evaluates the model's compliance policy (picked by its risk tier
in `include/policies/risk_tiers.yaml`, or its spec's override): provenance (the training stage registered
the version and its files are unchanged), then every check the policy lists: tags, lineage (validated,
not quarantined, data card), metric bounds and non-regression against the champion, a scan of every model
file without loading it, licences of its pip requirements, secrets, PII. Every failure is reported. The
JSON gate report and a model card (Markdown) are logged beside the version's MLflow run; every decision
goes to the audit log.

- **Rejected:** tag `compliance_status=rejected`, no alias moves, the task fails listing every failed check.
- **Approved automatically** (a policy without `approval.required`, e.g. low and medium risk): tag
  `compliance_status=approved`, alias `challenger`, Asset event `modelops_model_approved` (starts deployment).
- **Awaiting approval** (e.g. the `strict` policy of high-risk models): the task waits in
  *awaiting input*, holding no worker slot. One of the policy's approvers answers **Approve** or **Reject**
  with a comment, under *Required actions* in the Airflow UI, or through the REST API. Nobody else may
  answer. The approver's name and comment go into the gate record and the model card. No answer within the
  policy's `respond_within_hours` is a rejection. An approval deploys for `valid_for_hours`.

**Sweep** (every 5 minutes): gates each model's newest registered version the gate has not decided on,
in case its event was lost (Airflow 3.3 drops events that arrive while the DAG is at `max_active_runs`,
apache/airflow#56050). Usually there is none, and the run maps over nothing.

**One run per version:** `plan_gate` takes each version up (audit record `gate.taken_up`) before it is
evaluated. A version another run has taken up is left to it while that run is queued or running and has
not recorded its decision (or waits for the approver); a run that ended without recording anything leaves
it to the next run. A manual run of a version another run holds fails, naming the run.

**Trigger form** (a manual run): `model`, `model_version` (empty = the model's alias `candidate`).
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, dag

from modelops.assets import MODEL_APPROVED, MODEL_CANDIDATE
from modelops.operators.compliance import ComplianceGateOperator
from modelops.operators.planning import StagePlanOperator
from modelops.params import model_param, version_param


@dag(
    dag_id="modelops_compliance_gate",
    # Each event, and every 5 minutes a sweep for what lost events left undone (apache/airflow#56050).
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable("*/5 * * * *", timezone="UTC"), assets=[MODEL_CANDIDATE]
    ),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    # A run waiting for a person's approval must not hold up other models' versions.
    max_active_runs=8,
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
