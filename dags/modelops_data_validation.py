"""
### Stage 1 · Data validation

Hashes a dataset version (SHA-256, streamed in fixed-size chunks), validates it with the Great
Expectations suite named in `include/datasets/<dataset>.yaml`, scans it for PII, and on success writes a
content-addressed snapshot and a data card. The Asset event `modelops_validated_dataset` carries the
lineage (uri, snapshot, sha256, row count, columns, suite) and starts training.

A failure names every failed expectation and PII finding; the full result is in the audit log either way.

**Trigger form:** `dataset_uri` (blank = the dataset spec's `incoming_uri`), `dataset` (blank = the
platform default).
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag

from modelops.assets import VALIDATED_DATASET
from modelops.operators.validation import ValidateDatasetOperator


@dag(
    dag_id="modelops_data_validation",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["modelops", "stage-1", "data"],
    default_args={"owner": "ml-platform", "retries": 1, "retry_delay": timedelta(seconds=30)},
    doc_md=__doc__,
    params={
        "dataset_uri": Param(
            "",
            type="string",
            title="Dataset URI",
            description="CSV to validate: a local path, file:// or s3:// URI. Blank: the spec's incoming_uri.",
        ),
        "dataset": Param("", type="string", title="Dataset spec", description="Blank: the platform default."),
    },
)
def modelops_data_validation() -> None:
    ValidateDatasetOperator(
        task_id="validate_dataset",
        dataset_uri="{{ params.dataset_uri }}",
        dataset="{{ params.dataset }}",
        outlets=[VALIDATED_DATASET],
    )


modelops_data_validation()
