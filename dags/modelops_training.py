"""
### Stage 2 · Training and registration

Runs when a dataset passes validation (`modelops_validated_dataset`) or monitoring requests a retrain
(`modelops_retraining_request`), or by hand. Trains the model spec in `include/models/`, logs the run to
MLflow (params, holdout metrics, signature, input example) and registers a version tagged with its
lineage: `train_data_sha256`, `train_data_uri`, framework and version, Python version, code commit,
Airflow dag/run id and the trigger. Alias `candidate` moves to it; the Asset event
`modelops_model_candidate` starts the compliance gate. A retry of the same run reuses its version.

**Trigger form:** `dataset_sha256` (blank = the triggering event, else the latest validated dataset).
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag

from modelops.assets import MODEL_CANDIDATE, RETRAINING_REQUEST, VALIDATED_DATASET
from modelops.operators.training import TrainModelOperator


@dag(
    dag_id="modelops_training",
    schedule=(VALIDATED_DATASET | RETRAINING_REQUEST),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["modelops", "stage-2", "training"],
    default_args={"owner": "ml-platform", "retries": 1, "retry_delay": timedelta(seconds=30)},
    doc_md=__doc__,
    params={
        "dataset_sha256": Param(
            "",
            type="string",
            title="Dataset SHA-256",
            description="A dataset version that passed validation. Blank: the triggering event or the latest.",
        ),
        "model": Param("", type="string", title="Model spec", description="Blank: the platform default."),
    },
)
def modelops_training() -> None:
    TrainModelOperator(
        task_id="train_and_register",
        dataset_sha256="{{ params.dataset_sha256 }}",
        model="{{ params.model }}",
        outlets=[MODEL_CANDIDATE],
    )


modelops_training()
