"""The Airflow Assets that connect the lifecycle DAGs.

An event's ``extra`` carries the lineage the next stage needs, so a stage started by an Asset event
never has to guess which dataset or version it is about. Assets are named, without a URI scheme: a
scheme makes Airflow load every provider to normalise it, which costs a second of parse time per file.
"""

from __future__ import annotations

from airflow.sdk import Asset

VALIDATED_DATASET = Asset(name="modelops_validated_dataset")
"""A dataset version passed validation. extra: dataset, model_names (the models that train on it), uri,
snapshot_uri, sha256, row_count, columns, suite."""

RETRAINING_REQUEST = Asset(name="modelops_retraining_request")
"""Monitoring (or a person) asks for a retrain of one model. extra: model_name, version, verdict, reason."""

MODEL_CANDIDATE = Asset(name="modelops_model_candidate")
"""A version was registered with alias ``candidate``. extra: model_name, version, train_data_sha256."""

MODEL_APPROVED = Asset(name="modelops_model_approved")
"""A version passed the compliance gate, alias ``challenger``. extra: model_name, version, policy."""

MODEL_DEPLOYED = Asset(name="modelops_model_deployed")
"""A version became ``champion`` and serves. extra: model_name, version, previous_version."""

BATCH_SCORES = Asset(name="modelops_batch_scores")
"""A batch of files was scored with a model's champion. extra: model_name, version, output_uri, sha256, rows."""
