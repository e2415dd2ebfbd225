"""Stage 6, retirement: the selection rules on real registry versions, verified archives on real files,
and the operator (dry run, real run, refusal) against a real SQLite MLflow registry under tmp_path."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlflow
import pytest
from mlflow import MlflowClient

from modelops.audit import AuditStore
from modelops.data.synthetic import generate_clicks
from modelops.errors import RetirementError, RetirementRefused
from modelops.hooks.registry import MlflowRegistryHook
from modelops.operators.retirement import RetireModelsOperator
from modelops.settings import RetirementPolicy, model_spec, retirement_policy
from modelops.stages.deployment import CHAMPION_ALIAS, PREVIOUS_CHAMPION_ALIAS
from modelops.stages.retirement import (
    archive_version,
    retire_version,
    select_for_retirement,
    verify_archive,
)
from modelops.stages.training import CANDIDATE_ALIAS
from modelops.storage import as_storage_path
from tests.support import use_sqlite_registry

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
POLICY = RetirementPolicy(superseded_for_days=30)


@dataclass(frozen=True)
class Registry:
    root: Path
    tracking_uri: str
    client: MlflowClient
    source: str  # a logged model to register versions from


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    root = tmp_path_factory.mktemp("retirement")
    spec = model_spec()
    frame = generate_clicks(1000, seed=5)
    model = Pipeline(
        [
            ("features", ColumnTransformer([("numeric", "passthrough", spec.numeric_features)])),
            ("estimator", LogisticRegression(max_iter=500)),
        ]
    ).fit(frame[spec.features], frame[spec.target])
    with pytest.MonkeyPatch.context() as patch:
        tracking_uri, client, experiment = use_sqlite_registry(root, patch)
        MlflowRegistryHook().activate()
        with mlflow.start_run(experiment_id=experiment, run_name="retirement-fixture"):
            mlflow.log_params({"estimator": "LogisticRegression"})
            mlflow.log_metrics({"holdout_roc_auc": 0.71})
            source = mlflow.sklearn.log_model(
                model,
                name="model",
                pip_requirements=["scikit-learn"],
                input_example=frame[spec.features].head(2),
            ).model_uri
        yield Registry(root, tracking_uri, client, source)


def register(registry: Registry, name: str, tags: dict[str, str] | None = None) -> str:
    MlflowRegistryHook().activate()
    return str(mlflow.register_model(registry.source, name, tags=tags).version)


def ago(days: float) -> str:
    return (NOW - timedelta(days=days)).isoformat()


def versions(registry: Registry, name: str) -> list[Any]:
    return registry.client.search_model_versions(f"name = '{name}'")


def aliases(registry: Registry, name: str) -> dict[str, str]:
    return {alias: str(v) for alias, v in registry.client.get_registered_model(name).aliases.items()}


# --- selection -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def selection(registry: Registry) -> tuple[str, dict[str, str]]:
    """Versions of one model in every situation the rules distinguish."""
    name = "select_rules"
    numbers = {
        "old": register(registry, name, {"superseded_at": ago(40), "superseded_by": "x"}),
        "young": register(registry, name, {"superseded_at": ago(10)}),
        "retired": register(registry, name, {"superseded_at": ago(90), "retired": "true"}),
        "champion": register(registry, name, {"superseded_at": ago(60)}),  # promoted again since
        "never_served": register(registry, name),
        "boundary": register(registry, name, {"superseded_at": ago(30)}),
    }
    registry.client.set_registered_model_alias(name, CHAMPION_ALIAS, numbers["champion"])
    return name, numbers


def decide(registry: Registry, name: str, requested: list[str] | None = None, reason: str = "") -> list:
    return select_for_retirement(
        versions=versions(registry, name),
        aliases=aliases(registry, name),
        policy=POLICY,
        now=NOW,
        requested=requested or [],
        reason=reason,
    )


def test_superseded_long_enough_is_selected_and_the_rest_is_not(registry: Registry, selection) -> None:
    name, v = selection
    decisions = decide(registry, name)
    assert [(d.version, d.retire) for d in decisions] == [(v["old"], True), (v["boundary"], True)]
    assert decisions[0].reason == f"superseded since {ago(40)}, more than 30 days"


def test_the_champion_is_never_retired_even_on_request(registry: Registry, selection) -> None:
    name, v = selection
    decisions = decide(registry, name, [v["champion"], v["never_served"]], reason="  audit finding 12  ")
    by_version = {d.version: d for d in decisions}
    assert by_version[v["champion"]].retire is False
    assert by_version[v["champion"]].reason == "refused: it is the serving champion"
    assert by_version[v["never_served"]].retire is True
    assert by_version[v["never_served"]].reason == "manual request: audit finding 12"
    assert by_version[v["old"]].retire is True  # the policy still applies alongside a request
    assert v["young"] not in by_version and v["retired"] not in by_version


def test_a_manual_request_needs_a_reason(registry: Registry, selection) -> None:
    name, v = selection
    for reason in ("", "   "):
        with pytest.raises(RetirementRefused, match="needs a reason"):
            decide(registry, name, [v["young"]], reason=reason)


def test_unknown_versions_are_an_error_naming_them(registry: Registry, selection) -> None:
    name, v = selection
    with pytest.raises(RetirementError) as raised:
        decide(registry, name, ["99", v["young"], "12"], reason="cleanup")
    existing = sorted(v.values(), key=int)
    assert str(raised.value) == f"versions ['12', '99'] do not exist; existing versions are {existing}"


def test_an_already_retired_version_is_skipped_even_on_request(registry: Registry, selection) -> None:
    name, v = selection
    decisions = decide(registry, name, [v["retired"]], reason="again")
    assert v["retired"] not in {d.version for d in decisions}


def test_the_policy_window_comes_from_the_policy(registry: Registry, selection) -> None:
    name, v = selection
    lenient = select_for_retirement(
        versions=versions(registry, name),
        aliases=aliases(registry, name),
        policy=RetirementPolicy(superseded_for_days=5),
        now=NOW,
        requested=[],
        reason="",
    )
    assert {d.version for d in lenient} == {v["old"], v["young"], v["boundary"]}
    assert retirement_policy().superseded_for_days == 30


# --- archives ------------------------------------------------------------------------------------


@pytest.fixture
def archived(registry: Registry, tmp_path: Path) -> tuple[Any, Path, str]:
    name = "archive_roundtrip"
    version = register(registry, name, {"train_data_sha256": "e" * 64})
    hook = MlflowRegistryHook()
    # A task process has no global MLflow URIs of its own: the hook's must be the ones used.
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'elsewhere.db'}")
    mlflow.set_registry_uri(f"sqlite:///{tmp_path / 'elsewhere.db'}")
    try:
        manifest = archive_version(
            hook, name, version, as_storage_path(tmp_path / "archive"), NOW.isoformat()
        )
    finally:
        hook.activate()
    return manifest, tmp_path / "archive" / name / f"v{version}", version


def test_archive_round_trip(archived) -> None:
    manifest, folder, version = archived
    assert manifest.archive_uri == folder.as_uri() and manifest.version == version
    paths = {entry["path"] for entry in manifest.files}
    assert {"MLmodel", "modelops_metadata.json"} <= paths and len(paths) >= 4
    for entry in manifest.files:
        data = (folder / entry["path"]).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["bytes"] == len(data)
    assert not list(folder.rglob(".*.partial"))

    metadata = json.loads((folder / "modelops_metadata.json").read_text())
    assert metadata["version"] == version and metadata["tags"]["train_data_sha256"] == "e" * 64
    assert metadata["metrics"] == {"holdout_roc_auc": 0.71}
    assert json.loads((folder / "manifest.json").read_text()) == manifest.to_dict()

    assert verify_archive(manifest.archive_uri) == manifest
    assert verify_archive(str(folder)) == manifest  # a plain path works too


def test_a_tampered_file_is_named(archived) -> None:
    manifest, folder, _ = archived
    (folder / "MLmodel").write_text((folder / "MLmodel").read_text() + "\n# edited\n")
    with pytest.raises(RetirementError) as raised:
        verify_archive(manifest.archive_uri)
    message = str(raised.value)
    assert "does not match its manifest" in message and "MLmodel: sha256" in message
    assert "modelops_metadata.json" not in message


def test_a_same_size_edit_is_caught_by_the_hash(archived) -> None:
    manifest, folder, _ = archived
    target = folder / "modelops_metadata.json"
    data = bytearray(target.read_bytes())
    data[10] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(RetirementError, match=r"modelops_metadata\.json: sha256 [0-9a-f]{12}\.\.\. differs"):
        verify_archive(manifest.archive_uri)


def test_a_deleted_file_and_a_missing_manifest_are_named(archived) -> None:
    manifest, folder, _ = archived
    (folder / "MLmodel").unlink()
    with pytest.raises(RetirementError, match="MLmodel: missing"):
        verify_archive(manifest.archive_uri)
    (folder / "manifest.json").unlink()
    with pytest.raises(RetirementError, match="has no manifest.json"):
        verify_archive(manifest.archive_uri)


# --- retire_version ------------------------------------------------------------------------------


def test_retire_version_removes_its_aliases_and_tags_it(registry: Registry, tmp_path: Path) -> None:
    name, client, hook = "retire_tags", registry.client, MlflowRegistryHook()
    old, champion = register(registry, name), register(registry, name)
    client.set_registered_model_alias(name, PREVIOUS_CHAMPION_ALIAS, old)
    client.set_registered_model_alias(name, CANDIDATE_ALIAS, old)
    client.set_registered_model_alias(name, CHAMPION_ALIAS, champion)
    manifest = archive_version(hook, name, old, as_storage_path(tmp_path / "archive"), NOW.isoformat())

    removed = retire_version(hook, name, old, manifest=manifest, reason="superseded", now=NOW.isoformat())
    assert sorted(removed) == sorted([PREVIOUS_CHAMPION_ALIAS, CANDIDATE_ALIAS])
    assert aliases(registry, name) == {CHAMPION_ALIAS: champion}
    tags = client.get_model_version(name, old).tags
    assert tags["retired"] == "true" and tags["retired_reason"] == "superseded"
    assert tags["retired_at"] == NOW.isoformat() and tags["retired_archive_uri"] == manifest.archive_uri

    with pytest.raises(RetirementError, match="became champion meanwhile"):
        retire_version(hook, name, champion, manifest=manifest, reason="oops", now=NOW.isoformat())
    assert aliases(registry, name) == {CHAMPION_ALIAS: champion}
    assert "retired" not in client.get_model_version(name, champion).tags


# --- operator ------------------------------------------------------------------------------------


def task_context(run_id: str) -> dict[str, Any]:
    dag_run = SimpleNamespace(dag_id="modelops_retirement", run_id=run_id, triggering_user_name="carol")
    return {"dag_run": dag_run, "ti": SimpleNamespace(task_id="retire")}


def audit_records(home: Path) -> list[Any]:
    store = AuditStore(f"sqlite:///{home}/audit.db")
    try:
        assert store.verify().ok
        return store.records(action="model.retired")
    finally:
        store.dispose()


def snapshot(registry: Registry, name: str) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    return aliases(registry, name), {str(v.version): dict(v.tags) for v in versions(registry, name)}


def test_operator_dry_run_changes_nothing_then_the_real_run_retires(
    registry: Registry, modelops_home: Path
) -> None:
    name = model_spec().name
    now = datetime.now(UTC)
    stale = register(registry, name, {"superseded_at": (now - timedelta(days=45)).isoformat()})
    champion = register(registry, name)
    registry.client.set_registered_model_alias(name, PREVIOUS_CHAMPION_ALIAS, stale)
    registry.client.set_registered_model_alias(name, CHAMPION_ALIAS, champion)
    archive_dir = modelops_home / "storage" / "archive"
    before = snapshot(registry, name)

    dry = RetireModelsOperator(task_id="retire", dry_run="true").execute(task_context("manual__dry"))
    json.dumps(dry)
    assert dry["dry_run"] is True and dry["retired"] == [] and dry["refused"] == []
    assert [p["version"] for p in dry["planned"]] == [stale]
    assert dry["summary"].startswith(f"dry run: would retire ['{stale}']")
    assert snapshot(registry, name) == before
    assert not archive_dir.exists()
    (record,) = audit_records(modelops_home)
    assert record.decision == "would_retire" and record.details["dry_run"] is True

    done = RetireModelsOperator(task_id="retire").execute(task_context("manual__real"))
    (retired,) = done["retired"]
    assert retired["version"] == stale and done["planned"] == []
    folder = archive_dir / name / f"v{stale}"
    assert retired["archive_uri"] == folder.as_uri() and (folder / "manifest.json").exists()
    assert verify_archive(retired["archive_uri"]).version == stale
    assert aliases(registry, name) == {CHAMPION_ALIAS: champion}
    tags = registry.client.get_model_version(name, stale).tags
    assert tags["retired"] == "true" and tags["retired_archive_uri"] == folder.as_uri()
    record = audit_records(modelops_home)[-1]
    assert record.decision == "retired" and record.details["aliases_removed"] == [PREVIOUS_CHAMPION_ALIAS]
    assert record.details["files"] == retired["files"] and "archive_manifest" in record.evidence

    # Asking for the champion alone retires nothing and says why.
    after = snapshot(registry, name)
    with pytest.raises(RetirementRefused, match=f"nothing retired: v{champion} refused: it is the serving"):
        RetireModelsOperator(task_id="retire", versions=f"v{champion}", reason="test").execute(
            task_context("manual__champion")
        )
    assert snapshot(registry, name) == after
    assert audit_records(modelops_home)[-1].decision == "refused"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dry_run": "maybe"}, "dry_run must be true or false"),
        (
            {"versions": "3, latest", "reason": "x"},
            r"versions must be numbers like 3 or v3, got \['latest'\]",
        ),
    ],
)
def test_operator_refuses_bad_parameters(
    registry: Registry, modelops_home: Path, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(RetirementError, match=message):
        RetireModelsOperator(task_id="retire", **kwargs).execute(task_context("manual__bad"))
