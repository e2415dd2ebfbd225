"""Stage 4, deployment: staging, the HTTP smoke test and promotion against a real SQLite MLflow registry
and the real scoring gateway served by uvicorn on a loopback port."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from modelops.assets import MODEL_DEPLOYED
from modelops.audit import AuditStore
from modelops.data.synthetic import generate_clicks, write_csv
from modelops.errors import DeploymentFailed, DeploymentRefused, GateFailed
from modelops.hooks.gateway import GatewayHook
from modelops.hooks.registry import MlflowRegistryHook
from modelops.operators.compliance import CHALLENGER_ALIAS
from modelops.operators.deployment import SMOKE_ROWS, DeployModelOperator
from modelops.settings import model_spec, platform_settings
from modelops.stages.deployment import (
    CHAMPION_ALIAS,
    PREVIOUS_CHAMPION_ALIAS,
    deploy_version,
    smoke_test,
)
from modelops.stages.training import train_and_register
from tests.support import serve_in_thread, use_sqlite_registry

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

NAME = "ctr_recommender"


class OutletEvents(dict):
    """Stand-in for Airflow's outlet event accessors: an accessor (with ``extra``) per asset on demand."""

    def __missing__(self, key: Any) -> SimpleNamespace:
        self[key] = SimpleNamespace(extra={})
        return self[key]


def task_context(run_id: str) -> dict[str, Any]:
    dag_run = SimpleNamespace(dag_id="modelops_deployment", run_id=run_id, triggering_user_name=None)
    return {"dag_run": dag_run, "ti": SimpleNamespace(task_id="deploy"), "outlet_events": OutletEvents()}


class BrokenProbabilities(mlflow.pyfunc.PythonModel):
    """A model whose answers are malformed in a chosen way: too few rows, or rows that do not sum to 1."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> list:
        if self.mode == "short":
            return [[0.4, 0.6]]
        return [[0.6, 0.6] for _ in range(len(model_input))]


@dataclass(frozen=True)
class Stack:
    root: Path
    tracking_uri: str
    client: MlflowClient
    gateway_url: str
    csv: Path
    sha256: str
    smoke_rows: pd.DataFrame
    sources: dict[str, str]  # kind of model -> model URI to register versions from


def _log_bad_models(frame: pd.DataFrame) -> dict[str, str]:
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LinearRegression
    from sklearn.pipeline import Pipeline

    spec = model_spec()
    # A regressor served through predict(): its outputs are prices times a thousand, not probabilities.
    regressor = Pipeline(
        [
            ("features", ColumnTransformer([("numeric", "passthrough", spec.numeric_features)])),
            ("estimator", LinearRegression()),
        ]
    )
    regressor.fit(frame[spec.features], frame["item_price"] * 1000)
    sources = {}
    with mlflow.start_run(run_name="bad-models"):
        sources["large"] = mlflow.sklearn.log_model(
            regressor, name="regressor", pyfunc_predict_fn="predict", pip_requirements=["scikit-learn"]
        ).model_uri
        for mode in ("short", "sum"):
            sources[mode] = mlflow.pyfunc.log_model(
                name=f"broken_{mode}",
                python_model=BrokenProbabilities(mode),
                pip_requirements=["mlflow", "pandas"],
            ).model_uri
    return sources


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from modelops.serving.gateway import GatewayConfig, create_app

    root = tmp_path_factory.mktemp("deployment")
    with pytest.MonkeyPatch.context() as patch:
        tracking_uri, client, _ = use_sqlite_registry(root, patch)
        csv = write_csv(generate_clicks(2500, seed=7), root / "clicks.csv")
        sha = hashlib.sha256(csv.read_bytes()).hexdigest()
        frame = pd.read_csv(csv)
        trained = train_and_register(
            registry=MlflowRegistryHook(),
            spec=model_spec(),
            experiment_name=platform_settings().experiment_name,
            frame=frame,
            dataset_sha256=sha,
            dataset_uri=csv.as_uri(),
            trigger="manual",
            dag_id="modelops_training",
            run_id="manual__deployment",
        )
        sources = {"good": client.get_model_version(NAME, trained.version).source, **_log_bad_models(frame)}

        app = create_app(
            GatewayConfig(
                tracking_uri=tracking_uri,
                predictions_url=f"sqlite:///{root / 'predictions.db'}",
                default_model=NAME,
            )
        )
        with serve_in_thread(app) as gateway_url:
            host, port = gateway_url.removeprefix("http://").split(":")
            patch.setenv(
                "AIRFLOW_CONN_MODELOPS_GATEWAY",
                json.dumps({"conn_type": "http", "host": host, "port": int(port)}),
            )
            yield Stack(
                root=root,
                tracking_uri=tracking_uri,
                client=client,
                gateway_url=gateway_url,
                csv=csv,
                sha256=sha,
                smoke_rows=frame[model_spec().features].head(SMOKE_ROWS),
                sources=sources,
            )


def register(stack: Stack, name: str, kind: str, tags: dict[str, str] | None = None) -> str:
    MlflowRegistryHook().activate()
    return str(mlflow.register_model(stack.sources[kind], name, tags=tags).version)


def aliases(stack: Stack, name: str) -> dict[str, str]:
    return {alias: str(v) for alias, v in stack.client.get_registered_model(name).aliases.items()}


def served(gateway: GatewayHook, name: str) -> dict[str, Any]:
    return gateway.status()["models"].get(name, {})


# --- smoke test ----------------------------------------------------------------------------------


def test_smoke_test_passes_on_a_staged_good_version(stack: Stack) -> None:
    version = register(stack, "smoke_good", "good")
    gateway = GatewayHook()
    gateway.stage("smoke_good", version)
    try:
        check = smoke_test(gateway, "smoke_good", version, stack.smoke_rows)
    finally:
        gateway.unstage("smoke_good")
    assert check.passed and check.problems == []
    assert (check.rows, check.status_code) == (SMOKE_ROWS, 200)
    assert check.latency_ms is not None and check.latency_ms > 0


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("large", "is not a probability"),
        ("short", f"expected {SMOKE_ROWS} predictions, got 1"),
        ("sum", "do not sum to 1"),
    ],
)
def test_smoke_test_names_malformed_answers(stack: Stack, kind: str, expected: str) -> None:
    name = f"smoke_{kind}"
    version = register(stack, name, kind)
    gateway = GatewayHook()
    gateway.stage(name, version)
    try:
        check = smoke_test(gateway, name, version, stack.smoke_rows)
    finally:
        gateway.unstage(name)
    assert not check.passed and check.status_code == 200
    assert expected in check.problems[0], check.problems
    if kind == "short":
        assert len(check.problems) == 1
    else:
        # Every bad row is named, not only the first.
        assert len(check.problems) == SMOKE_ROWS
        assert [p.split(":")[0] for p in check.problems] == [f"row {i}" for i in range(SMOKE_ROWS)]


def test_smoke_test_of_a_version_that_is_not_staged_reports_the_http_error(stack: Stack) -> None:
    version = register(stack, "smoke_unstaged", "good")
    check = smoke_test(GatewayHook(), "smoke_unstaged", version, stack.smoke_rows)
    assert check.status_code == 404
    (problem,) = check.problems
    assert problem.startswith("HTTP 404:") and "VERSION_NOT_SERVED" in problem


# --- deploy_version ------------------------------------------------------------------------------


def test_deploy_promotes_supersedes_and_a_retry_is_a_no_op(stack: Stack) -> None:
    name, gateway, registry = "deploy_chain", GatewayHook(), MlflowRegistryHook()
    v1, v2 = register(stack, name, "good"), register(stack, name, "good")

    first = deploy_version(
        registry=registry, gateway=gateway, model=name, version=v1, smoke_rows=stack.smoke_rows
    )
    assert first.smoke_test.passed and first.previous_version is None and not first.already_live
    assert aliases(stack, name) == {CHAMPION_ALIAS: v1}
    tags = stack.client.get_model_version(name, v1).tags
    assert tags["deployment_status"] == "live" and tags["previous_champion"] == "none"
    assert tags["deployed_at"] == first.deployed_at
    assert served(gateway, name)["live_version"] == v1

    second = deploy_version(
        registry=registry, gateway=gateway, model=name, version=v2, smoke_rows=stack.smoke_rows
    )
    assert second.smoke_test.passed and second.previous_version == v1
    assert aliases(stack, name) == {CHAMPION_ALIAS: v2, PREVIOUS_CHAMPION_ALIAS: v1}
    old, new = (stack.client.get_model_version(name, v).tags for v in (v1, v2))
    assert old["superseded_by"] == v2 and old["superseded_at"] == second.deployed_at
    assert new["deployment_status"] == "live" and new["previous_champion"] == v1
    status = served(gateway, name)
    assert status["live_version"] == v2 and status["staged_version"] is None

    # Unpinned traffic now reaches the new champion.
    response = httpx.post(
        f"{stack.gateway_url}/models/{name}/invocations",
        json={"dataframe_split": stack.smoke_rows.head(2).to_dict(orient="split", index=False)},
    )
    assert response.status_code == 200 and response.headers["X-Model-Version"] == v2

    retry = deploy_version(
        registry=registry, gateway=gateway, model=name, version=v2, smoke_rows=stack.smoke_rows
    )
    assert retry.already_live and retry.previous_version == v1 and retry.smoke_test.rows == 0
    assert aliases(stack, name) == {CHAMPION_ALIAS: v2, PREVIOUS_CHAMPION_ALIAS: v1}
    assert stack.client.get_model_version(name, v2).tags == new
    assert stack.client.get_model_version(name, v1).tags == old
    assert served(gateway, name)["live_version"] == v2


def test_a_failed_smoke_test_leaves_the_previous_champion_serving(stack: Stack) -> None:
    name, gateway, registry = "deploy_smoke_fail", GatewayHook(), MlflowRegistryHook()
    good, bad = register(stack, name, "good"), register(stack, name, "large")
    deploy_version(registry=registry, gateway=gateway, model=name, version=good, smoke_rows=stack.smoke_rows)
    good_tags = stack.client.get_model_version(name, good).tags

    result = deploy_version(
        registry=registry, gateway=gateway, model=name, version=bad, smoke_rows=stack.smoke_rows
    )
    assert not result.smoke_test.passed and result.previous_version == good
    assert "is not a probability" in result.smoke_test.problems[0]
    assert result.to_dict()["smoke_test"]["passed"] is False

    assert aliases(stack, name) == {CHAMPION_ALIAS: good}
    status = served(gateway, name)
    assert status["live_version"] == good and status["staged_version"] is None
    assert stack.client.get_model_version(name, bad).tags["deployment_status"] == "smoke_test_failed"
    assert stack.client.get_model_version(name, good).tags == good_tags  # not superseded
    response = httpx.post(
        f"{stack.gateway_url}/models/{name}/invocations",
        json={"dataframe_split": stack.smoke_rows.head(1).to_dict(orient="split", index=False)},
    )
    assert response.status_code == 200 and response.headers["X-Model-Version"] == good


def test_a_first_deployment_that_fails_its_smoke_test_leaves_nothing_live(stack: Stack) -> None:
    name, gateway = "deploy_first_bad", GatewayHook()
    bad = register(stack, name, "short")
    result = deploy_version(
        registry=MlflowRegistryHook(), gateway=gateway, model=name, version=bad, smoke_rows=stack.smoke_rows
    )
    assert not result.smoke_test.passed and result.previous_version is None
    assert aliases(stack, name) == {}
    assert served(gateway, name).get("live_version") is None


# --- operator ------------------------------------------------------------------------------------


def lineage_tags(stack: Stack, **extra: str) -> dict[str, str]:
    return {"train_data_sha256": stack.sha256, "train_data_uri": stack.csv.as_uri(), **extra}


def audit_last(home: Path, action: str) -> Any:
    store = AuditStore(f"sqlite:///{home}/audit.db")
    try:
        assert store.verify().ok
        return store.last(action=action)
    finally:
        store.dispose()


@pytest.mark.parametrize("status", ["rejected", None])
def test_operator_refuses_an_unapproved_version(
    stack: Stack, modelops_home: Path, status: str | None
) -> None:
    tags = lineage_tags(stack) if status is None else lineage_tags(stack, compliance_status=status)
    version = register(stack, NAME, "good", tags)
    before = aliases(stack, NAME)
    with pytest.raises(DeploymentRefused) as raised:
        DeployModelOperator(task_id="deploy", model_version=version).execute(task_context("manual__refused"))
    assert isinstance(raised.value, GateFailed)
    message = str(raised.value)
    assert f"v{version} has compliance_status={status!r}" in message and "modelops_compliance_gate" in message
    assert aliases(stack, NAME) == before
    assert "deployment_status" not in stack.client.get_model_version(NAME, version).tags

    record = audit_last(modelops_home, "model.deployed")
    assert record.decision == "refused" and record.subject == f"model:{NAME}@{version}"
    assert record.details == {"reason": "not approved", "compliance_status": status}


def test_operator_deploys_the_challenger_and_emits_the_event(stack: Stack, modelops_home: Path) -> None:
    version = register(stack, NAME, "good", lineage_tags(stack, compliance_status="approved"))
    stack.client.set_registered_model_alias(NAME, CHALLENGER_ALIAS, version)
    context = task_context("manual__deploy")
    operator = DeployModelOperator(task_id="deploy", outlets=[MODEL_DEPLOYED])
    result = operator.execute(context)  # no model_version: the challenger alias decides
    json.dumps(result)

    assert result["version"] == version and result["smoke_test"]["passed"]
    assert result["serving_url"] == f"{stack.gateway_url}/invocations"
    assert str(stack.client.get_model_version_by_alias(NAME, CHAMPION_ALIAS).version) == version
    extra = context["outlet_events"][MODEL_DEPLOYED].extra
    assert extra["model_name"] == NAME and extra["version"] == version
    record = audit_last(modelops_home, "model.deployed")
    assert record.decision == "deployed" and record.evidence["dataset"] == stack.sha256

    # The default /invocations answers with the new champion.
    response = httpx.post(
        f"{stack.gateway_url}/invocations",
        json={"dataframe_records": stack.smoke_rows.head(1).to_dict(orient="records")},
    )
    assert response.status_code == 200 and response.headers["X-Model-Version"] == version


def test_operator_records_a_failed_smoke_test_before_failing(stack: Stack, modelops_home: Path) -> None:
    champion_before = stack.client.get_registered_model(NAME).aliases.get(CHAMPION_ALIAS)
    bad = register(stack, NAME, "large", lineage_tags(stack, compliance_status="approved"))
    with pytest.raises(DeploymentFailed) as raised:
        DeployModelOperator(task_id="deploy", model_version=bad).execute(task_context("manual__bad"))
    assert "failed its smoke test" in str(raised.value) and "is not a probability" in str(raised.value)
    assert stack.client.get_registered_model(NAME).aliases.get(CHAMPION_ALIAS) == champion_before

    record = audit_last(modelops_home, "model.deployed")
    assert record.decision == "smoke_test_failed" and record.subject == f"model:{NAME}@{bad}"
    assert record.details["smoke_test"]["passed"] is False
    assert len(record.details["smoke_test"]["problems"]) == SMOKE_ROWS
