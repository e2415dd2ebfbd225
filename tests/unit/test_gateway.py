"""The scoring gateway against a real MLflow registry (SQLite store under tmp_path) holding two models.

The models are saved with ``mlflow.sklearn.save_model`` and registered through an ``MlflowClient`` bound
to the test's registry, so nothing here touches MLflow's process-wide tracking or registry URI (and the
gateway must not either).
"""

from __future__ import annotations

import io
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import mlflow
import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

from modelops.errors import ConfigurationError
from modelops.serving.gateway import GatewayConfig, create_app
from modelops.serving.prediction_log import PredictionLog
from modelops.settings import load_catalog
from modelops.vocabulary import Alias
from tests.support import serve_in_thread

# skops resolves names through module attributes, which trips Airflow's deprecated-import shims.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CLASSIFIER = "clicks_gateway_test"  # the default model: also answers at /invocations
REGRESSOR = "spend_gateway_test"
UNDEPLOYED = "clicks_gateway_undeployed"  # registered, never deployed
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


@dataclass(frozen=True)
class Registry:
    tracking_uri: str
    client: MlflowClient
    clicks: pd.DataFrame  # sample rows of the classifier
    spend: pd.DataFrame  # sample rows of the regressor
    expected: dict[tuple[str, str], np.ndarray]  # (model, version) -> p1 (classifier) or prediction

    def records(self, model: str) -> dict[str, Any]:
        frame = self.clicks if model != REGRESSOR else self.spend
        return {"dataframe_records": frame.to_dict(orient="records")}


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


def register(
    client: MlflowClient, experiment_id: str, name: str, model, features: pd.DataFrame, tmp: Path
) -> str:
    """Save ``model`` locally, log the folder as a run's artifacts, register it as a version of ``name``."""
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
    run = client.create_run(experiment_id)
    client.log_artifacts(run.info.run_id, str(folder), "model")
    client.set_terminated(run.info.run_id)
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    source = f"{run.info.artifact_uri}/model"
    return str(client.create_model_version(name, source, run_id=run.info.run_id).version)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    root = tmp_path_factory.mktemp("mlflow")
    tracking_uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    experiment_id = client.create_experiment("gateway-tests", artifact_location=(root / "artifacts").as_uri())

    clicks, clicked = synthetic_clicks(300, seed=1)
    classifiers = {"1": train_classifier(clicks, clicked), "2": train_classifier(clicks, 1 - clicked)}
    spend_frame, spend = synthetic_spend(200, seed=2)
    regressors = {"1": train_regressor(spend_frame, spend), "2": train_regressor(spend_frame, -spend)}
    for version, model in classifiers.items():  # v2 is the opposite model: easy to tell apart
        assert register(client, experiment_id, CLASSIFIER, model, clicks, root) == version
    for version, model in regressors.items():
        assert register(client, experiment_id, REGRESSOR, model, spend_frame, root) == version
    register(client, experiment_id, UNDEPLOYED, classifiers["1"], clicks, root)
    client.create_registered_model(BROKEN)
    not_a_model = root / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "README").write_text("no MLmodel here")
    client.create_model_version(BROKEN, source=not_a_model.as_uri())
    client.set_registered_model_alias(CLASSIFIER, Alias.CHAMPION, "1")
    client.set_registered_model_alias(REGRESSOR, Alias.CHAMPION, "1")

    sample_clicks = synthetic_clicks(4, seed=7)[0]
    sample_spend = synthetic_spend(3, seed=8)[0]
    expected = {
        **{(CLASSIFIER, v): m.predict_proba(sample_clicks)[:, 1] for v, m in classifiers.items()},
        **{(REGRESSOR, v): m.predict(sample_spend) for v, m in regressors.items()},
    }
    return Registry(tracking_uri, client, sample_clicks, sample_spend, expected)


@pytest.fixture
def champion(registry: Registry) -> Iterator[None]:
    """Tests that move an alias put both champions back on version 1."""
    yield
    for name in (CLASSIFIER, REGRESSOR):
        registry.client.set_registered_model_alias(name, Alias.CHAMPION, "1")


def make_config(registry: Registry, tmp_path: Path, **overrides: Any) -> GatewayConfig:
    settings: dict[str, Any] = {
        "tracking_uri": registry.tracking_uri,
        "predictions_url": f"sqlite:///{tmp_path}/predictions.db",
        "default_model": CLASSIFIER,
        "models": (REGRESSOR, UNTRAINED),
        **overrides,
    }
    return GatewayConfig(**settings)


@pytest.fixture
def gateway(registry: Registry, tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(make_config(registry, tmp_path))) as client:
        yield client


def logged_calls(app: FastAPI) -> list[dict]:
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
    assert {call["caller_id"] for call in calls} == {"anonymous"}


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
    window = gateway.app.state.prediction_log.window(
        REGRESSOR, before, datetime.now(UTC) + timedelta(seconds=1)
    )
    assert window["prediction"].tolist() == expected(registry, REGRESSOR, "1")
    assert set(window["caller_id"]) == {"crm"}


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
    assert missing.json()["error_code"] == "BAD_REQUEST"
    assert "item_price" in missing.json()["message"]
    assert missing.headers["X-Model-Version"] == "1"

    wrong_type = gateway.post("/invocations", json={"dataframe_records": [{**records[0], "user_age": "old"}]})
    assert wrong_type.status_code == 400
    assert "user_age" in wrong_type.json()["message"]

    unsupported = gateway.post("/invocations", content=b"x", headers={"Content-Type": "text/plain"})
    assert unsupported.status_code == 415

    calls = logged_calls(gateway.app)
    assert [call["status_code"] for call in calls] == [400] * 6 + [415]
    assert all(call["error"] for call in calls)
    missing_call = next(call for call in calls if call["request_id"] == missing.headers["X-Request-Id"])
    assert missing_call["n_rows"] == 4  # parsed rows are kept even when scoring fails
    assert missing_call["model_version"] == "1"


def test_model_without_champion_is_503_naming_it(registry: Registry, tmp_path: Path) -> None:
    with TestClient(create_app(make_config(registry, tmp_path, default_model=UNDEPLOYED))) as client:
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
        assert (call["status_code"], call["model_version"], call["caller_id"]) == (503, None, "shop")
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
        "staged_version": "2",
        "loaded_versions": ["1", "2"],
        "invocations_url": f"/models/{CLASSIFIER}/invocations",
    }
    assert listing["models"][REGRESSOR] == {
        "live_version": None,
        "staged_version": None,
        "loaded_versions": [],
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
        ("deploy", "2"),
        ("shop", "1"),
        ("anonymous", "1"),
    ]


def test_first_deployment_can_smoke_test_before_any_champion(registry: Registry, tmp_path: Path) -> None:
    with TestClient(create_app(make_config(registry, tmp_path, default_model=UNDEPLOYED))) as client:
        assert client.post(f"/admin/models/{UNDEPLOYED}/stage", json={"version": 1}).status_code == 200
        body = registry.records(UNDEPLOYED)
        assert client.post("/invocations", json=body, headers={"X-Model-Version": "1"}).status_code == 200
        assert client.post("/invocations", json=body).status_code == 503


def test_reload_follows_the_alias_per_model(gateway: TestClient, registry: Registry, champion: None) -> None:
    served = gateway.app.state.models
    clicks, spend = registry.records(CLASSIFIER), registry.records(REGRESSOR)
    assert gateway.post("/invocations", json=clicks).headers["X-Model-Version"] == "1"
    assert gateway.post(f"/models/{REGRESSOR}/invocations", json=spend).headers["X-Model-Version"] == "1"
    # Each version is downloaded into its own folder of the gateway's temporary directory.
    workdir = served.workdir
    assert sorted(p.name for p in workdir.iterdir()) == [f"{CLASSIFIER}@1", f"{REGRESSOR}@1"]

    registry.client.set_registered_model_alias(REGRESSOR, Alias.CHAMPION, "2")
    # No deployment state of its own, but no registry call per request either: the move needs a reload.
    assert gateway.post(f"/models/{REGRESSOR}/invocations", json=spend).headers["X-Model-Version"] == "1"
    reloaded = gateway.post(f"/admin/models/{REGRESSOR}/reload")
    assert reloaded.json() == {"model": REGRESSOR, "live_version": "2", "previous_version": "1"}
    after = gateway.post(f"/models/{REGRESSOR}/invocations", json=spend)
    assert after.headers["X-Model-Version"] == "2"
    assert after.json()["predictions"] == expected(registry, REGRESSOR, "2")
    assert gateway.get(f"/models/{REGRESSOR}/version").json()["model_version"] == "2"
    # The other model is untouched by this model's deployment.
    assert gateway.post("/invocations", json=clicks).headers["X-Model-Version"] == "1"
    assert gateway.get("/version").json()["model_version"] == "1"
    # The evicted version's download is gone.
    assert sorted(p.name for p in workdir.iterdir()) == [f"{CLASSIFIER}@1", f"{REGRESSOR}@2"]

    registry.client.set_registered_model_alias(CLASSIFIER, Alias.CHAMPION, "2")
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

    # A restart resumes serving whatever the registry says.
    with TestClient(create_app(gateway.app.state.config)) as restarted:
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
    with TestClient(create_app(make_config(registry, tmp_path))) as client:
        assert client.post("/invocations", json=registry.records(CLASSIFIER)).status_code == 200
        assert client.post(f"/admin/models/{REGRESSOR}/stage", json={"version": "2"}).status_code == 200
        assert client.post(f"/admin/models/{REGRESSOR}/reload").status_code == 200
    assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == before


def test_admin_routes_need_the_token(registry: Registry, tmp_path: Path) -> None:
    with TestClient(create_app(make_config(registry, tmp_path, admin_token="s3cret"))) as client:
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

    window = gateway.app.state.prediction_log.window(
        CLASSIFIER, before, datetime.now(UTC) + timedelta(seconds=1)
    )
    assert len(window) == 4
    assert window["label"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert window["prediction"].tolist() == expected(registry, CLASSIFIER, "1")
    assert window[CLICK_FEATURES].reset_index(drop=True).equals(registry.clicks[CLICK_FEATURES])
    assert set(window["caller_id"]) == {"shop"} and set(window["model_version"]) == {"1"}


# --- configuration --------------------------------------------------------------------------------


def test_config_from_env_reads_the_catalog(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MODELOPS_DEFAULT_MODEL", raising=False)
    catalog = load_catalog()
    enabled = tuple(sorted(name for name, spec in catalog.models.items() if spec.serving.enabled))
    other = next(name for name in sorted(catalog.models) if name != catalog.platform.default_model)

    env = {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "MODELOPS_PREDICTIONS_URL": "sqlite:///x.db"}
    config = GatewayConfig.from_env(env)
    assert config.default_model == catalog.platform.default_model  # include/modelops.yaml's default_model
    assert config.models == enabled and len(enabled) >= 2
    assert config.admin_token is None
    config = GatewayConfig.from_env(
        {**env, "MODELOPS_DEFAULT_MODEL": other, "MODELOPS_GATEWAY_ADMIN_TOKEN": "t"}
    )
    assert (config.default_model, config.admin_token) == (other, "t")
    with pytest.raises(ConfigurationError, match=r"MODELOPS_DEFAULT_MODEL='nope' names no model spec"):
        GatewayConfig.from_env({**env, "MODELOPS_DEFAULT_MODEL": "nope"})
    for missing in env:
        with pytest.raises(ConfigurationError, match=missing):
            GatewayConfig.from_env({k: v for k, v in env.items() if k != missing})


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
    with httpx.Client(base_url=live_server.url, timeout=30, trust_env=False) as client:
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
        if call["caller_id"] == "httpx"
    }
    assert logged == {(CLASSIFIER, "1"), (REGRESSOR, "1")}


def test_mlflow_scoring_client_works_unchanged(live_server: LiveServer, registry: Registry) -> None:
    from mlflow.pyfunc.scoring_server.client import ScoringServerClient

    client = ScoringServerClient(*live_server.host_port)
    client.wait_server_ready(timeout=10)
    predictions = client.invoke(registry.clicks).get_predictions()
    assert predictions.iloc[:, 1].tolist() == expected(registry, CLASSIFIER, "1")
