"""Stage 3, the compliance gate: policies and their checks registered by name, planning which versions a
run gates, and the gate itself on versions trained into a real SQLite MLflow registry under tmp_path by the
training stage (real skops model files, real requirements), with real validated snapshots and data cards;
then the human approval's decisions, and the CI command.

Attacks tested here: a pickle that runs a command on load (blocked, never loaded), a joblib model file with
numpy buffers (no false alarm), a skops file with an unreviewed type, a policy naming a check that does not
exist, approval by someone outside the approver list, an approval that expired, a gate run on a version that
no longer exists, an AGPL dependency, an AWS-style key in a param, PII in the input example, a quarantined
dataset, a version registered straight into MLflow, model files changed after training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import joblib
import pandas as pd
import pytest
from airflow.sdk.exceptions import AirflowFailException
from mlflow import MlflowClient
from threadpoolctl import threadpool_limits

from modelops.assets import MODEL_APPROVED
from modelops.audit import AuditStore
from modelops.checks import CHECKS
from modelops.cli import main as cli_main
from modelops.data.sklearn_datasets import write_diabetes_csv
from modelops.data.synthetic import generate_clicks, write_csv
from modelops.errors import GateFailed, RegistryError, SettingsError, UnknownModel
from modelops.evidence import (
    CHAMPION_FIELD,
    EvidenceMismatch,
    approval_still_valid,
    evidence_summary,
    gate_record,
    version_file_hashes,
)
from modelops.evidence_files import FsspecFiles
from modelops.operators.compliance import ComplianceGateOperator
from modelops.registry import ModelRegistry
from modelops.settings import PROJECT_ROOT, Catalog, ModelSpec, ServingSpec, load_catalog
from modelops.stages.common import plan_versions
from modelops.stages.compliance import APPROVE, REJECT, ApprovalResponse, decide_approval, gate
from modelops.stages.outcome import StageOutcome, sha256_json
from modelops.stages.training import train
from modelops.vocabulary import (
    Alias,
    AuditAction,
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

CLASSIFIER = "ctr_recommender"  # binary_classification, risk tier medium: policy 'standard', automatic
REGRESSOR = "diabetes_progression"  # regression, risk tier high: policy 'strict', a risk officer approves
DATASETS = {CLASSIFIER: "ctr_clicks", REGRESSOR: "diabetes"}
EVERY_CHECK = [
    "provenance:registered_by_training",
    "files:unchanged_since_training",
    "tags",
    "lineage",
    "metrics",
    "non_regression",
    "model_files",
    "licences",
    "secrets",
    "pii",
]


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog()


@pytest.fixture
def include_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    include = tmp_path / "include"
    shutil.copytree(PROJECT_ROOT / "include", include)
    monkeypatch.setenv("MODELOPS_INCLUDE_DIR", str(include))
    return include


# --- policies: checks registered by name ----------------------------------------------------------------


def test_the_shipped_policies_load_with_every_registered_check(catalog: Catalog) -> None:
    standard, strict = catalog.compliance_policies["standard"], catalog.compliance_policies["strict"]
    for policy in (standard, strict):
        assert list(policy.checks) == EVERY_CHECK[2:]
        assert Tag.TRAIN_DATA_SHA256 in policy.settings_of("tags").required
    assert set(CHECKS) >= set(EVERY_CHECK[2:])
    bars = standard.settings_of("metrics").thresholds, strict.settings_of("metrics").thresholds
    for task, metric in (("binary_classification", "holdout_roc_auc"), ("regression", "holdout_r2")):
        assert bars[1][task][metric].min > bars[0][task][metric].min
    assert not standard.approval.required
    assert strict.approval.required and strict.approval.approvers == ["risk_officer"]
    assert "AGPL-*" in strict.settings_of("licences").deny
    assert catalog.policies_for(CLASSIFIER).compliance.name == "standard"
    assert catalog.policies_for(REGRESSOR).compliance.name == "strict"


def test_a_policy_naming_a_check_that_does_not_exist_fails_on_load_naming_it(include_copy: Path) -> None:
    policy_file = include_copy / "policies" / "compliance" / "standard.yaml"
    text = policy_file.read_text()
    assert "\n  licences:\n" in text
    policy_file.write_text(text.replace("\n  licences:\n", "\n  licenses:\n"))
    with pytest.raises(SettingsError) as raised:
        load_catalog()
    message = str(raised.value)
    assert str(policy_file) in message and "'licenses', which is no registered check" in message
    assert "'licences'" in message  # the registered names are listed


def test_a_setting_a_check_does_not_take_fails_on_load_naming_check_and_field(include_copy: Path) -> None:
    policy_file = include_copy / "policies" / "compliance" / "strict.yaml"
    text = policy_file.read_text()
    policy_file.write_text(text.replace("  model_files: {}", "  model_files: {allow_global: [os.system]}"))
    with pytest.raises(SettingsError) as raised:
        load_catalog()
    message = str(raised.value)
    assert str(policy_file) in message and "settings of check 'model_files': allow_global" in message


def test_a_threshold_on_a_metric_the_task_kind_does_not_log_is_refused(include_copy: Path) -> None:
    policy_file = include_copy / "policies" / "compliance" / "standard.yaml"
    text = policy_file.read_text()
    assert "holdout_r2: {min: 0.0}" in text
    policy_file.write_text(text.replace("holdout_r2: {min: 0.0}", "holdout_roc_auc: {min: 0.0}"))
    with pytest.raises(SettingsError) as raised:
        load_catalog()
    assert "thresholds.regression names ['holdout_roc_auc']" in str(raised.value)


def test_a_required_approval_with_nobody_to_give_it_is_refused(include_copy: Path) -> None:
    policy_file = include_copy / "policies" / "compliance" / "strict.yaml"
    policy_file.write_text(policy_file.read_text().replace("approvers: [risk_officer]", "approvers: []"))
    with pytest.raises(SettingsError, match="approval.required is true but approval.approvers names nobody"):
        load_catalog()


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


# --- the gate on versions the training stage registered ------------------------------------------------


@dataclass(frozen=True)
class Dataset:
    csv: Path
    sha256: str
    card: Path


@dataclass(frozen=True)
class World:
    root: Path
    tracking_uri: str
    registry: ModelRegistry
    client: MlflowClient  # a raw client: reads and writes the registry as an outside user would
    datasets: dict[str, Dataset]  # model -> its validated training data


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("compliance")
    with pytest.MonkeyPatch.context() as patch:
        tracking_uri, registry, _ = use_sqlite_registry(root, patch)
        clicks = write_csv(generate_clicks(2000, seed=7), root / "clicks.csv")
        diabetes = root / "diabetes.csv"
        write_diabetes_csv(diabetes)
        datasets = {}
        for name, csv in ((CLASSIFIER, clicks), (REGRESSOR, diabetes)):
            sha = hashlib.sha256(csv.read_bytes()).hexdigest()
            card = root / f"data_card_{name}.json"
            card.write_text(json.dumps({"dataset": DATASETS[name], "sha256": sha}))
            datasets[name] = Dataset(csv, sha, card)
        yield World(root, tracking_uri, registry, mlflow_client(tracking_uri), datasets)


@pytest.fixture
def audit(tmp_path: Path) -> Iterator[AuditStore]:
    store = AuditStore(f"sqlite:///{tmp_path}/audit.db", keyring=keyring_for_tests())
    yield store
    store.dispose()


def validated(world: World, audit: AuditStore, name: str, **details: Any) -> None:
    """The record the data stage writes for the model's training data: passed, its snapshot and card."""
    data = world.datasets[name]
    audit.append(
        actor="test",
        action=AuditAction.DATASET_VALIDATED,
        subject=dataset_subject(data.sha256),
        decision=Decision.PASSED,
        details={
            "dataset": DATASETS[name],
            "snapshot_uri": str(data.csv),
            "data_card_uri": str(data.card),
            **details,
        },
    )


_runs = iter(range(10_000))


def trained_version(world: World, audit: AuditStore, name: str, catalog: Catalog) -> str:
    """Train and register a version with the training stage itself, writing its registration record."""
    validated(world, audit, name)
    # One OpenMP thread: on a busy machine gradient boosting's threads otherwise spin-wait on each other.
    with threadpool_limits(1):
        outcome = train(
            spec=catalog.model(name),
            catalog=catalog,
            registry=world.registry,
            audit=audit,
            dataset_sha256=world.datasets[name].sha256,
            trigger=Trigger.MANUAL,
            dag_id="modelops_training",
            run_id=f"manual__test_{next(_runs)}",
        )
    for entry in outcome.records:
        audit.append(
            actor="test",
            **{k: getattr(entry, k) for k in ("action", "subject", "decision")},
            details=entry.details,
            evidence=entry.evidence,
        )
    return str(outcome.details["version"])


def model_folder(world: World, name: str, version: str, into: Path) -> Path:
    """A copy of a registered version's files, to alter and register as a new version."""
    return world.registry.download_version(name, version, into)


def registered_from(
    world: World,
    audit: AuditStore,
    name: str,
    like: str,
    folder: Path,
    *,
    params: dict[str, str] | None = None,
    metrics: dict[str, float] | None = None,
) -> str:
    """A new version from ``folder``, registered the way training registers (a run with ``like``'s lineage
    tags and metrics, a registration record with the files' hashes): what a data scientist could get through
    the pipeline if the files were theirs to shape."""
    original = world.registry.version(name, like)
    run = world.registry.run(original.run_id)
    run_id = world.registry.log_run(
        experiment=f"modelops/{name}",
        run_name="variant",
        tags=original.tags,
        params=params or {},
        metrics={**run.metrics, **(metrics or {})},
        artifact_dirs={"model": folder},
    )
    version = world.registry.register_version(name, run_id=run_id, artifact_path="model", tags=original.tags)
    files = version_file_hashes(world.registry, name, version.version)
    audit.append(
        actor="test",
        action=AuditAction.MODEL_REGISTERED,
        subject=model_subject(name, version.version),
        decision=Decision.CANDIDATE,
        details={
            "run_id": run_id,
            "tags": original.tags,
            "metrics": {**run.metrics, **(metrics or {})},
            **evidence_summary(files),
        },
    )
    return version.version


def run_gate(
    world: World,
    catalog: Catalog,
    audit: AuditStore,
    name: str,
    version: str | None,
    spec: ModelSpec | None = None,
) -> StageOutcome:
    """The stage as the operator runs it: decide, record, then apply the registry effects."""
    outcome = gate(
        spec=spec or catalog.model(name),
        catalog=catalog,
        registry=world.registry,
        audit=audit,
        files=FsspecFiles(),
        version=version,
    )
    record_and_apply(audit, outcome)
    return outcome


def record_and_apply(audit: AuditStore, outcome: StageOutcome) -> None:
    for entry in outcome.records:
        audit.append(
            actor="test",
            action=entry.action,
            subject=entry.subject,
            decision=entry.decision,
            details=entry.details,
            evidence=entry.evidence,
        )
    for effect in outcome.effects:
        effect()


def checks_of(outcome: StageOutcome) -> dict[str, dict[str, Any]]:
    (entry,) = outcome.records
    return {check["name"]: check for check in entry.details["checks"]}


def failed(outcome: StageOutcome) -> list[str]:
    (entry,) = outcome.records
    return entry.details["failed"]


def aliases(world: World, name: str) -> dict[str, str]:
    return {alias: str(v) for alias, v in world.client.get_registered_model(name).aliases.items()}


def artifact_text(world: World, name: str, version: str, path: str) -> str:
    run_id = world.client.get_model_version(name, version).run_id
    local = world.client.download_artifacts(run_id, path, str(world.root / f"dl-{name}-{version}"))
    return Path(local).read_text()


def test_a_compliant_classifier_passes_every_check_and_is_approved_automatically(
    world: World, catalog: Catalog, audit: AuditStore
) -> None:
    version = trained_version(world, audit, CLASSIFIER, catalog)
    outcome = run_gate(world, catalog, audit, CLASSIFIER, version)

    assert outcome.decision == Decision.APPROVED and outcome.refusal is None, outcome.summary
    (entry,) = outcome.records
    assert [check["name"] for check in entry.details["checks"]] == EVERY_CHECK
    assert entry.details["failed"] == []
    checks = checks_of(outcome)
    assert all(
        set(check) == {"name", "passed", "detail", "evidence", "findings"} for check in checks.values()
    )
    assert "first model" in checks["non_regression"]["detail"]  # no champion yet: passes by rule, said so
    assert "without loading" in checks["model_files"]["detail"]
    assert checks["lineage"]["evidence"]["data_card"] == str(world.datasets[CLASSIFIER].card)

    approval = entry.details["approval"]
    assert approval["mode"] == "automatic" and approval["by"] == "policy standard@3"
    assert datetime.fromisoformat(approval["valid_until"]) > datetime.now(UTC) + timedelta(days=6)
    assert aliases(world, CLASSIFIER)[Alias.CHALLENGER] == version
    tags = world.client.get_model_version(CLASSIFIER, version).tags
    assert tags[Tag.COMPLIANCE_STATUS] == "approved" and tags[Tag.COMPLIANCE_POLICY] == "standard@3"
    report = json.loads(artifact_text(world, CLASSIFIER, version, f"compliance/gate_report_v{version}.json"))
    assert sha256_json(report) == tags[Tag.COMPLIANCE_REPORT_SHA256] == entry.evidence["gate_report"]
    assert report["passed"] and [c["name"] for c in report["checks"]] == EVERY_CHECK
    card = artifact_text(world, CLASSIFIER, version, f"compliance/model_card_v{version}.md")
    assert f"# Model card: {CLASSIFIER} v{version}" in card and "**APPROVED**" in card
    assert "automatic by policy standard@3" in card and "ml-platform@example.com" in card
    assert all(f"| {name} | pass |" in card for name in EVERY_CHECK)
    assert all(f"**{name}**" in card for name in EVERY_CHECK)  # what each check proves
    assert outcome.asset_extra == {"model_name": CLASSIFIER, "version": version, "policy": "standard@3"}
    # Deployment's authority is this record.
    assert gate_record(audit, CLASSIFIER, version).decision == Decision.APPROVED


def test_every_failure_is_reported_not_only_the_first(
    world: World, catalog: Catalog, audit: AuditStore, tmp_path: Path
) -> None:
    good = trained_version(world, audit, CLASSIFIER, catalog)
    folder = model_folder(world, CLASSIFIER, good, tmp_path / "v")
    (folder / "requirements.txt").write_text("mlflow\nnot-a-real-package-xyz==1.0\n")
    weak = registered_from(world, audit, CLASSIFIER, good, folder, metrics={"holdout_roc_auc": 0.55})
    before = aliases(world, CLASSIFIER)
    outcome = run_gate(world, catalog, audit, CLASSIFIER, weak)
    assert outcome.decision == Decision.REJECTED
    assert failed(outcome) == ["metrics", "licences"]
    checks = checks_of(outcome)
    assert "holdout_roc_auc=0.5500 is below the minimum 0.6 (policy standard)" in checks["metrics"]["detail"]
    assert (
        "holdout_roc_auc=0.5500 is below the minimum 0.65 (model spec ctr_recommender)"
        in (checks["metrics"]["detail"])
    )
    assert "not-a-real-package-xyz" in checks["licences"]["detail"]
    assert outcome.refusal is not None and f"2 of {len(EVERY_CHECK)} checks failed" in outcome.refusal
    assert all(f"  - {name}: " in outcome.refusal for name in ("metrics", "licences"))
    assert "No alias moved" in outcome.refusal
    assert aliases(world, CLASSIFIER) == before
    assert world.client.get_model_version(CLASSIFIER, weak).tags[Tag.COMPLIANCE_STATUS] == "rejected"
    card = artifact_text(world, CLASSIFIER, weak, f"compliance/model_card_v{weak}.md")
    assert "**REJECTED**" in card and "| licences | **FAIL** |" in card


def promote(world: World, audit: AuditStore, name: str, version: str) -> None:
    """The record deployment writes when ``version`` becomes champion."""
    audit.append(
        actor="test",
        action=AuditAction.MODEL_DEPLOYED,
        subject=model_subject(name, version),
        decision=Decision.PROMOTED,
        details={
            CHAMPION_FIELD: version,
            **evidence_summary(version_file_hashes(world.registry, name, version)),
        },
    )


def test_non_regression_scores_the_champion_on_the_candidates_own_holdout(
    world: World, catalog: Catalog, audit: AuditStore, tmp_path: Path
) -> None:
    champion = trained_version(world, audit, CLASSIFIER, catalog)
    promote(world, audit, CLASSIFIER, champion)
    champion_auc = world.registry.run_metrics(world.registry.version(CLASSIFIER, champion).run_id)[
        "holdout_roc_auc"
    ]
    # The same model retrained on the same data scores the same: within tolerance.
    same = trained_version(world, audit, CLASSIFIER, catalog)
    check = checks_of(run_gate(world, catalog, audit, CLASSIFIER, same))["non_regression"]
    assert check["passed"], check
    assert check["evidence"]["champion_version"] == champion
    assert float(check["evidence"]["champion_score"]) == pytest.approx(champion_auc, abs=1e-6)
    # A version that claims a worse holdout AUC than the champion scores on it, beyond the 0.01 tolerance.
    folder = model_folder(world, CLASSIFIER, same, tmp_path / "worse")
    worse = registered_from(
        world, audit, CLASSIFIER, same, folder, metrics={"holdout_roc_auc": round(champion_auc - 0.02, 6)}
    )
    outcome = run_gate(world, catalog, audit, CLASSIFIER, worse)
    assert failed(outcome) == ["non_regression"]
    detail = checks_of(outcome)["non_regression"]["detail"]
    assert f"against champion v{champion}" in detail and "worse by 0.0200" in detail
    assert "beyond the tolerance 0.01" in detail


def test_a_pickle_that_runs_a_command_on_load_is_blocked_and_never_loaded(
    world: World, catalog: Catalog, audit: AuditStore, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            import os

            return (os.system, (f"touch {marker}",))

    good = trained_version(world, audit, CLASSIFIER, catalog)
    folder = model_folder(world, CLASSIFIER, good, tmp_path / "v")
    (folder / "preprocessor.pkl").write_bytes(pickle.dumps(Payload()))
    evil = registered_from(world, audit, CLASSIFIER, good, folder)
    outcome = run_gate(world, catalog, audit, CLASSIFIER, evil)
    assert failed(outcome) == ["model_files"]
    detail = checks_of(outcome)["model_files"]["detail"]
    assert "preprocessor.pkl" in detail and "system" in detail
    assert not marker.exists()  # scanned, never unpickled: the payload did not run
    assert (
        Alias.CHALLENGER not in aliases(world, CLASSIFIER)
        or aliases(world, CLASSIFIER)[Alias.CHALLENGER] != evil
    )


def test_a_joblib_model_file_with_numpy_buffers_is_scanned_without_a_false_alarm(
    world: World, catalog: Catalog, audit: AuditStore, tmp_path: Path
) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    good = trained_version(world, audit, CLASSIFIER, catalog)
    folder = model_folder(world, CLASSIFIER, good, tmp_path / "v")
    frame = pd.read_csv(world.datasets[CLASSIFIER].csv)
    numeric = frame[catalog.model(CLASSIFIER).numeric_features].to_numpy()
    joblib.dump(
        make_pipeline(StandardScaler(), LogisticRegression()).fit(numeric, frame["clicked"]),
        folder / "calibrator.joblib",
    )
    version = registered_from(world, audit, CLASSIFIER, good, folder)
    outcome = run_gate(world, catalog, audit, CLASSIFIER, version)
    assert outcome.decision == Decision.APPROVED, outcome.refusal
    assert "calibrator.joblib" in checks_of(outcome)["model_files"]["evidence"]


def test_a_skops_file_holding_a_type_nobody_reviewed_is_rejected(
    world: World, catalog: Catalog, audit: AuditStore
) -> None:
    version = trained_version(world, audit, CLASSIFIER, catalog)
    unreviewed = catalog.model(CLASSIFIER).model_copy(update={"skops_trusted_types": []})
    outcome = run_gate(world, catalog, audit, CLASSIFIER, version, spec=unreviewed)
    assert "model_files" in failed(outcome)
    assert "TreePredictor" in checks_of(outcome)["model_files"]["detail"]


def test_an_agpl_dependency_is_denied(
    world: World, catalog: Catalog, audit: AuditStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site"
    dist = site / "copyleft_widgets-2.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.4\nName: copyleft-widgets\nVersion: 2.0\nLicense-Expression: AGPL-3.0-only\n"
    )
    monkeypatch.syspath_prepend(str(site))
    good = trained_version(world, audit, CLASSIFIER, catalog)
    folder = model_folder(world, CLASSIFIER, good, tmp_path / "v")
    with (folder / "requirements.txt").open("a") as requirements:
        requirements.write("\ncopyleft-widgets==2.0\n")
    version = registered_from(world, audit, CLASSIFIER, good, folder)
    outcome = run_gate(world, catalog, audit, CLASSIFIER, version)
    assert failed(outcome) == ["licences"]
    detail = checks_of(outcome)["licences"]["detail"]
    assert "copyleft-widgets" in detail and "AGPL-3.0-only" in detail


def test_an_aws_key_in_a_param_is_caught_and_never_quoted(
    world: World, catalog: Catalog, audit: AuditStore, tmp_path: Path
) -> None:
    key = "AKIA" + "Q7ZP3M2XW5KD9RTB"
    good = trained_version(world, audit, CLASSIFIER, catalog)
    folder = model_folder(world, CLASSIFIER, good, tmp_path / "v")
    version = registered_from(world, audit, CLASSIFIER, good, folder, params={"s3_access": key})
    outcome = run_gate(world, catalog, audit, CLASSIFIER, version)
    assert failed(outcome) == ["secrets"]
    detail = checks_of(outcome)["secrets"]["detail"]
    assert "AWS" in detail and "param:s3_access" in detail
    (entry,) = outcome.records
    for text in (
        json.dumps(entry.details),
        outcome.refusal or "",
        outcome.summary,
        artifact_text(world, CLASSIFIER, version, f"compliance/gate_report_v{version}.json"),
        artifact_text(world, CLASSIFIER, version, f"compliance/model_card_v{version}.md"),
    ):
        assert key not in text and key[4:] not in text


def test_pii_in_the_input_example_and_a_sensitive_column_are_caught(
    world: World, catalog: Catalog, audit: AuditStore, tmp_path: Path
) -> None:
    good = trained_version(world, audit, CLASSIFIER, catalog)
    folder = model_folder(world, CLASSIFIER, good, tmp_path / "v")
    example = json.loads((folder / "input_example.json").read_text())
    example["data"][0][example["columns"].index("device")] = "jane.doe@example.com"
    (folder / "input_example.json").write_text(json.dumps(example))
    leaky = registered_from(world, audit, CLASSIFIER, good, folder)
    outcome = run_gate(world, catalog, audit, CLASSIFIER, leaky)
    assert failed(outcome) == ["pii"]
    detail = checks_of(outcome)["pii"]["detail"]
    assert "input_example.json: email address" in detail and "jane" not in json.dumps(
        outcome.records[0].details
    )

    # A column the data card marks sensitive may not appear in artifacts unless the policy allows it.
    card = world.datasets[CLASSIFIER].card
    validated(world, audit, CLASSIFIER, data_card_uri=str(tmp_path / "card.json"))
    (tmp_path / "card.json").write_text(
        json.dumps({**json.loads(card.read_text()), "sensitive_columns": ["user_age"]})
    )
    outcome = run_gate(world, catalog, audit, CLASSIFIER, good)
    assert failed(outcome) == ["pii"]
    assert (
        "column 'user_age', which dataset ctr_clicks's data card marks sensitive"
        in checks_of(outcome)["pii"]["detail"]
    )
    policy = catalog.compliance_policies["standard"]
    lenient = policy.model_copy(
        update={
            "checks": {
                **policy.checks,
                "pii": policy.checks["pii"].model_copy(update={"allow_sensitive_columns": ["user_age"]}),
            }
        }
    )
    allowing = dataclasses.replace(
        catalog, compliance_policies={**catalog.compliance_policies, "standard": lenient}
    )
    assert run_gate(world, allowing, audit, CLASSIFIER, good).decision == Decision.APPROVED


def test_lineage_needs_a_validated_unquarantined_dataset_with_its_data_card(
    world: World, catalog: Catalog, audit: AuditStore, tmp_path: Path
) -> None:
    version = trained_version(world, audit, CLASSIFIER, catalog)
    sha = world.datasets[CLASSIFIER].sha256
    assert "lineage" not in failed(run_gate(world, catalog, audit, CLASSIFIER, version))

    # A data card that is gone.
    validated(world, audit, CLASSIFIER, data_card_uri=str(tmp_path / "no_card.json"))
    outcome = run_gate(world, catalog, audit, CLASSIFIER, version)
    assert failed(outcome) == ["lineage"] and "data card" in checks_of(outcome)["lineage"]["detail"]
    validated(world, audit, CLASSIFIER)

    # Quarantined after validation, with the CLI, by a named person.
    assert (
        cli_main(
            [
                "dataset",
                "quarantine",
                sha,
                "--reason",
                "consent withdrawn",
                "--by",
                "dpo",
                "--url",
                str(audit.url),
            ]
        )
        == 0
    )
    outcome = run_gate(world, catalog, audit, CLASSIFIER, version)
    assert failed(outcome) == ["lineage"]
    detail = checks_of(outcome)["lineage"]["detail"]
    assert "quarantined by dpo" in detail and "consent withdrawn" in detail


def test_a_version_trained_for_another_model_fails_lineage(
    world: World, catalog: Catalog, audit: AuditStore, tmp_path: Path
) -> None:
    good = trained_version(world, audit, CLASSIFIER, catalog)
    version = world.registry.version(CLASSIFIER, good)
    audit.append(
        actor="test",
        action=AuditAction.MODEL_REGISTERED,
        subject=model_subject(CLASSIFIER, good),
        decision=Decision.CANDIDATE,
        details={
            **gate_free_registration(audit, CLASSIFIER, good),
            "tags": {**version.tags, Tag.MODEL_SPEC: REGRESSOR},
        },
    )
    outcome = run_gate(world, catalog, audit, CLASSIFIER, good)
    assert "lineage" in failed(outcome)
    assert (
        f"trained from model spec {REGRESSOR!r}, not {CLASSIFIER!r}"
        in checks_of(outcome)["lineage"]["detail"]
    )


def gate_free_registration(audit: AuditStore, name: str, version: str) -> dict[str, Any]:
    (record,) = audit.records(action=AuditAction.MODEL_REGISTERED, subject=model_subject(name, version))[-1:]
    return dict(record.details)


def test_a_gate_run_on_a_version_that_no_longer_exists_names_it(
    world: World, catalog: Catalog, audit: AuditStore
) -> None:
    version = trained_version(world, audit, CLASSIFIER, catalog)
    world.client.delete_model_version(CLASSIFIER, version)
    with pytest.raises(RegistryError, match=f"has no version '{version}'"):
        run_gate(world, catalog, audit, CLASSIFIER, version)


def test_without_a_version_the_gate_takes_the_candidate_and_without_one_says_so(
    world: World, catalog: Catalog, audit: AuditStore
) -> None:
    version = trained_version(world, audit, CLASSIFIER, catalog)
    assert aliases(world, CLASSIFIER)[Alias.CANDIDATE] == version
    assert run_gate(world, catalog, audit, CLASSIFIER, None).details["version"] == version
    spec = catalog.model(CLASSIFIER).model_copy(update={"name": "never_trained"})
    with pytest.raises(GateFailed, match="'never_trained' has no version with alias 'candidate'"):
        gate(
            spec=spec,
            catalog=catalog,
            registry=world.registry,
            audit=audit,
            files=FsspecFiles(),
            version=None,
        )


# --- provenance attacks --------------------------------------------------------------------------------------


def test_a_version_registered_straight_into_mlflow_is_rejected_with_a_record(
    world: World, catalog: Catalog, audit: AuditStore
) -> None:
    """Attack: register a version with an MLflow client from a trained run, with every lineage tag and
    compliance_status=approved set by hand. Training never recorded it, so the gate rejects it."""
    good = trained_version(world, audit, CLASSIFIER, catalog)
    original = world.registry.version(CLASSIFIER, good)
    forged = world.client.create_model_version(
        CLASSIFIER, f"runs:/{original.run_id}/model", run_id=original.run_id, tags=original.tags
    ).version
    world.client.set_model_version_tag(CLASSIFIER, forged, Tag.COMPLIANCE_STATUS, "approved")
    outcome = run_gate(world, catalog, audit, CLASSIFIER, str(forged))
    assert outcome.decision == Decision.REJECTED
    assert failed(outcome)[:2] == ["provenance:registered_by_training", "files:unchanged_since_training"]
    assert "was not registered by the training stage" in (outcome.refusal or "")


def test_model_files_changed_after_training_are_rejected(
    world: World, catalog: Catalog, audit: AuditStore, tmp_path: Path
) -> None:
    version = trained_version(world, audit, CLASSIFIER, catalog)
    run_id = world.registry.version(CLASSIFIER, version).run_id
    evil = tmp_path / "MLmodel"
    evil.write_text("flavors: {}\n")
    world.client.log_artifact(run_id, str(evil), "model")
    outcome = run_gate(world, catalog, audit, CLASSIFIER, version)
    assert "files:unchanged_since_training" in failed(outcome)
    assert "MLmodel changed" in (outcome.refusal or "")


# --- human approval -----------------------------------------------------------------------------------------


def awaiting(world: World, catalog: Catalog, audit: AuditStore) -> str:
    version = trained_version(world, audit, REGRESSOR, catalog)
    outcome = run_gate(world, catalog, audit, REGRESSOR, version)
    assert outcome.decision == Decision.AWAITING_APPROVAL, outcome.refusal
    assert outcome.refusal is None and outcome.asset_extra is None
    assert outcome.details["approvers"] == ["risk_officer"]
    return version


def answer(
    world: World,
    catalog: Catalog,
    audit: AuditStore,
    version: str,
    response: ApprovalResponse,
    now: datetime | None = None,
) -> StageOutcome:
    outcome = decide_approval(
        spec=catalog.model(REGRESSOR),
        catalog=catalog,
        registry=world.registry,
        audit=audit,
        version=version,
        response=response,
        now=now,
    )
    record_and_apply(audit, outcome)
    return outcome


def test_a_high_risk_model_waits_for_a_named_approver_and_records_who_approved(
    world: World, catalog: Catalog, audit: AuditStore
) -> None:
    version = awaiting(world, catalog, audit)
    assert (
        Alias.CHALLENGER not in aliases(world, REGRESSOR)
        or aliases(world, REGRESSOR)[Alias.CHALLENGER] != version
    )
    with pytest.raises(EvidenceMismatch, match="no authentic compliance gate decision"):
        gate_record(audit, REGRESSOR, version)  # awaiting approval does not deploy
    assert (
        world.client.get_model_version(REGRESSOR, version).tags[Tag.COMPLIANCE_STATUS] == "awaiting_approval"
    )

    outcome = answer(
        world,
        catalog,
        audit,
        version,
        ApprovalResponse(
            APPROVE, "risk_officer", "Rita Risk", "Reviewed the card; fine.", datetime.now(UTC).isoformat()
        ),
    )
    assert outcome.decision == Decision.APPROVED, outcome.refusal
    record = gate_record(audit, REGRESSOR, version)
    approval = record.details["approval"]
    assert (
        approval["mode"] == "human"
        and approval["by"] == "risk_officer"
        and approval["by_name"] == "Rita Risk"
    )
    assert approval["comment"] == "Reviewed the card; fine."
    assert [c["name"] for c in record.details["checks"]] == EVERY_CHECK  # the checks it approved
    assert record.details["artifacts"] == version_file_hashes(world.registry, REGRESSOR, version)
    assert approval_still_valid(record) is None
    assert aliases(world, REGRESSOR)[Alias.CHALLENGER] == version
    assert "approved by risk_officer (Rita Risk)" in outcome.summary
    card = artifact_text(world, REGRESSOR, version, f"compliance/model_card_v{version}.md")
    assert "human by risk_officer (Rita Risk)" in card and "Reviewed the card; fine." in card

    # The approval expires after the policy's 48 hours: deployment then refuses it.
    later = datetime.now(UTC) + timedelta(hours=49)
    reason = approval_still_valid(record, now=later)
    assert reason is not None and "expired" in reason and "run modelops_compliance_gate" in reason


@pytest.mark.parametrize(
    ("response", "because"),
    [
        (
            ApprovalResponse(APPROVE, "intern", "Ian Intern", "lgtm"),
            "'intern', who is not among the approvers",
        ),
        (
            ApprovalResponse(REJECT, "risk_officer", None, "holdout too small"),
            "risk_officer rejected it: holdout",
        ),
        (ApprovalResponse(None, None, timed_out=True), "no approval within 72 hours"),
    ],
    ids=["not-an-approver", "rejected", "timed-out"],
)
def test_anything_but_an_approvers_approval_in_time_rejects_on_record(
    world: World, catalog: Catalog, audit: AuditStore, response: ApprovalResponse, because: str
) -> None:
    version = awaiting(world, catalog, audit)
    outcome = answer(world, catalog, audit, version, response)
    assert outcome.decision == Decision.REJECTED
    assert outcome.refusal is not None and because in outcome.refusal and "No alias moved" in outcome.refusal
    (entry,) = outcome.records
    assert entry.decision == Decision.REJECTED and because in entry.details["approval"]["refused"]
    with pytest.raises(EvidenceMismatch, match="was rejected"):
        gate_record(audit, REGRESSOR, version)
    assert aliases(world, REGRESSOR).get(Alias.CHALLENGER) != version


def test_files_changed_while_awaiting_approval_are_not_approved(
    world: World, catalog: Catalog, audit: AuditStore, tmp_path: Path
) -> None:
    version = awaiting(world, catalog, audit)
    run_id = world.registry.version(REGRESSOR, version).run_id
    swapped = tmp_path / "MLmodel"
    swapped.write_text("flavors: {}\n")
    world.client.log_artifact(run_id, str(swapped), "model")
    outcome = answer(world, catalog, audit, version, ApprovalResponse(APPROVE, "risk_officer"))
    assert outcome.decision == Decision.REJECTED
    assert "model files changed while the version awaited approval" in (outcome.refusal or "")


def test_an_approval_without_a_pending_gate_record_is_refused(
    world: World, catalog: Catalog, audit: AuditStore
) -> None:
    version = trained_version(world, audit, REGRESSOR, catalog)
    with pytest.raises(GateFailed, match="no authentic gate record awaiting approval"):
        answer(world, catalog, audit, version, ApprovalResponse(APPROVE, "risk_officer"))


# --- the same gate from CI ------------------------------------------------------------------------------------


def gate_cli(
    world: World, audit: AuditStore, *args: str, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, str]:
    code = cli_main(["gate", "check", *args, "--tracking-uri", world.tracking_uri, "--url", str(audit.url)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_cli_runs_the_same_checks_and_writes_nothing(
    world: World, catalog: Catalog, audit: AuditStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = trained_version(world, audit, CLASSIFIER, catalog)
    records_before = len(audit.records())
    code, out, _ = gate_cli(world, audit, CLASSIFIER, good, capsys=capsys)
    report = json.loads(out)
    assert code == 0 and report["verdict"] == "approved"
    assert [c["name"] for c in report["checks"]] == EVERY_CHECK
    assert len(audit.records()) == records_before  # nothing recorded, no tag, no alias
    assert Tag.COMPLIANCE_STATUS not in world.client.get_model_version(CLASSIFIER, good).tags

    folder = model_folder(world, CLASSIFIER, good, tmp_path / "v")
    bad = registered_from(world, audit, CLASSIFIER, good, folder, metrics={"holdout_roc_auc": 0.5})
    code, out, _ = gate_cli(world, audit, CLASSIFIER, bad, capsys=capsys)
    assert code == 1 and json.loads(out)["verdict"] == "rejected" and "metrics" in json.loads(out)["failed"]

    pending = trained_version(world, audit, REGRESSOR, catalog)
    code, out, _ = gate_cli(world, audit, REGRESSOR, pending, capsys=capsys)
    assert code == 0 and json.loads(out)["verdict"] == "approval_pending"
    assert json.loads(out)["approval"]["approvers"] == ["risk_officer"]
    code, _, err = gate_cli(world, audit, REGRESSOR, pending, "--require-approval", capsys=capsys)
    assert code == 1 and "approval pending" in err
    # Once an approver approved these files in Airflow, CI sees the standing approval and who gave it.
    assert run_gate(world, catalog, audit, REGRESSOR, pending).decision == Decision.AWAITING_APPROVAL
    answer(world, catalog, audit, pending, ApprovalResponse(APPROVE, "risk_officer", comment="ok"))
    code, out, _ = gate_cli(world, audit, REGRESSOR, pending, "--require-approval", capsys=capsys)
    assert code == 0 and json.loads(out)["verdict"] == "approved"
    assert json.loads(out)["approval"]["record"]["by"] == "risk_officer"

    code, _, err = gate_cli(world, audit, CLASSIFIER, "9999", capsys=capsys)
    assert code == 2 and "has no version '9999'" in err


def test_the_cli_without_an_mlflow_server_is_a_usage_error(
    audit: AuditStore, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert cli_main(["gate", "check", CLASSIFIER, "1", "--url", str(audit.url)]) == 2
    assert "pass --tracking-uri URI or set $MLFLOW_TRACKING_URI" in capsys.readouterr().err
    assert cli_main(["gate", "check", CLASSIFIER]) == 2  # the version is required


# --- the operator: the approval's answer, as Airflow hands it back ------------------------------------------


class OutletEvents(dict):
    """Stand-in for Airflow's outlet event accessors: an accessor (with ``extra``) per asset on demand."""

    def __missing__(self, key: Any) -> SimpleNamespace:
        self[key] = SimpleNamespace(extra={})
        return self[key]


def task_context(run_id: str = "manual__gate") -> dict[str, Any]:
    dag_run = SimpleNamespace(dag_id="modelops_compliance_gate", run_id=run_id, triggering_user_name="bob")
    return {
        "dag_run": dag_run,
        "ti": SimpleNamespace(task_id="evaluate_policy"),
        "outlet_events": OutletEvents(),
    }


@pytest.fixture
def home_audit(modelops_home: Path) -> Iterator[AuditStore]:
    """The audit log the operator writes to (the connection modelops_audit of modelops_home)."""
    store = AuditStore(f"sqlite:///{modelops_home}/audit.db", keyring=keyring_for_tests())
    yield store
    store.dispose()


def test_the_operator_records_the_approvers_answer_and_emits_the_event(
    world: World, catalog: Catalog, home_audit: AuditStore
) -> None:
    version = awaiting(world, catalog, home_audit)
    operator = ComplianceGateOperator(task_id="evaluate_policy", model=REGRESSOR, outlets=[MODEL_APPROVED])
    context = task_context()
    event = {
        "chosen_options": ["Approve"],
        "params_input": {"comment": "Card read; ship it."},
        "responded_at": datetime.now(UTC),
        "responded_by_user": {"id": "risk_officer", "name": "risk_officer"},
        "timedout": False,
    }
    result = operator.execute_complete(context, event, model_version=version)
    assert result["verdict"] == "approved" and result["approval"]["by"] == "risk_officer"
    assert context["outlet_events"][MODEL_APPROVED].extra["version"] == version
    record = gate_record(home_audit, REGRESSOR, version)
    assert record.actor.startswith("airflow:modelops_compliance_gate.evaluate_policy")
    assert record.details["approval"]["comment"] == "Card read; ship it."
    assert aliases(world, REGRESSOR)[Alias.CHALLENGER] == version


@pytest.mark.parametrize(
    ("event", "because"),
    [
        (
            {"error": "timeout has passed without a response.", "error_type": "timeout"},
            "no approval within 72",
        ),
        (
            {
                "chosen_options": ["Approve"],
                "params_input": {"comment": ""},
                "responded_at": datetime.now(UTC),
                "responded_by_user": {"id": "intern", "name": "intern"},
            },
            "'intern', who is not among the approvers",
        ),
    ],
    ids=["timed-out", "not-an-approver"],
)
def test_the_operator_fails_without_retry_on_a_timeout_or_a_stranger_and_records_why(
    world: World, catalog: Catalog, home_audit: AuditStore, event: dict[str, Any], because: str
) -> None:
    version = awaiting(world, catalog, home_audit)
    operator = ComplianceGateOperator(task_id="evaluate_policy", model=REGRESSOR, outlets=[MODEL_APPROVED])
    context = task_context()
    with pytest.raises(AirflowFailException, match=because):
        operator.execute_complete(context, event, model_version=version)
    (last,) = home_audit.records(action=AuditAction.GATE_DECIDED, subject=model_subject(REGRESSOR, version))[
        -1:
    ]
    assert last.decision == Decision.REJECTED and because in last.details["approval"]["refused"]
    assert MODEL_APPROVED not in context["outlet_events"]


def test_a_model_spec_cannot_opt_out_of_the_approval_its_risk_tier_requires(include_copy: Path) -> None:
    spec_file = include_copy / "models" / f"{REGRESSOR}.yaml"
    spec_file.write_text(spec_file.read_text() + "policies:\n  compliance: standard\n")
    with pytest.raises(SettingsError) as raised:
        load_catalog()
    message = str(raised.value)
    assert str(spec_file) in message and "risk tier 'high' requires approval" in message
