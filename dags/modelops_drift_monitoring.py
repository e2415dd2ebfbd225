"""
### Stage 5 · Drift monitoring (hourly)

Every hour, for every model with a serving version (one mapped task per model, named after it), reads
that model's prediction log for exactly the run's data interval, so a backfill over past hours
reproduces the same verdicts, and compares it with the training data of the version that served it
(found through its `train_data_sha256` lineage) using Evidently. The HTML report is kept under
`<storage_root>/monitoring/<model>/` and, with the metrics, in one MLflow run per model and window in the
model's experiment; the verdict (ok / warning / critical / insufficient_data, thresholds from the model's
monitoring policy) goes to the audit log and the history table. The business metric comes from the
labels delivered for the window's predictions (`POST /labels`), against the serving version's own holdout
baseline; too few labels is *pending*, never a drop. Critical needs critical drift **and** a business-metric
drop seen in several callers' rows: drift alone is a warning. Warning and critical alert the model's owner
through the policy's channels (outbox, SMTP, webhook), once per condition within the cool-down; the first
ok after an alert sends a recovery. A critical verdict puts the previous approved champion back
(`roll_back_on_critical`) and, as the policy lists in `request_retraining_on`, emits a
`modelops_retraining_request` Asset event naming the model, which retrains that model only.

The timetable is `CronDataIntervalTimetable`: Airflow 3 makes a bare `@hourly` a point-in-time
schedule with no data interval.

**Backfill:** `airflow backfill create --dag-id modelops_drift_monitoring --from-date ... --to-date ...`.
**Trigger form:** `models` (empty = every serving model), `window_start` / `window_end` (ISO 8601) to
assess any other window.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import CronDataIntervalTimetable, dag

from modelops.assets import RETRAINING_REQUEST
from modelops.operators.monitoring import (
    DriftMonitorOperator,
    RequestRetrainingOperator,
    RollbackOnCriticalOperator,
)
from modelops.operators.planning import StagePlanOperator
from modelops.params import models_param, optional_text_param


@dag(
    dag_id="modelops_drift_monitoring",
    schedule=CronDataIntervalTimetable("0 * * * *", timezone="UTC"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=2,
    render_template_as_native_obj=True,
    tags=["modelops", "stage-5", "monitoring"],
    default_args={"owner": "ml-platform", "retries": 2, "retry_delay": timedelta(minutes=2)},
    doc_md=__doc__,
    params={
        "models": models_param("Which models to assess. Empty: every model with a serving version."),
        "window_start": optional_text_param(
            "Window start", "ISO 8601; empty: the run's data interval.", format="date-time"
        ),
        "window_end": optional_text_param(
            "Window end", "ISO 8601; empty: the run's data interval.", format="date-time"
        ),
    },
)
def modelops_drift_monitoring() -> None:
    plan = StagePlanOperator(task_id="find_serving_models", stage="monitoring")

    assessments = DriftMonitorOperator.partial(
        task_id="assess_drift",
        window_start="{{ params.window_start }}",
        window_end="{{ params.window_end }}",
        map_index_template="{{ task.model }}",
    ).expand_kwargs(plan.output)

    rollbacks = RollbackOnCriticalOperator.partial(
        task_id="roll_back_on_critical",
        map_index_template="{{ task.assessment['model_name'] }}",
    ).expand(assessment=assessments.output)

    retraining = RequestRetrainingOperator.partial(
        task_id="request_retraining",
        outlets=[RETRAINING_REQUEST],
        # Asked for whether or not a rollback happened (or was refused): the verdict is what calls for it.
        trigger_rule="all_done",
    ).expand(assessment=assessments.output)
    rollbacks >> retraining


modelops_drift_monitoring()
