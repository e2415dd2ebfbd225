"""
### Stage 4 · Deployment

Runs when a version is approved (`modelops_model_approved`), once per model the events name (one mapped
task per model, named after it). Refuses any version the compliance gate did not approve, or a model
whose spec disables serving. Stages the version in the scoring gateway next to the model's live
champion, smoke-tests it through HTTP with rows of its own training data, then moves the model's alias
`champion` (the old one keeps alias `previous_champion` for rollback) and has the gateway serve it at
`/models/<model>/invocations`. A failed smoke test leaves the previous champion serving and fails the
task; a failed switch rolls the alias back.

**Trigger form** (a manual run): `model`, `model_version` (empty = the model's alias `challenger`).
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import dag

from modelops.assets import MODEL_APPROVED, MODEL_DEPLOYED
from modelops.operators.deployment import DeployModelOperator
from modelops.operators.planning import StagePlanOperator
from modelops.params import model_param, version_param


@dag(
    dag_id="modelops_deployment",
    schedule=[MODEL_APPROVED],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    render_template_as_native_obj=True,
    tags=["modelops", "stage-4", "deployment"],
    default_args={"owner": "ml-platform", "retries": 1, "retry_delay": timedelta(seconds=30)},
    doc_md=__doc__,
    params={
        "model": model_param("The model to deploy (Asset-triggered runs deploy the events' versions)."),
        "model_version": version_param("Empty: the model's alias challenger."),
    },
)
def modelops_deployment() -> None:
    plan = StagePlanOperator(task_id="plan_deployment", stage="deployment")

    DeployModelOperator.partial(
        task_id="deploy_to_gateway",
        outlets=[MODEL_DEPLOYED],
        map_index_template="{{ task.model }}",
    ).expand_kwargs(plan.output)


modelops_deployment()
