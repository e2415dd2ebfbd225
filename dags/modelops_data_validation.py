"""
### Stage 1 · Data validation

Every five minutes (or when triggered), looks in the incoming folder of every dataset spec
(`include/datasets/*.yaml`, field `incoming_uri`) for files whose bytes were never validated, and
validates each one against the spec of the folder it was dropped in: SHA-256 (streamed), the Great
Expectations suite the spec names, a PII scan; a passing file gets a content-addressed snapshot and a
data card. One mapped task per file, named after its dataset. The Asset event `modelops_validated_dataset`
carries the lineage (dataset, uri, snapshot, sha256, row count, columns, suite) and starts training of
every model whose spec names that dataset.

A failure names the dataset spec and suite it used, and every failed expectation and PII finding; the
full result is in the audit log either way. A file already validated (passed or failed) is not redone.

**Trigger form:** `datasets` (empty = every dataset), `dataset_uri` (one file anywhere; its dataset is
the one named, else the one whose incoming folder holds it).
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import dag

from modelops.assets import VALIDATED_DATASET
from modelops.operators.planning import StagePlanOperator
from modelops.operators.validation import ValidateDatasetOperator
from modelops.params import datasets_param, optional_text_param


@dag(
    dag_id="modelops_data_validation",
    schedule="*/5 * * * *",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    render_template_as_native_obj=True,
    tags=["modelops", "stage-1", "data"],
    default_args={"owner": "ml-platform", "retries": 1, "retry_delay": timedelta(seconds=30)},
    doc_md=__doc__,
    params={
        "datasets": datasets_param("Whose incoming folders to look in. Empty: every dataset."),
        "dataset_uri": optional_text_param(
            "Dataset file",
            "One CSV to validate (a local path, file:// or s3:// URI). Empty: the incoming folders.",
        ),
    },
)
def modelops_data_validation() -> None:
    plan = StagePlanOperator(task_id="find_new_files", stage="validation")

    ValidateDatasetOperator.partial(
        task_id="validate_dataset",
        outlets=[VALIDATED_DATASET],
        map_index_template="{{ task.dataset }}",
    ).expand_kwargs(plan.output)


modelops_data_validation()
