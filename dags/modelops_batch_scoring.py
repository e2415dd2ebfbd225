"""
### Batch scoring on Spark

Scores a CSV or Parquet file, or a folder of them (a local path or any `ObjectStoragePath` URI such as
`s3://bucket/prefix/`), with the model's champion as the audit log records it, through
`mlflow.pyfunc.spark_udf` on Spark (`local[2]` by default; `MODELOPS_SPARK_MASTER` names a cluster).
The version's files are hashed against its promotion record before it is loaded; the input must lie
under the model's dataset roots and hold every feature of the model spec (other columns are not given to
the model). Writes `<output_uri>/scores.parquet` (key columns, source file, row number, `prediction`),
one prediction-log record per 10,000 rows (caller `batch:<dag_id>/<run_id>`) and a `batch.scored` audit
record with the sha256 of every input file and of the output. A retry overwrites its own output and logs
no chunk twice.

**Trigger form:** `model`, `input_uri`, `output_uri` (empty = `<storage_root>/batch_scores/<model>/<run_id>`),
`id_columns` (empty = the columns called `id` or ending in `_id`).
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag

from modelops.assets import BATCH_SCORES
from modelops.operators.batch_scoring import BatchScoreOperator
from modelops.params import model_param, optional_text_param


@dag(
    dag_id="modelops_batch_scoring",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=4,
    render_template_as_native_obj=True,
    tags=["modelops", "serving", "batch-scoring"],
    default_args={"owner": "ml-platform", "retries": 1, "retry_delay": timedelta(minutes=1)},
    doc_md=__doc__,
    params={
        "model": model_param("The model whose recorded champion scores the input."),
        "input_uri": optional_text_param(
            "Input", "A CSV or Parquet file, or a folder of them: a local path or a URI such as s3://..."
        ),
        "output_uri": optional_text_param(
            "Output folder",
            "Where scores.parquet is written. Empty: <storage_root>/batch_scores/<model>/<run_id>.",
        ),
        "id_columns": Param(
            [],
            type="array",
            items={"type": "string"},
            title="Id columns",
            description="Input columns copied to the output beside each score. Empty: id and *_id columns.",
        ),
    },
)
def modelops_batch_scoring() -> None:
    BatchScoreOperator(task_id="score_batch", outlets=[BATCH_SCORES])


modelops_batch_scoring()
