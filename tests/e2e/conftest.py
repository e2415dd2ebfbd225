"""A real, temporary stack for end-to-end runs: Airflow metadata DB, MLflow registry, scoring gateway.

``Stack.run`` runs one DAG with ``dag.test()``. ``Stack.run_queued`` does what the scheduler does with
Asset events: it asks Airflow which DAGs have their Asset condition met (``DagModel.dags_needing_dagruns``,
the scheduler's own query), creates each one's run with the events it consumes attached (so tasks see
them as ``triggering_asset_events``), clears the queue, and runs it. A test that drives the chain that
way notices a miswired ``schedule=``, which hand-triggering every stage would not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import pytest

from tests.support import serve_in_thread

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CTR = "ctr_recommender"
DIABETES = "diabetes_progression"
GATE_DAG, GATE_TASK = "modelops_compliance_gate", "evaluate_policy"
# Airflow users of the stack (SimpleAuthManager): the strict policy's approver, and someone who is not one.
USERS = {"risk_officer": "user", "intern": "user"}
# The gateway's admin token: the deployment DAG's smoke tests authenticate with it (modelops_gateway).
GATEWAY_ADMIN_TOKEN = "e2e-gateway-admin-token-0123456789abcdef"
EXTRA_TEAMS = ("radiology",)  # the README's "Add your own model" adds a model of this team


def caller_keys(teams: list[str], click_team: str) -> dict[str, dict[str, str]]:
    """Three API keys per team, named as ``make demo`` names them: the traffic simulator's default callers
    for the click model's team (so ``simulate_traffic`` finds them), ``<team>-<caller>`` for the others."""
    from modelops.data.traffic import DEFAULT_CALLERS
    from modelops.serving.access import new_key

    return {
        (caller if team == click_team else f"{team}-{caller}"): {"team": team, "key": new_key()}
        for team in sorted(set(teams))
        for caller in DEFAULT_CALLERS
    }


@dataclass
class Answer:
    """How the stack's approver answers the next approval requests (a test may change it)."""

    user: str = "risk_officer"
    option: str = "Approve"
    comment: str = "Model card reviewed."


@dataclass
class Approvals:
    """Answers every compliance approval request through Airflow's real REST API, as a person would in
    the UI: first as ``intern`` (who is not an approver: Airflow must refuse), then as ``answer.user``.

    ``dag.test()`` waits while a task is awaiting input; this thread is the person at the other end.
    """

    client: object
    answer: Answer = field(default_factory=Answer)
    log: list[dict] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def token(self, user: str) -> str:
        response = self.client.post("/auth/token", json={"username": user, "password": f"{user}-pw"})
        assert response.status_code == 201, response.text
        return response.json()["access_token"]

    def respond(self, run_id: str, map_index: int) -> None:
        url = f"/api/v2/dags/{GATE_DAG}/dagRuns/{run_id}/taskInstances/{GATE_TASK}/{map_index}/hitlDetails"
        body = {"chosen_options": [self.answer.option], "params_input": {"comment": self.answer.comment}}
        for user in ("intern", self.answer.user):
            response = self.client.patch(
                url, json=body, headers={"Authorization": f"Bearer {self.token(user)}"}
            )
            self.log.append({"run_id": run_id, "user": user, "status": response.status_code})
            if response.status_code == 200:
                return

    def watch(self) -> None:
        from airflow.models.taskinstance import TaskInstance
        from airflow.utils.session import create_session
        from sqlalchemy import select

        answered: set[tuple[str, int]] = set()
        while not self.stop.is_set():
            with create_session() as session:
                waiting = session.execute(
                    select(TaskInstance.run_id, TaskInstance.map_index).where(
                        TaskInstance.dag_id == GATE_DAG, TaskInstance.state == "awaiting_input"
                    )
                ).all()
            for run_id, map_index in waiting:
                if (run_id, map_index) not in answered:
                    answered.add((run_id, map_index))
                    self.respond(run_id, map_index)
            time.sleep(0.3)


@contextmanager
def approver(root: Path) -> Iterator[Approvals]:
    """Airflow's users with passwords, its REST app in-process, and a thread answering approvals."""
    passwords = root / "simple_auth_manager_passwords.json"
    passwords.write_text(json.dumps({user: f"{user}-pw" for user in USERS}))
    os.environ["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"] = ",".join(f"{u}:{r}" for u, r in USERS.items())
    os.environ["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"] = str(passwords)
    # Imported here, in the main thread: a thread importing Airflow's models can deadlock on an import lock.
    from airflow.api_fastapi.app import create_app
    from airflow.models import import_all_models
    from fastapi.testclient import TestClient
    from sqlalchemy.orm import configure_mappers

    import_all_models()
    configure_mappers()
    approvals = Approvals(client=TestClient(create_app(apps="core")))
    thread = threading.Thread(target=approvals.watch, daemon=True, name="approver")
    thread.start()
    try:
        yield approvals
    finally:
        approvals.stop.set()
        thread.join(timeout=10)


@dataclass
class Stack:
    root: Path
    home: Path
    incoming: Path
    tracking_uri: str
    gateway_url: str
    audit_url: str
    predictions_url: str
    dags: dict
    param_defaults: dict
    approvals: Approvals
    keys: dict = field(default_factory=dict)  # key id -> {"team", "key"}: the callers' API keys
    runs: list = field(default_factory=list)

    def key_headers(self, team: str) -> dict[str, str]:
        """``Authorization`` for one of ``team``'s keys: what a test scoring through the gateway sends."""
        key = next(entry["key"] for _, entry in sorted(self.keys.items()) if entry["team"] == team)
        return {"Authorization": f"Bearer {key}"}

    def run(self, dag_id: str, conf: dict | None = None, *, events: list | None = None, **kwargs):
        """Run one DAG with ``dag.test()`` and return the finished DagRun.

        Every param is passed, defaults included: ``dag.test()`` keeps the previous run's conf on the
        in-memory DAG's params, so an omitted param would silently reuse the last run's value. ``events``
        (AssetEvent rows) are attached to the run as the scheduler attaches the events a run consumes.
        """
        with _consuming(events or []):
            run = self.dags[dag_id].test(run_conf={**self.param_defaults[dag_id], **(conf or {})}, **kwargs)
        self.runs.append(run)
        return run

    def run_queued(self, max_rounds: int = 10) -> list:
        """Run every DAG whose Asset condition is met, as the scheduler would, until none is; return the runs."""
        finished = []
        for _ in range(max_rounds):
            ready = _dags_ready_to_run()
            if not ready:
                return finished
            for dag_id, events in ready:
                finished.append(self.run(dag_id, events=events))
        raise AssertionError(f"Asset-triggered runs still queued after {max_rounds} rounds")

    def clear_queue(self) -> None:
        """Forget queued Asset triggers (another test's events are not this test's business)."""
        from airflow.models.asset import AssetDagRunQueue
        from airflow.utils.session import create_session
        from sqlalchemy import delete

        with create_session() as session:
            session.execute(delete(AssetDagRunQueue))


def consumed_extras(run) -> list[dict]:
    """The extras of the Asset events a finished run consumed (read fresh: the run object is detached)."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        fresh = session.scalar(select(DagRun).where(DagRun.dag_id == run.dag_id, DagRun.run_id == run.run_id))
        return [dict(event.extra or {}) for event in fresh.consumed_asset_events]


def _dags_ready_to_run() -> list[tuple[str, list[int]]]:
    """(dag_id, ids of the events its run consumes) for each DAG the scheduler would start now."""
    from airflow.models.asset import AssetDagRunQueue, AssetEvent, DagScheduleAssetReference
    from airflow.models.dag import DagModel
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import delete, select

    ready = []
    with create_session() as session:
        _, triggered_date_by_dag = DagModel.dags_needing_dagruns(session)
        for dag_id in sorted(triggered_date_by_dag):
            # The scheduler takes the events of the DAG's assets since its previous asset-triggered run;
            # here, the events no run of this DAG has consumed yet.
            events = session.scalars(
                select(AssetEvent.id)
                .where(
                    AssetEvent.asset_id.in_(
                        select(DagScheduleAssetReference.asset_id).where(
                            DagScheduleAssetReference.dag_id == dag_id
                        )
                    ),
                    ~AssetEvent.created_dagruns.any(DagRun.dag_id == dag_id),
                )
                .order_by(AssetEvent.timestamp, AssetEvent.id)
            ).all()
            session.execute(delete(AssetDagRunQueue).where(AssetDagRunQueue.target_dag_id == dag_id))
            ready.append((dag_id, list(events)))
    return ready


@contextmanager
def _consuming(event_ids: list[int]) -> Iterator[None]:
    if not event_ids:
        yield
        return
    from airflow.models import dagrun as dagrun_module
    from airflow.models.asset import AssetEvent
    from sqlalchemy import select

    original = dagrun_module.get_or_create_dagrun

    def create_with_events(*args, **kwargs):
        run = original(*args, **kwargs)
        session = kwargs["session"]
        run.consumed_asset_events.extend(
            session.scalars(select(AssetEvent).where(AssetEvent.id.in_(event_ids)))
        )
        session.commit()
        return run

    with mock.patch.object(dagrun_module, "get_or_create_dagrun", create_with_events):
        yield


def _airflow(*args: str) -> None:
    completed = subprocess.run(
        [str(Path(sys.executable).parent / "airflow"), *args], capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, f"airflow {' '.join(args)} failed:\n{completed.stderr[-3000:]}"


def _unpause_all() -> None:
    # Airflow queues Asset-triggered runs only for unpaused DAGs, as a deployment has them.
    from airflow.models.dag import DagModel
    from airflow.utils.session import create_session
    from sqlalchemy import update

    with create_session() as session:
        session.execute(update(DagModel).values(is_paused=False))


@pytest.fixture(scope="package")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("lifecycle")
    home = root / "modelops-home"
    home.mkdir()
    incoming = root / "incoming"
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    audit_url = f"sqlite:///{home / 'audit.db'}"
    predictions_url = f"sqlite:///{home / 'predictions.db'}"
    env = {
        "MODELOPS_HOME": str(home),
        "MODELOPS_INCOMING_ROOT": str(incoming),
        "MLFLOW_TRACKING_URI": tracking_uri,
        "AIRFLOW_CONN_MLFLOW_DEFAULT": json.dumps(
            {"conn_type": "http", "extra": {"tracking_uri": tracking_uri}}
        ),
        "AIRFLOW_CONN_MODELOPS_AUDIT": json.dumps({"conn_type": "sqlite", "host": str(home / "audit.db")}),
        "AIRFLOW_CONN_MODELOPS_PREDICTIONS": json.dumps(
            {"conn_type": "sqlite", "host": str(home / "predictions.db")}
        ),
        "AIRFLOW_CONN_MODELOPS_AUDIT_ANCHOR": json.dumps(
            {"conn_type": "fs", "extra": {"path": str(home / "audit-anchors")}}
        ),
        "MODELOPS_AUDIT_ANCHORS": (home / "audit-anchors").as_uri(),
        # The stack's models are minutes old: their alerts would otherwise wait out the cold start.
        "MODELOPS_COLD_START_DAYS": "0",
    }
    auth_keys = (
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE",
    )
    saved = {key: os.environ.get(key) for key in (*env, *auth_keys)}
    os.environ.update(env)

    # MLflow without a server puts artifacts in ./mlruns unless the experiment says otherwise.
    from mlflow import MlflowClient

    from modelops.settings import load_catalog

    client = MlflowClient(tracking_uri)
    for spec in load_catalog().models.values():
        client.create_experiment(
            spec.experiment_name, artifact_location=(root / "artifacts" / spec.name).as_uri()
        )

    # dag.test() refuses a DAG that is not serialized in the metadata DB.
    _airflow("db", "migrate")
    _airflow("dags", "reserialize")
    _unpause_all()

    from modelops.serving.access import CLIENT_KEYS_ENV, ApiKeyring, key_entry
    from modelops.serving.gateway import GatewayConfig, ModelPolicy, create_app
    from tests.support import keyring_for_tests

    # The gateway as GatewayConfig.from_env builds it: the teams' keys (digests), each spec's allowed teams
    # and screening, the admin token; the traffic simulator reads the keys from an owner-only file.
    catalog = load_catalog()
    keys = caller_keys(
        [*(spec.team for spec in catalog.models.values()), *EXTRA_TEAMS], catalog.model(CTR).team
    )
    keys_file = root / "gateway_keys.json"
    keys_file.touch(mode=0o600)
    keys_file.write_text(json.dumps(keys))
    saved[CLIENT_KEYS_ENV] = os.environ.get(CLIENT_KEYS_ENV)
    os.environ[CLIENT_KEYS_ENV] = str(keys_file)
    base = GatewayConfig.from_env(
        {
            "MLFLOW_TRACKING_URI": tracking_uri,
            "MODELOPS_PREDICTIONS_URL": predictions_url,
            "MODELOPS_AUDIT_URL": audit_url,
            "MODELOPS_AUDIT_KEYS": json.dumps(
                {"current": keyring_for_tests().current, "keys": dict(keyring_for_tests().keys)}
            ),
            "MODELOPS_DEFAULT_MODEL": CTR,
            "MODELOPS_GATEWAY_ADMIN_TOKEN": GATEWAY_ADMIN_TOKEN,
            "MODELOPS_GATEWAY_KEYS": json.dumps(
                {key_id: key_entry(entry["team"], entry["key"]) for key_id, entry in keys.items()}
            ),
        }
    )
    # A model added later (the README's tumour classifier) has no spec yet: its team is allowed up front.
    policies = {**base.policies, "tumour_classifier": ModelPolicy(allowed_teams=frozenset(EXTRA_TEAMS))}
    app = create_app(
        GatewayConfig(
            tracking_uri=tracking_uri,
            predictions_url=predictions_url,
            default_model=CTR,
            models=base.models,
            audit_url=audit_url,
            audit_keyring=keyring_for_tests(),
            admin_token=GATEWAY_ADMIN_TOKEN,
            api_keys=ApiKeyring.from_json(
                json.dumps({key_id: key_entry(entry["team"], entry["key"]) for key_id, entry in keys.items()})
            ),
            policies=policies,
        )
    )
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(PROJECT_ROOT / "dags"))
    assert bag.import_errors == {}
    try:
        with serve_in_thread(app) as gateway_url, approver(root) as approvals:
            host, port = gateway_url.removeprefix("http://").split(":")
            os.environ["AIRFLOW_CONN_MODELOPS_GATEWAY"] = json.dumps(
                {"conn_type": "http", "host": host, "port": int(port), "password": GATEWAY_ADMIN_TOKEN}
            )
            yield Stack(
                root=root,
                home=home,
                incoming=incoming,
                tracking_uri=tracking_uri,
                gateway_url=gateway_url,
                audit_url=audit_url,
                predictions_url=predictions_url,
                dags=bag.dags,
                param_defaults={dag_id: dag.params.dump() for dag_id, dag in bag.dags.items()},
                approvals=approvals,
                keys=keys,
            )
    finally:
        os.environ.pop("AIRFLOW_CONN_MODELOPS_GATEWAY", None)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
