"""
### Stage 6 · Retirement (monthly)

Every month, for every registered model (one mapped task per model, named after it), selects the
versions the model's retirement policy retires (superseded as champion for longer than
`superseded_for_days`) plus any named in a manual request. Each is archived (model files and metadata,
with a manifest of every file's sha256) under `<storage_root>/archive/<model>/` through
`ObjectStoragePath` (a local folder by default, `s3://` by configuration only), the archive is read back
and verified, and only then are its aliases removed and it is tagged `retired` with the archive URI.
The serving champion is never retired.

**Trigger form:** `models` (empty = every registered model), `versions` (e.g. `[3, 4]`, with exactly one
model), `reason` (required with versions), `dry_run` (report only).
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag

from modelops.operators.planning import StagePlanOperator
from modelops.operators.retirement import RetireModelsOperator
from modelops.params import models_param, optional_text_param


@dag(
    dag_id="modelops_retirement",
    schedule="@monthly",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    render_template_as_native_obj=True,
    tags=["modelops", "stage-6", "retirement"],
    default_args={"owner": "ml-platform", "retries": 1, "retry_delay": timedelta(minutes=5)},
    doc_md=__doc__,
    params={
        "models": models_param("Whose versions to consider. Empty: every registered model."),
        "versions": Param(
            [],
            type="array",
            items={"type": "integer", "minimum": 1},
            title="Versions to retire",
            description="With exactly one model. Empty: the policy decides.",
        ),
        "reason": optional_text_param("Reason", "Required when versions are named."),
        "dry_run": Param(
            False, type="boolean", title="Dry run", description="Show what would happen; change nothing."
        ),
    },
)
def modelops_retirement() -> None:
    plan = StagePlanOperator(task_id="find_registered_models", stage="retirement")

    RetireModelsOperator.partial(
        task_id="retire_versions",
        map_index_template="{{ task.model }}",
    ).expand_kwargs(plan.output)


modelops_retirement()
