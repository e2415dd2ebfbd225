"""Stage 6, retirement: the selection rules on real registry versions, verified archives on real files,
the stage (dry run, real run, refusal, a failure half-way), which models a run concerns, and the
operator, against a real SQLite MLflow registry under a temporary folder."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from modelops.audit import AuditStore
from modelops.errors import RetirementError, RetirementRefused, UnknownModel
from modelops.operators.retirement import RetireModelsOperator
from modelops.registry import ModelRegistry
from modelops.settings import Catalog, RetirementPolicy, load_catalog
from modelops.stages import retirement as stage
from modelops.stages.retirement import (
    archive_version,
    plan_retirement,
    requested_versions,
    retire,
    retire_version,
    select_for_retirement,
    verify_archive,
)
from modelops.storage import as_storage_path
from modelops.vocabulary import Alias, AuditAction, Decision, Tag
from tests.support import keyring_for_tests

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
POLICY = RetirementPolicy(name="test", superseded_for_days=30)
TEST_EXPERIMENT = "modelops-tests/retirement"
CTR = "ctr_recommender"
DIABETES = "diabetes_progression"


@dataclasses.dataclass(frozen=True)
class Registry:
    root: Path
    tracking_uri: str
    registry: ModelRegistry
    model_dir: Path  # a saved model to register versions from


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog()


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, catalog: Catalog) -> Registry:
    """A SQLite MLflow registry; every experiment has its artifacts under the test folder (a SQLite store
    would otherwise write ./mlruns)."""
    import mlflow.sklearn
    from mlflow import MlflowClient
    from sklearn.linear_model import LogisticRegression

    root = tmp_path_factory.mktemp("retirement")
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    for experiment in [TEST_EXPERIMENT, *(spec.experiment_name for spec in catalog.models.values())]:
        client.create_experiment(experiment, artifact_location=(root / "artifacts").as_uri())
    model_dir = root / "model"
    model = LogisticRegression().fit([[0.0], [1.0], [2.0], [3.0]], [0, 0, 1, 1])
    mlflow.sklearn.save_model(model, str(model_dir), pip_requirements=["scikit-learn"])
    return Registry(root, tracking_uri, ModelRegistry(tracking_uri), model_dir)


def register(registry: Registry, name: str, tags: dict[str, str] | None = None) -> str:
    """A new version of ``name`` from its own training run (params and metrics like a real one)."""
    run_id = registry.registry.log_run(
        experiment=TEST_EXPERIMENT,
        run_name=f"fixture-{name}",
        tags={},
        params={"estimator": "LogisticRegression"},
        metrics={"holdout_roc_auc": 0.71},
        artifact_dirs={"model": registry.model_dir},
    )
    registry.registry.ensure_model(name, {})
    return registry.registry.register_version(
        name, run_id=run_id, artifact_path="model", tags=tags or {}
    ).version


def ago(days: float) -> str:
    return (NOW - timedelta(days=days)).isoformat()


def aliases(registry: Registry, name: str) -> dict[str, str]:
    return registry.registry.aliases(name)


def tags_of(registry: Registry, name: str, version: str) -> dict[str, str]:
    return registry.registry.version(name, version).tags


# --- selection -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def selection(registry: Registry) -> tuple[str, dict[str, str]]:
    """Versions of one model in every situation the rules distinguish."""
    name = "select_rules"
    numbers = {
        "old": register(registry, name, {Tag.SUPERSEDED_AT: ago(40), Tag.SUPERSEDED_BY: "x"}),
        "young": register(registry, name, {Tag.SUPERSEDED_AT: ago(10)}),
        "retired": register(registry, name, {Tag.SUPERSEDED_AT: ago(90), Tag.RETIRED: "true"}),
        "champion": register(registry, name, {Tag.SUPERSEDED_AT: ago(60)}),  # promoted again since
        "never_served": register(registry, name),
        "boundary": register(registry, name, {Tag.SUPERSEDED_AT: ago(30)}),
    }
    registry.registry.set_alias(name, Alias.CHAMPION, numbers["champion"])
    return name, numbers


def decide(
    registry: Registry,
    name: str,
    requested: list[str] | None = None,
    reason: str | None = "",
    policy: RetirementPolicy = POLICY,
) -> list:
    return select_for_retirement(
        versions=registry.registry.versions(name),
        aliases=aliases(registry, name),
        policy=policy,
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
    for reason in ("", "   ", None):
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


def test_the_policy_window_comes_from_the_policy(registry: Registry, selection, catalog: Catalog) -> None:
    name, v = selection
    lenient = decide(registry, name, policy=RetirementPolicy(name="lenient", superseded_for_days=5))
    assert {d.version for d in lenient} == {v["old"], v["young"], v["boundary"]}
    # Each model's policy follows its risk tier: the high-risk model keeps superseded versions longer.
    assert catalog.policies_for(CTR).retirement.superseded_for_days == 30
    assert catalog.policies_for(DIABETES).retirement.superseded_for_days == 90
    strict = decide(registry, name, policy=catalog.policies_for(DIABETES).retirement)
    assert strict == []


@pytest.mark.parametrize(
    ("given", "expected"),
    [(None, []), ([], []), ([3, "4", " 5 ", 3], ["3", "4", "5"]), (("7",), ["7"])],
)
def test_requested_versions_are_whole_numbers(given: Any, expected: list[str]) -> None:
    assert requested_versions(given) == expected


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ([3, "latest"], r"versions must be whole numbers like 3, got \['latest'\]"),
        ([True, 2.5, "v3", "-1"], r"got \[True, 2.5, 'v3', '-1'\]"),
        ("3, 4", r"versions must be a list of version numbers like \[3, 4\], got '3, 4'"),
    ],
)
def test_requested_versions_refuse_anything_else(given: Any, message: str) -> None:
    with pytest.raises(RetirementError, match=message):
        requested_versions(given)


# --- archives ------------------------------------------------------------------------------------


@pytest.fixture
def archived(registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Path, str]:
    name = "archive_roundtrip"
    version = register(registry, name, {Tag.TRAIN_DATA_SHA256: "e" * 64})
    # The registry's own URIs must be the ones used, never a process-wide default.
    elsewhere = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", elsewhere)
    manifest = archive_version(
        registry.registry, name, version, as_storage_path(tmp_path / "archive"), NOW.isoformat()
    )
    assert not (tmp_path / "elsewhere.db").exists()
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
    assert metadata["version"] == version and metadata["tags"][Tag.TRAIN_DATA_SHA256] == "e" * 64
    assert metadata["metrics"] == {"holdout_roc_auc": 0.71}
    assert metadata["params"] == {"estimator": "LogisticRegression"}
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
    name, models = "retire_tags", registry.registry
    old, champion = register(registry, name), register(registry, name)
    models.set_alias(name, Alias.PREVIOUS_CHAMPION, old)
    models.set_alias(name, Alias.CANDIDATE, old)
    models.set_alias(name, Alias.CHAMPION, champion)
    manifest = archive_version(models, name, old, as_storage_path(tmp_path / "archive"), NOW.isoformat())

    removed = retire_version(models, name, old, manifest=manifest, reason="superseded", now=NOW.isoformat())
    assert sorted(removed) == sorted([Alias.PREVIOUS_CHAMPION, Alias.CANDIDATE])
    assert aliases(registry, name) == {Alias.CHAMPION: champion}
    tags = tags_of(registry, name, old)
    assert tags[Tag.RETIRED] == "true" and tags[Tag.RETIRED_REASON] == "superseded"
    assert tags[Tag.RETIRED_AT] == NOW.isoformat() and tags[Tag.RETIRED_ARCHIVE_URI] == manifest.archive_uri

    with pytest.raises(RetirementError, match="became champion meanwhile"):
        retire_version(models, name, champion, manifest=manifest, reason="oops", now=NOW.isoformat())
    assert aliases(registry, name) == {Alias.CHAMPION: champion}
    assert Tag.RETIRED not in tags_of(registry, name, champion)


# --- the stage -----------------------------------------------------------------------------------


def snapshot(registry: Registry, name: str) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    return aliases(registry, name), {v.version: v.tags for v in registry.registry.versions(name)}


def run_retire(registry: Registry, catalog: Catalog, name: str, storage: Path, **kwargs: Any):
    spec = catalog.model(CTR).model_copy(update={"name": name})
    arguments = {"versions": [], "reason": None, "dry_run": False, "now": NOW, **kwargs}
    return retire(
        spec=spec,
        policy=catalog.policies_for(CTR).retirement,
        registry=registry.registry,
        storage=as_storage_path(storage),
        storage_conn_id=None,
        **arguments,
    )


def test_a_failure_half_way_keeps_the_records_of_what_was_retired(
    registry: Registry, catalog: Catalog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = "stage_failure"
    first, second, third = (register(registry, name, {Tag.SUPERSEDED_AT: ago(40)}) for _ in range(3))
    champion = register(registry, name)
    registry.registry.set_alias(name, Alias.CHAMPION, champion)
    real_verify = stage.verify_archive

    def verify_fails_for_the_second(archive_uri: str, conn_id: str | None = None):
        if archive_uri.endswith(f"/v{second}"):
            raise RetirementError(f"archive {archive_uri} does not match its manifest: MLmodel: missing")
        return real_verify(archive_uri, conn_id)

    monkeypatch.setattr(stage, "verify_archive", verify_fails_for_the_second)
    outcome = run_retire(registry, catalog, name, tmp_path / "storage")
    assert outcome.decision == Decision.FAILED
    assert [r["version"] for r in outcome.details["retired"]] == [first]
    assert [(r.subject, r.decision) for r in outcome.records] == [
        (f"model:{name}@{first}", Decision.RETIRED),
        (f"model:{name}@{second}", Decision.FAILED),
    ]
    assert "MLmodel: missing" in outcome.records[1].details["error"]
    assert outcome.refusal.startswith(f"retirement of {name} stopped at v{second}: RetirementError")
    assert tags_of(registry, name, first)[Tag.RETIRED] == "true"
    assert Tag.RETIRED not in tags_of(registry, name, second) and Tag.RETIRED not in tags_of(
        registry, name, third
    )

    # A rerun continues with the rest; a failure before anything changed is an ordinary (retried) error.
    monkeypatch.setattr(stage, "verify_archive", real_verify)
    rerun = run_retire(registry, catalog, name, tmp_path / "storage")
    assert [r["version"] for r in rerun.details["retired"]] == [second, third] and rerun.refusal is None

    def broken(*args: Any, **kwargs: Any):
        raise OSError("storage unreachable")

    monkeypatch.setattr(stage, "archive_version", broken)
    register(registry, name, {Tag.SUPERSEDED_AT: ago(40)})
    with pytest.raises(OSError, match="storage unreachable"):
        run_retire(registry, catalog, name, tmp_path / "storage")


def test_the_stage_refuses_a_flag_that_is_not_a_boolean(
    registry: Registry, catalog: Catalog, tmp_path: Path
) -> None:
    with pytest.raises(RetirementError, match="dry_run must be true or false, got 'true'"):
        run_retire(registry, catalog, "select_rules", tmp_path, dry_run="true")


# --- which models a run concerns -----------------------------------------------------------------


def test_plan_retirement_names_the_models_and_their_request(registry: Registry, catalog: Catalog) -> None:
    base = catalog.model(CTR)
    models = {
        name: base.model_copy(update={"name": name}) for name in ("plan_registered", "plan_unregistered")
    }
    plans = dataclasses.replace(catalog, models=models)
    register(registry, "plan_registered")

    def plan(models: list[str], versions: list[int] | None = None, **kwargs: Any) -> list[dict[str, Any]]:
        options = {"reason": None, "dry_run": False, **kwargs}
        return plan_retirement(
            catalog=plans, registry=registry.registry, models=models, versions=versions or [], **options
        )

    # No model named: every catalog model that is registered, by the policy alone.
    assert plan([]) == [{"model": "plan_registered", "versions": [], "reason": None, "dry_run": False}]
    # Named models are planned whether registered or not (nothing to retire is not an error).
    assert [entry["model"] for entry in plan(["plan_unregistered", "plan_registered"], dry_run=True)] == [
        "plan_unregistered",
        "plan_registered",
    ]
    assert plan(["plan_registered"], ["3", 4], reason="audit", dry_run=True) == [
        {"model": "plan_registered", "versions": [3, 4], "reason": "audit", "dry_run": True}
    ]
    for named in ([], ["plan_registered", "plan_unregistered"]):
        with pytest.raises(RetirementError, match="name exactly one model with them"):
            plan(named, [3], reason="audit")
    with pytest.raises(UnknownModel, match="'nope'"):
        plan(["nope"])
    with pytest.raises(RetirementError, match="versions must be whole numbers"):
        plan(["plan_registered"], ["latest"], reason="audit")
    with pytest.raises(RetirementError, match="dry_run must be true or false"):
        plan([], dry_run="yes")


# --- operator ------------------------------------------------------------------------------------


def task_context(run_id: str) -> dict[str, Any]:
    dag_run = SimpleNamespace(dag_id="modelops_retirement", run_id=run_id, triggering_user_name="carol")
    return {"dag_run": dag_run, "ti": SimpleNamespace(task_id="retire")}


@pytest.fixture
def connections(modelops_home: Path, registry: Registry, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(
        "AIRFLOW_CONN_MLFLOW_DEFAULT",
        json.dumps({"conn_type": "http", "extra": {"tracking_uri": registry.tracking_uri}}),
    )
    return modelops_home


def audit_records(home: Path) -> list[Any]:
    store = AuditStore(f"sqlite:///{home}/audit.db", keyring=keyring_for_tests())
    try:
        assert store.verify().ok
        return store.records(action=AuditAction.MODEL_RETIRED)
    finally:
        store.dispose()


def test_operator_dry_run_changes_nothing_then_the_real_run_retires(
    registry: Registry, connections: Path
) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    name = CTR
    now = datetime.now(UTC)
    stale = register(registry, name, {Tag.SUPERSEDED_AT: (now - timedelta(days=45)).isoformat()})
    champion = register(registry, name)
    registry.registry.set_alias(name, Alias.PREVIOUS_CHAMPION, stale)
    registry.registry.set_alias(name, Alias.CHAMPION, champion)
    archive_dir = connections / "storage" / "archive"
    before = snapshot(registry, name)

    operator = RetireModelsOperator(task_id="retire", model=name, dry_run=True)
    # Inputs come from the plan task, never rendered as Jinja (a reason is free text from the form).
    assert set(operator.template_fields) == set()
    dry = operator.execute(task_context("manual__dry"))
    json.dumps(dry)
    assert dry["dry_run"] is True and dry["retired"] == [] and dry["refused"] == []
    assert dry["decision"] == Decision.WOULD_RETIRE and dry["model_name"] == name
    assert [p["version"] for p in dry["planned"]] == [stale]
    assert dry["summary"].startswith(f"{name}: dry run: would retire ['{stale}']")
    assert snapshot(registry, name) == before
    assert not archive_dir.exists()
    (record,) = audit_records(connections)
    assert record.decision == "would_retire" and record.details["dry_run"] is True
    assert record.subject == f"model:{name}@{stale}" and record.details["policy"] == "standard"

    done = RetireModelsOperator(task_id="retire", model=name).execute(task_context("manual__real"))
    (retired,) = done["retired"]
    assert retired["version"] == stale and done["planned"] == [] and done["decision"] == Decision.RETIRED
    folder = archive_dir / name / f"v{stale}"
    assert retired["archive_uri"] == folder.as_uri() and (folder / "manifest.json").exists()
    assert verify_archive(retired["archive_uri"]).version == stale
    assert aliases(registry, name) == {Alias.CHAMPION: champion}
    tags = tags_of(registry, name, stale)
    assert tags[Tag.RETIRED] == "true" and tags[Tag.RETIRED_ARCHIVE_URI] == folder.as_uri()
    record = audit_records(connections)[-1]
    assert record.decision == "retired" and record.details["aliases_removed"] == [Alias.PREVIOUS_CHAMPION]
    assert record.details["files"] == retired["files"]
    assert set(record.evidence) == {"archive_manifest", "policy"}

    # Asking for the champion alone retires nothing and says why, after recording the refusal.
    after = snapshot(registry, name)
    with pytest.raises(
        AirflowFailException, match=f"nothing retired: v{champion} refused: it is the serving"
    ):
        RetireModelsOperator(task_id="retire", model=name, versions=[int(champion)], reason="test").execute(
            task_context("manual__champion")
        )
    assert snapshot(registry, name) == after
    assert audit_records(connections)[-1].decision == "refused"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dry_run": "maybe"}, "dry_run must be true or false, got 'maybe'"),
        (
            {"versions": [3, "latest"], "reason": "x"},
            r"versions must be whole numbers like 3, got \['latest'\]",
        ),
        ({"versions": "3, 4", "reason": "x"}, "versions must be a list of version numbers"),
    ],
)
def test_operator_refuses_bad_parameters(
    registry: Registry, connections: Path, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(RetirementError, match=message):
        RetireModelsOperator(task_id="retire", model=CTR, **kwargs).execute(task_context("manual__bad"))


def test_operator_without_a_reason_for_named_versions_fails_without_retry(
    registry: Registry, connections: Path
) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    version = register(registry, DIABETES)
    with pytest.raises(AirflowFailException, match="needs a reason"):
        RetireModelsOperator(task_id="retire", model=DIABETES, versions=[int(version)]).execute(
            task_context("manual__no_reason")
        )
    assert Tag.RETIRED not in tags_of(registry, DIABETES, version)
