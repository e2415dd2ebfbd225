"""
### Stage 2 · Training and registration

Runs when a dataset passes validation (`modelops_validated_dataset`): trains every model whose spec
(`include/models/*.yaml`) names that dataset, on that version. Runs when monitoring asks for a retrain
(`modelops_retraining_request`): trains the model the request names, on the newest validated version of
that model's own dataset. One mapped task per model, named after it. Each logs a run to the model's own
MLflow experiment (params, holdout metrics of its task kind, signature, input example) and registers a
version tagged with its lineage: `train_data_sha256`, `train_data_uri`, dataset, framework and version,
Python version, code commit, Airflow dag/run id and the trigger. Alias `candidate` moves to it; the Asset
event `modelops_model_candidate` (with the model name) starts the compliance gate. A retry of the same
run reuses its version.

A spec with `training.runner: kubernetes` trains in a pod of its own (task `train_in_pod`,
KubernetesPodOperator): the same entry point, credentials from a Kubernetes Secret. The task appears only
when some spec asks for it; each task skips the models the other one trains.

**Trigger form** (a manual run): `model`, and `dataset_sha256` (empty = the newest validated version of
the model's dataset).
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import dag

from modelops.assets import MODEL_CANDIDATE, RETRAINING_REQUEST, VALIDATED_DATASET
from modelops.operators.planning import StagePlanOperator
from modelops.operators.training import TrainModelOperator
from modelops.params import model_param, optional_text_param
from modelops.settings import models_trained_in_pods


@dag(
    dag_id="modelops_training",
    schedule=(VALIDATED_DATASET | RETRAINING_REQUEST),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    render_template_as_native_obj=True,
    tags=["modelops", "stage-2", "training"],
    default_args={"owner": "ml-platform", "retries": 1, "retry_delay": timedelta(seconds=30)},
    doc_md=__doc__,
    params={
        "model": model_param("The model to train (Asset-triggered runs train the events' models)."),
        "dataset_sha256": optional_text_param(
            "Dataset SHA-256",
            "A validated version of the model's dataset. Empty: the newest one.",
            pattern="^[0-9a-f]{64}$",
        ),
    },
)
def modelops_training() -> None:
    plan = StagePlanOperator(task_id="plan_training", stage="training")

    TrainModelOperator.partial(
        task_id="train_and_register",
        outlets=[MODEL_CANDIDATE],
        map_index_template="{{ task.model }}",
    ).expand_kwargs(plan.output)

    if models_trained_in_pods():
        # Imported only here: the Kubernetes provider costs ~3 s of parse time.
        from modelops.operators.training_pod import TrainInPodOperator

        TrainInPodOperator.partial(
            task_id="train_in_pod",
            outlets=[MODEL_CANDIDATE],
            map_index_template="{{ task.model }}",
        ).expand_kwargs(plan.output)


modelops_training()
