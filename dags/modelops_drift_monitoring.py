"""
### Stage 5 · Drift monitoring (hourly)

Every hour, reads the prediction log for exactly the run's data interval, so a backfill over past hours
reproduces the same verdict, and compares it with the training data of the version that served it
(found through its `train_data_sha256` lineage) using Evidently. The HTML report is kept under
`<storage_root>/monitoring/` and, with the metrics, in one MLflow run per window; the verdict (ok /
warning / critical / insufficient_data, thresholds in `include/policies/monitoring.yaml`) goes to the
audit log. A verdict listed in `request_retraining_on`
emits a `modelops_retraining_request` Asset event, which starts training.

The timetable is `CronDataIntervalTimetable`: Airflow 3 makes a bare `@hourly` a point-in-time
schedule with no data interval.

**Backfill:** `airflow backfill create --dag-id modelops_drift_monitoring --from-date ... --to-date ...`.
**Trigger form:** `window_start` / `window_end` (ISO 8601) to assess any other window.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import CronDataIntervalTimetable, Param, dag, task

from modelops.assets import RETRAINING_REQUEST
from modelops.operators.monitoring import DriftMonitorOperator


@dag(
    dag_id="modelops_drift_monitoring",
    schedule=CronDataIntervalTimetable("0 * * * *", timezone="UTC"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=2,
    tags=["modelops", "stage-5", "monitoring"],
    default_args={"owner": "ml-platform", "retries": 2, "retry_delay": timedelta(minutes=2)},
    doc_md=__doc__,
    params={
        "window_start": Param(
            "", type="string", title="Window start", description="ISO 8601; blank: the run's interval."
        ),
        "window_end": Param(
            "", type="string", title="Window end", description="ISO 8601; blank: the run's interval."
        ),
        "model": Param("", type="string", title="Model spec", description="Blank: the platform default."),
    },
)
def modelops_drift_monitoring() -> None:
    assessment = DriftMonitorOperator(
        task_id="assess_drift",
        window_start="{{ params.window_start }}",
        window_end="{{ params.window_end }}",
        model="{{ params.model }}",
    )

    @task(outlets=[RETRAINING_REQUEST])
    def request_retraining(result: dict[str, Any], **context: Any) -> dict[str, Any]:
        """Ask for a retrain when the verdict calls for one; otherwise skip (no Asset event)."""
        from modelops.operators.monitoring import retraining_request

        return retraining_request(result, context)

    request_retraining(assessment.output)


modelops_drift_monitoring()
