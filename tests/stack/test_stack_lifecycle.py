"""The lifecycle on the production shape (``make stack``): Airflow on PostgreSQL with the CeleryExecutor and
two Celery workers on Redis, MLflow on PostgreSQL with its artifacts in S3 (moto), our tables on
PostgreSQL and the platform's storage in ``s3://``. Nothing is stubbed: the driver of ``make demo`` runs a
model through the six stages over Airflow's REST API, the gate is answered by its approver, traffic goes
through the gateway.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import sqlalchemy as sa

pytestmark = [pytest.mark.services, pytest.mark.stack]

MODEL = "ctr_recommender"


def _objects(the_plan, bucket: str) -> list[str]:
    from modelops_dev.prodstack import s3_client

    client = s3_client(the_plan.config)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def test_the_lifecycle_runs_on_the_production_stack(production_stack, lifecycle_report) -> None:
    from modelops.audit import AuditKeyring, AuditStore
    from modelops_dev.prodstack import client_env

    the_plan, report = production_stack, lifecycle_report
    facts = report.models[MODEL].facts
    assert facts is not None and facts.champion, "\n".join(report.lines)
    assert report.models[MODEL].traffic.ok > 0

    env = client_env(the_plan)
    prefix = the_plan.config.prefix
    # Our tables live in the stack's own PostgreSQL databases.
    assert env["MODELOPS_AUDIT_URL"].endswith(f"/{prefix}_modelops_audit")
    store = AuditStore(
        env["MODELOPS_AUDIT_URL"], keyring=AuditKeyring.from_json(env["MODELOPS_AUDIT_KEYS"], source="test")
    )
    try:
        verification = store.verify()
        assert verification.ok, verification
        records = store.records()
    finally:
        store.dispose()
    actions = {str(record.action) for record in records}
    assert {"dataset.validated", "model.registered", "model.deployed"} <= actions
    # The gate took each version up once and decided on it once, whatever its events and sweeps.
    for action in ("gate.taken_up", "gate.decided"):
        subjects = [r.subject for r in records if str(r.action) == action]
        assert subjects and len(subjects) == len(set(subjects)), (action, subjects)
    # Deployment runs several runs at once, each holding its models: no version is deployed twice.
    deployed = [(r.subject, str(r.decision)) for r in records if str(r.action) == "model.deployed"]
    assert deployed and len(deployed) == len(set(deployed)), deployed
    assert [r for r in records if str(r.action) == "deployment.taken_up"], "deployment took no model up"
    engine = sa.create_engine(env["MODELOPS_PREDICTIONS_URL"])
    try:
        with engine.connect() as conn:
            logged = conn.execute(
                sa.text("select count(*) from modelops_predictions where model_name = :m"), {"m": MODEL}
            )
            assert logged.scalar_one() >= report.models[MODEL].traffic.ok
    finally:
        engine.dispose()

    # Storage and MLflow's artifacts are in the stack's buckets, not on this disk.
    buckets = the_plan.buckets
    platform_bucket = next(b for b in buckets if b.endswith("-modelops"))
    artifacts_bucket = next(b for b in buckets if b.endswith("-mlflow-artifacts"))
    stored = _objects(the_plan, platform_bucket)
    assert any(key.startswith("incoming/ctr_clicks/") for key in stored)
    assert any(key.startswith("storage/") for key in stored), stored[:20]
    assert any(key.endswith("MLmodel") for key in _objects(the_plan, artifacts_bucket))

    # The tasks ran on the Celery workers, both of them.
    logs = the_plan.config.logs
    received = {
        worker.name: len(re.findall(r"Task execute_workload\[[^\]]+\] received", worker.log_file.read_text()))
        for worker in the_plan.airflow
        if re.fullmatch(r"airflow-worker-\d+", worker.name)
    }
    assert len(received) == 2 and all(count > 0 for count in received.values()), received
    assert not (the_plan.config.airflow_home / "airflow.db").exists()  # no SQLite fallback anywhere
    assert logs.is_dir()
    assert os.environ["MODELOPS_STORAGE_ROOT"].startswith("s3://")
    assert json.loads(env["AIRFLOW_CONN_MODELOPS_S3"])["extra"]["endpoint_url"] == the_plan.config.s3_endpoint
