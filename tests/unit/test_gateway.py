"""The scoring gateway against a real MLflow registry (SQLite store under tmp_path)."""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

from modelops.errors import ConfigurationError
from modelops.serving.gateway import GatewayConfig, create_app
from modelops.serving.prediction_log import PredictionLog
from tests.support import serve_in_thread

# skops resolves names through module attributes, which trips Airflow's deprecated-import shims.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

MODEL = "ctr_gateway_test"
UNDEPLOYED = "ctr_gateway_undeployed"
BROKEN = "ctr_gateway_broken"
FEATURES = [
    "user_age",
    "user_balance",
    "click_history_length",
    "item_price",
    "hour_of_day",
    "item_category",
    "device",
]


@dataclass(frozen=True)
class Registry:
    tracking_uri: str
    client: MlflowClient
    sample: pd.DataFrame
    expected: dict[str, np.ndarray]  # version -> p1 of the sample rows


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


def train(features: pd.DataFrame, target: pd.Series):
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    numeric = FEATURES[:5]
    preprocess = ColumnTransformer(
        [
            ("num", StandardScaler(), numeric),
            ("cat", OneHotEncoder(handle_unknown="ignore"), ["item_category", "device"]),
        ]
    )
    return Pipeline([("pre", preprocess), ("clf", LogisticRegression(max_iter=1000))]).fit(features, target)


def log_version(model, features: pd.DataFrame, name: str, experiment_id: str, tmp: Path) -> str:
    import skops.io

    probe = tmp / f"probe-{uuid.uuid4().hex}.skops"
    skops.io.dump(model, probe)
    trusted = skops.io.get_untrusted_types(file=probe)
    with mlflow.start_run(experiment_id=experiment_id):
        info = mlflow.sklearn.log_model(
            model,
            name="model",
            registered_model_name=name,
            signature=infer_signature(features, model.predict_proba(features)),
            input_example=features.head(3),
            pyfunc_predict_fn="predict_proba",
            skops_trusted_types=trusted,
            # Explicit requirements skip MLflow's inference, which re-imports the model in a subprocess.
            pip_requirements=["scikit-learn", "skops"],
        )
    return str(info.registered_model_version)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    root = tmp_path_factory.mktemp("mlflow")
    tracking_uri = f"sqlite:///{root}/mlflow.db"
    previous_tracking, previous_registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    experiment_id = client.create_experiment("gateway-tests", artifact_location=(root / "artifacts").as_uri())

    features, clicked = synthetic_clicks(300, seed=1)
    v1_model = train(features, clicked)
    v2_model = train(features, 1 - clicked)  # the opposite model: its predictions are easy to tell apart
    v1 = log_version(v1_model, features, MODEL, experiment_id, root)
    v2 = log_version(v2_model, features, MODEL, experiment_id, root)
    assert (v1, v2) == ("1", "2")
    log_version(v1_model, features, UNDEPLOYED, experiment_id, root)
    # A version whose artifacts are not a model: staging it must fail with the reason.
    client.create_registered_model(BROKEN)
    not_a_model = root / "not-a-model"
    not_a_model.mkdir()
    client.create_model_version(BROKEN, source=not_a_model.as_uri())
    client.set_registered_model_alias(MODEL, "champion", "1")

    sample = synthetic_clicks(4, seed=7)[0]
    yield Registry(
        tracking_uri=tracking_uri,
        client=client,
        sample=sample,
        expected={"1": v1_model.predict_proba(sample)[:, 1], "2": v2_model.predict_proba(sample)[:, 1]},
    )
    mlflow.set_tracking_uri(previous_tracking)
    mlflow.set_registry_uri(previous_registry)


@pytest.fixture
def champion(registry: Registry) -> Iterator[None]:
    """Tests that move the alias put it back on version 1."""
    yield
    registry.client.set_registered_model_alias(MODEL, "champion", "1")


def make_config(registry: Registry, tmp_path: Path, **overrides) -> GatewayConfig:
    return GatewayConfig(
        tracking_uri=registry.tracking_uri,
        predictions_url=f"sqlite:///{tmp_path}/predictions.db",
        default_model=MODEL,
        **overrides,
    )


@pytest.fixture
def gateway(registry: Registry, tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(make_config(registry, tmp_path))) as client:
        yield client


def logged_calls(client: TestClient) -> list[dict]:
    log: PredictionLog = client.app.state.prediction_log
    table = sa.table(
        "modelops_predictions",
        *(sa.column(name) for name in ("request_id", "caller_id", "model_name", "model_version")),
        *(sa.column(name) for name in ("status_code", "n_rows", "error", "received_at", "latency_ms")),
    )
    with log.engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(sa.select(table).order_by(table.c.received_at))]


def p1(response: httpx.Response) -> list[float]:
    return [row[1] for row in response.json()["predictions"]]


# --- scoring --------------------------------------------------------------------------------------


def test_every_mlflow_input_format_scores_the_champion(gateway: TestClient, registry: Registry) -> None:
    sample = registry.sample
    expected = pytest.approx(list(registry.expected["1"]))
    bodies = {
        "dataframe_split": {"dataframe_split": sample.to_dict(orient="split", index=False)},
        "dataframe_records": {"dataframe_records": sample.to_dict(orient="records")},
        "inputs": {"inputs": sample.to_dict(orient="records")},
        "inputs+params": {"inputs": sample.to_dict(orient="records"), "params": {}},
    }
    for label, body in bodies.items():
        response = gateway.post("/invocations", json=body)
        assert response.status_code == 200, (label, response.text)
        assert p1(response) == expected, label
        assert response.headers["X-Model-Version"] == "1"
        assert len(response.headers["X-Request-Id"]) == 32

    response = gateway.post(
        f"/models/{MODEL}/invocations",
        content=sample.to_csv(index=False),
        headers={"Content-Type": "text/csv"},
    )
    assert response.status_code == 200, response.text
    assert p1(response) == expected

    calls = logged_calls(gateway)
    assert [call["status_code"] for call in calls] == [200] * 5
    assert {call["model_version"] for call in calls} == {"1"}
    assert {call["n_rows"] for call in calls} == {4}
    assert {call["caller_id"] for call in calls} == {"anonymous"}


def test_bad_requests_are_400_naming_the_problem(gateway: TestClient, registry: Registry) -> None:
    records = registry.sample.to_dict(orient="records")

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

    calls = logged_calls(gateway)
    assert [call["status_code"] for call in calls] == [400] * 6 + [415]
    assert all(call["error"] for call in calls)
    missing_call = next(call for call in calls if call["request_id"] == missing.headers["X-Request-Id"])
    assert missing_call["n_rows"] == 4  # parsed rows are kept even when scoring fails
    assert missing_call["model_version"] == "1"


def test_model_without_champion_is_503_naming_it(registry: Registry, tmp_path: Path) -> None:
    config = GatewayConfig(
        tracking_uri=registry.tracking_uri,
        predictions_url=f"sqlite:///{tmp_path}/predictions.db",
        default_model=UNDEPLOYED,
    )
    with TestClient(create_app(config)) as client:
        response = client.post(
            "/invocations",
            json={"dataframe_records": registry.sample.to_dict(orient="records")},
            headers={"X-Caller-Id": "shop"},
        )
        assert response.status_code == 503
        assert response.json()["error_code"] == "NO_DEPLOYED_VERSION"
        assert (
            f"model '{UNDEPLOYED}' has no deployed version (no 'champion' alias)"
            in response.json()["message"]
        )
        assert "X-Model-Version" not in response.headers

        for path in ("/ping", "/health"):
            health = client.get(path)
            assert health.status_code == 503
            assert UNDEPLOYED in health.json()["message"]
        assert client.get("/version").json()["model_version"] is None

        [call] = logged_calls(client)
        assert (call["status_code"], call["model_version"], call["caller_id"]) == (503, None, "shop")
        assert call["request_id"] == response.headers["X-Request-Id"]


def test_unknown_model_is_404(gateway: TestClient, registry: Registry) -> None:
    response = gateway.post(
        "/models/no_such_model/invocations",
        json={"dataframe_records": registry.sample.to_dict(orient="records")},
    )
    assert response.status_code == 404
    assert "no_such_model" in response.json()["message"]
    [call] = logged_calls(gateway)
    assert (call["status_code"], call["model_name"]) == (404, "no_such_model")


def test_health_and_version(gateway: TestClient) -> None:
    assert gateway.get("/version").json()["model_version"] is None  # nothing loaded yet: lazy
    for path in ("/ping", "/health"):
        response = gateway.get(path)
        assert response.status_code == 200
        assert response.json()["model_version"] == "1"
    assert gateway.get("/version").json() == {
        "mlflow": mlflow.__version__,
        "model": MODEL,
        "model_version": "1",
    }


# --- deployment -----------------------------------------------------------------------------------


def test_staged_version_serves_only_requests_that_ask_for_it(
    gateway: TestClient, registry: Registry, champion: None
) -> None:
    body = {"dataframe_records": registry.sample.to_dict(orient="records")}
    staged = gateway.post(f"/admin/models/{MODEL}/stage", json={"version": "2"})
    assert staged.status_code == 200, staged.text
    assert staged.json() == {"model": MODEL, "staged_version": "2", "live_version": None}

    smoke = gateway.post("/invocations", json=body, headers={"X-Model-Version": "2", "X-Caller-Id": "deploy"})
    assert smoke.status_code == 200
    assert smoke.headers["X-Model-Version"] == "2"
    assert p1(smoke) == pytest.approx(list(registry.expected["2"]))

    everyone = gateway.post("/invocations", json=body, headers={"X-Caller-Id": "shop"})
    assert everyone.headers["X-Model-Version"] == "1"
    assert p1(everyone) == pytest.approx(list(registry.expected["1"]))
    assert gateway.post("/invocations", json=body, headers={"X-Model-Version": "1"}).status_code == 200

    not_served = gateway.post("/invocations", json=body, headers={"X-Model-Version": "7"})
    assert not_served.status_code == 404
    assert "stage it" in not_served.json()["message"]

    listing = gateway.get("/admin/models").json()
    assert listing["models"][MODEL] == {
        "live_version": "1",
        "staged_version": "2",
        "loaded_versions": ["1", "2"],
    }

    missing = gateway.post(f"/admin/models/{MODEL}/stage", json={"version": "99"})
    assert missing.status_code == 404
    assert "99" in missing.json()["message"]
    assert gateway.post("/admin/models/no_such_model/stage", json={"version": "1"}).status_code == 404
    broken = gateway.post(f"/admin/models/{BROKEN}/stage", json={"version": "1"})
    assert broken.status_code == 422
    assert broken.json()["error_code"] == "MODEL_LOAD_FAILED"
    assert "failed to load" in broken.json()["message"]

    unstaged = gateway.delete(f"/admin/models/{MODEL}/stage")
    assert unstaged.json()["unstaged_version"] == "2"
    assert gateway.post("/invocations", json=body, headers={"X-Model-Version": "2"}).status_code == 404
    assert gateway.get("/admin/models").json()["models"][MODEL]["loaded_versions"] == ["1"]

    not_served_call = next(
        call for call in logged_calls(gateway) if call["request_id"] == not_served.headers["X-Request-Id"]
    )
    assert (not_served_call["status_code"], not_served_call["model_version"]) == (404, None)

    calls = [call for call in logged_calls(gateway) if call["status_code"] == 200]
    assert [(call["caller_id"], call["model_version"]) for call in calls] == [
        ("deploy", "2"),
        ("shop", "1"),
        ("anonymous", "1"),
    ]


def test_first_deployment_can_smoke_test_before_any_champion(registry: Registry, tmp_path: Path) -> None:
    config = GatewayConfig(
        tracking_uri=registry.tracking_uri,
        predictions_url=f"sqlite:///{tmp_path}/predictions.db",
        default_model=UNDEPLOYED,
    )
    with TestClient(create_app(config)) as client:
        assert client.post(f"/admin/models/{UNDEPLOYED}/stage", json={"version": 1}).status_code == 200
        body = {"dataframe_records": registry.sample.to_dict(orient="records")}
        assert client.post("/invocations", json=body, headers={"X-Model-Version": "1"}).status_code == 200
        assert client.post("/invocations", json=body).status_code == 503


def test_reload_follows_the_alias(gateway: TestClient, registry: Registry, champion: None) -> None:
    body = {"dataframe_records": registry.sample.to_dict(orient="records")}
    assert gateway.post("/invocations", json=body).headers["X-Model-Version"] == "1"

    registry.client.set_registered_model_alias(MODEL, "champion", "2")
    # No deployment state of its own, but no registry call per request either: the move takes effect on reload.
    assert gateway.post("/invocations", json=body).headers["X-Model-Version"] == "1"
    reloaded = gateway.post(f"/admin/models/{MODEL}/reload")
    assert reloaded.json() == {"model": MODEL, "live_version": "2", "previous_version": "1"}
    after = gateway.post("/invocations", json=body)
    assert after.headers["X-Model-Version"] == "2"
    assert p1(after) == pytest.approx(list(registry.expected["2"]))
    assert gateway.get("/version").json()["model_version"] == "2"
    assert gateway.get("/admin/models").json()["models"][MODEL]["loaded_versions"] == ["2"]

    # A restart resumes serving whatever the registry says.
    app = create_app(gateway.app.state.config)
    with TestClient(app) as restarted:
        assert restarted.post("/invocations", json=body).headers["X-Model-Version"] == "2"

    assert gateway.post("/admin/models/no_such_model/reload").status_code == 404
    no_alias = gateway.post(f"/admin/models/{UNDEPLOYED}/reload")
    assert no_alias.status_code == 503
    assert no_alias.json()["error_code"] == "NO_DEPLOYED_VERSION"


def test_admin_routes_need_the_token(registry: Registry, tmp_path: Path) -> None:
    with TestClient(create_app(make_config(registry, tmp_path, admin_token="s3cret"))) as client:
        assert client.get("/admin/models").status_code == 401
        assert client.get("/admin/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        denied = client.post(f"/admin/models/{MODEL}/reload", headers={"Authorization": "Basic s3cret"})
        assert denied.status_code == 401
        assert "Bearer" in denied.json()["message"]
        assert client.delete(f"/admin/models/{MODEL}/stage").status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        assert client.get("/admin/models", headers=auth).status_code == 200
        assert client.post(f"/admin/models/{MODEL}/reload", headers=auth).json()["live_version"] == "1"
        assert client.get("/ping").status_code == 200  # scoring and health stay open


# --- labels and the log ---------------------------------------------------------------------------


def test_labels_join_the_logged_rows(gateway: TestClient, registry: Registry) -> None:
    before = datetime.now(UTC)
    scored = gateway.post(
        "/invocations",
        json={"dataframe_split": registry.sample.to_dict(orient="split", index=False)},
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

    window = gateway.app.state.prediction_log.window(MODEL, before, datetime.now(UTC) + timedelta(seconds=1))
    assert len(window) == 4
    assert window["label"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert window["prediction"].tolist() == pytest.approx(list(registry.expected["1"]))
    assert window[FEATURES].reset_index(drop=True).equals(registry.sample[FEATURES])
    assert set(window["caller_id"]) == {"shop"} and set(window["model_version"]) == {"1"}


# --- configuration --------------------------------------------------------------------------------


def test_config_from_env(tmp_path: Path) -> None:
    env = {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "MODELOPS_PREDICTIONS_URL": "sqlite:///x.db"}
    config = GatewayConfig.from_env(env)
    assert config.default_model == "ctr_recommender"  # include/modelops.yaml's served_model
    assert config.admin_token is None
    config = GatewayConfig.from_env(
        {**env, "MODELOPS_SERVED_MODEL": "m", "MODELOPS_GATEWAY_ADMIN_TOKEN": "t"}
    )
    assert (config.default_model, config.admin_token) == ("m", "t")
    for missing in env:
        with pytest.raises(ConfigurationError, match=missing):
            GatewayConfig.from_env({k: v for k, v in env.items() if k != missing})


def test_module_entry_point_has_a_cli() -> None:
    from modelops.serving.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0


# --- over real HTTP -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live_server(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    config = make_config(registry, tmp_path_factory.mktemp("server"))
    with serve_in_thread(create_app(config)) as url:
        host, port = url.removeprefix("http://").split(":")
        yield host, int(port)


def test_real_uvicorn_server_scores_over_http(live_server: tuple[str, int], registry: Registry) -> None:
    host, port = live_server
    with httpx.Client(base_url=f"http://{host}:{port}", timeout=30) as client:
        assert client.get("/ping").status_code == 200
        response = client.post(
            "/invocations",
            json={"dataframe_split": registry.sample.to_dict(orient="split", index=False)},
            headers={"X-Caller-Id": "httpx"},
        )
        assert response.status_code == 200
        assert response.headers["X-Model-Version"] == "1"
        assert p1(response) == pytest.approx(list(registry.expected["1"]))
        csv = io.StringIO()
        registry.sample.to_csv(csv, index=False)
        assert client.post(
            "/invocations", content=csv.getvalue(), headers={"Content-Type": "text/csv"}
        ).is_success


def test_mlflow_scoring_client_works_unchanged(live_server: tuple[str, int], registry: Registry) -> None:
    from mlflow.pyfunc.scoring_server.client import ScoringServerClient

    client = ScoringServerClient(*live_server)
    client.wait_server_ready(timeout=10)
    predictions = client.invoke(registry.sample).get_predictions()
    assert predictions.iloc[:, 1].tolist() == pytest.approx(list(registry.expected["1"]))
