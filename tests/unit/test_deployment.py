"""Stage 4, deployment: staging, the HTTP smoke test, promotion and rollback against a real SQLite MLflow
registry and the real scoring gateway served by uvicorn on a loopback port, for both shipped models (a
classifier and a regressor)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import mlflow
import pandas as pd
import pytest
from airflow.sdk.exceptions import AirflowFailException
from mlflow import MlflowClient
from mlflow.models import infer_signature

from modelops.assets import MODEL_DEPLOYED
from modelops.audit import AuditStore
from modelops.data.sklearn_datasets import write_diabetes_csv
from modelops.data.synthetic import generate_clicks, write_csv
from modelops.errors import DeploymentFailed
from modelops.evidence import evidence_summary, version_file_hashes
from modelops.operators.deployment import DeployModelOperator
from modelops.registry import ModelRegistry
from modelops.serving.client import GatewayClient
from modelops.serving.prediction_log import PredictionLog
from modelops.settings import CanarySpec, Catalog, ModelSpec, ScreeningSpec, ServingSpec, load_catalog
from modelops.stages import deployment
from modelops.stages.deployment import SMOKE_TEST_CALLER, deploy, deploy_version, rollback, smoke_test
from modelops.stages.outcome import AuditEntry
from modelops.storage import read_dataset
from modelops.vocabulary import (
    Alias,
    Arm,
    AuditAction,
    ComplianceStatus,
    Decision,
    DeploymentStatus,
    Tag,
    dataset_subject,
    model_subject,
)
from tests.support import (
    authorise,
    keyring_for_tests,
    mlflow_client,
    serve_in_thread,
    use_sqlite_registry,
    valid_approval,
)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

CLASSIFIER = "ctr_recommender"  # binary_classification; the gateway's default model
REGRESSOR = "diabetes_progression"  # regression
MODELS = (CLASSIFIER, REGRESSOR)


class OutletEvents(dict):
    """Stand-in for Airflow's outlet event accessors: an accessor (with ``extra``) per asset on demand."""

    def __missing__(self, key: Any) -> SimpleNamespace:
        self[key] = SimpleNamespace(extra={})
        return self[key]


def task_context(run_id: str) -> dict[str, Any]:
    dag_run = SimpleNamespace(dag_id="modelops_deployment", run_id=run_id, triggering_user_name=None)
    return {"dag_run": dag_run, "ti": SimpleNamespace(task_id="deploy"), "outlet_events": OutletEvents()}


class Misbehaving(mlflow.pyfunc.PythonModel):
    """A model whose answers are malformed in a chosen way."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> list:
        rows = len(model_input)
        if self.mode == "large":  # a classifier answering prices times a thousand, not probabilities
            return [float(price) * 1000 for price in model_input["item_price"]]
        if self.mode == "short":  # one answer, whatever the number of rows
            return [[0.4, 0.6]]
        if self.mode == "sum":  # class probabilities that do not sum to 1
            return [[0.6, 0.6] for _ in range(rows)]
        if self.mode == "nan":  # a regressor answering NaN
            return [math.nan] * rows
        if self.mode == "slow":  # valid answers, 40 ms late
            import time

            time.sleep(0.04)
            return [[0.5, 0.5] for _ in range(rows)]
        if self.mode == "single_row_fails":  # passes the 20-row smoke test, fails every 1-row call
            if rows == 1:
                raise RuntimeError("cannot score a single row")
            return [[0.5, 0.5] for _ in range(rows)]
        return ["high"] * rows  # "text": a regressor answering words


BAD_KINDS = {
    "large": CLASSIFIER,
    "short": CLASSIFIER,
    "sum": CLASSIFIER,
    "nan": REGRESSOR,
    "text": REGRESSOR,
    "single_row_fails": CLASSIFIER,
    "slow": CLASSIFIER,
    "shuffled": CLASSIFIER,  # a real classifier trained on shuffled labels: valid answers, no skill
}


@dataclass(frozen=True)
class Stack:
    root: Path
    catalog: Catalog
    registry: ModelRegistry
    client: MlflowClient  # a raw client: reads the registry as an outside user would
    gateway: GatewayClient
    gateway_url: str
    csv: dict[str, Path]  # model -> its training data
    sha256: dict[str, str]  # model -> hash of its training data
    rows: dict[str, pd.DataFrame]  # model -> its smoke-test rows
    runs: dict[str, str]  # kind of model (a model name, or a BAD_KINDS key) -> run that logged it at "model"
    audit: AuditStore  # the audit log the gateway reads its authority from
    audit_url: str
    app: Any  # the gateway's ASGI app: its prediction writer is flushed before a test reads the log
    predictions: PredictionLog

    def record(self, entry: AuditEntry) -> dict[str, Any]:
        """What the operator's recorder does, outside a task."""
        return self.audit.append(
            actor="test",
            action=entry.action,
            subject=entry.subject,
            decision=entry.decision,
            details=entry.details,
            evidence=entry.evidence,
        ).to_dict()

    def spec(self, model: str, name: str | None = None, **canary: Any) -> ModelSpec:
        """The shipped spec of ``model``, under another registered ``name`` if given (an isolated test).

        Without ``canary`` settings a new version replaces the champion after its smoke test (the canary
        is off); with them, the spec's ``serving.canary`` is those settings.
        """
        spec = self.catalog.model(model)
        settings = {"enabled": False} if not canary else {"enabled": True, **canary}
        serving = spec.serving.model_copy(update={"canary": CanarySpec(**settings)})
        return spec.model_copy(update={"serving": serving, **({"name": name} if name else {})})


def _fit(spec: ModelSpec, frame: pd.DataFrame) -> Any:
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    steps = [("numeric", StandardScaler(), spec.numeric_features)]
    if spec.categorical_features:
        steps.append(("categorical", OneHotEncoder(handle_unknown="ignore"), spec.categorical_features))
    estimator = LogisticRegression(max_iter=500) if spec.task == "binary_classification" else Ridge()
    return Pipeline([("features", ColumnTransformer(steps)), ("estimator", estimator)]).fit(
        frame[spec.features], frame[spec.target]
    )


def _save_sklearn(model: Any, spec: ModelSpec, frame: pd.DataFrame, folder: Path) -> None:
    """Save like training does: skops with the reviewed types, explicit requirements (no inference)."""
    import skops.io

    probe = folder.with_suffix(".skops")
    skops.io.dump(model, probe)
    predict_fn = "predict_proba" if spec.task == "binary_classification" else "predict"
    example = frame[spec.features].head(5)
    mlflow.sklearn.save_model(
        model,
        str(folder),
        signature=infer_signature(example, getattr(model, predict_fn)(example)),
        pyfunc_predict_fn=predict_fn,
        serialization_format=mlflow.sklearn.SERIALIZATION_FORMAT_SKOPS,
        skops_trusted_types=skops.io.get_untrusted_types(file=probe),
        pip_requirements=["scikit-learn", "skops"],
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from modelops.serving.gateway import GatewayConfig, create_app

    root = tmp_path_factory.mktemp("deployment")
    catalog = load_catalog()
    with pytest.MonkeyPatch.context() as patch:
        tracking_uri, registry, _ = use_sqlite_registry(root, patch)
        csv = {CLASSIFIER: write_csv(generate_clicks(400, seed=7), root / "clicks.csv")}
        csv[REGRESSOR] = root / "diabetes.csv"
        write_diabetes_csv(csv[REGRESSOR])

        runs: dict[str, str] = {}
        for model in MODELS:
            spec = catalog.model(model)
            frame = pd.read_csv(csv[model])
            folder = root / f"saved-{model}"
            _save_sklearn(_fit(spec, frame), spec, frame, folder)
            runs[model] = registry.log_run(
                experiment=spec.experiment_name, run_name=model, tags={}, artifact_dirs={"model": folder}
            )
        for kind, model in BAD_KINDS.items():
            folder = root / f"saved-{kind}"
            if kind == "shuffled":
                spec, frame = catalog.model(model), pd.read_csv(csv[model])
                frame[spec.target] = frame[spec.target].sample(frac=1.0, random_state=3).to_numpy()
                _save_sklearn(_fit(spec, frame), spec, frame, folder)
                runs[kind] = registry.log_run(
                    experiment=spec.experiment_name, run_name=kind, tags={}, artifact_dirs={"model": folder}
                )
                continue
            mlflow.pyfunc.save_model(str(folder), python_model=Misbehaving(kind), pip_requirements=["mlflow"])
            runs[kind] = registry.log_run(
                experiment=catalog.model(model).experiment_name,
                run_name=kind,
                tags={},
                artifact_dirs={"model": folder},
            )

        audit_url = f"sqlite:///{root / 'audit.db'}"
        audit = AuditStore(audit_url, keyring=keyring_for_tests())
        sha256 = {model: hashlib.sha256(path.read_bytes()).hexdigest() for model, path in csv.items()}
        for model, path in csv.items():  # what validation records of each model's data
            audit.append(
                actor="test",
                action=AuditAction.DATASET_VALIDATED,
                subject=dataset_subject(sha256[model]),
                decision=Decision.PASSED,
                details={"dataset": catalog.model(model).dataset, "snapshot_uri": path.as_uri()},
            )
        predictions_url = f"sqlite:///{root / 'predictions.db'}"
        app = create_app(
            GatewayConfig(
                tracking_uri=tracking_uri,
                predictions_url=predictions_url,
                default_model=CLASSIFIER,
                models=(REGRESSOR,),
                audit_url=audit_url,
                audit_keyring=keyring_for_tests(),
            )
        )
        with serve_in_thread(app) as gateway_url:
            host, port = gateway_url.removeprefix("http://").split(":")
            patch.setenv(
                "AIRFLOW_CONN_MODELOPS_GATEWAY",
                json.dumps({"conn_type": "http", "host": host, "port": int(port)}),
            )
            gateway = GatewayClient(gateway_url)
            yield Stack(
                root=root,
                catalog=catalog,
                registry=registry,
                client=mlflow_client(tracking_uri),
                gateway=gateway,
                gateway_url=gateway_url,
                csv=csv,
                sha256=sha256,
                rows={
                    model: read_dataset(
                        path.as_uri(),
                        columns=catalog.model(model).features,
                        nrows=catalog.model(model).serving.smoke_rows,
                    )
                    for model, path in csv.items()
                },
                runs=runs,
                audit=audit,
                audit_url=audit_url,
                app=app,
                predictions=PredictionLog(predictions_url),
            )
            gateway.close()
        audit.dispose()


@pytest.fixture(autouse=True)
def operators_deploy_without_canary(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The operators read the shipped specs, whose canary is on: off for the tests written before it
    (a second version replaces the champion), on for the tests with ``canary`` in their name."""
    if "canary" in request.node.name:
        return
    import modelops.settings as settings

    load = settings.load_catalog

    def without_canary(*args: Any, **kwargs: Any) -> Catalog:
        catalog = load(*args, **kwargs)
        off = CanarySpec(enabled=False)
        return dataclasses.replace(
            catalog,
            models={
                name: spec.model_copy(update={"serving": spec.serving.model_copy(update={"canary": off})})
                for name, spec in catalog.models.items()
            },
        )

    monkeypatch.setattr(settings, "load_catalog", without_canary)


def task_of(kind: str) -> str:
    """The shipped model whose data a kind of model takes."""
    return BAD_KINDS.get(kind, kind)


def lineage_tags(stack: Stack, model: str) -> dict[str, str]:
    return {Tag.TRAIN_DATA_SHA256: stack.sha256[model], Tag.TRAIN_DATA_URI: stack.csv[model].as_uri()}


def register(
    stack: Stack,
    name: str,
    kind: str,
    status: str | None = ComplianceStatus.APPROVED,
    *,
    data: str | None = None,
) -> str:
    """A new version of ``name`` from the logged model ``kind``, with the lineage tags of its data (the
    shipped model ``data`` whose data it takes; default: the kind's), and the authentic records training
    and the gate would write (``status`` approved or rejected; None: never gated)."""
    data = data or task_of(kind)
    stack.registry.ensure_model(name, {})
    version = stack.registry.register_version(
        name, run_id=stack.runs[kind], artifact_path="model", tags=lineage_tags(stack, data)
    ).version
    files = authorise(stack.audit, stack.registry, name, version, register=True, approve=False)
    if status is not None:
        stack.audit.append(
            actor="test",
            action=AuditAction.GATE_DECIDED,
            subject=model_subject(name, version),
            decision=status,
            details={
                Tag.TRAIN_DATA_SHA256: stack.sha256[data],
                **evidence_summary(files),
                **valid_approval(),
            },
        )
    return version


def ship(stack: Stack, spec: ModelSpec, version: str, gateway: GatewayClient | None = None) -> Any:
    """deploy_version as deploy() calls it, with the version's files as they are now."""
    return deploy_version(
        registry=stack.registry,
        gateway=gateway or stack.gateway,
        audit=stack.audit,
        record=stack.record,
        spec=spec,
        version=version,
        files=version_file_hashes(stack.registry, spec.name, version),
        smoke_rows=stack.rows[task_of(spec.name) if spec.name in MODELS else _model_of(spec)],
    )


def _model_of(spec: ModelSpec) -> str:
    return CLASSIFIER if spec.task == "binary_classification" else REGRESSOR


def promotion(stack: Stack, name: str, version: str) -> Any:
    """The promotion record of ``name`` v``version``."""
    return stack.audit.last(action=AuditAction.MODEL_DEPLOYED, subject=model_subject(name, version))


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def aliases(stack: Stack, name: str) -> dict[str, str]:
    return {alias: str(v) for alias, v in stack.client.get_registered_model(name).aliases.items()}


def served(stack: Stack, name: str) -> dict[str, Any]:
    return stack.gateway.status()["models"].get(name, {})


def answered_by(stack: Stack, model: str, name: str | None = None, *, path: str | None = None) -> str:
    """Which version answers unpinned traffic for ``name`` (default: ``model``) at its invocations URL."""
    url = f"{stack.gateway_url}{path or f'/models/{name or model}/invocations'}"
    payload = {"dataframe_split": stack.rows[model].head(2).to_dict(orient="split", index=False)}
    # Through deployment's own door (this gateway has no admin token and no team keys): the smoke test's
    # caller id, which monitoring never counts as traffic.
    response = httpx.post(url, json=payload, headers={"X-Caller-Id": SMOKE_TEST_CALLER})
    assert response.status_code == 200, response.text
    return response.headers["X-Model-Version"]


# --- reading the smoke-test rows -----------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_read_dataset_reads_only_the_spec_s_smoke_rows_of_its_features(stack: Stack, model: str) -> None:
    spec = stack.spec(model)
    rows = read_dataset(stack.csv[model].as_uri(), columns=spec.features, nrows=spec.serving.smoke_rows)
    assert len(rows) == spec.serving.smoke_rows < len(pd.read_csv(stack.csv[model]))
    assert sorted(rows.columns) == sorted(spec.features) and spec.target not in rows.columns
    assert {CLASSIFIER: 20, REGRESSOR: 10}[model] == spec.serving.smoke_rows


# --- smoke test ----------------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_smoke_test_passes_on_a_staged_good_version(stack: Stack, model: str) -> None:
    spec = stack.spec(model, unique("smoke_good"))
    version = register(stack, spec.name, model)
    stack.gateway.stage(spec.name, version)
    try:
        check = smoke_test(stack.gateway, spec, version, stack.rows[model])
    finally:
        stack.gateway.unstage(spec.name)
    assert check.passed and check.problems == []
    assert (check.rows, check.status_code) == (spec.serving.smoke_rows, 200)
    assert check.latency_ms is not None and check.latency_ms > 0


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("large", "is not a probability"),
        ("short", "expected 20 predictions, got 1"),
        ("sum", "do not sum to 1"),
        ("nan", "nan is not a finite number"),
        ("text", "'high' is not a finite number"),
    ],
)
def test_smoke_test_names_malformed_answers(stack: Stack, kind: str, expected: str) -> None:
    model = task_of(kind)
    spec = stack.spec(model, unique(f"smoke_{kind}"))
    version = register(stack, spec.name, kind)
    stack.gateway.stage(spec.name, version)
    try:
        check = smoke_test(stack.gateway, spec, version, stack.rows[model])
    finally:
        stack.gateway.unstage(spec.name)
    assert not check.passed and check.status_code == 200
    assert expected in check.problems[0], check.problems
    if kind == "short":
        assert len(check.problems) == 1
    else:
        # Every bad row is named, not only the first.
        rows = spec.serving.smoke_rows
        assert [p.split(":")[0] for p in check.problems] == [f"row {i}" for i in range(rows)]


def test_a_classifier_answer_is_not_accepted_from_a_regressor(stack: Stack) -> None:
    # The same HTTP answer is judged by the task kind of the spec: class probabilities are not a number.
    spec = stack.spec(REGRESSOR, unique("smoke_probabilities"))
    version = register(stack, spec.name, "sum")
    stack.gateway.stage(spec.name, version)
    try:
        check = smoke_test(stack.gateway, spec, version, stack.rows[REGRESSOR])
    finally:
        stack.gateway.unstage(spec.name)
    assert check.problems[0] == "row 0: [0.6, 0.6] is not a finite number"


def test_smoke_test_of_a_version_that_is_not_staged_reports_the_http_error(stack: Stack) -> None:
    spec = stack.spec(CLASSIFIER, unique("smoke_unstaged"))
    version = register(stack, spec.name, CLASSIFIER)
    check = smoke_test(stack.gateway, spec, version, stack.rows[CLASSIFIER])
    assert check.status_code == 404
    (problem,) = check.problems
    assert problem.startswith("HTTP 404:") and "VERSION_NOT_SERVED" in problem


# --- deploy_version and rollback -----------------------------------------------------------------


def test_deploy_promotes_supersedes_and_a_retry_is_a_no_op(stack: Stack) -> None:
    spec = stack.spec(CLASSIFIER, unique("deploy_chain"))
    name = spec.name
    v1, v2 = register(stack, name, CLASSIFIER), register(stack, name, CLASSIFIER)

    def deploy_it(version: str) -> deployment.DeploymentResult:
        return ship(stack, spec, version)

    first = deploy_it(v1)
    assert first.smoke_test.passed and first.previous_version is None and not first.already_live
    assert aliases(stack, name) == {Alias.CHAMPION: v1}
    tags = stack.client.get_model_version(name, v1).tags
    assert tags[Tag.DEPLOYMENT_STATUS] == DeploymentStatus.LIVE and tags[Tag.PREVIOUS_CHAMPION] == "none"
    assert tags[Tag.DEPLOYED_AT] == first.deployed_at
    assert served(stack, name)["live_version"] == v1

    second = deploy_it(v2)
    assert second.smoke_test.passed and second.previous_version == v1
    assert aliases(stack, name) == {Alias.CHAMPION: v2, Alias.PREVIOUS_CHAMPION: v1}
    old, new = (stack.client.get_model_version(name, v).tags for v in (v1, v2))
    assert old[Tag.SUPERSEDED_BY] == v2 and old[Tag.SUPERSEDED_AT] == second.deployed_at
    assert new[Tag.DEPLOYMENT_STATUS] == DeploymentStatus.LIVE and new[Tag.PREVIOUS_CHAMPION] == v1
    status = served(stack, name)
    assert status["live_version"] == v2 and status["staged_version"] is None
    assert answered_by(stack, CLASSIFIER, name) == v2  # unpinned traffic reaches the new champion

    retry = deploy_it(v2)
    assert retry.already_live and retry.previous_version == v1 and retry.smoke_test.rows == 0
    assert aliases(stack, name) == {Alias.CHAMPION: v2, Alias.PREVIOUS_CHAMPION: v1}
    assert stack.client.get_model_version(name, v2).tags == new
    assert stack.client.get_model_version(name, v1).tags == old
    assert served(stack, name)["live_version"] == v2


def test_a_failed_smoke_test_leaves_the_previous_champion_serving(stack: Stack) -> None:
    spec = stack.spec(REGRESSOR, unique("deploy_smoke_fail"))
    name = spec.name
    good, bad = register(stack, name, REGRESSOR), register(stack, name, "nan")
    ship(stack, spec, good)
    good_tags = stack.client.get_model_version(name, good).tags

    result = ship(stack, spec, bad)
    assert not result.smoke_test.passed and result.previous_version == good
    assert "is not a finite number" in result.smoke_test.problems[0]
    assert result.to_dict()["smoke_test"]["passed"] is False

    assert aliases(stack, name) == {Alias.CHAMPION: good}
    status = served(stack, name)
    assert status["live_version"] == good and status["staged_version"] is None
    bad_tags = stack.client.get_model_version(name, bad).tags
    assert bad_tags[Tag.DEPLOYMENT_STATUS] == DeploymentStatus.SMOKE_TEST_FAILED
    assert stack.client.get_model_version(name, good).tags == good_tags  # not superseded
    assert answered_by(stack, REGRESSOR, name) == good


def test_a_first_deployment_that_fails_its_smoke_test_leaves_nothing_live(stack: Stack) -> None:
    spec = stack.spec(CLASSIFIER, unique("deploy_first_bad"))
    bad = register(stack, spec.name, "short")
    result = ship(stack, spec, bad)
    assert not result.smoke_test.passed and result.previous_version is None
    assert aliases(stack, spec.name) == {}
    assert served(stack, spec.name).get("live_version") is None


class ReloadFailsOnce(GatewayClient):
    """A gateway client whose first reload fails, as if the gateway went away right after the smoke test."""

    failed = False

    def reload(self, model: str) -> dict[str, Any]:
        if not self.failed:
            self.failed = True
            raise DeploymentFailed("scoring gateway did not answer POST reload: connection reset")
        return super().reload(model)


def test_a_switch_the_gateway_does_not_take_rolls_the_alias_back(stack: Stack) -> None:
    spec = stack.spec(CLASSIFIER, unique("deploy_switch_fails"))
    name = spec.name
    v1, v2 = register(stack, name, CLASSIFIER), register(stack, name, CLASSIFIER)
    ship(stack, spec, v1)

    flaky = ReloadFailsOnce(stack.gateway_url)
    try:
        with pytest.raises(DeploymentFailed) as raised:
            ship(stack, spec, v2, flaky)
    finally:
        flaky.close()
    assert f"{name} v{v2} passed the smoke test but the gateway did not take it live" in str(raised.value)
    assert f"rolled back to v{v1}" in str(raised.value)
    assert aliases(stack, name)[Alias.CHAMPION] == v1
    tags = stack.client.get_model_version(name, v2).tags
    assert tags[Tag.DEPLOYMENT_STATUS] == DeploymentStatus.ROLLED_BACK
    assert served(stack, name)["live_version"] == v1
    assert answered_by(stack, CLASSIFIER, name) == v1


def test_a_switch_the_gateway_does_not_take_leaves_nothing_staged(stack: Stack) -> None:
    spec = stack.spec(REGRESSOR, unique("deploy_switch_unstaged"))
    name = spec.name
    v1, v2 = register(stack, name, REGRESSOR), register(stack, name, REGRESSOR)
    ship(stack, spec, v1)
    flaky = ReloadFailsOnce(stack.gateway_url)
    try:
        with pytest.raises(DeploymentFailed):
            ship(stack, spec, v2, flaky)
    finally:
        flaky.close()
    assert served(stack, name)["staged_version"] is None


def test_rollback_puts_the_previous_champion_back(stack: Stack) -> None:
    spec = stack.spec(REGRESSOR, unique("rollback"))
    name = spec.name
    v1, v2 = register(stack, name, REGRESSOR), register(stack, name, REGRESSOR)
    for version in (v1, v2):
        ship(stack, spec, version)
    assert answered_by(stack, REGRESSOR, name) == v2

    rollback(
        stack.registry,
        stack.gateway,
        stack.audit,
        stack.record,
        name,
        failed_version=v2,
        previous=promotion(stack, name, v1),
        reason="test",
    )
    assert aliases(stack, name)[Alias.CHAMPION] == v1
    assert (
        stack.client.get_model_version(name, v2).tags[Tag.DEPLOYMENT_STATUS] == DeploymentStatus.ROLLED_BACK
    )
    assert served(stack, name)["live_version"] == v1
    assert answered_by(stack, REGRESSOR, name) == v1


def test_rollback_without_a_previous_champion_withdraws_the_alias(stack: Stack) -> None:
    spec = stack.spec(CLASSIFIER, unique("rollback_first"))
    name = spec.name
    v1 = register(stack, name, CLASSIFIER)
    ship(stack, spec, v1)

    rollback(
        stack.registry,
        stack.gateway,
        stack.audit,
        stack.record,
        name,
        failed_version=v1,
        previous=None,
        reason="test",
    )
    assert Alias.CHAMPION not in aliases(stack, name)
    assert (
        stack.client.get_model_version(name, v1).tags[Tag.DEPLOYMENT_STATUS] == DeploymentStatus.ROLLED_BACK
    )
    assert served(stack, name).get("live_version") is None


def test_a_first_deployment_the_gateway_does_not_take_leaves_nothing_live(stack: Stack) -> None:
    spec = stack.spec(REGRESSOR, unique("deploy_first_switch_fails"))
    v1 = register(stack, spec.name, REGRESSOR)
    flaky = ReloadFailsOnce(stack.gateway_url)
    try:
        with pytest.raises(DeploymentFailed) as raised:
            ship(stack, spec, v1, flaky)
    finally:
        flaky.close()
    if "passed the smoke test but the gateway did not take it live" not in str(raised.value):
        raise raised.value  # the rollback's own failure, not the deployment's report
    assert Alias.CHAMPION not in aliases(stack, spec.name)
    tags = stack.client.get_model_version(spec.name, v1).tags
    assert tags[Tag.DEPLOYMENT_STATUS] == DeploymentStatus.ROLLED_BACK
    assert served(stack, spec.name).get("live_version") is None


# --- deploy, and the operator --------------------------------------------------------------------


def audit_last(stack: Stack, action: str) -> Any:
    assert stack.audit.verify().ok
    return stack.audit.last(action=action)


@pytest.fixture
def operator_audit(stack: Stack, modelops_home: Path, monkeypatch: pytest.MonkeyPatch) -> AuditStore:
    """Operators record into the audit log the stack's gateway reads its authority from."""
    monkeypatch.setenv(
        "AIRFLOW_CONN_MODELOPS_AUDIT",
        json.dumps({"conn_type": "sqlite", "host": str(stack.root / "audit.db")}),
    )
    return stack.audit


@pytest.mark.parametrize("status", ["rejected", None])
def test_operator_refuses_an_unapproved_version(
    stack: Stack, operator_audit: AuditStore, status: str | None
) -> None:
    version = register(stack, CLASSIFIER, CLASSIFIER, status)
    before = aliases(stack, CLASSIFIER)
    context = task_context("manual__refused")
    with pytest.raises(AirflowFailException) as raised:
        DeployModelOperator(
            task_id="deploy", model=CLASSIFIER, model_version=version, outlets=[MODEL_DEPLOYED]
        ).execute(context)
    message = str(raised.value)
    if status is None:
        assert f"v{version} has no authentic compliance gate decision" in message
        assert "modelops_compliance_gate" in message
    else:
        assert f"v{version} was rejected by the compliance gate" in message
    assert aliases(stack, CLASSIFIER) == before
    assert Tag.DEPLOYMENT_STATUS not in stack.client.get_model_version(CLASSIFIER, version).tags
    assert MODEL_DEPLOYED not in context["outlet_events"]

    record = audit_last(stack, AuditAction.MODEL_DEPLOYED)
    assert record.decision == Decision.REFUSED and record.subject == model_subject(CLASSIFIER, version)
    assert record.details == {"reason": message}


def test_a_model_whose_spec_disables_serving_is_refused(stack: Stack) -> None:
    spec = stack.spec(REGRESSOR).model_copy(update={"serving": ServingSpec(enabled=False)})
    version = register(stack, REGRESSOR, REGRESSOR)  # approved
    before = aliases(stack, REGRESSOR)
    outcome = deploy(
        spec=spec,
        registry=stack.registry,
        gateway=stack.gateway,
        audit=stack.audit,
        record=stack.record,
        version=version,
    )
    assert outcome.decision == Decision.REFUSED and outcome.asset_extra is None
    assert outcome.refusal is not None and "serving.enabled: false" in outcome.refusal
    (entry,) = outcome.records
    assert entry.action == AuditAction.MODEL_DEPLOYED and entry.decision == Decision.REFUSED
    assert aliases(stack, REGRESSOR) == before
    assert served(stack, REGRESSOR).get("staged_version") is None


@pytest.mark.parametrize("model", MODELS)
def test_operator_deploys_the_challenger_and_emits_the_event(
    stack: Stack, operator_audit: AuditStore, monkeypatch: pytest.MonkeyPatch, model: str
) -> None:
    spec = stack.spec(model)
    version = register(stack, model, model)
    stack.registry.set_alias(model, Alias.CHALLENGER, version)
    previous = aliases(stack, model).get(Alias.CHAMPION)
    reads: list[dict[str, Any]] = []

    def spy(uri: str, **kwargs: Any) -> pd.DataFrame:
        reads.append({"uri": uri, **kwargs})
        return read_dataset(uri, **kwargs)

    monkeypatch.setattr(deployment, "read_dataset", spy)
    context = task_context(f"manual__deploy_{model}")
    operator = DeployModelOperator(task_id="deploy", model=model, outlets=[MODEL_DEPLOYED])
    result = operator.execute(context)  # no model_version: the challenger alias decides
    assert json.loads(json.dumps(result)) == result

    # The smoke test scored the spec's smoke_rows rows of the model's own training data, features only.
    assert reads == [
        {"uri": stack.csv[model].as_uri(), "columns": spec.features, "nrows": spec.serving.smoke_rows}
    ]
    assert result["decision"] == "deployed" and result["version"] == version
    assert result["smoke_test"]["passed"] and result["smoke_test"]["rows"] == spec.serving.smoke_rows
    assert result["previous_version"] == previous
    assert result["serving_url"] == f"{stack.gateway_url}/models/{model}/invocations"
    expected_aliases = {Alias.CHAMPION: version, Alias.CHALLENGER: version}
    if previous is not None:
        expected_aliases[Alias.PREVIOUS_CHAMPION] = previous
    assert {k: v for k, v in aliases(stack, model).items() if k != Alias.CANDIDATE} == expected_aliases
    assert context["outlet_events"][MODEL_DEPLOYED].extra == {
        "model_name": model,
        "version": version,
        "previous_version": previous,
    }
    record = audit_last(stack, AuditAction.MODEL_DEPLOYED)
    assert record.decision == Decision.DEPLOYED and record.subject == model_subject(model, version)
    assert record.evidence["dataset"] == stack.sha256[model]
    assert record.actor == "airflow:modelops_deployment.deploy"

    assert answered_by(stack, model) == version
    if model == CLASSIFIER:  # the default model also answers at MLflow's own /invocations
        assert answered_by(stack, model, path="/invocations") == version


def test_operator_records_a_failed_smoke_test_before_failing(
    stack: Stack, operator_audit: AuditStore
) -> None:
    spec = stack.spec(REGRESSOR)
    good = register(stack, REGRESSOR, REGRESSOR)
    DeployModelOperator(task_id="deploy", model=REGRESSOR, model_version=good).execute(
        task_context("manual__good")
    )
    bad = register(stack, REGRESSOR, "text")
    context = task_context("manual__bad")
    with pytest.raises(AirflowFailException) as raised:
        DeployModelOperator(
            task_id="deploy", model=REGRESSOR, model_version=bad, outlets=[MODEL_DEPLOYED]
        ).execute(context)
    message = str(raised.value)
    assert f"v{bad} failed its smoke test; v{good} keeps serving" in message
    assert "'high' is not a finite number" in message
    assert aliases(stack, REGRESSOR)[Alias.CHAMPION] == good
    assert MODEL_DEPLOYED not in context["outlet_events"]
    assert answered_by(stack, REGRESSOR) == good

    record = audit_last(stack, AuditAction.MODEL_DEPLOYED)
    assert record.decision == Decision.SMOKE_TEST_FAILED and record.subject == model_subject(REGRESSOR, bad)
    assert record.details["smoke_test"]["passed"] is False
    assert len(record.details["smoke_test"]["problems"]) == spec.serving.smoke_rows


def test_operator_fails_without_retry_when_there_is_no_challenger(
    stack: Stack, operator_audit: AuditStore
) -> None:
    ghost = stack.spec(CLASSIFIER, "never_approved")
    operator = DeployModelOperator(task_id="deploy", model="never_approved")
    operator.catalog = dataclasses.replace(
        stack.catalog, models={**stack.catalog.models, "never_approved": ghost}
    )
    with pytest.raises(AirflowFailException, match="'never_approved' has no version with alias"):
        operator.execute(task_context("manual__ghost"))
    # No decision about any version, but the task's own failure is on record.
    assert audit_last(stack, AuditAction.MODEL_DEPLOYED).decision == Decision.ERROR


def test_deploying_one_model_leaves_the_other_alone(stack: Stack) -> None:
    for model, other in ((CLASSIFIER, REGRESSOR), (REGRESSOR, CLASSIFIER)):
        other_version = register(stack, other, other)
        deploy(
            spec=stack.spec(other),
            registry=stack.registry,
            gateway=stack.gateway,
            audit=stack.audit,
            record=stack.record,
            version=other_version,
        )
        other_aliases, other_live = aliases(stack, other), served(stack, other)["live_version"]

        version = register(stack, model, model)
        outcome = deploy(
            spec=stack.spec(model),
            registry=stack.registry,
            gateway=stack.gateway,
            audit=stack.audit,
            record=stack.record,
            version=version,
        )
        assert outcome.decision == Decision.DEPLOYED, outcome.refusal
        assert aliases(stack, model)[Alias.CHAMPION] == version
        assert aliases(stack, other) == other_aliases
        assert served(stack, other)["live_version"] == other_live == other_version
        assert answered_by(stack, other) == other_version and answered_by(stack, model) == version


def test_the_smoke_test_is_logged_as_its_own_caller(stack: Stack) -> None:
    from modelops.serving.prediction_log import PredictionLog

    spec = stack.spec(CLASSIFIER, unique("smoke_logged"))
    version = register(stack, spec.name, CLASSIFIER)
    ship(stack, spec, version)
    stack.app.state.prediction_writer.flush()
    log = PredictionLog(f"sqlite:///{stack.root / 'predictions.db'}")
    try:
        frame = log.window(spec.name, datetime(2000, 1, 1, tzinfo=UTC), datetime.now(UTC) + timedelta(days=1))
    finally:
        log.dispose()
    assert len(frame) == spec.serving.smoke_rows  # one row per scored row, of one request
    assert set(frame["caller_id"]) == {SMOKE_TEST_CALLER} and set(frame["model_version"]) == {version}


# --- attacks on the decision: each must be caught ---------------------------------------------------


def test_a_version_hand_approved_in_mlflow_is_refused_and_never_loaded(stack: Stack) -> None:
    """Attack: register straight into MLflow, set compliance_status=approved and the lineage tags by hand.
    No gate record exists, so deployment refuses and the gateway never loads (runs) the version."""
    spec = stack.spec(CLASSIFIER, unique("hand_approved"))
    stack.registry.ensure_model(spec.name, {})
    version = stack.registry.register_version(
        spec.name, run_id=stack.runs[CLASSIFIER], artifact_path="model", tags=lineage_tags(stack, CLASSIFIER)
    ).version
    stack.client.set_model_version_tag(spec.name, version, Tag.COMPLIANCE_STATUS, ComplianceStatus.APPROVED)
    stack.client.set_registered_model_alias(spec.name, Alias.CHALLENGER, version)
    outcome = deploy(
        spec=spec,
        registry=stack.registry,
        gateway=stack.gateway,
        audit=stack.audit,
        record=stack.record,
        version=None,
    )
    assert outcome.decision == Decision.REFUSED
    assert "no authentic compliance gate decision" in outcome.refusal
    assert "registry tags such as compliance_status do not count" in outcome.refusal
    assert Alias.CHAMPION not in aliases(stack, spec.name)
    assert served(stack, spec.name).get("loaded_versions", []) == []
    # The gateway's own door is shut too: staging it is refused before anything is loaded.
    with pytest.raises(DeploymentFailed, match="UNVERIFIED_MODEL_VERSION|no authentic compliance gate"):
        stack.gateway.stage(spec.name, version)
    assert served(stack, spec.name).get("loaded_versions", []) == []


def test_a_forged_gate_record_without_the_key_is_refused(stack: Stack) -> None:
    """Attack: with database access but not the key, insert an 'approved' gate record (hash recomputed)."""
    import sqlalchemy as sa

    from modelops.audit.chain import audit_table, canonical_json, compute_record_hash

    spec = stack.spec(REGRESSOR, unique("forged_gate"))
    version = register(stack, spec.name, REGRESSOR, status=None)
    files = version_file_hashes(stack.registry, spec.name, version)
    tail = stack.audit.records(limit=1)[0]
    fields = {
        "seq": tail.seq + 1,
        "recorded_at": datetime.now(UTC).isoformat(),
        "actor": "airflow:modelops_compliance_gate.gate",
        "dag_id": None,
        "run_id": None,
        "task_id": None,
        "action": str(AuditAction.GATE_DECIDED),
        "subject": model_subject(spec.name, version),
        "decision": str(Decision.APPROVED),
        "details": {Tag.TRAIN_DATA_SHA256.value: stack.sha256[REGRESSOR], **evidence_summary(files)},
        "evidence": {},
        "prev_hash": tail.record_hash,
        "key_id": tail.key_id,
    }
    fields["record_hash"] = compute_record_hash(fields)
    engine = sa.create_engine(stack.audit_url)
    with engine.begin() as conn:
        # The attacker can recompute the hash but not the HMAC: without the key any value is a guess.
        row = {**fields, "details": canonical_json(fields["details"]), "evidence": "{}", "hmac": "0" * 64}
        conn.execute(audit_table.insert().values(**row))
    engine.dispose()
    try:
        outcome = deploy(
            spec=spec,
            registry=stack.registry,
            gateway=stack.gateway,
            audit=stack.audit,
            record=stack.record,
            version=version,
        )
        assert outcome.decision == Decision.REFUSED
        assert f"seq={fields['seq']}" in outcome.refusal and "fail their HMAC check" in outcome.refusal
        assert Alias.CHAMPION not in aliases(stack, spec.name)
    finally:
        with sa.create_engine(stack.audit_url).begin() as conn:  # the module's later tests append after it
            conn.execute(sa.delete(audit_table).where(audit_table.c.seq == fields["seq"]))


def test_an_approval_that_expired_does_not_deploy(stack: Stack) -> None:
    """The policy's valid_for_hours passed since the gate approved: deployment refuses, naming the expiry."""
    spec = stack.spec(CLASSIFIER, unique("expired"))
    version = register(stack, spec.name, CLASSIFIER, status=None)
    files = version_file_hashes(stack.registry, spec.name, version)
    stack.audit.append(
        actor="test",
        action=AuditAction.GATE_DECIDED,
        subject=model_subject(spec.name, version),
        decision=Decision.APPROVED,
        details={
            Tag.TRAIN_DATA_SHA256: stack.sha256[CLASSIFIER],
            **evidence_summary(files),
            **valid_approval(-1),
        },
    )
    outcome = deploy(
        spec=spec,
        registry=stack.registry,
        gateway=stack.gateway,
        audit=stack.audit,
        record=stack.record,
        version=version,
    )
    assert outcome.decision == Decision.REFUSED
    assert "expired at" in outcome.refusal and "run modelops_compliance_gate" in outcome.refusal
    assert Alias.CHAMPION not in aliases(stack, spec.name)


def test_a_model_file_overwritten_after_the_gate_is_refused(stack: Stack) -> None:
    """Attack: after the gate approved a version, overwrite its model file through MLflow's artifact API
    (no authentication). Deployment re-hashes the files against the gate's record and refuses; the
    champion keeps serving and its predictions do not change."""
    spec = stack.spec(CLASSIFIER, unique("overwritten"))
    name = spec.name
    good = register(stack, name, CLASSIFIER)
    ship(stack, spec, good)
    payload = {"dataframe_split": stack.rows[CLASSIFIER].head(3).to_dict(orient="split", index=False)}
    before = httpx.post(f"{stack.gateway_url}/models/{name}/invocations", json=payload).json()

    # A second run with its own copy of the model, approved by the gate, then tampered with.
    folder = stack.root / f"tamper-{uuid.uuid4().hex[:6]}"
    stack.client.download_artifacts(stack.runs[CLASSIFIER], "model", str(folder))
    run_id = stack.registry.log_run(
        experiment=spec.experiment_name, run_name="tamper", tags={}, artifact_dirs={"model": folder / "model"}
    )
    victim = stack.registry.register_version(
        name, run_id=run_id, artifact_path="model", tags=lineage_tags(stack, CLASSIFIER)
    ).version
    files = authorise(stack.audit, stack.registry, name, victim, register=True, approve=False)
    stack.audit.append(
        actor="test",
        action=AuditAction.GATE_DECIDED,
        subject=model_subject(name, victim),
        decision=Decision.APPROVED,
        details={
            Tag.TRAIN_DATA_SHA256: stack.sha256[CLASSIFIER],
            **evidence_summary(files),
            **valid_approval(),
        },
    )
    mlmodel = folder / "model" / "MLmodel"
    mlmodel.write_text(mlmodel.read_text() + "\n# tampered\n")
    stack.client.log_artifact(run_id, str(mlmodel), "model")  # overwrites model/MLmodel in place

    outcome = deploy(
        spec=spec,
        registry=stack.registry,
        gateway=stack.gateway,
        audit=stack.audit,
        record=stack.record,
        version=victim,
    )
    assert outcome.decision == Decision.REFUSED
    assert (
        "not those the compliance gate approved" in outcome.refusal and "MLmodel changed" in outcome.refusal
    )
    assert aliases(stack, name)[Alias.CHAMPION] == good
    assert httpx.post(f"{stack.gateway_url}/models/{name}/invocations", json=payload).json() == before
    # Even staged directly (an admin call), the gateway re-hashes and refuses to load it.
    with pytest.raises(DeploymentFailed, match="UNVERIFIED_MODEL_VERSION|MLmodel changed"):
        stack.gateway.stage(name, victim)
    assert victim not in served(stack, name)["loaded_versions"]


# --- monitoring's automatic rollback goes through the same path ------------------------------------------


def test_a_critical_verdict_puts_the_previous_champion_back_through_the_deployment_checks(
    stack: Stack,
) -> None:
    from modelops.settings import load_catalog
    from modelops.stages.monitoring import roll_back_on_critical

    spec = stack.spec(CLASSIFIER, unique("incident"))
    first = register(stack, spec.name, CLASSIFIER)
    ship(stack, spec, first)
    second = register(stack, spec.name, CLASSIFIER)
    ship(stack, spec, second)
    assert aliases(stack, spec.name)[Alias.CHAMPION] == second
    policy = load_catalog().policies_for(CLASSIFIER).monitoring
    assessment = {
        "model_name": spec.name,
        "version": second,
        "verdict": "critical",
        "drift_level": "critical",
        "window_start": "2026-03-01T10:00:00+00:00",
        "window_end": "2026-03-01T11:00:00+00:00",
        "business": {"metric": "click_through_rate", "drop": 0.4},
    }

    def roll_back(of: dict[str, Any]) -> Any:
        return roll_back_on_critical(
            spec=spec,
            policy=policy,
            assessment=of,
            registry=stack.registry,
            gateway=stack.gateway,
            audit=stack.audit,
            record=stack.record,
        )

    assert roll_back({**assessment, "verdict": "warning"}) is None  # only critical acts
    outcome = roll_back(assessment)
    assert outcome.decision == Decision.ROLLED_BACK, outcome.summary
    assert aliases(stack, spec.name)[Alias.CHAMPION] == first
    assert stack.gateway.live_version(spec.name) == first
    record = stack.audit.last(action=AuditAction.MODEL_ROLLED_BACK, subject=model_subject(spec.name, second))
    assert record.decision == Decision.ROLLED_BACK and record.details["champion_version"] == first
    assert "critical monitoring verdict" in record.details["reason"]
    # The same verdict again (a retry or a late run): v2 no longer serves, so nothing moves.
    again = roll_back(assessment)
    assert again.decision == Decision.REFUSED and aliases(stack, spec.name)[Alias.CHAMPION] == first


def test_a_rollback_target_whose_files_changed_is_refused(stack: Stack) -> None:
    from modelops.settings import load_catalog
    from modelops.stages.monitoring import roll_back_on_critical

    spec = stack.spec(CLASSIFIER, unique("tampered_target"))
    first = register(stack, spec.name, CLASSIFIER)
    ship(stack, spec, first)
    # The earlier champion's promotion record no longer matches its files: forged hashes on a new record.
    stack.audit.append(
        actor="test",
        action=AuditAction.MODEL_DEPLOYED,
        subject=model_subject(spec.name, first),
        decision=Decision.PROMOTED,
        details={"champion_version": first, "artifacts": {"MLmodel": "0" * 64}},
    )
    second = register(stack, spec.name, CLASSIFIER)
    ship(stack, spec, second)
    outcome = roll_back_on_critical(
        spec=spec,
        policy=load_catalog().policies_for(CLASSIFIER).monitoring,
        assessment={"model_name": spec.name, "version": second, "verdict": "critical",
                    "window_start": "2026-03-01T10:00:00+00:00", "window_end": "2026-03-01T11:00:00+00:00"},
        registry=stack.registry,
        gateway=stack.gateway,
        audit=stack.audit,
        record=stack.record,
    )  # fmt: skip
    assert (
        outcome.decision == Decision.REFUSED
        and "differ from those its promotion record names" in outcome.summary
    )
    assert aliases(stack, spec.name)[Alias.CHAMPION] == second


# --- the canary --------------------------------------------------------------------------------------


def call(stack: Stack, name: str, rows: pd.DataFrame, routing_key: str) -> httpx.Response:
    """One unpinned call for ``name``, from the smoke-test door with ``routing_key`` as its end user."""
    payload = {"dataframe_split": rows.to_dict(orient="split", index=False)}
    headers = {"X-Caller-Id": SMOKE_TEST_CALLER, "X-Routing-Key": routing_key}
    return httpx.post(f"{stack.gateway_url}/models/{name}/invocations", json=payload, headers=headers)


def canary_look(stack: Stack, spec: ModelSpec, *, later_by_minutes: float = 0.0) -> Any:
    """canary_step as the canary task calls it, ``later_by_minutes`` from now."""
    from modelops.stages.canary import canary_step

    stack.app.state.prediction_writer.flush()
    return canary_step(
        spec=spec,
        policy=stack.catalog.policies_for(spec).monitoring,
        registry=stack.registry,
        gateway=stack.gateway,
        audit=stack.audit,
        record=stack.record,
        prediction_log=stack.predictions,
        now=datetime.now(UTC) + timedelta(minutes=later_by_minutes),
    )


def canary_of(stack: Stack, model: str, champion_kind: str, challenger_kind: str, **canary: Any) -> Any:
    """A fresh model whose champion is ``champion_kind`` and whose canary is ``challenger_kind``."""
    spec = stack.spec(CLASSIFIER, unique("canary"), **{"enabled": True, **canary})
    first = register(stack, spec.name, champion_kind)
    assert ship(stack, spec, first).canary is None  # nothing to compare with: promoted after its smoke test
    second = register(stack, spec.name, challenger_kind)
    result = ship(stack, spec, second)
    assert result.smoke_test.passed and result.canary is not None
    return spec, first, second, result


def test_a_second_version_is_a_canary_sticky_per_caller_then_promoted(stack: Stack) -> None:
    spec, first, second, result = canary_of(
        stack, CLASSIFIER, CLASSIFIER, CLASSIFIER, initial_share=0.3, soak_minutes=5, min_calls=20
    )
    name = spec.name
    assert result.canary["challenger_share"] == 0.3 and result.canary["champion_version"] == first
    assert aliases(stack, name) == {Alias.CHAMPION: first, Alias.CHALLENGER: second}
    status = served(stack, name)
    assert status["live_version"] == first and status["challenger_version"] == second
    assert status["challenger_share"] == 0.3
    assert stack.client.get_model_version(name, second).tags[Tag.DEPLOYMENT_STATUS] == DeploymentStatus.CANARY
    started = stack.audit.last(action=AuditAction.TRAFFIC_SHARE_SET, subject=model_subject(name, second))
    assert started.decision == Decision.CANARY_STARTED and started.details["challenger_share"] == 0.3

    # Sticky: each end user always gets the same arm; about the share of them get the challenger.
    rows = stack.rows[CLASSIFIER].head(1)
    arms = {}
    for user in range(120):
        answers = {call(stack, name, rows, f"user-{user}").headers["X-Model-Arm"] for _ in range(2)}
        assert len(answers) == 1, f"user-{user} answered by {answers}"
        arms[user] = answers.pop()
    share = sum(arm == Arm.CHALLENGER for arm in arms.values()) / len(arms)
    assert 0.15 <= share <= 0.45, share
    pinned = call(stack, name, rows, "user-0")
    assert pinned.headers["X-Model-Version"] == (second if arms[0] == Arm.CHALLENGER else first)
    stack.app.state.prediction_writer.flush()
    frame = pd.read_sql(
        f"SELECT model_version, arm FROM modelops_predictions WHERE model_name = '{name}'",
        stack.predictions.engine,
    )
    by_arm = frame.groupby("arm")["model_version"].agg(set).to_dict()
    assert by_arm[Arm.CHAMPION] == {first} and by_arm[Arm.CHALLENGER] == {second}
    assert by_arm[Arm.STAGED] == {first, second}  # the smoke tests, pinned to the staged versions

    # Before the soak ends: wait, without a record; after it: promoted, on record, aliases moved.
    waiting = canary_look(stack, spec)
    assert waiting.decision == "soaking" and waiting.details["next_check"] == result.canary["soak_until"]
    assert not waiting.records
    done = canary_look(stack, spec, later_by_minutes=6)
    assert done.decision == Decision.PROMOTED, done.summary
    assert aliases(stack, name) == {Alias.CHAMPION: second, Alias.PREVIOUS_CHAMPION: first}
    status = served(stack, name)
    assert status["live_version"] == second and status["challenger_version"] is None
    assert answered_by(stack, CLASSIFIER, name) == second
    promoted = promotion(stack, name, second)
    assert promoted.decision == Decision.PROMOTED and promoted.details["previous_version"] == first
    history = done.details["traffic"]
    assert [(p["version"], p["arm"], p["share"]) for p in history] == [
        (first, "champion", 1.0),
        (first, "champion", 0.7),
        (second, "challenger", 0.3),
        (second, "champion", 1.0),
    ]
    assert all(p["to"] for p in history[:-1]) and history[-1]["to"] is None
    # The canary task of a later run finds nothing to do.
    assert canary_look(stack, spec).decision == "no_canary"


def test_a_canary_whose_challenger_fails_every_call_is_rolled_back_before_its_soak_ends(stack: Stack) -> None:
    spec, first, second, _ = canary_of(
        stack, CLASSIFIER, CLASSIFIER, "single_row_fails", initial_share=0.5, soak_minutes=60
    )
    rows = stack.rows[CLASSIFIER].head(1)
    answers = [call(stack, spec.name, rows, f"user-{user}") for user in range(40)]
    failed = [r for r in answers if r.status_code != 200]
    assert failed and all(r.headers["X-Model-Version"] == second for r in failed)
    outcome = canary_look(stack, spec)
    assert outcome.decision == Decision.ROLLED_BACK, outcome.summary
    assert f"v{second} failed" in outcome.summary
    assert aliases(stack, spec.name) == {Alias.CHAMPION: first}
    assert served(stack, spec.name)["challenger_version"] is None
    assert stack.client.get_model_version(spec.name, second).tags[Tag.DEPLOYMENT_STATUS] == "rolled_back"
    ended = stack.audit.last(action=AuditAction.TRAFFIC_SHARE_SET, subject=model_subject(spec.name, second))
    assert ended.decision == Decision.ROLLED_BACK and ended.details["challenger_share"] == 0.0
    assert all(call(stack, spec.name, rows, f"user-{u}").status_code == 200 for u in range(10))


def test_a_canary_worse_on_the_labels_is_rolled_back(stack: Stack) -> None:
    """The challenger answers validly and fast, but was trained on shuffled labels: the labels that
    arrive for its calls show it has no skill, so it goes."""
    spec, first, second, _ = canary_of(
        stack,
        CLASSIFIER,
        CLASSIFIER,
        "shuffled",
        initial_share=0.5,
        soak_minutes=1,
        min_calls=10,
        min_labelled_rows=100,
    )
    frame = pd.read_csv(stack.csv[CLASSIFIER])
    for user, start in enumerate(range(0, len(frame), 10)):
        chunk = frame.iloc[start : start + 10]
        response = call(stack, spec.name, chunk[spec.features], f"user-{user}")
        assert response.status_code == 200, response.text
        stack.app.state.prediction_writer.flush()
        stack.predictions.add_labels(response.headers["X-Request-Id"], chunk[spec.target].tolist())
    outcome = canary_look(stack, spec, later_by_minutes=2)
    assert outcome.decision == Decision.ROLLED_BACK, outcome.summary
    compared = outcome.details["evaluation"]["compared"]
    assert compared["roc_auc"]["drop"] > 0.05 and compared["roc_auc"]["z"] >= 2, compared
    assert "roc_auc" in outcome.details["reason"]
    assert aliases(stack, spec.name) == {Alias.CHAMPION: first}


def test_a_canary_with_too_few_calls_soaks_on_then_rolls_back_at_its_limit(stack: Stack) -> None:
    spec, first, second, result = canary_of(
        stack, CLASSIFIER, CLASSIFIER, CLASSIFIER, soak_minutes=10, max_soak_minutes=30, min_calls=50
    )
    pending = canary_look(stack, spec, later_by_minutes=11)
    assert pending.decision == Decision.CANARY_PENDING and "too few calls" in pending.summary
    assert pending.records and pending.records[0].decision == Decision.CANARY_PENDING
    assert served(stack, spec.name)["challenger_version"] == second
    expired = canary_look(stack, spec, later_by_minutes=31)
    assert expired.decision == Decision.ROLLED_BACK and "too few calls" in expired.summary
    assert aliases(stack, spec.name) == {Alias.CHAMPION: first}


def test_a_canary_retry_reverifies_and_a_second_canary_waits_for_the_first(stack: Stack) -> None:
    from modelops.stages.canary import CanaryError

    spec, first, second, result = canary_of(stack, CLASSIFIER, CLASSIFIER, CLASSIFIER)
    again = ship(stack, spec, second)  # a retried deployment task
    assert again.canary["started_at"] == result.canary["started_at"]
    starts = stack.audit.records(
        action=AuditAction.TRAFFIC_SHARE_SET, subject=model_subject(spec.name, second)
    )
    assert [r.decision for r in starts] == [Decision.CANARY_STARTED]
    third = register(stack, spec.name, CLASSIFIER)
    with pytest.raises(CanaryError, match=rf"canary of v{second} .* is still running"):
        ship(stack, spec, third)
    assert served(stack, spec.name)["challenger_version"] == second


def test_a_forged_or_altered_canary_record_is_not_served(stack: Stack) -> None:
    from modelops.audit import AuditStore as Store

    spec, first, second, _ = canary_of(stack, CLASSIFIER, CLASSIFIER, CLASSIFIER, initial_share=0.5)
    stack.gateway.reload(spec.name)
    assert served(stack, spec.name)["challenger_version"] == second
    # Someone with database access but not the audit key writes a canary for an unapproved version.
    rogue = register(stack, spec.name, "shuffled", status=None)
    forger = Store(stack.audit_url)  # no keyring: its records do not authenticate
    try:
        forger.append(
            actor="intruder",
            action=AuditAction.TRAFFIC_SHARE_SET,
            subject=model_subject(spec.name, rogue),
            decision=Decision.CANARY_STARTED,
            details={
                "champion_version": first,
                "challenger_version": rogue,
                "challenger_share": 0.99,
                **evidence_summary(version_file_hashes(stack.registry, spec.name, rogue)),
            },
        )
    except Exception as refused:  # the store may refuse an unkeyed append outright: as good
        assert "key" in str(refused).lower()
    finally:
        forger.dispose()
    stack.gateway.reload(spec.name)
    status = served(stack, spec.name)
    assert status["challenger_version"] == second and status["challenger_share"] == 0.5


def test_manual_rollback_ends_a_canary_then_puts_the_previous_champion_back(stack: Stack) -> None:
    from modelops.stages.canary import manual_rollback

    spec, first, second, _ = canary_of(stack, CLASSIFIER, CLASSIFIER, CLASSIFIER)

    def roll_back() -> Any:
        return manual_rollback(
            spec=spec,
            registry=stack.registry,
            gateway=stack.gateway,
            audit=stack.audit,
            record=stack.record,
            reason="manual rollback by alice: the canary's answers look odd",
        )

    ended = roll_back()
    assert ended.decision == Decision.ROLLED_BACK and ended.refusal is None
    assert served(stack, spec.name)["challenger_version"] is None
    record = stack.audit.last(action=AuditAction.TRAFFIC_SHARE_SET, subject=model_subject(spec.name, second))
    assert "by alice" in record.details["reason"]
    # No canary now, and only one champion ever: nothing to go back to, which fails the run.
    refused = roll_back()
    assert refused.decision == Decision.REFUSED and "no earlier approved champion" in refused.refusal
    assert aliases(stack, spec.name) == {Alias.CHAMPION: first}


def test_the_canary_task_defers_while_it_soaks_and_the_rollback_form_ends_the_canary(
    stack: Stack, operator_audit: AuditStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow.providers.standard.triggers.temporal import DateTimeTrigger
    from airflow.sdk.exceptions import TaskDeferred

    from modelops.operators.deployment import CanaryOperator, RollbackOperator

    monkeypatch.setenv(
        "AIRFLOW_CONN_MODELOPS_PREDICTIONS",
        json.dumps({"conn_type": "sqlite", "host": str(stack.root / "predictions.db")}),
    )
    spec = stack.catalog.model(REGRESSOR)  # the shipped spec: its canary is on
    champion = stack.gateway.live_version(REGRESSOR)
    if champion is None:
        DeployModelOperator(
            task_id="deploy", model=REGRESSOR, model_version=register(stack, REGRESSOR, REGRESSOR)
        ).execute(task_context("manual__first"))
        champion = stack.gateway.live_version(REGRESSOR)
    version = register(stack, REGRESSOR, REGRESSOR)
    started = DeployModelOperator(task_id="deploy", model=REGRESSOR, model_version=version).execute(
        task_context("manual__canary")
    )
    assert (
        started["decision"] == Decision.CANARY_STARTED and started["canary"]["challenger_version"] == version
    )

    with pytest.raises(TaskDeferred) as deferred:
        CanaryOperator(task_id="canary", model=REGRESSOR, model_version=version).execute(
            task_context("manual__canary")
        )
    trigger = deferred.value.trigger
    assert isinstance(trigger, DateTimeTrigger) and deferred.value.method_name == "execute_complete"
    soak = timedelta(minutes=spec.serving.canary.soak_minutes)
    assert trigger.moment == datetime.fromisoformat(started["canary"]["soak_until"])
    assert timedelta(0) < trigger.moment - datetime.now(UTC) <= soak

    context = {**task_context("manual__rollback"), "params": {"model": REGRESSOR, "reason": "odd answers"}}
    context["dag_run"].triggering_user_name = "alice"
    ended = RollbackOperator(task_id="roll_back").execute(context)
    assert (
        ended["decision"] == Decision.ROLLED_BACK
        and "manual rollback by alice: odd answers" in ended["reason"]
    )
    assert served(stack, REGRESSOR)["challenger_version"] is None
    assert stack.gateway.live_version(REGRESSOR) == champion
    # The canary task of that run then has nothing to watch.
    idle = CanaryOperator(task_id="canary", model=REGRESSOR, model_version=version).execute(
        task_context("manual__canary")
    )
    assert idle["decision"] == "no_canary"


# --- the environment ---------------------------------------------------------------------------------


def test_a_version_saved_with_another_major_framework_version_is_refused_naming_both(stack: Stack) -> None:
    import sklearn
    import yaml

    spec = stack.spec(CLASSIFIER, unique("old_sklearn"))
    frame = pd.read_csv(stack.csv[CLASSIFIER])
    folder = stack.root / f"saved-{spec.name}"
    _save_sklearn(_fit(spec, frame), spec, frame, folder)
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    mlmodel["flavors"]["sklearn"]["sklearn_version"] = "0.24.2"  # as a model saved years ago says
    (folder / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    stack.runs[spec.name] = stack.registry.log_run(
        experiment=spec.experiment_name, run_name=spec.name, tags={}, artifact_dirs={"model": folder}
    )
    version = register(stack, spec.name, spec.name, data=CLASSIFIER)
    outcome = deploy(
        spec=spec,
        registry=stack.registry,
        gateway=stack.gateway,
        audit=stack.audit,
        record=stack.record,
        version=version,
    )
    assert outcome.decision == Decision.REFUSED
    assert (
        "scikit-learn 0.24.2" in outcome.refusal and f"scikit-learn {sklearn.__version__}" in outcome.refusal
    )
    assert "major versions differ" in outcome.refusal
    refused = outcome.records[0]
    assert refused.details["recorded_environment"]["scikit-learn"] == "0.24.2"
    assert served(stack, spec.name) == {}  # never staged, never loaded


def test_a_deployment_records_the_environment_it_checked(stack: Stack) -> None:
    import sklearn

    spec = stack.spec(REGRESSOR, unique("env_ok"))
    version = register(stack, spec.name, REGRESSOR)
    outcome = deploy(
        spec=spec,
        registry=stack.registry,
        gateway=stack.gateway,
        audit=stack.audit,
        record=stack.record,
        version=version,
    )
    assert outcome.decision == Decision.DEPLOYED, outcome.summary
    assert outcome.records[0].details["environment"]["scikit-learn"] == sklearn.__version__
    assert outcome.details["environment_notes"] == []


# --- training ranges -----------------------------------------------------------------------------------


def test_training_ranges_are_read_strictly(tmp_path: Path) -> None:
    from modelops.serving.ranges import RangesUnreadable, outside_ranges, read_ranges, write_ranges

    assert read_ranges(tmp_path) is None  # a version logged without them
    write_ranges(tmp_path, {"user_age": [18.0, 80.0], "empty": [None, None]})
    ranges = read_ranges(tmp_path)
    assert ranges == {"user_age": (18.0, 80.0)}
    frame = pd.DataFrame({"user_age": [17, 18, 80, 10**12], "other": [1, 2, 3, 4]})
    assert outside_ranges(frame, ranges) == {"user_age": 2}
    for bad in ("[1, 2]", '{"user_age": [80, 18]}', '{"user_age": "wide"}', "not json"):
        (tmp_path / "training_ranges.json").write_text(bad)
        with pytest.raises(RangesUnreadable):
            read_ranges(tmp_path)


def _version_with_ranges(stack: Stack, name: str) -> str:
    """A classifier logged as training logs it: with its training ranges beside the model."""
    from modelops.monitoring_reference import numeric_ranges
    from modelops.serving.ranges import write_ranges

    spec = stack.spec(CLASSIFIER)
    frame = pd.read_csv(stack.csv[CLASSIFIER])
    folder = stack.root / f"saved-{name}"
    _save_sklearn(_fit(spec, frame), spec, frame, folder)
    write_ranges(folder, numeric_ranges(frame, spec.numeric_features))
    stack.runs[name] = stack.registry.log_run(
        experiment=spec.experiment_name, run_name=name, tags={}, artifact_dirs={"model": folder}
    )
    version = register(stack, name, name, data=CLASSIFIER)
    assert ship(stack, stack.spec(CLASSIFIER, name), version).smoke_test.passed
    return version


def test_a_value_outside_the_training_range_is_scored_and_flagged_or_refused(stack: Stack) -> None:
    from modelops.serving.gateway import GatewayConfig, ModelPolicy, create_app
    from modelops.serving.screening import Screening

    name = unique("ranges")
    version = _version_with_ranges(stack, name)
    rows = stack.rows[CLASSIFIER].head(2).copy()
    inside = call(stack, name, rows, "user-1")
    assert inside.status_code == 200 and "X-Out-Of-Training-Range" not in inside.headers
    rows.loc[0, "user_age"] = 10**12  # a long, as the signature allows; never seen in training
    flagged = call(stack, name, rows, "user-1")
    assert flagged.status_code == 200, flagged.text
    assert flagged.headers["X-Out-Of-Training-Range"] == "user_age"
    stack.app.state.prediction_writer.flush()
    logged = pd.read_sql(
        f"SELECT flags FROM modelops_predictions WHERE request_id = '{flagged.headers['X-Request-Id']}'",
        stack.predictions.engine,
    )
    assert logged["flags"].tolist() == ["out_of_training_range:user_age"]

    # The same version behind a gateway whose policy for the model refuses such values.
    refusing = create_app(
        GatewayConfig(
            tracking_uri=stack.registry.tracking_uri,
            predictions_url=f"sqlite:///{stack.root / 'predictions-refuse.db'}",
            default_model=name,
            audit_url=stack.audit_url,
            audit_keyring=keyring_for_tests(),
            policies={name: ModelPolicy(screening=Screening.build(ScreeningSpec(out_of_range="refuse")))},
        )
    )
    with serve_in_thread(refusing) as url:
        payload = {"dataframe_split": rows.to_dict(orient="split", index=False)}
        refused = httpx.post(
            f"{url}/models/{name}/invocations", json=payload, headers={"X-Caller-Id": SMOKE_TEST_CALLER}
        )
    assert refused.status_code == 422 and refused.json()["error_code"] == "OUT_OF_TRAINING_RANGE"
    assert "user_age (1 rows)" in refused.json()["message"] and "1000000000000" not in refused.text
    assert version


# --- the batch target ----------------------------------------------------------------------------------


def test_the_batch_target_smoke_tests_in_process_and_promotes_without_a_canary(stack: Stack) -> None:
    from modelops.serving.targets import BatchTarget

    spec = stack.spec(REGRESSOR, unique("batch_target"), enabled=True)
    spec = spec.model_copy(update={"serving": spec.serving.model_copy(update={"target": "batch"})})
    target = BatchTarget(stack.registry, stack.audit)
    first, second = register(stack, spec.name, REGRESSOR), register(stack, spec.name, REGRESSOR)
    try:
        for version, before in ((first, None), (second, first)):
            outcome = deploy(
                spec=spec,
                registry=stack.registry,
                gateway=target,
                audit=stack.audit,
                record=stack.record,
                version=version,
            )
            assert outcome.decision == Decision.DEPLOYED, outcome.refusal  # no canary: nothing to split
            assert outcome.details["previous_version"] == before
            assert outcome.details["serving_url"] == f"dag modelops_batch_scoring (model={spec.name})"
            assert target.live_version(spec.name) == version
        assert aliases(stack, spec.name) == {Alias.CHAMPION: second, Alias.PREVIOUS_CHAMPION: first}
        assert served(stack, spec.name) == {}  # the gateway was never asked
        # A version whose smoke test fails leaves the recorded champion in place.
        bad = register(stack, spec.name, "nan")
        failed = deploy(
            spec=spec,
            registry=stack.registry,
            gateway=target,
            audit=stack.audit,
            record=stack.record,
            version=bad,
        )
        assert failed.decision == Decision.SMOKE_TEST_FAILED and target.live_version(spec.name) == second
    finally:
        target.close()


def test_a_canary_slower_than_the_champion_is_rolled_back(stack: Stack) -> None:
    spec, first, second, _ = canary_of(
        stack, CLASSIFIER, CLASSIFIER, "slow", initial_share=0.5, soak_minutes=1, min_calls=15
    )
    rows = stack.rows[CLASSIFIER].head(1)
    for user in range(60):
        assert call(stack, spec.name, rows, f"user-{user}").status_code == 200
    outcome = canary_look(stack, spec, later_by_minutes=2)
    assert outcome.decision == Decision.ROLLED_BACK, outcome.summary
    compared = outcome.details["evaluation"]["compared"]
    assert compared["p50_latency_ratio"] > 1.5 and compared["latency_p_value"] < 0.01, compared
    assert "p50 latency" in outcome.details["reason"]
