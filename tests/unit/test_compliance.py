"""Stage 3, the compliance gate: the policy evaluation, the policy files, planning which versions a run
gates, and the gate itself on versions trained into a real SQLite MLflow registry under tmp_path (the
stage function, and the operator through a stand-in Airflow context)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest
from airflow.sdk.exceptions import AirflowFailException
from mlflow import MlflowClient
from threadpoolctl import threadpool_limits

from modelops.assets import MODEL_APPROVED
from modelops.audit import AuditStore
from modelops.data.sklearn_datasets import write_diabetes_csv
from modelops.data.synthetic import generate_clicks, write_csv
from modelops.errors import GateFailed, SettingsError, UnknownModel
from modelops.evidence import evidence_summary, version_file_hashes
from modelops.operators.compliance import ComplianceGateOperator
from modelops.registry import ModelRegistry, json_tag
from modelops.settings import (
    PROJECT_ROOT,
    Catalog,
    CompliancePolicy,
    MetricThreshold,
    ModelSpec,
    ServingSpec,
    load_catalog,
)
from modelops.stages.common import plan_versions
from modelops.stages.compliance import evaluate_policy, gate
from modelops.stages.outcome import StageOutcome, sha256_json
from modelops.stages.training import TrainingResult, build_pipeline, holdout_metrics, model_tags, split_frame
from modelops.vocabulary import (
    Alias,
    AuditAction,
    ComplianceStatus,
    Decision,
    Tag,
    Trigger,
    dataset_subject,
    model_subject,
)
from tests.support import keyring_for_tests, mlflow_client, use_sqlite_registry

# skops resolves names through module attributes, which trips Airflow's deprecated-import shims.
pytestmark = pytest.mark.filterwarnings(
    "ignore::FutureWarning", "ignore:Hint. Inferred schema contains integer column:UserWarning"
)

CLASSIFIER = "ctr_recommender"  # binary_classification, risk tier medium: policy 'standard'
REGRESSOR = "diabetes_progression"  # regression, risk tier high: policy 'strict'
SHA = "c" * 64


class OutletEvents(dict):
    """Stand-in for Airflow's outlet event accessors: an accessor (with ``extra``) per asset on demand."""

    def __missing__(self, key: Any) -> SimpleNamespace:
        self[key] = SimpleNamespace(extra={})
        return self[key]


def task_context(run_id: str = "manual__gate", **extra: Any) -> dict[str, Any]:
    dag_run = SimpleNamespace(dag_id="modelops_compliance_gate", run_id=run_id, triggering_user_name="bob")
    return {
        "dag_run": dag_run,
        "ti": SimpleNamespace(task_id="compliance_gate"),
        "outlet_events": OutletEvents(),
        **extra,
    }


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog()


# --- evaluate_policy -----------------------------------------------------------------------------


def small_policy(**overrides: Any) -> CompliancePolicy:
    fields: dict[str, Any] = {
        "name": "test-policy",
        "version": "7",
        "required_tags": [Tag.TRAIN_DATA_SHA256, Tag.CODE_COMMIT, Tag.TRIGGER],
        "metric_thresholds": {
            "binary_classification": {
                "holdout_roc_auc": MetricThreshold(min=0.65),
                "holdout_log_loss": MetricThreshold(max=0.69),
            },
            "regression": {"holdout_r2": MetricThreshold(min=0.2)},
        },
        "require_validated_dataset": True,
    }
    return CompliancePolicy(**{**fields, **overrides})


def classifier_spec(catalog: Catalog, **thresholds: MetricThreshold) -> ModelSpec:
    """The shipped classifier's spec with its own thresholds replaced (default: accuracy in [0.5, 0.99])."""
    own = thresholds or {"holdout_accuracy": MetricThreshold(min=0.5, max=0.99)}
    return catalog.model(CLASSIFIER).model_copy(update={"metric_thresholds": own})


GOOD_TAGS = {
    Tag.TRAIN_DATA_SHA256: SHA,
    Tag.CODE_COMMIT: "abc",
    Tag.TRIGGER: "manual",
    Tag.MODEL_SPEC: CLASSIFIER,
}
GOOD_METRICS = {"holdout_roc_auc": 0.8, "holdout_log_loss": 0.4, "holdout_accuracy": 0.9}


def test_a_compliant_version_passes_every_check(catalog: Catalog) -> None:
    report = evaluate_policy(
        policy=small_policy(),
        spec=classifier_spec(catalog),
        version="3",
        tags=GOOD_TAGS,
        metrics=GOOD_METRICS,
        dataset_validated=True,
    )
    assert report.approved and report.verdict == ComplianceStatus.APPROVED and report.failures == []
    assert [c.name for c in report.checks] == [
        "tag:train_data_sha256",
        "tag:code_commit",
        "tag:trigger",
        "lineage:model_spec",
        "metric:holdout_roc_auc (policy test-policy)",
        "metric:holdout_log_loss (policy test-policy)",
        "metric:holdout_accuracy (model spec ctr_recommender)",
        "data:validated",
    ]
    details = {c.name: c.detail for c in report.checks}
    assert details["metric:holdout_roc_auc (policy test-policy)"] == "holdout_roc_auc=0.8000 within bounds"
    assert details["lineage:model_spec"] == "trained from model spec 'ctr_recommender'"
    assert details["data:validated"] == f"dataset ctr_clicks sha256 {SHA[:12]}... passed validation"
    as_json = json.loads(report.to_json())
    assert as_json["verdict"] == "approved" and as_json["policy"] == "test-policy"
    assert as_json["policy_version"] == "7" and as_json["version"] == "3"
    assert as_json["model_name"] == CLASSIFIER


def test_every_failed_check_is_listed_not_only_the_first(catalog: Catalog) -> None:
    report = evaluate_policy(
        policy=small_policy(),
        spec=classifier_spec(catalog),
        version="4",
        # trigger and model_spec absent, code_commit empty
        tags={Tag.TRAIN_DATA_SHA256: SHA, Tag.CODE_COMMIT: ""},
        metrics={"holdout_roc_auc": 0.5, "holdout_log_loss": 0.9},  # accuracy never logged
        dataset_validated=False,
    )
    assert report.verdict == ComplianceStatus.REJECTED
    failures = {check.name: check.detail for check in report.failures}
    assert list(failures) == [
        "tag:code_commit",
        "tag:trigger",
        "lineage:model_spec",
        "metric:holdout_roc_auc (policy test-policy)",
        "metric:holdout_log_loss (policy test-policy)",
        "metric:holdout_accuracy (model spec ctr_recommender)",
        "data:validated",
    ]
    # The missing tags' wording is checked in test_a_missing_tag_is_named_by_its_key.
    assert {name: detail for name, detail in failures.items() if not name.startswith("tag:")} == {
        "lineage:model_spec": (
            "trained from model spec '', not 'ctr_recommender': the version was not trained for this model"
        ),
        "metric:holdout_roc_auc (policy test-policy)": "holdout_roc_auc=0.5000 below the minimum 0.65",
        "metric:holdout_log_loss (policy test-policy)": "holdout_log_loss=0.9000 above the maximum 0.69",
        "metric:holdout_accuracy (model spec ctr_recommender)": (
            "metric 'holdout_accuracy' was not logged by the training run"
        ),
        "data:validated": (
            f"dataset sha256 {SHA[:12]}... has no passing validation record as dataset 'ctr_clicks' in the "
            "audit log; run the data validation DAG on it first"
        ),
    }
    assert [c.name for c in report.checks if c.passed] == ["tag:train_data_sha256"]


def test_a_missing_tag_is_named_by_its_key(catalog: Catalog) -> None:
    report = evaluate_policy(
        policy=small_policy(),
        spec=classifier_spec(catalog),
        version="4",
        tags={**GOOD_TAGS, Tag.CODE_COMMIT: ""},
        metrics=GOOD_METRICS,
        dataset_validated=True,
    )
    assert [(c.name, c.detail) for c in report.failures] == [
        ("tag:code_commit", "required tag 'code_commit' is missing")
    ]


def test_a_metric_above_a_max_is_caught_even_when_above_its_min(catalog: Catalog) -> None:
    report = evaluate_policy(
        policy=small_policy(),
        spec=classifier_spec(catalog),
        version="5",
        tags=GOOD_TAGS,
        metrics={**GOOD_METRICS, "holdout_accuracy": 0.999},
        dataset_validated=True,
    )
    assert [(c.name, c.detail) for c in report.failures] == [
        (
            "metric:holdout_accuracy (model spec ctr_recommender)",
            "holdout_accuracy=0.9990 above the maximum 0.99",
        )
    ]


def test_the_policy_and_the_spec_bound_one_metric_in_separate_checks(catalog: Catalog) -> None:
    spec = classifier_spec(catalog, holdout_roc_auc=MetricThreshold(min=0.75))

    def failed(auc: float) -> list[str]:
        report = evaluate_policy(
            policy=small_policy(),
            spec=spec,
            version="5",
            tags=GOOD_TAGS,
            metrics={**GOOD_METRICS, "holdout_roc_auc": auc},
            dataset_validated=True,
        )
        names = [c.name for c in report.checks]
        assert "metric:holdout_roc_auc (policy test-policy)" in names
        assert "metric:holdout_roc_auc (model spec ctr_recommender)" in names
        return [c.name for c in report.failures]

    assert failed(0.8) == []
    # Above the policy's bound for every classifier, below this model's own.
    assert failed(0.7) == ["metric:holdout_roc_auc (model spec ctr_recommender)"]
    assert failed(0.6) == [
        "metric:holdout_roc_auc (policy test-policy)",
        "metric:holdout_roc_auc (model spec ctr_recommender)",
    ]


def test_policy_thresholds_apply_to_the_models_task_kind_only(catalog: Catalog) -> None:
    spec = catalog.model(REGRESSOR)
    metrics = {"holdout_r2": 0.5, "holdout_rmse": 55.0}
    tags = {**GOOD_TAGS, Tag.MODEL_SPEC: REGRESSOR}
    report = evaluate_policy(
        policy=small_policy(), spec=spec, version="1", tags=tags, metrics=metrics, dataset_validated=True
    )
    assert report.approved
    assert [c.name for c in report.checks if c.name.startswith("metric:")] == [
        "metric:holdout_r2 (policy test-policy)",
        *[f"metric:{name} (model spec {REGRESSOR})" for name in spec.metric_thresholds],
    ]
    # A policy with no bounds for regression leaves only the spec's own.
    classifiers_only = small_policy(
        metric_thresholds={"binary_classification": {"holdout_roc_auc": {"min": 0.9}}}
    )
    report = evaluate_policy(
        policy=classifiers_only, spec=spec, version="1", tags=tags, metrics=metrics, dataset_validated=True
    )
    assert report.approved
    assert [c.name for c in report.checks if c.name.startswith("metric:")] == [
        f"metric:{name} (model spec {REGRESSOR})" for name in spec.metric_thresholds
    ]


def test_the_strict_policy_holds_a_regressor_to_a_higher_bar_than_the_standard_one(catalog: Catalog) -> None:
    spec = catalog.model(REGRESSOR)
    assert catalog.policies_for(spec).compliance.name == "strict"
    assert catalog.policies_for(CLASSIFIER).compliance.name == "standard"
    tags = {**GOOD_TAGS, Tag.MODEL_SPEC: REGRESSOR}

    def failed(policy: str, r2: float) -> list[str]:
        report = evaluate_policy(
            policy=catalog.compliance_policies[policy].model_copy(update={"required_tags": []}),
            spec=spec,
            version="1",
            tags=tags,
            metrics={"holdout_r2": r2, "holdout_rmse": 55.0},
            dataset_validated=True,
        )
        return [c.name for c in report.failures]

    own = f"metric:holdout_r2 (model spec {REGRESSOR})"
    assert failed("standard", 0.1) == [own]
    assert failed("strict", 0.1) == ["metric:holdout_r2 (policy strict)", own]
    assert failed("strict", 0.25) == [own]  # the strict policy's bound met, the model's own not
    assert failed("strict", 0.5) == []


def test_a_version_trained_for_another_model_fails_its_lineage(catalog: Catalog) -> None:
    report = evaluate_policy(
        policy=small_policy(),
        spec=classifier_spec(catalog),
        version="5",
        tags={**GOOD_TAGS, Tag.MODEL_SPEC: REGRESSOR},
        metrics=GOOD_METRICS,
        dataset_validated=True,
    )
    assert [(c.name, c.detail) for c in report.failures] == [
        (
            "lineage:model_spec",
            f"trained from model spec {REGRESSOR!r}, not 'ctr_recommender': "
            "the version was not trained for this model",
        )
    ]


@pytest.mark.parametrize("validated", [False, None])
def test_an_unvalidated_or_unknown_dataset_fails(catalog: Catalog, validated: bool | None) -> None:
    report = evaluate_policy(
        policy=small_policy(),
        spec=classifier_spec(catalog),
        version="6",
        tags=GOOD_TAGS,
        metrics=GOOD_METRICS,
        dataset_validated=validated,
    )
    assert [c.name for c in report.failures] == ["data:validated"]


def test_without_a_data_hash_the_data_cannot_be_traced(catalog: Catalog) -> None:
    tags = {Tag.MODEL_SPEC: CLASSIFIER}
    report = evaluate_policy(
        policy=small_policy(required_tags=[]),
        spec=classifier_spec(catalog),
        version="6",
        tags=tags,
        metrics=GOOD_METRICS,
        dataset_validated=True,
    )
    assert [(c.name, c.detail) for c in report.failures] == [
        ("data:validated", "no train_data_sha256 tag, so the data cannot be traced")
    ]
    unchecked = evaluate_policy(
        policy=small_policy(required_tags=[], require_validated_dataset=False),
        spec=classifier_spec(catalog),
        version="6",
        tags=tags,
        metrics=GOOD_METRICS,
        dataset_validated=None,
    )
    assert unchecked.approved and not any(c.name == "data:validated" for c in unchecked.checks)


# --- the policy files ----------------------------------------------------------------------------


@pytest.fixture
def include_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    include = tmp_path / "include"
    shutil.copytree(PROJECT_ROOT / "include", include)
    monkeypatch.setenv("MODELOPS_INCLUDE_DIR", str(include))
    return include


def test_the_shipped_policies_load(catalog: Catalog) -> None:
    assert set(catalog.compliance_policies) == {"standard", "strict"}
    standard, strict = catalog.compliance_policies["standard"], catalog.compliance_policies["strict"]
    for policy in (standard, strict):
        assert Tag.TRAIN_DATA_SHA256 in policy.required_tags and policy.require_validated_dataset
        assert set(policy.metric_thresholds) == {"binary_classification", "regression"}
    for task, metric in (("binary_classification", "holdout_roc_auc"), ("regression", "holdout_r2")):
        assert strict.metric_thresholds[task][metric].min > standard.metric_thresholds[task][metric].min


def test_a_policy_with_an_unknown_field_names_the_file_and_the_field(include_copy: Path) -> None:
    policy_file = include_copy / "policies" / "compliance" / "standard.yaml"
    policy_file.write_text(policy_file.read_text() + "approved_by: alice\n")
    with pytest.raises(SettingsError) as raised:
        load_catalog()
    message = str(raised.value)
    assert str(policy_file) in message
    assert "field 'approved_by': unknown field (remove it or check its spelling)" in message


def test_a_misspelt_threshold_bound_names_its_path(include_copy: Path) -> None:
    policy_file = include_copy / "policies" / "compliance" / "strict.yaml"
    text = policy_file.read_text()
    assert "holdout_roc_auc: {min: 0.7}" in text
    policy_file.write_text(text.replace("holdout_roc_auc: {min: 0.7}", "holdout_roc_auc: {minimum: 0.7}"))
    with pytest.raises(SettingsError) as raised:
        load_catalog()
    message = str(raised.value)
    assert str(policy_file) in message
    assert "metric_thresholds.binary_classification.holdout_roc_auc.minimum" in message


def test_a_threshold_on_a_metric_the_task_kind_does_not_log_is_refused(include_copy: Path) -> None:
    policy_file = include_copy / "policies" / "compliance" / "standard.yaml"
    text = policy_file.read_text()
    assert "holdout_r2: {min: 0.0}" in text
    policy_file.write_text(text.replace("holdout_r2: {min: 0.0}", "holdout_roc_auc: {min: 0.0}"))
    with pytest.raises(SettingsError) as raised:
        load_catalog()
    message = str(raised.value)
    assert str(policy_file) in message and "metric_thresholds.regression names ['holdout_roc_auc']" in message


# --- which versions a run gates ------------------------------------------------------------------


def test_the_plan_takes_the_newest_version_per_model_from_the_events(catalog: Catalog) -> None:
    events = [
        {"model_name": CLASSIFIER, "version": "9"},
        {"model_name": REGRESSOR, "version": "2"},
        {"model_name": CLASSIFIER, "version": "10"},  # newer by number, not by string
        {"model_name": CLASSIFIER, "version": "4"},
        {"model_name": "no_such_model", "version": "11"},  # a model no spec declares: ignored
        {"model_name": REGRESSOR},  # no version: ignored
    ]
    plan = plan_versions(catalog=catalog, events=events, model=REGRESSOR, model_version="1")
    assert plan == [
        {"model": CLASSIFIER, "model_version": "10"},
        {"model": REGRESSOR, "model_version": "2"},
    ]  # with events, the form's model and version are not used


def test_events_only_of_unknown_models_plan_nothing(catalog: Catalog) -> None:
    events = [{"model_name": "no_such_model", "version": "1"}]
    assert plan_versions(catalog=catalog, events=events, model=CLASSIFIER, model_version=None) == []


def test_a_forged_event_with_a_version_that_is_no_number_is_ignored(catalog: Catalog) -> None:
    events = [{"model_name": CLASSIFIER, "version": "{{ 7 * 7 }}"}, {"model_name": REGRESSOR, "version": "3"}]
    plan = plan_versions(catalog=catalog, events=events, model=None, model_version=None)
    assert plan == [{"model": REGRESSOR, "model_version": "3"}]


def test_deployment_plans_no_version_of_a_model_that_does_not_serve(catalog: Catalog) -> None:
    quiet = catalog.models[REGRESSOR].model_copy(update={"serving": ServingSpec(enabled=False)})
    no_serving = dataclasses.replace(catalog, models={**catalog.models, REGRESSOR: quiet})
    events = [{"model_name": CLASSIFIER, "version": "2"}, {"model_name": REGRESSOR, "version": "3"}]
    deploying = plan_versions(
        catalog=no_serving, events=events, model=None, model_version=None, serving_only=True
    )
    assert deploying == [{"model": CLASSIFIER, "model_version": "2"}]
    # The gate still gates it: approval and serving are separate decisions.
    gating = plan_versions(catalog=no_serving, events=events, model=None, model_version=None)
    assert [entry["model"] for entry in gating] == [CLASSIFIER, REGRESSOR]


@pytest.mark.parametrize(("given", "planned"), [(7, "7"), ("3", "3"), ("", None), (None, None)])
def test_a_manual_run_uses_the_forms_model_and_version(
    catalog: Catalog, given: int | str | None, planned: str | None
) -> None:
    plan = plan_versions(catalog=catalog, events=[], model=REGRESSOR, model_version=given)
    assert plan == [{"model": REGRESSOR, "model_version": planned}]


def test_a_manual_run_needs_a_known_model(catalog: Catalog) -> None:
    with pytest.raises(GateFailed, match="a manual run needs a model"):
        plan_versions(catalog=catalog, events=[], model=None, model_version="1")
    with pytest.raises(UnknownModel, match="no_such_model"):
        plan_versions(catalog=catalog, events=[], model="no_such_model", model_version=None)


# --- the gate on registered versions -------------------------------------------------------------


@dataclass(frozen=True)
class Trained:
    root: Path
    registry: ModelRegistry
    client: MlflowClient  # a raw client: reads the registry as an outside user would
    results: dict[str, TrainingResult]  # model -> the version "training" registered (alias candidate)
    sha256: dict[str, str]  # model -> hash of its training data


def lineage_tags(spec: ModelSpec, csv: Path, sha: str) -> dict[str, str]:
    """Every lineage tag training sets on a version (see stages/training.py)."""
    return {
        Tag.TRAIN_DATA_SHA256: sha,
        Tag.TRAIN_DATA_URI: csv.as_uri(),
        Tag.DATASET: spec.dataset,
        Tag.FRAMEWORK: "scikit-learn",
        Tag.FRAMEWORK_VERSION: "1.9.1",
        Tag.PYTHON_VERSION: "3.11.7",
        Tag.CODE_COMMIT: "0123abc",
        Tag.AIRFLOW_DAG_ID: "modelops_training",
        Tag.AIRFLOW_RUN_ID: f"manual__{spec.name}",
        Tag.TRIGGER: Trigger.MANUAL,
        Tag.MODEL_SPEC: spec.name,
        Tag.TASK: spec.task,
        Tag.ESTIMATOR: spec.estimator.class_path,
        Tag.SKOPS_TRUSTED_TYPES: json_tag(spec.skops_trusted_types),
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, catalog: Catalog) -> Iterator[Trained]:
    """One registry for the module with one version of each shipped model, registered as training does:
    its spec's pipeline fitted on the model's own data, holdout metrics logged to a run, lineage tags,
    alias candidate. The gate never loads the model, so small stand-in model files are logged (saving a
    real one costs MLflow a requirements-inference subprocess); the gate hashes them."""
    root = tmp_path_factory.mktemp("compliance")
    with pytest.MonkeyPatch.context() as patch:
        tracking_uri, registry, _ = use_sqlite_registry(root, patch)
        clicks = write_csv(generate_clicks(2000, seed=7), root / "clicks.csv")
        diabetes = root / "diabetes.csv"
        write_diabetes_csv(diabetes)
        results, hashes = {}, {}
        for name, csv in ((CLASSIFIER, clicks), (REGRESSOR, diabetes)):
            spec = catalog.model(name)
            hashes[name] = hashlib.sha256(csv.read_bytes()).hexdigest()
            x_train, x_holdout, y_train, y_holdout = split_frame(pd.read_csv(csv), spec)
            # One OpenMP thread: on a busy machine the gradient-boosting fit's threads otherwise spin-wait
            # for each other and take a minute instead of two seconds.
            with threadpool_limits(1):
                model = build_pipeline(spec).fit(x_train, y_train)
            metrics = holdout_metrics(spec, model, x_holdout, y_holdout)
            tags = lineage_tags(spec, csv, hashes[name])
            registry.ensure_model(name, model_tags(spec, catalog))
            files = root / f"files-{name}"
            files.mkdir()
            (files / "MLmodel").write_text(f"flavors: {{}}\nmodel: {name}\n")
            (files / "model.skops").write_bytes(name.encode() * 64)
            run_id = registry.log_run(
                experiment=spec.experiment_name,
                run_name=f"train-{name}",
                tags=tags,
                metrics=metrics,
                artifact_dirs={"model": files},
            )
            version = registry.register_version(name, run_id=run_id, artifact_path="model", tags=tags)
            registry.set_alias(name, Alias.CANDIDATE, version.version)
            results[name] = TrainingResult(name, version.version, run_id, metrics, tags, reused=False)
        yield Trained(root, registry, mlflow_client(tracking_uri), results, hashes)


def register_copy(
    trained: Trained,
    name: str,
    *,
    run_id: str | None = None,
    tags: dict[str, str] | None = None,
    audit: AuditStore | Path | None = None,
) -> str:
    """A new version of ``name`` from the model its training run logged (or from run ``run_id``), with
    the trained version's lineage tags, or exactly ``tags``; with ``audit`` (a store, or a MODELOPS_HOME
    whose audit.db to use), also the registration record training writes."""
    result = trained.results[name]
    version = trained.registry.register_version(
        name,
        run_id=run_id or result.run_id,
        artifact_path="model",
        tags=result.tags if tags is None else tags,
    )
    if audit is not None:
        store = (
            AuditStore(f"sqlite:///{audit}/audit.db", keyring=keyring_for_tests())
            if isinstance(audit, Path)
            else audit
        )
        record_registration(trained, store, name, version.version)
        if isinstance(audit, Path):
            store.dispose()
    return version.version


def record_registration(trained: Trained, store: AuditStore, name: str, version: str) -> None:
    """The registration record training writes: the version's run, tags, metrics and file hashes."""
    found = trained.registry.version(name, version)
    files = version_file_hashes(trained.registry, name, version)
    store.append(
        actor="test",
        action=AuditAction.MODEL_REGISTERED,
        subject=model_subject(name, version),
        decision=Decision.CANDIDATE,
        details={
            "run_id": found.run_id,
            "tags": found.tags,
            "metrics": trained.registry.run_metrics(found.run_id),
            **evidence_summary(files),
        },
    )


@pytest.fixture
def audit(tmp_path: Path) -> Iterator[AuditStore]:
    store = AuditStore(f"sqlite:///{tmp_path}/audit.db", keyring=keyring_for_tests())
    yield store
    store.dispose()


def record_validation(
    store: AuditStore, sha: str, dataset: str, decision: Decision = Decision.PASSED
) -> None:
    store.append(
        actor="test",
        action=AuditAction.DATASET_VALIDATED,
        subject=dataset_subject(sha),
        decision=decision,
        details={"dataset": dataset},
    )


def aliases(trained: Trained, name: str) -> dict[str, str]:
    return {alias: str(v) for alias, v in trained.client.get_registered_model(name).aliases.items()}


def gate_report(trained: Trained, name: str, version: str) -> dict[str, Any]:
    run_id = trained.client.get_model_version(name, version).run_id
    local = trained.client.download_artifacts(
        run_id, f"compliance/gate_report_v{version}.json", str(trained.root)
    )
    return json.loads(Path(local).read_text())


def run_gate(
    trained: Trained, catalog: Catalog, audit: AuditStore, name: str, version: str | None
) -> StageOutcome:
    outcome = gate(
        spec=catalog.model(name), catalog=catalog, registry=trained.registry, audit=audit, version=version
    )
    for effect in outcome.effects:  # as the operator does, after recording
        effect()
    return outcome


def test_the_gate_approves_a_compliant_classifier(
    trained: Trained, catalog: Catalog, audit: AuditStore
) -> None:
    version = register_copy(trained, CLASSIFIER, audit=audit)
    record_validation(audit, trained.sha256[CLASSIFIER], "ctr_clicks")
    outcome = run_gate(trained, catalog, audit, CLASSIFIER, version)

    policy = catalog.policies_for(CLASSIFIER).compliance
    label = f"{policy.name}@{policy.version}"
    assert label == "standard@2"
    assert outcome.decision == Decision.APPROVED and outcome.refusal is None
    assert aliases(trained, CLASSIFIER)[Alias.CHALLENGER] == version
    tags = trained.client.get_model_version(CLASSIFIER, version).tags
    assert tags[Tag.COMPLIANCE_STATUS] == "approved" and tags[Tag.COMPLIANCE_POLICY] == label

    # The report is an artifact of the version's training run; the tag is the hash of exactly it.
    report = gate_report(trained, CLASSIFIER, version)
    assert report["verdict"] == "approved" and all(check["passed"] for check in report["checks"])
    assert [check["name"] for check in report["checks"]] == [
        "provenance:registered_by_training",
        "files:unchanged_since_training",
        *[f"tag:{tag}" for tag in policy.required_tags],
        "lineage:model_spec",
        "metric:holdout_roc_auc (policy standard)",
        "metric:holdout_roc_auc (model spec ctr_recommender)",
        "metric:holdout_log_loss (model spec ctr_recommender)",
        "data:validated",
    ]
    assert tags[Tag.COMPLIANCE_REPORT_SHA256] == sha256_json(report)

    assert outcome.asset_extra == {"model_name": CLASSIFIER, "version": version, "policy": label}
    xcom = outcome.xcom()
    assert xcom["verdict"] == "approved" and xcom["version"] == version
    assert xcom["checks"] == len(report["checks"])
    (entry,) = outcome.records
    assert entry.action == AuditAction.GATE_DECIDED and entry.decision == Decision.APPROVED
    assert entry.subject == model_subject(CLASSIFIER, version)
    assert entry.details["failed"] == [] and entry.details["policy"] == label
    assert entry.details["risk_tier"] == "medium"
    assert entry.evidence == {
        "policy": sha256_json(policy.model_dump()),
        "gate_report": tags[Tag.COMPLIANCE_REPORT_SHA256],
        "artifacts": sha256_json(version_file_hashes(trained.registry, CLASSIFIER, version)),
        "dataset": trained.sha256[CLASSIFIER],
    }
    assert entry.details["artifacts"] == version_file_hashes(trained.registry, CLASSIFIER, version)


def test_the_gate_approves_the_regression_model_under_the_strict_policy(
    trained: Trained, catalog: Catalog, audit: AuditStore
) -> None:
    version = register_copy(trained, REGRESSOR, audit=audit)
    metrics = trained.results[REGRESSOR].metrics
    assert metrics["holdout_r2"] >= 0.3 and metrics["holdout_rmse"] <= 70  # what the spec asks
    record_validation(audit, trained.sha256[REGRESSOR], "diabetes")
    outcome = run_gate(trained, catalog, audit, REGRESSOR, version)

    assert outcome.decision == Decision.APPROVED, outcome.refusal
    assert aliases(trained, REGRESSOR)[Alias.CHALLENGER] == version
    assert trained.client.get_model_version(REGRESSOR, version).tags[Tag.COMPLIANCE_POLICY] == "strict@1"
    report = gate_report(trained, REGRESSOR, version)
    metric_checks = [check["name"] for check in report["checks"] if check["name"].startswith("metric:")]
    assert metric_checks == [
        "metric:holdout_r2 (policy strict)",
        "metric:holdout_rmse (model spec diabetes_progression)",
        "metric:holdout_r2 (model spec diabetes_progression)",
    ]
    (entry,) = outcome.records
    assert entry.details["risk_tier"] == "high" and entry.details["policy"] == "strict@1"
    assert outcome.asset_extra == {"model_name": REGRESSOR, "version": version, "policy": "strict@1"}


def test_a_regressor_below_the_strict_policys_r2_is_rejected_and_no_alias_moves(
    trained: Trained, catalog: Catalog, audit: AuditStore
) -> None:
    spec = catalog.model(REGRESSOR)
    # A run like the trained one, except that its holdout R² is below the strict policy's 0.2.
    weak_run = trained.registry.log_run(
        experiment=spec.experiment_name,
        run_name="weak",
        tags={},
        metrics={**trained.results[REGRESSOR].metrics, "holdout_r2": 0.15},
        artifact_dirs={"model": trained.root / f"files-{REGRESSOR}"},
    )
    version = register_copy(trained, REGRESSOR, run_id=weak_run, audit=audit)
    record_validation(audit, trained.sha256[REGRESSOR], "diabetes")
    before = aliases(trained, REGRESSOR)

    outcome = run_gate(trained, catalog, audit, REGRESSOR, version)
    assert outcome.decision == Decision.REJECTED and outcome.asset_extra is None
    assert aliases(trained, REGRESSOR) == before and version not in before.values()
    tags = trained.client.get_model_version(REGRESSOR, version).tags
    assert tags[Tag.COMPLIANCE_STATUS] == "rejected"

    failed = ["metric:holdout_r2 (policy strict)", "metric:holdout_r2 (model spec diabetes_progression)"]
    (entry,) = outcome.records
    assert entry.decision == Decision.REJECTED and entry.details["failed"] == failed
    assert outcome.refusal is not None
    total = len(gate_report(trained, REGRESSOR, version)["checks"])
    assert f"2 of {total} checks failed" in outcome.refusal
    assert "metric:holdout_r2 (policy strict): holdout_r2=0.1500 below the minimum 0.2" in outcome.refusal
    assert "holdout_r2=0.1500 below the minimum 0.3" in outcome.refusal
    assert "No alias moved" in outcome.refusal
    assert gate_report(trained, REGRESSOR, version)["verdict"] == "rejected"


def test_a_version_registered_under_another_models_name_fails_its_lineage(
    trained: Trained, catalog: Catalog, audit: AuditStore
) -> None:
    # Everything about it would pass for the classifier, except that its tags say it was trained as
    # the regressor's spec.
    tags = {**trained.results[CLASSIFIER].tags, Tag.MODEL_SPEC: REGRESSOR}
    version = register_copy(trained, CLASSIFIER, tags=tags, audit=audit)
    record_validation(audit, trained.sha256[CLASSIFIER], "ctr_clicks")
    before = aliases(trained, CLASSIFIER)

    outcome = run_gate(trained, catalog, audit, CLASSIFIER, version)
    assert outcome.decision == Decision.REJECTED
    (entry,) = outcome.records
    assert entry.details["failed"] == ["lineage:model_spec"]
    assert outcome.refusal is not None and "1 of " in outcome.refusal
    assert f"trained from model spec {REGRESSOR!r}, not {CLASSIFIER!r}" in outcome.refusal
    assert aliases(trained, CLASSIFIER) == before


def test_data_validated_needs_a_passing_record_of_the_models_own_dataset(
    trained: Trained, catalog: Catalog, audit: AuditStore
) -> None:
    sha = trained.sha256[CLASSIFIER]
    version = register_copy(trained, CLASSIFIER, audit=audit)

    def failed() -> list[str]:
        (entry,) = run_gate(trained, catalog, audit, CLASSIFIER, version).records
        return entry.details["failed"]

    assert failed() == ["data:validated"]  # never validated
    record_validation(audit, sha, "diabetes")  # the same bytes, passed as another dataset
    assert failed() == ["data:validated"]
    record_validation(audit, sha, "ctr_clicks", Decision.FAILED)  # its own dataset, but failed
    assert failed() == ["data:validated"]
    record_validation(audit, sha, "ctr_clicks")
    assert failed() == []
    assert aliases(trained, CLASSIFIER)[Alias.CHALLENGER] == version


def test_without_a_version_the_gate_takes_the_candidate(
    trained: Trained, catalog: Catalog, audit: AuditStore
) -> None:
    candidate = trained.results[REGRESSOR].version
    assert aliases(trained, REGRESSOR)[Alias.CANDIDATE] == candidate
    record_registration(trained, audit, REGRESSOR, candidate)
    record_validation(audit, trained.sha256[REGRESSOR], "diabetes")
    outcome = run_gate(trained, catalog, audit, REGRESSOR, None)
    assert outcome.decision == Decision.APPROVED and outcome.details["version"] == candidate
    assert aliases(trained, REGRESSOR)[Alias.CHALLENGER] == candidate


def test_a_model_with_no_candidate_cannot_be_gated_without_a_version(
    trained: Trained, catalog: Catalog, audit: AuditStore
) -> None:
    spec = catalog.model(CLASSIFIER).model_copy(update={"name": "never_trained"})
    with pytest.raises(GateFailed, match="'never_trained' has no version with alias") as raised:
        gate(spec=spec, catalog=catalog, registry=trained.registry, audit=audit, version=None)
    assert "give model_version explicitly" in str(raised.value)


def test_the_missing_alias_is_named_by_its_value(
    trained: Trained, catalog: Catalog, audit: AuditStore
) -> None:
    spec = catalog.model(CLASSIFIER).model_copy(update={"name": "never_trained"})
    with pytest.raises(GateFailed, match="has no version with alias 'candidate';"):
        gate(spec=spec, catalog=catalog, registry=trained.registry, audit=audit, version=None)


# --- the operator --------------------------------------------------------------------------------


def audit_records(home: Path, action: str) -> list[Any]:
    store = AuditStore(f"sqlite:///{home}/audit.db", keyring=keyring_for_tests())
    try:
        assert store.verify().ok
        return store.records(action=action)
    finally:
        store.dispose()


def record_validated_in(home: Path, sha: str, dataset: str) -> None:
    store = AuditStore(f"sqlite:///{home}/audit.db", keyring=keyring_for_tests())
    try:
        record_validation(store, sha, dataset)
    finally:
        store.dispose()


def test_operator_approves_records_and_emits_the_event(
    trained: Trained, catalog: Catalog, modelops_home: Path
) -> None:
    version = register_copy(trained, CLASSIFIER, audit=modelops_home)
    record_validated_in(modelops_home, trained.sha256[CLASSIFIER], "ctr_clicks")
    context = task_context()
    result = ComplianceGateOperator(
        task_id="compliance_gate", model=CLASSIFIER, model_version=int(version), outlets=[MODEL_APPROVED]
    ).execute(context)
    assert json.loads(json.dumps(result)) == result
    assert result["verdict"] == "approved" and result["decision"] == "approved"
    assert result["version"] == version and result["model_name"] == CLASSIFIER

    assert aliases(trained, CLASSIFIER)[Alias.CHALLENGER] == version
    assert context["outlet_events"][MODEL_APPROVED].extra == {
        "model_name": CLASSIFIER,
        "version": version,
        "policy": "standard@2",
    }
    (record,) = audit_records(modelops_home, AuditAction.GATE_DECIDED)
    assert record.decision == "approved" and record.subject == model_subject(CLASSIFIER, version)
    assert record.details["failed"] == []
    tags = trained.client.get_model_version(CLASSIFIER, version).tags
    assert record.evidence["gate_report"] == tags[Tag.COMPLIANCE_REPORT_SHA256]
    assert record.evidence["dataset"] == trained.sha256[CLASSIFIER]
    assert record.actor == "airflow:modelops_compliance_gate.compliance_gate (triggered by bob)"
    assert (record.dag_id, record.run_id, record.task_id) == (
        "modelops_compliance_gate",
        "manual__gate",
        "compliance_gate",
    )


def test_operator_records_a_rejection_before_failing_and_moves_no_alias(
    trained: Trained, catalog: Catalog, modelops_home: Path
) -> None:
    # A version whose lineage is incomplete and whose data was never validated.
    partial_tags = {Tag.TRAIN_DATA_SHA256: "d" * 64, Tag.FRAMEWORK: "scikit-learn", Tag.TRIGGER: "manual"}
    rejected = register_copy(trained, CLASSIFIER, tags=partial_tags, audit=modelops_home)
    before = aliases(trained, CLASSIFIER)
    context = task_context("manual__reject")

    with pytest.raises(AirflowFailException) as raised:  # fails without a retry: it would not change
        ComplianceGateOperator(
            task_id="compliance_gate", model=CLASSIFIER, model_version=rejected, outlets=[MODEL_APPROVED]
        ).execute(context)

    assert aliases(trained, CLASSIFIER) == before and rejected not in before.values()
    assert MODEL_APPROVED not in context["outlet_events"]
    tags = trained.client.get_model_version(CLASSIFIER, rejected).tags
    assert tags[Tag.COMPLIANCE_STATUS] == "rejected"

    policy = catalog.policies_for(CLASSIFIER).compliance
    missing = [tag for tag in policy.required_tags if tag not in partial_tags]
    expected_failed = [f"tag:{tag}" for tag in missing] + ["lineage:model_spec", "data:validated"]
    (record,) = audit_records(modelops_home, AuditAction.GATE_DECIDED)
    assert record.decision == "rejected" and record.subject == model_subject(CLASSIFIER, rejected)
    assert record.details["failed"] == expected_failed
    assert record.evidence["gate_report"] == tags[Tag.COMPLIANCE_REPORT_SHA256]

    message = str(raised.value)
    report = gate_report(trained, CLASSIFIER, rejected)
    assert report["verdict"] == "rejected"
    assert f"{len(expected_failed)} of {len(report['checks'])} checks failed" in message
    assert all(name in message for name in expected_failed)
    assert "No alias moved" in message


def test_operator_fails_without_retry_when_there_is_no_version_to_gate(
    trained: Trained, catalog: Catalog, modelops_home: Path
) -> None:
    ghost = catalog.model(CLASSIFIER).model_copy(update={"name": "never_trained"})
    operator = ComplianceGateOperator(task_id="compliance_gate", model="never_trained")
    operator.catalog = dataclasses.replace(catalog, models={**catalog.models, "never_trained": ghost})
    with pytest.raises(AirflowFailException, match="'never_trained' has no version with alias"):
        operator.execute(task_context("manual__ghost"))
    # No decision about any version, but the task's own failure is on record.
    assert [r.decision for r in audit_records(modelops_home, AuditAction.GATE_DECIDED)] == [Decision.ERROR]


# --- attacks on the gate: each must be caught -----------------------------------------------------


def test_a_version_registered_straight_into_mlflow_is_rejected_with_a_record(
    trained: Trained, catalog: Catalog, audit: AuditStore
) -> None:
    """Attack: register a version with an MLflow client, with every lineage tag and
    compliance_status=approved set by hand. Training never recorded it, so the gate rejects it (and says
    why), recording the rejection; no alias moves."""
    version = register_copy(trained, CLASSIFIER)  # no registration record: not the training stage's
    trained.client.set_model_version_tag(CLASSIFIER, version, Tag.COMPLIANCE_STATUS, "approved")
    record_validation(audit, trained.sha256[CLASSIFIER], "ctr_clicks")
    before = aliases(trained, CLASSIFIER)
    outcome = run_gate(trained, catalog, audit, CLASSIFIER, version)
    assert outcome.decision == Decision.REJECTED
    (entry,) = outcome.records
    assert entry.details["failed"] == ["provenance:registered_by_training", "files:unchanged_since_training"]
    assert "was not registered by the training stage" in outcome.refusal
    assert aliases(trained, CLASSIFIER) == before


def test_model_files_changed_after_training_are_rejected(
    trained: Trained, catalog: Catalog, audit: AuditStore, tmp_path: Path
) -> None:
    """Attack: overwrite a registered version's model file through MLflow's artifact API before the gate."""
    files = tmp_path / "model"
    files.mkdir()
    (files / "MLmodel").write_text("flavors: {}\n")
    (files / "model.skops").write_bytes(b"honest")
    run_id = trained.registry.log_run(
        experiment=catalog.model(CLASSIFIER).experiment_name,
        run_name="to-tamper",
        tags={},
        metrics=trained.results[CLASSIFIER].metrics,
        artifact_dirs={"model": files},
    )
    version = register_copy(trained, CLASSIFIER, run_id=run_id, audit=audit)
    record_validation(audit, trained.sha256[CLASSIFIER], "ctr_clicks")
    (files / "model.skops").write_bytes(b"malicious")
    trained.client.log_artifact(run_id, str(files / "model.skops"), "model")

    outcome = run_gate(trained, catalog, audit, CLASSIFIER, version)
    assert outcome.decision == Decision.REJECTED
    (entry,) = outcome.records
    assert entry.details["failed"] == ["files:unchanged_since_training"]
    assert "model.skops changed" in outcome.refusal
