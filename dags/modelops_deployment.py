"""
### Stage 4 · Deployment

Runs when a version is approved (`modelops_model_approved`). Refuses any version the compliance gate did
not approve. Stages the version in the scoring gateway next to the live champion, smoke-tests it
through HTTP with rows from its own training snapshot, then moves alias `champion` (the old one keeps
alias `previous_champion` for rollback) and has the gateway serve it. A failed smoke test leaves the
previous champion serving and fails the task; a failed switch rolls the alias back.

The gateway speaks the MLflow scoring protocol: `POST /invocations`, `GET /ping`, `/health`, `/version`.

**Trigger form:** `model_version` (blank = the triggering event, else alias `challenger`).
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag

from modelops.assets import MODEL_APPROVED, MODEL_DEPLOYED
from modelops.operators.deployment import DeployModelOperator


@dag(
    dag_id="modelops_deployment",
    schedule=[MODEL_APPROVED],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["modelops", "stage-4", "deployment"],
    default_args={"owner": "ml-platform", "retries": 1, "retry_delay": timedelta(seconds=30)},
    doc_md=__doc__,
    params={
        "model_version": Param(
            "", type=["string", "integer"], title="Model version", description="Blank: alias challenger."
        ),
        "model": Param("", type="string", title="Model spec", description="Blank: the platform default."),
    },
)
def modelops_deployment() -> None:
    DeployModelOperator(
        task_id="deploy_to_gateway",
        model_version="{{ params.model_version }}",
        model="{{ params.model }}",
        outlets=[MODEL_DEPLOYED],
    )


modelops_deployment()
