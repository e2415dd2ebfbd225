"""The scoring gateway against a real MLflow registry (SQLite store under tmp_path) holding two models,
and a real audit log (SQLite) whose signed records authorise what the gateway may serve.

The models are saved with ``mlflow.sklearn.save_model`` and registered through an ``MlflowClient`` bound
to the test's registry, so nothing here touches MLflow's process-wide tracking or registry URI (and the
gateway must not either). The audit records are the ones the pipeline writes (gate approvals, then a
promotion before every move of the ``champion`` alias), written with the tests' keyring by
:func:`tests.support.authorise`. The attacks at the end of the module each get a registry and audit log
of their own, as they tamper with both.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import io
import json
import logging
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

from modelops.audit import TABLE_NAME, AuditRecord, AuditStore, compute_record_hash
from modelops.audit.chain import canonical_json
from modelops.errors import ConfigurationError
from modelops.evidence import CHAMPION_FIELD, evidence_summary, version_file_hashes
from modelops.registry import ModelRegistry
from modelops.serving.access import ApiKeyring, key_entry
from modelops.serving.gateway import GatewayConfig, ModelPolicy, create_app
from modelops.serving.prediction_log import PredictionLog
from modelops.settings import load_catalog
from modelops.vocabulary import Alias, AuditAction, Decision, Tag, model_subject
from tests.support import (
    TEST_KEY_ID,
    authorise,
    keyring_for_tests,
    mlflow_client,
    serve_in_thread,
    sqlite_tracking_uri,
)

# skops resolves names through module attributes, which trips Airflow's deprecated-import shims.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CLASSIFIER = "clicks_gateway_test"  # the default model: also answers at /invocations
REGRESSOR = "spend_gateway_test"
UNDEPLOYED = "clicks_gateway_undeployed"  # registered, approved by the gate, never deployed
BROKEN = "clicks_gateway_broken"  # its only version's artifacts are not a model
UNTRAINED = "churn_gateway_untrained"  # known to the gateway (a spec), never registered
CLICK_FEATURES = [
    "user_age",
    "user_balance",
    "click_history_length",
    "item_price",
    "hour_of_day",
    "item_category",
    "device",
]
SPEND_FEATURES = ["visits", "basket_size", "tenure_years"]
# The team that owns every test model, its key, and a key of another team. The caller id the log records
# is the key's team and id; the key itself must never reach the log, a response or an error.
TEAM = "clicks-team"
KEY = "mok_test-clicks-team-key-0123456789abcdefghijklmnopqrstuv"
CALLER_ID = f"{TEAM}:shop"
OTHER_TEAM = "rival-team"
OTHER_KEY = "mok_test-rival-team-key-0123456789abcdefghijklmnopqrstuvw"
AUTH = {"Authorization": f"Bearer {KEY}"}
TEST_API_KEYS = ApiKeyring({"shop": key_entry(TEAM, KEY), "rival": key_entry(OTHER_TEAM, OTHER_KEY)})


@dataclass(frozen=True)
class Registry:
    tracking_uri: str
    client: MlflowClient
    experiment_id: str
    audit_url: str
    store: AuditStore  # the audit log, with the tests' keyring: writes what the pipeline would
    clicks: pd.DataFrame  # sample rows of the classifier
    spend: pd.DataFrame  # sample rows of the regressor
    expected: dict[tuple[str, str], np.ndarray]  # (model, version) -> p1 (classifier) or prediction

    @property
    def models(self) -> ModelRegistry:
        return ModelRegistry(self.tracking_uri)

    def records(self, model: str) -> dict[str, Any]:
        frame = self.clicks if model != REGRESSOR else self.spend
        return {"dataframe_records": frame.to_dict(orient="records")}

    def approve(self, name: str, version: str) -> None:
        """The compliance gate's approval of a version, with its files' hashes as they are now."""
        authorise(self.store, self.models, name, version, approve=True)

    def promote(self, name: str, version: str) -> None:
        """What the deployment DAG does: record the promotion (with the files' hashes), then move the alias."""
        authorise(self.store, self.models, name, version, approve=False, promote=True)
        self.client.set_registered_model_alias(name, Alias.CHAMPION, version)


def synthetic_clicks(rows: int, seed: int) -> tuple[pd.DataFrame, pd.Series]:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "user_age": rng.integers(18, 80, rows).astype(float),
            "user_balance": rng.normal(1000, 300, rows),
            "click_history_length": rng.integers(0, 50, rows).astype(float),
            "item_price": rng.uniform(1, 200, rows),
            "hour_of_day": rng.integers(0, 24, rows).astype(float),
            "item_category": rng.choice(["books", "toys", "garden"], rows),
            "device": rng.choice(["mobile", "desktop"], rows),
        }
    )
    clicked = ((frame["item_price"] < 80) ^ (rng.random(rows) < 0.1)).astype(int)
    return frame, clicked


def synthetic_spend(rows: int, seed: int) -> tuple[pd.DataFrame, pd.Series]:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "visits": rng.integers(1, 30, rows).astype(float),
            "basket_size": rng.uniform(1, 12, rows),
            "tenure_years": rng.uniform(0, 10, rows),
        }
    )
    spend = 20 * frame["basket_size"] + 3 * frame["visits"] + rng.normal(0, 5, rows)
    return frame, spend


def train_classifier(features: pd.DataFrame, target: pd.Series):
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    preprocess = ColumnTransformer(
        [
            ("num", StandardScaler(), CLICK_FEATURES[:5]),
            ("cat", OneHotEncoder(handle_unknown="ignore"), ["item_category", "device"]),
        ]
    )
    return Pipeline([("pre", preprocess), ("clf", LogisticRegression(max_iter=1000))]).fit(features, target)


def train_regressor(features: pd.DataFrame, target: pd.Series):
    from sklearn.linear_model import LinearRegression

    return LinearRegression().fit(features, target)


def save_sklearn(model, features: pd.DataFrame, tmp: Path) -> Path:
    """``model`` saved as an MLflow sklearn model folder (skops format) under ``tmp``."""
    import skops.io

    classifier = hasattr(model, "predict_proba")
    folder = tmp / f"model-{uuid.uuid4().hex}"
    probe = tmp / f"probe-{uuid.uuid4().hex}.skops"
    skops.io.dump(model, probe)
    mlflow.sklearn.save_model(
        model,
        str(folder),
        signature=infer_signature(
            features, model.predict_proba(features) if classifier else model.predict(features)
        ),
        pyfunc_predict_fn="predict_proba" if classifier else "predict",
        skops_trusted_types=skops.io.get_untrusted_types(file=probe),
        # Explicit requirements skip MLflow's inference, which re-imports the model in a subprocess.
        pip_requirements=["scikit-learn", "skops"],
    )
    return folder


def register_folder(
    client: MlflowClient, experiment_id: str, name: str, folder: Path, tags: dict[str, str] | None = None
) -> str:
    """Log a saved model folder as a run's ``model`` artifacts and register it as a version of ``name``."""
    run = client.create_run(experiment_id)
    client.log_artifacts(run.info.run_id, str(folder), "model")
    client.set_terminated(run.info.run_id)
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    source = f"{run.info.artifact_uri}/model"
    return str(client.create_model_version(name, source, run_id=run.info.run_id, tags=tags).version)


def register(
    client: MlflowClient, experiment_id: str, name: str, model, features: pd.DataFrame, tmp: Path
) -> str:
    """Save ``model`` locally, log the folder as a run's artifacts, register it as a version of ``name``."""
    return register_folder(client, experiment_id, name, save_sklearn(model, features, tmp))


@dataclass(frozen=True)
class Trained:
    clicks: pd.DataFrame  # training rows of the classifiers
    classifiers: dict[str, Any]  # v2 is the opposite model of v1: easy to tell apart
    spend: pd.DataFrame
    regressors: dict[str, Any]
    sample_clicks: pd.DataFrame
    sample_spend: pd.DataFrame

    def expected(self) -> dict[tuple[str, str], np.ndarray]:
        return {
            **{
                (CLASSIFIER, v): m.predict_proba(self.sample_clicks)[:, 1]
                for v, m in self.classifiers.items()
            },
            **{(REGRESSOR, v): m.predict(self.sample_spend) for v, m in self.regressors.items()},
        }


@functools.cache
def trained() -> Trained:
    clicks, clicked = synthetic_clicks(300, seed=1)
    spend_frame, spend = synthetic_spend(200, seed=2)
    return Trained(
        clicks=clicks,
        classifiers={"1": train_classifier(clicks, clicked), "2": train_classifier(clicks, 1 - clicked)},
        spend=spend_frame,
        regressors={"1": train_regressor(spend_frame, spend), "2": train_regressor(spend_frame, -spend)},
        sample_clicks=synthetic_clicks(4, seed=7)[0],
        sample_spend=synthetic_spend(3, seed=8)[0],
    )


def new_registry(root: Path) -> Registry:
    """An empty MLflow registry and audit log under ``root``."""
    tracking_uri = sqlite_tracking_uri(root)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    experiment_id = client.create_experiment("gateway-tests", artifact_location=(root / "artifacts").as_uri())
    audit_url = f"sqlite:///{root}/audit.db"
    models = trained()
    return Registry(
        tracking_uri=tracking_uri,
        client=client,
        experiment_id=experiment_id,
        audit_url=audit_url,
        store=AuditStore(audit_url, keyring=keyring_for_tests()),
        clicks=models.sample_clicks,
        spend=models.sample_spend,
        expected=models.expected(),
    )


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    root = tmp_path_factory.mktemp("mlflow")
    reg = new_registry(root)
    client, experiment_id, models = reg.client, reg.experiment_id, trained()
    for version, model in models.classifiers.items():
        assert register(client, experiment_id, CLASSIFIER, model, models.clicks, root) == version
    for version, model in models.regressors.items():
        assert register(client, experiment_id, REGRESSOR, model, models.spend, root) == version
    register(client, experiment_id, UNDEPLOYED, models.classifiers["1"], models.clicks, root)
    client.create_registered_model(BROKEN)
    not_a_model = root / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "README").write_text("no MLmodel here")
    client.create_model_version(BROKEN, source=not_a_model.as_uri())

    # The audit log says what the pipeline decided: the gate approved every version the tests stage,
    # and deployment promoted version 1 of both deployed models (recorded before the alias moved).
    for name, version in [(CLASSIFIER, "1"), (CLASSIFIER, "2"), (REGRESSOR, "1"), (REGRESSOR, "2")]:
        reg.approve(name, version)
    reg.approve(UNDEPLOYED, "1")
    reg.approve(BROKEN, "1")  # its files are what the gate saw; they just are not a model
    reg.promote(CLASSIFIER, "1")
    reg.promote(REGRESSOR, "1")
    yield reg
    reg.store.dispose()


@pytest.fixture
def champion(registry: Registry) -> Iterator[None]:
    """Tests that move an alias put both champions back on version 1, through the pipeline's door: a
    promotion record of version 1 first, then the alias."""
    yield
    for name in (CLASSIFIER, REGRESSOR):
        registry.promote(name, "1")


def make_config(registry: Registry, tmp_path: Path, **overrides: Any) -> GatewayConfig:
    settings: dict[str, Any] = {
        "tracking_uri": registry.tracking_uri,
        "predictions_url": f"sqlite:///{tmp_path}/predictions.db",
        "default_model": CLASSIFIER,
        "models": (REGRESSOR, UNTRAINED),
        "audit_url": registry.audit_url,
        "audit_keyring": keyring_for_tests(),
        "api_keys": TEST_API_KEYS,
        "policies": {
            name: ModelPolicy(allowed_teams=frozenset({TEAM}))
            for name in (CLASSIFIER, REGRESSOR, UNDEPLOYED, BROKEN, UNTRAINED, OUTSIDER)
        },
        **overrides,
    }
    return GatewayConfig(**settings)


def keyed(app: FastAPI, headers: dict[str, str] | None = None) -> TestClient:
    """A test client that calls as ``TEAM`` (its key on every request) unless ``headers`` says otherwise."""
    return TestClient(app, headers=AUTH if headers is None else headers)


@pytest.fixture
def gateway(registry: Registry, tmp_path: Path) -> Iterator[TestClient]:
    with keyed(create_app(make_config(registry, tmp_path))) as client:
        yield client


def logged_calls(app: FastAPI) -> list[dict]:
    app.state.prediction_writer.flush()  # calls are logged off the request path
    log: PredictionLog = app.state.prediction_log
    table = sa.table(
        "modelops_predictions",
        *(sa.column(name) for name in ("request_id", "caller_id", "model_name", "model_version")),
        *(sa.column(name) for name in ("status_code", "n_rows", "error", "received_at", "latency_ms")),
    )
    with log.engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(sa.select(table).order_by(table.c.received_at))]


def p1(response: httpx.Response) -> list[float]:
    return [row[1] for row in response.json()["predictions"]]


def expected(registry: Registry, model: str, version: str) -> Any:
    return pytest.approx(list(registry.expected[(model, version)]))


# --- scoring --------------------------------------------------------------------------------------


def test_every_mlflow_input_format_scores_the_champion(gateway: TestClient, registry: Registry) -> None:
    sample = registry.clicks
    bodies = {
        "dataframe_split": {"dataframe_split": sample.to_dict(orient="split", index=False)},
        "dataframe_records": {"dataframe_records": sample.to_dict(orient="records")},
        "inputs": {"inputs": sample.to_dict(orient="records")},
        "inputs+params": {"inputs": sample.to_dict(orient="records"), "params": {}},
    }
    for label, body in bodies.items():
        response = gateway.post("/invocations", json=body)
        assert response.status_code == 200, (label, response.text)
        assert p1(response) == expected(registry, CLASSIFIER, "1"), label
        assert response.headers["X-Model-Version"] == "1"
        assert len(response.headers["X-Request-Id"]) == 32

    response = gateway.post(
        f"/models/{CLASSIFIER}/invocations",
        content=sample.to_csv(index=False),
        headers={"Content-Type": "text/csv"},
    )
    assert response.status_code == 200, response.text
    assert p1(response) == expected(registry, CLASSIFIER, "1")

    calls = logged_calls(gateway.app)
    assert [call["status_code"] for call in calls] == [200] * 5
    assert {(call["model_name"], call["model_version"]) for call in calls} == {(CLASSIFIER, "1")}
    assert {call["n_rows"] for call in calls} == {4}
    assert {call["caller_id"] for call in calls} == {CALLER_ID}


def test_each_model_scores_at_its_own_path_and_is_logged_under_its_name(
    gateway: TestClient, registry: Registry
) -> None:
    regression = gateway.post(
        f"/models/{REGRESSOR}/invocations", json=registry.records(REGRESSOR), headers={"X-Caller-Id": "crm"}
    )
    assert regression.status_code == 200, regression.text
    assert regression.headers["X-Model-Version"] == "1"
    assert regression.json()["predictions"] == expected(registry, REGRESSOR, "1")

    classification = gateway.post(f"/models/{CLASSIFIER}/invocations", json=registry.records(CLASSIFIER))
    default = gateway.post("/invocations", json=registry.records(CLASSIFIER))
    assert p1(classification) == p1(default) == expected(registry, CLASSIFIER, "1")
    # The regressor's columns are not the default model's: /invocations is the classifier only.
    assert gateway.post("/invocations", json=registry.records(REGRESSOR)).status_code == 400

    calls = logged_calls(gateway.app)
    assert [(c["model_name"], c["model_version"], c["status_code"]) for c in calls] == [
        (REGRESSOR, "1", 200),
        (CLASSIFIER, "1", 200),
        (CLASSIFIER, "1", 200),
        (CLASSIFIER, "1", 400),
    ]
    assert [c["n_rows"] for c in calls[:3]] == [3, 4, 4]

    before = datetime.now(UTC) - timedelta(minutes=1)
    gateway.app.state.prediction_writer.flush()
    window = gateway.app.state.prediction_log.window(
        REGRESSOR, before, datetime.now(UTC) + timedelta(seconds=1)
    )
    assert window["prediction"].tolist() == expected(registry, REGRESSOR, "1")
    # The key decides the caller id; X-Caller-Id no longer does.
    assert set(window["caller_id"]) == {CALLER_ID}


def test_bad_requests_are_400_naming_the_problem(gateway: TestClient, registry: Registry) -> None:
    records = registry.clicks.to_dict(orient="records")

    malformed = gateway.post(
        "/invocations", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert malformed.status_code == 400
    assert malformed.json()["error_code"] == "BAD_REQUEST"
    assert "valid JSON" in malformed.json()["message"]

    unknown_key = gateway.post("/invocations", json={"rows": records})
    assert unknown_key.status_code == 400
    assert "dataframe_split" in unknown_key.json()["message"]  # lists the formats it accepts
    assert "got keys ['rows']" in unknown_key.json()["message"]
    two_keys = gateway.post("/invocations", json={"inputs": records, "dataframe_records": records})
    assert two_keys.status_code == 400
    not_an_object = gateway.post("/invocations", json=records)
    assert not_an_object.status_code == 400
    assert "JSON dictionary" in not_an_object.json()["message"]

    missing = gateway.post(
        "/invocations",
        json={"dataframe_records": [{k: v for k, v in r.items() if k != "item_price"} for r in records]},
    )
    assert missing.status_code == 400
    assert missing.json()["error_code"] == "SCHEMA_MISMATCH"
    assert "item_price" in missing.json()["message"]
    assert missing.headers["X-Model-Version"] == "1"

    wrong_type = gateway.post("/invocations", json={"dataframe_records": [{**records[0], "user_age": "old"}]})
    assert wrong_type.status_code == 422
    assert "user_age" in wrong_type.json()["message"] and "old" not in wrong_type.json()["message"]

    unsupported = gateway.post("/invocations", content=b"x", headers={"Content-Type": "text/plain"})
    assert unsupported.status_code == 415

    calls = logged_calls(gateway.app)
    assert [call["status_code"] for call in calls] == [400] * 5 + [422, 415]
    assert all(call["error"] for call in calls)
    missing_call = next(call for call in calls if call["request_id"] == missing.headers["X-Request-Id"])
    assert missing_call["n_rows"] == 4  # parsed rows are kept even when scoring fails
    assert missing_call["model_version"] == "1"


def test_model_without_champion_is_503_naming_it(registry: Registry, tmp_path: Path) -> None:
    with keyed(create_app(make_config(registry, tmp_path, default_model=UNDEPLOYED))) as client:
        response = client.post(
            "/invocations", json=registry.records(UNDEPLOYED), headers={"X-Caller-Id": "shop"}
        )
        assert response.status_code == 503
        assert response.json()["error_code"] == "NO_DEPLOYED_VERSION"
        assert (
            f"model '{UNDEPLOYED}' has no deployed version (no '{Alias.CHAMPION}' alias)"
            in response.json()["message"]
        )
        assert "X-Model-Version" not in response.headers

        for path in ("/ping", "/health", f"/models/{UNDEPLOYED}/health"):
            health = client.get(path)
            assert health.status_code == 503, path
            assert UNDEPLOYED in health.json()["message"]
        assert client.get("/version").json()["model_version"] is None

        # A model the gateway knows (it has a spec) but nobody trained yet is unavailable, not unknown.
        untrained = client.post(f"/models/{UNTRAINED}/invocations", json=registry.records(CLASSIFIER))
        assert untrained.status_code == 503
        assert "not registered in the model registry yet" in untrained.json()["message"]
        assert client.post(f"/admin/models/{UNTRAINED}/reload").status_code == 503

        [call, untrained_call] = logged_calls(client.app)
        assert (call["status_code"], call["model_version"], call["caller_id"]) == (503, None, CALLER_ID)
        assert call["request_id"] == response.headers["X-Request-Id"]
        assert (untrained_call["model_name"], untrained_call["status_code"]) == (UNTRAINED, 503)


def test_unknown_model_is_404_naming_the_known_ones(gateway: TestClient, registry: Registry) -> None:
    response = gateway.post("/models/no_such_model/invocations", json=registry.records(CLASSIFIER))
    assert response.status_code == 404
    message = response.json()["message"]
    assert "no_such_model" in message
    assert str(sorted([CLASSIFIER, REGRESSOR, UNTRAINED])) in message
    [call] = logged_calls(gateway.app)
    assert (call["status_code"], call["model_name"]) == (404, "no_such_model")

    for path in ("/models/no_such_model/health", "/models/no_such_model/version"):
        answer = gateway.get(path)
        assert answer.status_code == 404, path
        assert CLASSIFIER in answer.json()["message"]
    # A name that is refused leaves nothing behind in the gateway's state.
    assert "no_such_model" not in gateway.get("/admin/models").json()["models"]
    assert "no_such_model" not in gateway.get("/health").json()["models"]


# --- health and version ---------------------------------------------------------------------------


def test_health_and_version_speak_for_the_default_model_and_each_model(
    gateway: TestClient, registry: Registry
) -> None:
    assert gateway.get("/version").json()["model_version"] is None  # nothing loaded yet: lazy
    for path in ("/ping", "/health"):
        response = gateway.get(path)
        assert response.status_code == 200
        assert response.json()["model"] == CLASSIFIER
        assert response.json()["model_version"] == "1"
    assert gateway.get("/version").json() == {
        "mlflow": mlflow.__version__,
        "model": CLASSIFIER,
        "model_version": "1",
    }

    # /health summarises every model it knows without asking the registry: the regressor is not loaded yet.
    models = gateway.get("/health").json()["models"]
    assert models == {
        CLASSIFIER: {
            "status": "ok",
            "model_version": "1",
            "invocations_url": f"/models/{CLASSIFIER}/invocations",
        },
        REGRESSOR: {
            "status": "not_loaded",
            "model_version": None,
            "invocations_url": f"/models/{REGRESSOR}/invocations",
        },
        UNTRAINED: {
            "status": "not_loaded",
            "model_version": None,
            "invocations_url": f"/models/{UNTRAINED}/invocations",
        },
    }
    assert gateway.get(f"/models/{REGRESSOR}/version").json()["model_version"] is None

    regressor = gateway.get(f"/models/{REGRESSOR}/health")
    assert regressor.status_code == 200
    assert regressor.json() == {"status": "ok", "model": REGRESSOR, "model_version": "1"}
    assert gateway.get(f"/models/{REGRESSOR}/version").json() == {
        "mlflow": mlflow.__version__,
        "model": REGRESSOR,
        "model_version": "1",
    }
    assert gateway.get(f"/models/{UNTRAINED}/health").status_code == 503
    assert gateway.get(f"/models/{UNTRAINED}/version").json()["model_version"] is None

    # A registered model outside the known set is served (the registry is the truth) and then listed.
    undeployed = gateway.get(f"/models/{UNDEPLOYED}/health")
    assert undeployed.status_code == 503
    health = gateway.get("/health")
    assert health.status_code == 200  # the default model serves; another model's trouble does not change that
    summary = health.json()["models"]
    assert summary[REGRESSOR]["status"] == "ok" and summary[REGRESSOR]["model_version"] == "1"
    assert summary[UNTRAINED]["status"] == "unavailable"
    assert "not registered" in summary[UNTRAINED]["message"]
    assert summary[UNDEPLOYED]["status"] == "unavailable"
    assert "no deployed version" in summary[UNDEPLOYED]["message"]


# --- deployment -----------------------------------------------------------------------------------


def test_staged_version_serves_only_requests_that_ask_for_it(
    gateway: TestClient, registry: Registry, champion: None
) -> None:
    body = registry.records(CLASSIFIER)
    staged = gateway.post(f"/admin/models/{CLASSIFIER}/stage", json={"version": "2"})
    assert staged.status_code == 200, staged.text
    assert staged.json() == {"model": CLASSIFIER, "staged_version": "2", "live_version": None}

    smoke = gateway.post("/invocations", json=body, headers={"X-Model-Version": "2", "X-Caller-Id": "deploy"})
    assert smoke.status_code == 200
    assert smoke.headers["X-Model-Version"] == "2"
    assert p1(smoke) == expected(registry, CLASSIFIER, "2")

    everyone = gateway.post("/invocations", json=body, headers={"X-Caller-Id": "shop"})
    assert everyone.headers["X-Model-Version"] == "1"
    assert p1(everyone) == expected(registry, CLASSIFIER, "1")
    assert gateway.post("/invocations", json=body, headers={"X-Model-Version": "1"}).status_code == 200

    not_served = gateway.post("/invocations", json=body, headers={"X-Model-Version": "7"})
    assert not_served.status_code == 404
    assert "stage it" in not_served.json()["message"]

    listing = gateway.get("/admin/models").json()
    assert listing["default_model"] == CLASSIFIER and listing["champion_alias"] == Alias.CHAMPION
    assert listing["models"][CLASSIFIER] == {
        "live_version": "1",
        "challenger_version": None,
        "challenger_share": 0.0,
        "canary_problem": None,
        "staged_version": "2",
        "loaded_versions": ["1", "2"],
        "alias_mismatch": None,
        "invocations_url": f"/models/{CLASSIFIER}/invocations",
    }
    assert listing["models"][REGRESSOR] == {
        "live_version": None,
        "challenger_version": None,
        "challenger_share": 0.0,
        "canary_problem": None,
        "staged_version": None,
        "loaded_versions": [],
        "alias_mismatch": None,
        "invocations_url": f"/models/{REGRESSOR}/invocations",
    }

    missing = gateway.post(f"/admin/models/{CLASSIFIER}/stage", json={"version": "99"})
    assert missing.status_code == 404
    assert "99" in missing.json()["message"] and "['1', '2']" in missing.json()["message"]
    unknown = gateway.post("/admin/models/no_such_model/stage", json={"version": "1"})
    assert unknown.status_code == 404
    assert "no_such_model" in unknown.json()["message"] and CLASSIFIER in unknown.json()["message"]
    broken = gateway.post(f"/admin/models/{BROKEN}/stage", json={"version": "1"})
    assert broken.status_code == 422
    assert broken.json()["error_code"] == "MODEL_LOAD_FAILED"
    assert "failed to load" in broken.json()["message"]

    unstaged = gateway.delete(f"/admin/models/{CLASSIFIER}/stage")
    assert unstaged.json()["unstaged_version"] == "2"
    assert gateway.post("/invocations", json=body, headers={"X-Model-Version": "2"}).status_code == 404
    assert gateway.get("/admin/models").json()["models"][CLASSIFIER]["loaded_versions"] == ["1"]

    not_served_call = next(
        call for call in logged_calls(gateway.app) if call["request_id"] == not_served.headers["X-Request-Id"]
    )
    assert (not_served_call["status_code"], not_served_call["model_version"]) == (404, None)

    calls = [call for call in logged_calls(gateway.app) if call["status_code"] == 200]
    assert [(call["caller_id"], call["model_version"]) for call in calls] == [
        (CALLER_ID, "2"),
        (CALLER_ID, "1"),
        (CALLER_ID, "1"),
    ]


def test_first_deployment_can_smoke_test_before_any_champion(registry: Registry, tmp_path: Path) -> None:
    with keyed(create_app(make_config(registry, tmp_path, default_model=UNDEPLOYED))) as client:
        assert client.post(f"/admin/models/{UNDEPLOYED}/stage", json={"version": 1}).status_code == 200
        body = registry.records(UNDEPLOYED)
        assert client.post("/invocations", json=body, headers={"X-Model-Version": "1"}).status_code == 200
        assert client.post("/invocations", json=body).status_code == 503


def test_reload_follows_each_recorded_promotion_per_model(
    gateway: TestClient, registry: Registry, champion: None
) -> None:
    """A deployment records the promotion, moves the alias, then reloads: the gateway follows it.

    (Before evidence binding this test moved the alias alone; now the alias must agree with the newest
    authentic promotion record, so each move goes through ``registry.promote`` as the deployment DAG's
    does. An alias moved without a record is the attack tested further down.)"""
    served = gateway.app.state.models
    clicks, spend = registry.records(CLASSIFIER), registry.records(REGRESSOR)
    assert gateway.post("/invocations", json=clicks).headers["X-Model-Version"] == "1"
    assert gateway.post(f"/models/{REGRESSOR}/invocations", json=spend).headers["X-Model-Version"] == "1"
    # Each version is downloaded into its own folder of the gateway's temporary directory.
    workdir = served.workdir
    assert sorted(p.name for p in workdir.iterdir()) == [f"{CLASSIFIER}@1", f"{REGRESSOR}@1"]

    registry.promote(REGRESSOR, "2")
    # No deployment state of its own, but no registry call per request either: the move needs a reload.
    assert gateway.post(f"/models/{REGRESSOR}/invocations", json=spend).headers["X-Model-Version"] == "1"
    reloaded = gateway.post(f"/admin/models/{REGRESSOR}/reload")
    assert reloaded.json() == {
        "model": REGRESSOR,
        "live_version": "2",
        "previous_version": "1",
        "challenger_version": None,
        "challenger_share": 0.0,
        "alias_mismatch": None,
    }
    after = gateway.post(f"/models/{REGRESSOR}/invocations", json=spend)
    assert after.headers["X-Model-Version"] == "2"
    assert after.json()["predictions"] == expected(registry, REGRESSOR, "2")
    assert gateway.get(f"/models/{REGRESSOR}/version").json()["model_version"] == "2"
    # The other model is untouched by this model's deployment.
    assert gateway.post("/invocations", json=clicks).headers["X-Model-Version"] == "1"
    assert gateway.get("/version").json()["model_version"] == "1"
    # The evicted version's download is gone.
    assert sorted(p.name for p in workdir.iterdir()) == [f"{CLASSIFIER}@1", f"{REGRESSOR}@2"]

    registry.promote(CLASSIFIER, "2")
    assert gateway.post(f"/admin/models/{CLASSIFIER}/reload").json()["live_version"] == "2"
    default = gateway.post("/invocations", json=clicks)
    assert default.headers["X-Model-Version"] == "2"
    assert p1(default) == expected(registry, CLASSIFIER, "2")
    status = gateway.get("/admin/models").json()["models"]
    assert (status[CLASSIFIER]["loaded_versions"], status[REGRESSOR]["loaded_versions"]) == (["2"], ["2"])
    assert {
        name: entry["model_version"] for name, entry in gateway.get("/health").json()["models"].items()
    } == {
        CLASSIFIER: "2",
        REGRESSOR: "2",
        UNTRAINED: None,
    }

    # A restart resumes serving the recorded champions (which the aliases agree with).
    with keyed(create_app(gateway.app.state.config)) as restarted:
        assert restarted.post("/invocations", json=clicks).headers["X-Model-Version"] == "2"
        assert (
            restarted.post(f"/models/{REGRESSOR}/invocations", json=spend).headers["X-Model-Version"] == "2"
        )
        restarted_workdir = restarted.app.state.models.workdir
    assert not restarted_workdir.exists()  # shutdown removes the downloads

    assert gateway.post("/admin/models/no_such_model/reload").status_code == 404
    no_alias = gateway.post(f"/admin/models/{UNDEPLOYED}/reload")
    assert no_alias.status_code == 503
    assert no_alias.json()["error_code"] == "NO_DEPLOYED_VERSION"


def test_gateway_leaves_mlflow_process_wide_uris_alone(registry: Registry, tmp_path: Path) -> None:
    before = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    assert registry.tracking_uri not in before
    with keyed(create_app(make_config(registry, tmp_path))) as client:
        assert client.post("/invocations", json=registry.records(CLASSIFIER)).status_code == 200
        assert client.post(f"/admin/models/{REGRESSOR}/stage", json={"version": "2"}).status_code == 200
        assert client.post(f"/admin/models/{REGRESSOR}/reload").status_code == 200
    assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == before


def test_admin_routes_need_the_token(registry: Registry, tmp_path: Path) -> None:
    with keyed(create_app(make_config(registry, tmp_path, admin_token="s3cret"))) as client:
        assert client.get("/admin/models").status_code == 401
        assert client.get("/admin/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        denied = client.post(f"/admin/models/{CLASSIFIER}/reload", headers={"Authorization": "Basic s3cret"})
        assert denied.status_code == 401
        assert "Bearer" in denied.json()["message"]
        assert client.delete(f"/admin/models/{CLASSIFIER}/stage").status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        assert client.get("/admin/models", headers=auth).status_code == 200
        assert client.post(f"/admin/models/{CLASSIFIER}/reload", headers=auth).json()["live_version"] == "1"
        # scoring, health and version stay open
        assert client.get("/ping").status_code == 200
        assert client.get(f"/models/{REGRESSOR}/health").status_code == 200


# --- labels and the log ---------------------------------------------------------------------------


def test_labels_join_the_logged_rows(gateway: TestClient, registry: Registry) -> None:
    before = datetime.now(UTC)
    scored = gateway.post(
        "/invocations",
        json={"dataframe_split": registry.clicks.to_dict(orient="split", index=False)},
        headers={"X-Caller-Id": "shop"},
    )
    request_id = scored.headers["X-Request-Id"]

    accepted = gateway.post("/labels", json={"request_id": request_id, "labels": [1, 0, 0, 1]})
    assert accepted.status_code == 200
    assert accepted.json() == {"request_id": request_id, "accepted": 4}
    assert gateway.post("/labels", json={"request_id": request_id, "labels": [1, 0, 0, 1]}).status_code == 200

    unknown = gateway.post("/labels", json={"request_id": "nope", "labels": [1]})
    assert unknown.status_code == 404
    assert "nope" in unknown.json()["message"]
    wrong_count = gateway.post("/labels", json={"request_id": request_id, "labels": [1, 0]})
    assert wrong_count.status_code == 400
    assert "4 row" in wrong_count.json()["message"]
    assert gateway.post("/labels", json={"request_id": request_id}).status_code == 400

    gateway.app.state.prediction_writer.flush()
    window = gateway.app.state.prediction_log.window(
        CLASSIFIER, before, datetime.now(UTC) + timedelta(seconds=1)
    )
    assert len(window) == 4
    assert window["label"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert window["prediction"].tolist() == expected(registry, CLASSIFIER, "1")
    assert window[CLICK_FEATURES].reset_index(drop=True).equals(registry.clicks[CLICK_FEATURES])
    assert set(window["caller_id"]) == {CALLER_ID} and set(window["model_version"]) == {"1"}


# --- configuration --------------------------------------------------------------------------------


def test_config_from_env_reads_the_catalog(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MODELOPS_DEFAULT_MODEL", raising=False)
    catalog = load_catalog()
    enabled = tuple(sorted(name for name, spec in catalog.models.items() if spec.serving.enabled))
    other = next(name for name in sorted(catalog.models) if name != catalog.platform.default_model)

    keys = {"current": TEST_KEY_ID, "keys": {TEST_KEY_ID: keyring_for_tests().keys[TEST_KEY_ID]}}
    env = {
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "MODELOPS_PREDICTIONS_URL": "sqlite:///x.db",
        "MODELOPS_AUDIT_URL": "sqlite:///audit.db",
        "MODELOPS_AUDIT_KEYS": json.dumps(keys),
        "MODELOPS_GATEWAY_ADMIN_TOKEN": "t",
        "MODELOPS_GATEWAY_KEYS": json.dumps({"shop": key_entry("growth-marketing", KEY)}),
    }
    config = GatewayConfig.from_env(env)
    assert config.default_model == catalog.platform.default_model  # include/modelops.yaml's default_model
    assert config.models == enabled and len(enabled) >= 2
    assert config.admin_token == "t"
    assert (
        config.api_keys is not None and config.api_keys.authenticate(KEY).caller_id == "growth-marketing:shop"
    )
    assert KEY not in repr(config.api_keys) and KEY not in repr(config)
    # Each spec's team may call its model unless serving.allowed_teams says otherwise.
    for name, spec in catalog.models.items():
        assert config.policy(name).allowed_teams == frozenset(spec.serving.allowed_teams or [spec.team])
    assert config.audit_url == "sqlite:///audit.db"
    assert config.audit_keyring == keyring_for_tests()
    # A keyring that is not JSON is refused without quoting it (it holds secrets).
    with pytest.raises(ConfigurationError, match="MODELOPS_AUDIT_KEYS is not valid JSON") as bad_keys:
        GatewayConfig.from_env({**env, "MODELOPS_AUDIT_KEYS": "{secret-material"})
    assert "secret-material" not in str(bad_keys.value)
    config = GatewayConfig.from_env({**env, "MODELOPS_DEFAULT_MODEL": other})
    assert config.default_model == other
    with pytest.raises(ConfigurationError, match=r"MODELOPS_DEFAULT_MODEL='nope' names no model spec"):
        GatewayConfig.from_env({**env, "MODELOPS_DEFAULT_MODEL": "nope"})
    for missing in env:
        with pytest.raises(ConfigurationError, match=missing):
            GatewayConfig.from_env({k: v for k, v in env.items() if k != missing})


def test_config_without_the_audit_log_is_refused(registry: Registry, tmp_path: Path) -> None:
    """A gateway that cannot read the audit log could only trust the registry: it refuses to start."""
    for missing in ({"audit_url": ""}, {"audit_keyring": None}):
        with pytest.raises(ConfigurationError, match="MODELOPS_AUDIT_URL.*MODELOPS_AUDIT_KEYS"):
            make_config(registry, tmp_path, **missing)


def test_module_entry_point_has_a_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    from modelops.serving.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(SystemExit, match="MLFLOW_TRACKING_URI is not set"):
        main([])


def test_the_gateway_imports_no_airflow() -> None:
    code = (
        "import sys, modelops.serving.gateway, modelops.serving.__main__; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'airflow'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


# --- over real HTTP -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LiveServer:
    url: str
    app: FastAPI

    @property
    def host_port(self) -> tuple[str, int]:
        host, port = self.url.removeprefix("http://").split(":")
        return host, int(port)


@pytest.fixture(scope="module")
def live_server(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    app = create_app(make_config(registry, tmp_path_factory.mktemp("server")))
    with serve_in_thread(app) as url:
        yield LiveServer(url, app)


def test_real_uvicorn_server_scores_both_models_over_http(
    live_server: LiveServer, registry: Registry
) -> None:
    with httpx.Client(base_url=live_server.url, timeout=30, trust_env=False, headers=AUTH) as client:
        assert client.get("/ping").status_code == 200
        response = client.post(
            "/invocations",
            json={"dataframe_split": registry.clicks.to_dict(orient="split", index=False)},
            headers={"X-Caller-Id": "httpx"},
        )
        assert response.status_code == 200
        assert response.headers["X-Model-Version"] == "1"
        assert p1(response) == expected(registry, CLASSIFIER, "1")
        csv = io.StringIO()
        registry.clicks.to_csv(csv, index=False)
        assert client.post(
            "/invocations", content=csv.getvalue(), headers={"Content-Type": "text/csv"}
        ).is_success

        regression = client.post(
            f"/models/{REGRESSOR}/invocations",
            json=registry.records(REGRESSOR),
            headers={"X-Caller-Id": "httpx"},
        )
        assert regression.status_code == 200
        assert regression.json()["predictions"] == expected(registry, REGRESSOR, "1")
        assert client.get(f"/models/{REGRESSOR}/health").json()["model_version"] == "1"
        assert client.get("/models/no_such_model/health").status_code == 404
        models = client.get("/health").json()["models"]
        assert (models[CLASSIFIER]["model_version"], models[REGRESSOR]["model_version"]) == ("1", "1")

    logged = {
        (call["model_name"], call["model_version"])
        for call in logged_calls(live_server.app)
        if call["caller_id"] == CALLER_ID
    }
    assert logged == {(CLASSIFIER, "1"), (REGRESSOR, "1")}


def test_mlflow_scoring_client_works_unchanged(live_server: LiveServer, registry: Registry) -> None:
    from mlflow.pyfunc.scoring_server.client import ScoringServerClient

    client = ScoringServerClient(*live_server.host_port)
    client.wait_server_ready(timeout=10)
    # MLflow's client sends no credentials, so the gateway refuses it; its payload, with a key, scores.
    with pytest.raises(Exception, match="error code 401"):
        client.invoke(registry.clicks)
    from mlflow.pyfunc.scoring_server.client import dump_input_data

    response = httpx.post(
        f"{live_server.url}/invocations",
        content=dump_input_data(registry.clicks),
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert [row[1] for row in response.json()["predictions"]] == expected(registry, CLASSIFIER, "1")


# --- attacks: each must be caught (issue 7, "decisions bound to evidence") --------------------------
#
# Each attack gets a registry and audit log of its own (they tamper with both): the classifier's v1 is
# the champion the pipeline deployed (gate approval, promotion record, then the alias), v2 passed the
# gate but was never deployed. The attacker has an MLflow client and the audit database, not the key.

OUTSIDER = "clicks_gateway_outsider"  # registered and given a champion alias with no record at all


@pytest.fixture
def attacked(tmp_path: Path) -> Iterator[Registry]:
    root = tmp_path / "attacked"
    reg = new_registry(root)
    models = trained()
    for version, model in models.classifiers.items():
        assert register(reg.client, reg.experiment_id, CLASSIFIER, model, models.clicks, root) == version
        reg.approve(CLASSIFIER, version)
    reg.promote(CLASSIFIER, "1")
    yield reg
    reg.store.dispose()


def attack_config(registry: Registry, tmp_path: Path) -> GatewayConfig:
    return make_config(registry, tmp_path, models=())


def spy_on_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every model folder the gateway hands to ``mlflow.pyfunc.load_model``, as ``name@version``."""
    loaded: list[str] = []
    real = mlflow.pyfunc.load_model

    def spy(model_uri: str, *args: Any, **kwargs: Any) -> Any:
        loaded.append(Path(model_uri).parent.name)
        return real(model_uri, *args, **kwargs)

    monkeypatch.setattr(mlflow.pyfunc, "load_model", spy)
    return loaded


def move_alias_by_hand(registry: Registry, name: str, version: str) -> None:
    """The attacker's move: the alias set with a plain MLflow client, no pipeline run, no record."""
    mlflow_client(registry.tracking_uri).set_registered_model_alias(name, Alias.CHAMPION, version)


def downloaded(client: TestClient) -> list[str]:
    return sorted(path.name for path in client.app.state.models.workdir.iterdir())


def served_versions(client: TestClient) -> set[str | None]:
    return {call["model_version"] for call in logged_calls(client.app) if call["status_code"] == 200}


def test_alias_moved_outside_the_pipeline_is_reported_and_never_served(
    attacked: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    loads = spy_on_loads(monkeypatch)
    config = attack_config(attacked, tmp_path)
    body = attacked.records(CLASSIFIER)
    with keyed(create_app(config)) as before:
        assert before.post("/invocations", json=body).headers["X-Model-Version"] == "1"

    move_alias_by_hand(attacked, CLASSIFIER, "2")  # v2 passed the gate but deployment never promoted it
    assert attacked.models.version_by_alias(CLASSIFIER, Alias.CHAMPION).version == "2"
    # Whatever logging set-up an earlier test (Airflow's) left behind, the gateway's warning reaches caplog.
    gateway_logger = logging.getLogger("modelops.serving.gateway")
    monkeypatch.setattr(gateway_logger, "disabled", False)
    monkeypatch.setattr(gateway_logger, "propagate", True)

    with (
        caplog.at_level(logging.WARNING, logger="modelops.serving.gateway"),
        keyed(create_app(config)) as restarted,
    ):
        response = restarted.post("/invocations", json=body)
        assert response.status_code == 200, response.text
        assert response.headers["X-Model-Version"] == "1"
        assert p1(response) == expected(attacked, CLASSIFIER, "1")

        health = restarted.get("/health")
        assert health.status_code == 200
        assert health.json()["model_version"] == "1"
        summary = health.json()["models"][CLASSIFIER]
        assert (summary["status"], summary["model_version"]) == ("ok", "1")
        mismatch = summary["alias_mismatch"]
        assert "points at v2" in mismatch and "moved outside the pipeline" in mismatch
        assert "names v1" in mismatch and "v2 is not served" in mismatch

        described = restarted.get("/admin/models").json()["models"][CLASSIFIER]
        assert described["live_version"] == "1" and described["loaded_versions"] == ["1"]
        assert described["alias_mismatch"] == mismatch

        reloaded = restarted.post(f"/admin/models/{CLASSIFIER}/reload")
        assert reloaded.status_code == 200, reloaded.text
        assert reloaded.json()["live_version"] == "1"
        assert "points at v2" in reloaded.json()["alias_mismatch"]

        # Asking for v2 by header does not get it served either.
        smuggled = restarted.post("/invocations", json=body, headers={"X-Model-Version": "2"})
        assert smuggled.status_code == 404
        assert downloaded(restarted) == [f"{CLASSIFIER}@1"]
        assert served_versions(restarted) == {"1"}
    assert any(
        "points at v2" in record.getMessage() for record in caplog.records if record.levelname == "WARNING"
    )
    assert f"{CLASSIFIER}@2" not in loads

    # Through the pipeline's door (promotion record, then the alias), v2 serves and the mismatch clears.
    attacked.promote(CLASSIFIER, "2")
    with keyed(create_app(config)) as deployed:
        response = deployed.post("/invocations", json=body)
        assert response.headers["X-Model-Version"] == "2"
        assert p1(response) == expected(attacked, CLASSIFIER, "2")
        assert "alias_mismatch" not in deployed.get("/health").json()["models"][CLASSIFIER]


def test_alias_with_no_deployment_record_at_all_serves_nothing(
    attacked: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = trained()
    register(
        attacked.client, attacked.experiment_id, OUTSIDER, models.classifiers["2"], models.clicks, tmp_path
    )
    move_alias_by_hand(attacked, OUTSIDER, "1")
    loads = spy_on_loads(monkeypatch)
    with keyed(create_app(attack_config(attacked, tmp_path))) as client:
        response = client.post(f"/models/{OUTSIDER}/invocations", json=attacked.records(CLASSIFIER))
        assert response.status_code == 409
        assert response.json()["error_code"] == "UNVERIFIED_MODEL_VERSION"
        assert "no deployment record" in response.json()["message"]
        health = client.get(f"/models/{OUTSIDER}/health")
        assert health.status_code == 503
        assert "no deployment record" in health.json()["message"]
        summary = client.get("/health").json()["models"][OUTSIDER]
        assert summary["status"] == "unavailable" and "points at v1" in summary["alias_mismatch"]
        reloaded = client.post(f"/admin/models/{OUTSIDER}/reload")
        assert reloaded.status_code == 409
        assert reloaded.json()["error_code"] == "UNVERIFIED_MODEL_VERSION"
        # The classifier, whose champion was recorded, is not affected.
        assert client.post("/invocations", json=attacked.records(CLASSIFIER)).status_code == 200
    assert loads == [f"{CLASSIFIER}@1"]


def replace_model_file(registry: Registry, name: str, version: str, filename: str, tmp_path: Path) -> None:
    """The attacker's overwrite through MLflow's artifact API: the run's ``model/<filename>`` is replaced
    (with another model's ``model.skops``, or an edited ``MLmodel`` that predicts labels, not p1)."""
    found = registry.models.version(name, version)
    assert found.run_id is not None
    replacement = tmp_path / f"replacement-{uuid.uuid4().hex}" / filename
    replacement.parent.mkdir()
    if filename == "model.skops":
        rng_frame, clicked = synthetic_clicks(300, seed=99)
        other = train_classifier(rng_frame, (rng_frame["item_price"] > 150).astype(int))
        source = save_sklearn(other, rng_frame, tmp_path) / "model.skops"
        replacement.write_bytes(source.read_bytes())
    else:
        original = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{found.source}/{filename}",
            dst_path=str(tmp_path / f"original-{uuid.uuid4().hex}"),
            tracking_uri=registry.tracking_uri,
        )
        text = Path(original).read_text()
        assert "predict_fn: predict_proba" in text
        replacement.write_text(text.replace("predict_fn: predict_proba", "predict_fn: predict"))
    mlflow_client(registry.tracking_uri).log_artifact(found.run_id, str(replacement), "model")


@pytest.mark.parametrize("filename", ["model.skops", "MLmodel"])
def test_model_file_overwritten_after_the_decision_is_refused(
    attacked: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, filename: str
) -> None:
    body = attacked.records(CLASSIFIER)
    config = attack_config(attacked, tmp_path)
    with keyed(create_app(config)) as gateway:
        before = gateway.post("/invocations", json=body)
        assert before.headers["X-Model-Version"] == "1"
        genuine_v2 = version_file_hashes(attacked.models, CLASSIFIER, "2")
        # Deployment of v2 got as far as recording the promotion and moving the alias, with v2's genuine
        # files; then the attacker replaced one of them before the gateway reloaded.
        attacked.promote(CLASSIFIER, "2")
        replace_model_file(attacked, CLASSIFIER, "2", filename, tmp_path)
        tampered = version_file_hashes(attacked.models, CLASSIFIER, "2")
        assert tampered[filename] != genuine_v2[filename]
        assert {k: v for k, v in tampered.items() if k != filename} == {
            k: v for k, v in genuine_v2.items() if k != filename
        }
        # The replaced file does change what v2 predicts (so serving it would matter).
        tampered_model = attacked.models.load_pyfunc(CLASSIFIER, "2", tmp_path / "attacker-check")
        tampered_output = np.asarray(tampered_model.predict(attacked.clicks))
        assert tampered_output.shape != (4, 2) or not np.allclose(
            tampered_output[:, 1], attacked.expected[(CLASSIFIER, "2")]
        )

        loads = spy_on_loads(monkeypatch)
        for refused in (
            gateway.post(f"/admin/models/{CLASSIFIER}/stage", json={"version": "2"}),
            gateway.post(f"/admin/models/{CLASSIFIER}/reload"),
        ):
            assert refused.status_code == 409, refused.text
            assert refused.json()["error_code"] == "UNVERIFIED_MODEL_VERSION"
            assert f"{filename} changed" in refused.json()["message"]
            assert "not loaded" in refused.json()["message"]
        assert loads == []
        assert downloaded(gateway) == [f"{CLASSIFIER}@1"]  # the refused download is removed too

        after = gateway.post("/invocations", json=body)
        assert after.status_code == 200
        assert after.headers["X-Model-Version"] == "1"
        assert p1(after) == p1(before) == expected(attacked, CLASSIFIER, "1")
        assert gateway.post("/invocations", json=body, headers={"X-Model-Version": "2"}).status_code == 404
        described = gateway.get("/admin/models").json()["models"][CLASSIFIER]
        assert (described["live_version"], described["staged_version"]) == ("1", None)
        assert described["loaded_versions"] == ["1"]
        assert gateway.get("/health").json()["model_version"] == "1"
        assert served_versions(gateway) == {"1"}

    # A restarted gateway has no verified version to fall back on: it serves nothing rather than v2.
    with keyed(create_app(config)) as restarted:
        refused = restarted.post("/invocations", json=body)
        assert refused.status_code == 409
        assert refused.json()["error_code"] == "UNVERIFIED_MODEL_VERSION"
        health = restarted.get("/health")
        assert health.status_code == 503 and f"{filename} changed" in health.json()["message"]
    assert loads == []


def forge(
    registry: Registry, *, action: str, subject: str, decision: str, details: dict, sign: Callable[[str], str]
) -> int:
    """Insert a record straight into the audit table with SQL, as someone with database access but not
    the key would: the right seq, prev_hash and record_hash, and ``sign(record_hash)`` as its HMAC."""
    engine = sa.create_engine(registry.audit_url)
    table = sa.table(TABLE_NAME, *(sa.column(name) for name in AuditRecord.__dataclass_fields__))
    try:
        with engine.begin() as conn:
            tail = conn.execute(
                sa.text(f"SELECT seq, record_hash FROM {TABLE_NAME} ORDER BY seq DESC LIMIT 1")
            ).one()
            fields: dict[str, Any] = {
                "seq": tail.seq + 1,
                "recorded_at": datetime.now(UTC).isoformat(timespec="microseconds"),
                "actor": "airflow",
                "dag_id": "modelops_deployment",
                "run_id": "manual__forged",
                "task_id": "deploy",
                "action": action,
                "subject": subject,
                "decision": decision,
                "details": details,
                "evidence": {},
                "prev_hash": tail.record_hash,
                "key_id": TEST_KEY_ID,  # claims the real key
            }
            fields["record_hash"] = compute_record_hash(fields)
            fields["hmac"] = sign(fields["record_hash"])
            conn.execute(
                table.insert().values(
                    **fields | {"details": canonical_json(details), "evidence": canonical_json({})}
                )
            )
    finally:
        engine.dispose()
    return fields["seq"]


FORGED_MACS: dict[str, Callable[[str], str]] = {
    # No HMAC at all (the column is NOT NULL, so an empty one).
    "absent": lambda _record_hash: "",
    # The HMAC of the very record_hash, under a key the forger made up.
    "wrong key": lambda record_hash: hmac.new(
        b"attacker-key-0123456789abcdefghijklmno", record_hash.encode(), hashlib.sha256
    ).hexdigest(),
}


@pytest.mark.parametrize("forgery", sorted(FORGED_MACS))
def test_forged_promotion_record_without_the_key_is_ignored(
    attacked: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, forgery: str
) -> None:
    # The genuine files of v2 (which the gate did approve): only the key is missing.
    files = version_file_hashes(attacked.models, CLASSIFIER, "2")
    seq = forge(
        attacked,
        action=AuditAction.MODEL_DEPLOYED,
        subject=model_subject(CLASSIFIER, "2"),
        decision=Decision.PROMOTED,
        details={CHAMPION_FIELD: "2", **evidence_summary(files)},
        sign=FORGED_MACS[forgery],
    )
    move_alias_by_hand(attacked, CLASSIFIER, "2")

    [forged] = attacked.store.records(
        action=AuditAction.MODEL_DEPLOYED, subject=model_subject(CLASSIFIER, "2")
    )
    assert forged.seq == seq and forged.details[CHAMPION_FIELD] == "2"
    assert compute_record_hash(forged.to_dict()) == forged.record_hash  # a well-formed record ...
    assert not attacked.store.authentic(forged)  # ... that the key did not sign

    loads = spy_on_loads(monkeypatch)
    body = attacked.records(CLASSIFIER)
    with keyed(create_app(attack_config(attacked, tmp_path))) as gateway:
        response = gateway.post("/invocations", json=body)
        assert response.status_code == 200
        assert response.headers["X-Model-Version"] == "1"
        assert p1(response) == expected(attacked, CLASSIFIER, "1")
        mismatch = gateway.get("/health").json()["models"][CLASSIFIER]["alias_mismatch"]
        assert "points at v2" in mismatch and "names v1" in mismatch
        reloaded = gateway.post(f"/admin/models/{CLASSIFIER}/reload").json()
        assert reloaded["live_version"] == "1" and "points at v2" in reloaded["alias_mismatch"]
        assert gateway.get("/admin/models").json()["models"][CLASSIFIER]["loaded_versions"] == ["1"]
        assert served_versions(gateway) == {"1"}
    assert loads == [f"{CLASSIFIER}@1"]


class MarkerModel(mlflow.pyfunc.PythonModel):
    """A custom pyfunc whose code runs when it is loaded: it leaves a marker file behind."""

    def load_context(self, context: Any) -> None:
        Path(context.model_config["marker"]).write_text("the attacker's code ran")

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> list[float]:
        return [0.999] * len(model_input)


def test_version_registered_straight_into_mlflow_is_not_staged_and_runs_no_code(
    attacked: Registry, tmp_path: Path
) -> None:
    marker = tmp_path / "code-ran.txt"
    folder = tmp_path / "marker-model"
    mlflow.pyfunc.save_model(
        str(folder), python_model=MarkerModel(), model_config={"marker": str(marker)}, pip_requirements=[]
    )
    assert not marker.exists()
    # Registered by hand, with the tags the pipeline would set, so the registry says "approved".
    tags = {
        Tag.COMPLIANCE_STATUS: Decision.APPROVED,
        Tag.COMPLIANCE_POLICY: "default",
        Tag.TRAIN_DATA_SHA256: "0" * 64,
        Tag.TRAIN_DATA_URI: "file:///data/clicks.csv",
        Tag.AIRFLOW_DAG_ID: "modelops_training",
        Tag.AIRFLOW_RUN_ID: "manual__2026-01-01",
    }
    version = register_folder(
        attacked.client, attacked.experiment_id, CLASSIFIER, folder, tags={str(k): v for k, v in tags.items()}
    )
    assert version == "3"
    assert attacked.models.version(CLASSIFIER, version).tags[Tag.COMPLIANCE_STATUS] == Decision.APPROVED

    body = attacked.records(CLASSIFIER)
    config = attack_config(attacked, tmp_path)
    with keyed(create_app(config)) as gateway:
        assert gateway.post("/invocations", json=body).headers["X-Model-Version"] == "1"
        refused = gateway.post(f"/admin/models/{CLASSIFIER}/stage", json={"version": version})
        assert refused.status_code == 409, refused.text
        assert refused.json()["error_code"] == "UNVERIFIED_MODEL_VERSION"
        assert "no authentic compliance gate decision" in refused.json()["message"]
        assert "compliance_status do not count" in refused.json()["message"]
        assert not marker.exists()

        # A gate approval forged with SQL (the version's true hashes, no key) does not count either.
        seq = forge(
            attacked,
            action=AuditAction.GATE_DECIDED,
            subject=model_subject(CLASSIFIER, version),
            decision=Decision.APPROVED,
            details=evidence_summary(version_file_hashes(attacked.models, CLASSIFIER, version)),
            sign=FORGED_MACS["absent"],
        )
        refused = gateway.post(f"/admin/models/{CLASSIFIER}/stage", json={"version": version})
        assert refused.status_code == 409
        assert f"seq={seq}" in refused.json()["message"] and "HMAC" in refused.json()["message"]
        assert not marker.exists()

        described = gateway.get("/admin/models").json()["models"][CLASSIFIER]
        assert (described["staged_version"], described["loaded_versions"]) == (None, ["1"])
        assert (
            gateway.post("/invocations", json=body, headers={"X-Model-Version": version}).status_code == 404
        )
        assert downloaded(gateway) == [f"{CLASSIFIER}@1"]

    # Nor does moving the alias onto it and restarting the gateway.
    move_alias_by_hand(attacked, CLASSIFIER, version)
    with keyed(create_app(config)) as restarted:
        response = restarted.post("/invocations", json=body)
        assert response.headers["X-Model-Version"] == "1"
        assert p1(response) == expected(attacked, CLASSIFIER, "1")
        assert (
            f"points at v{version}" in restarted.get("/health").json()["models"][CLASSIFIER]["alias_mismatch"]
        )
        assert not marker.exists()

        # The control: with an authentic gate approval the same version stages, and its code runs on load,
        # so the marker's absence above shows the gateway never loaded it.
        attacked.approve(CLASSIFIER, version)
        staged = restarted.post(f"/admin/models/{CLASSIFIER}/stage", json={"version": version})
        assert staged.status_code == 200, staged.text
    assert marker.read_text() == "the attacker's code ran"
