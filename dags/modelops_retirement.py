"""
### Stage 6 · Retirement (monthly)

Selects the versions `include/policies/retirement.yaml` retires (superseded as champion for longer than
`superseded_for_days`) plus any named in a manual request. Each is archived (model files and metadata,
with a manifest of every file's sha256) under `<storage_root>/archive/` through `ObjectStoragePath` (a
local folder by default, `s3://` by configuration only), the archive is read back and verified, and only
then are its aliases removed and it is tagged `retired` with the archive URI. The serving champion is
never retired.

**Trigger form:** `versions` (e.g. `3, 4`), `reason` (required with versions), `dry_run` (report only).
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag

from modelops.operators.retirement import RetireModelsOperator


@dag(
    dag_id="modelops_retirement",
    schedule="@monthly",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["modelops", "stage-6", "retirement"],
    default_args={"owner": "ml-platform", "retries": 1, "retry_delay": timedelta(minutes=5)},
    doc_md=__doc__,
    params={
        "versions": Param(
            "", type="string", title="Versions to retire", description="Comma-separated; blank: policy only."
        ),
        "reason": Param("", type="string", title="Reason", description="Required when versions are named."),
        "dry_run": Param(
            False, type="boolean", title="Dry run", description="Show what would happen; change nothing."
        ),
        "model": Param("", type="string", title="Model spec", description="Blank: the platform default."),
    },
)
def modelops_retirement() -> None:
    RetireModelsOperator(
        task_id="retire_versions",
        versions="{{ params.versions }}",
        reason="{{ params.reason }}",
        dry_run="{{ params.dry_run }}",
        model="{{ params.model }}",
    )


modelops_retirement()
