"""
### Stage 4 · Deployment

Runs when a version is approved (`modelops_model_approved`), once per model the events name (one mapped
task per model, named after it). Refuses any version the compliance gate did not approve, or a model
whose spec disables serving. Stages the version in the scoring gateway next to the model's live
champion, smoke-tests it through HTTP with rows of its own training data, then moves the model's alias
`champion` (the old one keeps alias `previous_champion` for rollback) and has the gateway serve it at
`/models/<model>/invocations`. A failed smoke test leaves the previous champion serving and fails the
task; a failed switch rolls the alias back.

When a champion already serves, the new version goes live as a **canary** instead (the model spec's
`serving.canary`): it answers `initial_share` of the callers (sticky per caller id), task `canary` soaks
without holding a worker slot (deferred to the triggerer), then compares the two arms on server errors,
p95 latency and, once labels have arrived, the business metric and ROC AUC (RMSE for a regressor): as
good or better promotes it (`champion` moves, 100 %), worse rolls it back (0 %). Every share change is an
audit record. To roll a canary or a champion back by hand, trigger `modelops_rollback`.

**One run per model:** up to 8 runs at once, so that one model's canary soaking for hours does not hold
every other model's deployment back. `plan_deployment` takes each model up (audit record
`deployment.taken_up`, subject `model:<name>`); a model another run holds is left to it while that run is
queued or running, and the sweep after it ends deploys what is still owed. A manual run of a model another
run holds fails, naming the run.

**Trigger form** (a manual run): `model`, `model_version` (empty = the model's alias `challenger`).

**Sweep** (every 5 minutes, and in every event-triggered run): deploys each model's newest approved
version that no deployment has acted on, newer than its champion, in case its event was lost
(apache/airflow#56050).
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, dag

from modelops.assets import MODEL_APPROVED, MODEL_DEPLOYED
from modelops.operators.deployment import CanaryOperator, DeployModelOperator
from modelops.operators.planning import StagePlanOperator
from modelops.params import model_param, version_param


@dag(
    dag_id="modelops_deployment",
    # Each event, and every 5 minutes a sweep for what lost events left undone (apache/airflow#56050).
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable("*/5 * * * *", timezone="UTC"), assets=[MODEL_APPROVED]
    ),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    # A canary soaks inside its run: several runs, each holding its own models (plan_deployment's take-up).
    max_active_runs=8,
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

    deploy = DeployModelOperator.partial(
        task_id="deploy_to_gateway",
        outlets=[MODEL_DEPLOYED],
        map_index_template="{{ task.model }}",
    ).expand_kwargs(plan.output)

    # all_done: one model's failed deployment must not leave another model's canary unwatched; each
    # canary task reads its model's running canary from the audit log (none: nothing to do).
    deploy >> CanaryOperator.partial(
        task_id="canary",
        deploy_task_id="deploy_to_gateway",
        trigger_rule="all_done",
        retries=3,
        map_index_template="{{ task.model }}",
    ).expand_kwargs(plan.output)


modelops_deployment()
