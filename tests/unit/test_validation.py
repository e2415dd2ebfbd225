"""Stage 1, dataset hashing and validation, on real CSV files under tmp_path with the shipped GX suites.

The catalog is the shipped include/ with every dataset's incoming folder under tmp_path/incoming
(``MODELOPS_INCOMING_ROOT``) and storage under the test's private MODELOPS_HOME.
"""

from __future__ import annotations

import hashlib
import json
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from airflow.sdk import ObjectStoragePath
from airflow.sdk.exceptions import AirflowFailException

from modelops.assets import VALIDATED_DATASET
from modelops.audit import AuditStore
from modelops.data.sklearn_datasets import write_diabetes_csv
from modelops.data.synthetic import generate_clicks, write_csv
from modelops.errors import DatasetError, SettingsError
from modelops.operators.validation import ValidateDatasetOperator
from modelops.settings import Catalog, DatasetSpec, load_catalog
from modelops.stages.outcome import StageOutcome
from modelops.stages.validation import plan_validation, snapshot_dir, validate, validate_dataset
from modelops.storage import as_storage_path, sha256_of, storage_root
from modelops.vocabulary import AuditAction, Decision, dataset_location_subject, dataset_subject
from tests.support import keyring_for_tests

ROWS = 500
DIABETES_ROWS = 442


class OutletEvents(dict):
    """Stand-in for Airflow's outlet event accessors: an accessor (with ``extra``) per asset on demand."""

    def __missing__(self, key: Any) -> SimpleNamespace:
        self[key] = SimpleNamespace(extra={})
        return self[key]


def task_context(task_id: str = "validate", run_id: str = "manual__1") -> dict[str, Any]:
    dag_run = SimpleNamespace(dag_id="modelops_data_validation", run_id=run_id, triggering_user_name="alice")
    return {"dag_run": dag_run, "ti": SimpleNamespace(task_id=task_id), "outlet_events": OutletEvents()}


@pytest.fixture
def incoming(modelops_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where the datasets' incoming folders are (tmp_path/incoming/<dataset>); storage is MODELOPS_HOME's."""
    root = tmp_path / "incoming"
    monkeypatch.setenv("MODELOPS_INCOMING_ROOT", str(root))
    monkeypatch.delenv("MODELOPS_STORAGE_ROOT", raising=False)
    monkeypatch.delenv("MODELOPS_STORAGE_CONN_ID", raising=False)
    return root


@pytest.fixture
def catalog(incoming: Path) -> Catalog:
    return load_catalog()


@pytest.fixture
def storage(catalog: Catalog) -> ObjectStoragePath:
    return storage_root(catalog.platform)


@pytest.fixture
def clicks(catalog: Catalog) -> DatasetSpec:
    return catalog.dataset("ctr_clicks")


@pytest.fixture
def audit_store(modelops_home: Path) -> Iterator[AuditStore]:
    store = AuditStore(f"sqlite:///{modelops_home}/audit.db", keyring=keyring_for_tests())
    yield store
    store.dispose()


def datasets_dir(home: Path) -> Path:
    return home / "storage" / "datasets"


def csv_of(incoming: Path, name: str, **kwargs: Any) -> Path:
    """A click CSV dropped in the ctr_clicks incoming folder."""
    return write_csv(generate_clicks(ROWS, seed=3, **kwargs), incoming / "ctr_clicks" / f"{name}.csv")


def diabetes_csv(incoming: Path, name: str = "2026-01") -> Path:
    path = incoming / "diabetes" / f"{name}.csv"
    assert write_diabetes_csv(path) == DIABETES_ROWS
    return path


def sha_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_validate(
    catalog: Catalog, storage: ObjectStoragePath, path: Path | str, dataset: str
) -> StageOutcome:
    return validate(str(path), catalog.dataset(dataset), catalog, storage)


def check(catalog: Catalog, storage: ObjectStoragePath, path: Path, dataset: str = "ctr_clicks"):
    spec = catalog.dataset(dataset)
    return validate_dataset(str(path), spec, catalog.suite_path(spec), storage)


# --- hashing -------------------------------------------------------------------------------------


def test_sha256_is_streamed_in_chunks_with_bounded_memory(tmp_path: Path) -> None:
    size = 6 * 1024 * 1024 + 123  # several chunks plus a partial one
    data = hashlib.shake_256(b"modelops").digest(size)
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    del data

    storage_path = as_storage_path(path)
    assert sha256_of(storage_path) == (expected, size)  # default 1 MiB chunks

    tracemalloc.start()
    try:
        digest, counted = sha256_of(storage_path, chunk_bytes=64 * 1024)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (digest, counted) == (expected, size)
    # The whole file is never held: the peak stays around one chunk, far below the 6 MiB file.
    assert peak < size / 8, f"peak {peak} bytes while hashing a {size}-byte file"


def test_sha256_of_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.bin"
    path.write_bytes(b"")
    assert sha256_of(as_storage_path(path)) == (hashlib.sha256(b"").hexdigest(), 0)


# --- unreadable inputs ---------------------------------------------------------------------------


def test_missing_file_names_the_path_and_the_fix(
    modelops_home: Path, incoming: Path, catalog, storage
) -> None:
    missing = incoming / "ctr_clicks" / "nowhere.csv"
    with pytest.raises(DatasetError) as raised:
        check(catalog, storage, missing)
    message = str(raised.value)
    assert str(missing) in message
    assert "dataset_uri" in message and "drop the file there" in message

    outcome = run_validate(catalog, storage, missing, "ctr_clicks")
    assert outcome.decision == Decision.UNREADABLE and outcome.asset_extra is None
    (record,) = outcome.records
    assert record.action == AuditAction.DATASET_VALIDATED and record.decision == Decision.UNREADABLE
    # Nothing to hash: named by where it was.
    assert record.subject == dataset_location_subject(str(missing))
    assert record.details["dataset"] == "ctr_clicks" and str(missing) in record.details["error"]
    assert outcome.refusal is not None and str(missing) in outcome.refusal
    assert str(catalog.source_of("datasets", "ctr_clicks")) in outcome.refusal
    assert "ctr_clicks.json" in outcome.refusal
    assert not datasets_dir(modelops_home).exists()


def test_empty_file_is_refused(modelops_home: Path, incoming: Path, catalog, storage) -> None:
    empty = incoming / "ctr_clicks" / "empty.csv"
    empty.parent.mkdir(parents=True)
    empty.write_bytes(b"")
    with pytest.raises(DatasetError, match=r"is empty \(0 bytes\); it needs a header row and data"):
        check(catalog, storage, empty)
    outcome = run_validate(catalog, storage, empty, "ctr_clicks")
    assert outcome.decision == Decision.UNREADABLE
    # A file that exists is named by its bytes, so the poller does not retry the same bytes forever.
    assert outcome.records[0].subject == dataset_subject(hashlib.sha256(b"").hexdigest())
    assert not datasets_dir(modelops_home).exists()


def test_header_only_csv_is_refused(modelops_home: Path, incoming: Path, catalog, storage) -> None:
    header_only = incoming / "ctr_clicks" / "header.csv"
    header_only.parent.mkdir(parents=True)
    header_only.write_text(",".join(generate_clicks(1).columns) + "\n")
    with pytest.raises(DatasetError, match="has a header but no data rows"):
        check(catalog, storage, header_only)
    outcome = run_validate(catalog, storage, header_only, "ctr_clicks")
    assert outcome.decision == Decision.UNREADABLE
    assert outcome.records[0].subject == dataset_subject(sha_of(header_only))
    assert "has a header but no data rows" in outcome.refusal
    assert not datasets_dir(modelops_home).exists()


def test_a_file_that_is_no_csv_is_unreadable_without_echoing_it(
    modelops_home: Path, incoming: Path, catalog, storage
) -> None:
    binary = incoming / "diabetes" / "scan.csv"
    binary.parent.mkdir(parents=True)
    binary.write_bytes(b"\xff\xfe\x00secret\x00" * 50 + b"\n\x00\xff\n")
    outcome = run_validate(catalog, storage, binary, "diabetes")
    assert outcome.decision == Decision.UNREADABLE
    (record,) = outcome.records
    assert record.subject == dataset_subject(sha_of(binary))
    assert "not a readable CSV file" in record.details["error"] and "secret" not in record.details["error"]
    assert (
        str(catalog.source_of("datasets", "diabetes")) in outcome.refusal
        and "diabetes.json" in outcome.refusal
    )
    assert not datasets_dir(modelops_home).exists()


# --- failing expectations and PII ----------------------------------------------------------------


def test_missing_column_is_named(modelops_home: Path, incoming: Path, catalog, storage) -> None:
    report = check(catalog, storage, csv_of(incoming, "missing", defects=["missing_column"]))
    assert not report.passed
    failed = {(o.expectation, o.column) for o in report.failed_expectations}
    assert ("expect_table_columns_to_match_set", None) in failed
    assert ("expect_column_values_to_be_in_set", "device") in failed
    (device,) = [o for o in report.failed_expectations if o.column == "device"]
    # The reason GX could not evaluate it is kept, not reduced to a bare "failed".
    assert "could not be evaluated" in device.detail and "device" in device.detail
    assert any("column 'device'" in problem for problem in report.problems())
    assert report.snapshot_uri is None and report.data_card_uri is None
    assert not datasets_dir(modelops_home).exists()


def test_wrong_column_type_names_the_type_expectation(
    modelops_home: Path, incoming: Path, catalog, storage
) -> None:
    report = check(catalog, storage, csv_of(incoming, "words", defects=["wrong_types"]))
    assert not report.passed
    type_failures = [
        o for o in report.failed_expectations if o.expectation == "expect_column_values_to_be_in_type_list"
    ]
    assert [o.column for o in type_failures] == ["user_age"]
    assert "unexpected values" in type_failures[0].detail
    assert any(
        p.startswith("expect_column_values_to_be_in_type_list on column 'user_age'")
        for p in report.problems()
    )
    assert not datasets_dir(modelops_home).exists()


def test_pii_is_found_and_masked(modelops_home: Path, incoming: Path, catalog, storage) -> None:
    path = csv_of(incoming, "pii", with_pii=True)
    report = check(catalog, storage, path)
    assert not report.passed
    (finding,) = report.pii_findings
    assert finding.column == "email" and finding.pattern == "email address"
    assert finding.matching_rows == ROWS
    assert finding.example.endswith("***") and "@" not in finding.example

    addresses = set(generate_clicks(ROWS, seed=3, with_pii=True)["email"])
    everything = json.dumps(report.to_dict(), default=str) + "\n".join(report.problems())
    assert not any(address in everything for address in addresses)
    assert not any(address.split("@")[0] in everything for address in addresses)
    assert any("column 'email' holds email address values" in p for p in report.problems())

    # Nor does the stage outcome (audit record, refusal) carry an address.
    outcome = run_validate(catalog, storage, path, "ctr_clicks")
    recorded = json.dumps([outcome.records[0].details, outcome.refusal], default=str)
    assert not any(address in recorded for address in addresses)
    assert not datasets_dir(modelops_home).exists()


def test_out_of_range_values_are_named(modelops_home: Path, incoming: Path, catalog, storage) -> None:
    report = check(catalog, storage, csv_of(incoming, "range", defects=["out_of_range"]))
    failed = {
        o.column for o in report.failed_expectations if o.expectation == "expect_column_values_to_be_between"
    }
    assert failed == {"hour_of_day", "item_price"}
    problems = " | ".join(report.problems())
    assert "25 unexpected values (5.00%)" in problems and "(masked)" in problems
    assert "27" not in problems  # the bad hours are counted, never quoted
    assert not report.pii_findings
    assert not datasets_dir(modelops_home).exists()


def test_a_failed_validation_refuses_naming_the_spec_and_the_suite(
    modelops_home: Path, incoming: Path, catalog, storage
) -> None:
    path = csv_of(incoming, "bad", defects=["out_of_range"])
    sha = sha_of(path)
    outcome = run_validate(catalog, storage, path, "ctr_clicks")
    assert outcome.decision == Decision.FAILED and outcome.asset_extra is None
    (record,) = outcome.records
    assert record.action == AuditAction.DATASET_VALIDATED and record.decision == Decision.FAILED
    assert record.subject == dataset_subject(sha)
    assert record.details["dataset"] == "ctr_clicks" and record.details["snapshot_uri"] is None
    assert record.details["suite_file"] == str(catalog.suite_path("ctr_clicks"))
    assert record.details["dataset_spec"] == str(catalog.source_of("datasets", "ctr_clicks"))
    assert record.evidence["dataset"] == sha
    assert record.evidence["expectation_suite"] == sha_of(catalog.suite_path("ctr_clicks"))
    refusal = outcome.refusal
    assert refusal is not None and sha[:12] in refusal and str(path) in refusal
    assert str(catalog.source_of("datasets", "ctr_clicks")) in refusal and "suite ctr_clicks.json" in refusal
    assert "2 problem(s)" in refusal and all(problem in refusal for problem in record.details["problems"])
    assert "nothing was snapshotted" in refusal
    assert not datasets_dir(modelops_home).exists()


def test_a_file_checked_against_another_datasets_spec_fails_naming_that_spec(
    modelops_home: Path, incoming: Path, catalog, storage
) -> None:
    path = diabetes_csv(incoming)
    outcome = run_validate(catalog, storage, path, "ctr_clicks")
    assert outcome.decision == Decision.FAILED
    assert "dataset spec 'ctr_clicks'" in outcome.refusal and "ctr_clicks.json" in outcome.refusal
    assert any("expect_table_columns_to_match_set" in p for p in outcome.records[0].details["problems"])
    assert not datasets_dir(modelops_home).exists()


def test_an_implausible_diabetes_file_fails_its_own_suite(
    modelops_home: Path, incoming: Path, catalog, storage
) -> None:
    path = diabetes_csv(incoming)
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    first = lines[1].split(",")
    first[header.index("bmi")] = "95"
    path.write_text("\n".join([lines[0], ",".join(first), *lines[2:]]) + "\n")
    outcome = run_validate(catalog, storage, path, "diabetes")
    assert outcome.decision == Decision.FAILED
    (problem,) = outcome.records[0].details["problems"]
    assert problem.startswith("expect_column_values_to_be_between on column 'bmi'") and "95" in problem
    assert "suite diabetes.json" in outcome.refusal
    assert not datasets_dir(modelops_home).exists()


# --- passing dataset -----------------------------------------------------------------------------


def test_a_passing_dataset_is_snapshotted_once_with_a_data_card(
    modelops_home: Path, incoming: Path, catalog, storage
) -> None:
    path = csv_of(incoming, "good")
    raw = path.read_bytes()
    sha = hashlib.sha256(raw).hexdigest()

    report = check(catalog, storage, path)
    assert report.passed and report.problems() == []
    assert (report.sha256, report.size_bytes, report.row_count) == (sha, len(raw), ROWS)
    assert report.suite == "ctr_clicks" and all(o.success for o in report.expectations)
    snapshot = datasets_dir(modelops_home) / "ctr_clicks" / sha / "data.csv"
    assert report.snapshot_uri == str(snapshot_dir(storage, "ctr_clicks", sha) / "data.csv")
    assert report.snapshot_uri == snapshot.as_uri()
    assert snapshot.read_bytes() == raw

    card = json.loads((snapshot.parent / "data_card.json").read_text())
    assert report.data_card_uri == (snapshot.parent / "data_card.json").as_uri()
    assert card["sha256"] == sha and card["row_count"] == ROWS and card["size_bytes"] == len(raw)
    assert card["dataset"] == "ctr_clicks" and card["source_uri"] == path.as_uri()
    assert card["expectation_suite"] == "ctr_clicks"
    assert card["expectations_evaluated"] == len(report.expectations)
    assert set(card["columns"]) == set(report.columns)
    assert card["columns"]["user_age"]["min"] >= 18 and card["columns"]["device"]["distinct"] <= 3
    assert card["sensitive_columns"] == []  # the spec marks none

    assert report.lineage() == {
        "dataset": "ctr_clicks",
        "uri": path.as_uri(),
        "snapshot_uri": report.snapshot_uri,
        "sha256": sha,
        "row_count": ROWS,
        "columns": list(generate_clicks(1).columns),
        "suite": "ctr_clicks",
    }

    written_at = snapshot.stat().st_mtime_ns
    again = check(catalog, storage, path)
    assert again.passed and again.snapshot_uri == report.snapshot_uri
    assert snapshot.stat().st_mtime_ns == written_at  # kept, not rewritten
    assert [p.name for p in (datasets_dir(modelops_home) / "ctr_clicks").iterdir()] == [sha]
    assert sorted(p.name for p in snapshot.parent.iterdir()) == ["data.csv", "data_card.json"]


def test_the_data_card_marks_the_columns_the_spec_calls_sensitive(
    modelops_home: Path, incoming: Path, catalog, storage
) -> None:
    import dataclasses

    spec = catalog.datasets["ctr_clicks"].model_copy(update={"sensitive_columns": ["user_age", "no_such"]})
    marked = dataclasses.replace(catalog, datasets={**catalog.datasets, "ctr_clicks": spec})
    report = check(marked, storage, csv_of(incoming, "sensitive"))
    card = json.loads(Path(report.data_card_uri.removeprefix("file://")).read_text())
    assert card["sensitive_columns"] == ["user_age"]  # only columns the file has


def test_a_passing_outcome_carries_the_lineage_for_the_asset_event(
    modelops_home: Path, incoming: Path, catalog, storage
) -> None:
    path = diabetes_csv(incoming)
    sha = sha_of(path)
    outcome = run_validate(catalog, storage, path, "diabetes")
    assert outcome.decision == Decision.PASSED and outcome.refusal is None
    snapshot = datasets_dir(modelops_home) / "diabetes" / sha / "data.csv"
    assert snapshot.read_bytes() == path.read_bytes()
    extra = outcome.asset_extra
    assert extra is not None
    assert (extra["dataset"], extra["sha256"], extra["snapshot_uri"]) == ("diabetes", sha, snapshot.as_uri())
    assert (extra["row_count"], extra["suite"], extra["uri"]) == (DIABETES_ROWS, "diabetes", path.as_uri())
    assert extra["columns"] == ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6", "progression"]
    (record,) = outcome.records
    assert record.subject == dataset_subject(sha) and record.decision == Decision.PASSED
    assert record.details["snapshot_uri"] == extra["snapshot_uri"] and record.details["problems"] == []
    assert record.details["dataset"] == "diabetes"
    assert set(record.evidence) == {"dataset", "expectation_suite", "report"}
    assert outcome.xcom()["decision"] == Decision.PASSED
    assert outcome.summary.startswith(f"diabetes sha256 {sha[:12]}... {DIABETES_ROWS} rows")


# --- what to validate ----------------------------------------------------------------------------


def test_plan_polls_every_incoming_folder_for_matching_files(incoming: Path, catalog, audit_store) -> None:
    assert plan_validation(catalog=catalog, audit=audit_store, datasets=[], dataset_uri=None) == []

    clicks_a = csv_of(incoming, "a")
    clicks_b = write_csv(generate_clicks(50, seed=4), incoming / "ctr_clicks" / "b.csv")
    diabetes = diabetes_csv(incoming)
    # Not versions: a file being written (dot-file), one not matching the pattern, a sub-folder.
    (incoming / "ctr_clicks" / ".c.csv.partial").write_text("half")
    (incoming / "ctr_clicks" / ".hidden.csv").write_text("x,y\n1,2\n")
    (incoming / "ctr_clicks" / "notes.txt").write_text("not data")
    (incoming / "ctr_clicks" / "older.csv").mkdir()

    plan = plan_validation(catalog=catalog, audit=audit_store, datasets=[], dataset_uri=None)
    assert plan == [
        {"dataset": "ctr_clicks", "dataset_uri": clicks_a.as_uri()},
        {"dataset": "ctr_clicks", "dataset_uri": clicks_b.as_uri()},
        {"dataset": "diabetes", "dataset_uri": diabetes.as_uri()},
    ]
    only = plan_validation(catalog=catalog, audit=audit_store, datasets=["diabetes"], dataset_uri=None)
    assert only == [{"dataset": "diabetes", "dataset_uri": diabetes.as_uri()}]


def test_plan_skips_files_validated_before_at_the_same_location(
    incoming: Path, catalog, storage, audit_store: AuditStore
) -> None:
    passed = csv_of(incoming, "passed")
    failed = csv_of(incoming, "failed", defects=["out_of_range"])
    empty = incoming / "diabetes" / "empty.csv"
    empty.parent.mkdir(parents=True)
    empty.write_bytes(b"")
    diabetes = diabetes_csv(incoming, "later")
    first = plan_validation(catalog=catalog, audit=audit_store, datasets=[], dataset_uri=None)
    assert first == [
        {"dataset": "ctr_clicks", "dataset_uri": failed.as_uri()},
        {"dataset": "ctr_clicks", "dataset_uri": passed.as_uri()},
        {"dataset": "diabetes", "dataset_uri": empty.as_uri()},
        {"dataset": "diabetes", "dataset_uri": diabetes.as_uri()},
    ]
    # Validate and record three of them as the DAG's mapped tasks would, whatever the decision.
    decisions = []
    for entry in first[:3]:
        outcome = validate(entry["dataset_uri"], catalog.dataset(entry["dataset"]), catalog, storage)
        for record in outcome.records:
            audit_store.append(
                actor="test",
                action=record.action,
                subject=record.subject,
                decision=record.decision,
                details=record.details,
                evidence=record.evidence,
            )
        decisions.append(outcome.decision)
    assert decisions == [Decision.FAILED, Decision.PASSED, Decision.UNREADABLE]
    # A record of another action about the diabetes file does not count as its validation.
    audit_store.append(
        actor="test",
        action=AuditAction.MODEL_REGISTERED,
        subject=dataset_subject(sha_of(diabetes)),
        decision=Decision.CANDIDATE,
        details={"uri": diabetes.as_uri()},
    )
    assert plan_validation(catalog=catalog, audit=audit_store, datasets=[], dataset_uri=None) == [
        {"dataset": "diabetes", "dataset_uri": diabetes.as_uri()}
    ]

    # The same bytes dropped under another name are another delivery; a failed file fixed and dropped
    # again under its old name is new bytes: both are validated.
    again = incoming / "ctr_clicks" / "passed-again.csv"
    again.write_bytes(passed.read_bytes())
    write_csv(generate_clicks(ROWS, seed=5), failed)
    assert plan_validation(catalog=catalog, audit=audit_store, datasets=["ctr_clicks"], dataset_uri=None) == [
        {"dataset": "ctr_clicks", "dataset_uri": failed.as_uri()},
        {"dataset": "ctr_clicks", "dataset_uri": again.as_uri()},
    ]


def test_plan_of_one_file_finds_its_dataset_from_its_folder(incoming: Path, catalog, audit_store) -> None:
    dropped = diabetes_csv(incoming)
    for uri in (str(dropped), dropped.as_uri()):
        plan = plan_validation(catalog=catalog, audit=audit_store, datasets=[], dataset_uri=uri)
        assert plan == [{"dataset": "diabetes", "dataset_uri": uri}]
    # Named explicitly, a file anywhere is checked, even one already validated.
    audit_store.append(
        actor="test",
        action=AuditAction.DATASET_VALIDATED,
        subject=dataset_subject(sha_of(dropped)),
        decision=Decision.PASSED,
    )
    assert plan_validation(catalog=catalog, audit=audit_store, datasets=[], dataset_uri=str(dropped)) == [
        {"dataset": "diabetes", "dataset_uri": str(dropped)}
    ]


def test_plan_of_one_file_elsewhere_needs_its_dataset_named(
    tmp_path: Path, incoming: Path, catalog, audit_store, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = write_csv(generate_clicks(20, seed=1), tmp_path / "downloads" / "clicks.csv")
    with pytest.raises(SettingsError) as raised:
        plan_validation(catalog=catalog, audit=audit_store, datasets=[], dataset_uri=str(elsewhere))
    message = str(raised.value)
    assert str(elsewhere) in message and str(incoming / "ctr_clicks") in message
    assert str(incoming / "diabetes") in message

    # Named, it is still outside every folder datasets may be read from: refused, naming them.
    with pytest.raises(DatasetError, match="outside the folders datasets may be read from") as raised:
        plan_validation(
            catalog=catalog, audit=audit_store, datasets=["ctr_clicks"], dataset_uri=str(elsewhere)
        )
    assert str(incoming / "ctr_clicks") in str(raised.value)
    # A folder allowed in the platform settings makes it readable.
    monkeypatch.setenv("MODELOPS_DATASET_ROOT", str(elsewhere.parent))
    plan = plan_validation(
        catalog=load_catalog(), audit=audit_store, datasets=["ctr_clicks"], dataset_uri=str(elsewhere)
    )
    assert plan == [{"dataset": "ctr_clicks", "dataset_uri": str(elsewhere)}]
    # An explicit dataset wins over the folder the file is in.
    in_diabetes = diabetes_csv(incoming)
    plan = plan_validation(
        catalog=catalog, audit=audit_store, datasets=["ctr_clicks"], dataset_uri=str(in_diabetes)
    )
    assert plan == [{"dataset": "ctr_clicks", "dataset_uri": str(in_diabetes)}]
    with pytest.raises(DatasetError, match="name at most one dataset"):
        plan_validation(
            catalog=catalog,
            audit=audit_store,
            datasets=["ctr_clicks", "diabetes"],
            dataset_uri=str(elsewhere),
        )


def test_plan_with_an_unknown_dataset_lists_the_known_ones(incoming: Path, catalog, audit_store) -> None:
    csv_of(incoming, "a")
    for uri in (None, str(incoming / "ctr_clicks" / "a.csv")):
        with pytest.raises(SettingsError) as raised:
            plan_validation(catalog=catalog, audit=audit_store, datasets=["ctr_click"], dataset_uri=uri)
        message = str(raised.value)
        assert "'ctr_click'" in message and "['ctr_clicks', 'diabetes']" in message


# --- operator ------------------------------------------------------------------------------------


def test_operator_records_every_problem_before_failing(
    modelops_home: Path, incoming: Path, audit_store: AuditStore
) -> None:
    path = csv_of(incoming, "bad", defects=["out_of_range"], with_pii=True)
    operator = ValidateDatasetOperator(
        task_id="validate", dataset="ctr_clicks", dataset_uri=str(path), outlets=[VALIDATED_DATASET]
    )
    context = task_context()
    with pytest.raises(AirflowFailException) as raised:
        operator.execute(context)

    record = audit_store.last(action=AuditAction.DATASET_VALIDATED)
    assert record is not None and record.decision == Decision.FAILED
    assert record.subject == dataset_subject(sha_of(path))
    assert (record.dag_id, record.run_id, record.task_id) == (
        "modelops_data_validation",
        "manual__1",
        "validate",
    )
    assert record.actor == "airflow:modelops_data_validation.validate (triggered by alice)"
    problems = record.details["problems"]
    assert len(problems) == 4  # column set, hour_of_day, item_price, email
    for needle in ("expect_table_columns_to_match_set", "hour_of_day", "item_price", "column 'email'"):
        assert any(needle in problem for problem in problems), needle
    assert record.details["snapshot_uri"] is None and record.details["dataset"] == "ctr_clicks"
    assert set(record.evidence) == {"dataset", "expectation_suite", "report"}

    message = str(raised.value)
    assert "4 problem(s)" in message and all(problem in message for problem in problems)
    assert "ctr_clicks.yaml" in message and "suite ctr_clicks.json" in message
    assert "nothing was snapshotted" in message
    assert not context["outlet_events"]
    assert not datasets_dir(modelops_home).exists()


def test_operator_passes_and_puts_the_lineage_on_the_asset_event(
    modelops_home: Path, incoming: Path, audit_store: AuditStore
) -> None:
    path = csv_of(incoming, "good")
    sha = sha_of(path)
    snapshot_uri = (datasets_dir(modelops_home) / "ctr_clicks" / sha / "data.csv").as_uri()
    operator = ValidateDatasetOperator(
        task_id="validate", dataset="ctr_clicks", dataset_uri=path.as_uri(), outlets=[VALIDATED_DATASET]
    )
    context = task_context()
    result = operator.execute(context)

    extra = context["outlet_events"][VALIDATED_DATASET].extra
    assert extra["sha256"] == sha and extra["snapshot_uri"] == snapshot_uri
    assert extra["row_count"] == ROWS and extra["dataset"] == "ctr_clicks"
    assert type(extra["dataset"]) is str and json.loads(json.dumps(extra)) == extra
    assert {key: result[key] for key in extra} == extra
    assert result["decision"] == "passed"
    assert result["summary"].startswith(f"ctr_clicks sha256 {sha[:12]}... {ROWS} rows")
    json.dumps(result)  # JSON-safe XCom

    record = audit_store.last(action=AuditAction.DATASET_VALIDATED)
    assert record.decision == Decision.PASSED and record.subject == dataset_subject(sha)
    assert record.details["problems"] == [] and record.details["snapshot_uri"] == extra["snapshot_uri"]
    assert record.evidence["dataset"] == sha
    assert audit_store.verify().ok

    # A retry of the same task run writes no second record.
    operator.execute(task_context())
    assert audit_store.count() == 1


def test_operator_records_an_unreadable_dataset_before_failing(
    modelops_home: Path, incoming: Path, audit_store: AuditStore
) -> None:
    missing = incoming / "diabetes" / "nowhere.csv"
    operator = ValidateDatasetOperator(task_id="validate", dataset="diabetes", dataset_uri=str(missing))
    context = task_context()
    with pytest.raises(AirflowFailException, match="dataset not found") as raised:
        operator.execute(context)
    record = audit_store.last(action=AuditAction.DATASET_VALIDATED)
    assert record.decision == Decision.UNREADABLE and record.subject == dataset_location_subject(str(missing))
    assert str(missing) in record.details["error"] and record.details["dataset"] == "diabetes"
    assert "diabetes.yaml" in str(raised.value) and "diabetes.json" in str(raised.value)
    assert not context["outlet_events"]


def test_a_folder_is_refused_as_unreadable_and_recorded(
    modelops_home: Path, incoming: Path, catalog, storage, audit_store: AuditStore
) -> None:
    folder = diabetes_csv(incoming).parent
    outcome = run_validate(catalog, storage, folder, "diabetes")
    assert outcome.decision == Decision.UNREADABLE and str(folder) in outcome.refusal
    operator = ValidateDatasetOperator(task_id="validate", dataset="diabetes", dataset_uri=str(folder))
    with pytest.raises(AirflowFailException):
        operator.execute(task_context())
    assert audit_store.last(action=AuditAction.DATASET_VALIDATED).decision == Decision.UNREADABLE


def test_operator_with_an_unknown_dataset_names_the_known_ones(
    incoming: Path, audit_store: AuditStore
) -> None:
    operator = ValidateDatasetOperator(task_id="validate", dataset="diabetis", dataset_uri="/x.csv")
    # A settings mistake fails the task without a retry (no retry could fix it), naming the known ones.
    with pytest.raises(
        AirflowFailException, match=r"'diabetis'; known datasets: \['ctr_clicks', 'diabetes'\]"
    ):
        operator.execute(task_context())
    # The task's own failure is on record (an error, not a decision about any file).
    (record,) = audit_store.records()
    assert record.decision == "error" and record.details["error"] == "SettingsError"
    assert record.subject == "dataset-uri:/x.csv" and record.details["retried_by_airflow"] is False


# --- attacks: nothing sensitive in records, every row scanned, inputs confined ------------------------


def test_pii_in_a_categorical_column_is_never_quoted(
    modelops_home: Path, incoming: Path, catalog, storage
) -> None:
    frame = generate_clicks(ROWS, seed=3)
    addresses = [f"customer.{i}@example.com" for i in range(40)]
    frame.loc[: len(addresses) - 1, "item_category"] = addresses
    path = write_csv(frame, incoming / "ctr_clicks" / "leaky.csv")
    outcome = run_validate(catalog, storage, path, "ctr_clicks")
    assert outcome.decision == Decision.FAILED
    problems = outcome.records[0].details["problems"]
    assert any("item_category" in p and "40 unexpected values" in p for p in problems)
    assert any("column 'item_category' holds email address values (40 rows" in p for p in problems)
    recorded = json.dumps([outcome.records[0].details, outcome.refusal, outcome.summary], default=str)
    recorded += json.dumps(check(catalog, storage, path).to_dict(), default=str)
    for address in addresses:
        assert address not in recorded and address.split("@")[0] not in recorded
    assert not datasets_dir(modelops_home).exists()  # no snapshot, so no data card


def test_data_card_quotes_no_identifier_or_free_text_values(
    modelops_home: Path, incoming: Path, catalog, storage
) -> None:
    path = csv_of(incoming, "good")
    report = check(catalog, storage, path)
    card = json.loads(Path(report.data_card_uri.removeprefix("file://")).read_text())
    assert card["columns"]["device"]["kind"] == "categorical" and card["columns"]["device"]["top_values"]
    assert card["pii_scan"]["rows_scanned"] == ROWS and card["pii_scan"]["findings"] == []
    assert "item_category" in card["pii_scan"]["columns_scanned"]
    assert card["pii_scan"]["patterns"] == [p.name for p in catalog.dataset("ctr_clicks").pii_patterns]
    from modelops.stages.validation import data_card

    frame = generate_clicks(ROWS, seed=3)
    frame["note"] = [f"free text number {i}" for i in range(ROWS)]
    entry = data_card(report, frame)["columns"]["note"]
    assert "top_values" not in entry and entry["kind"].startswith("free text or identifier")


def test_pii_scan_covers_every_row(modelops_home: Path, incoming: Path, catalog, storage) -> None:
    rows = 25_000
    frame = generate_clicks(rows, seed=3)
    frame["comment"] = "ok"
    addresses = [f"late.{i}@example.org" for i in range(50)]
    frame.loc[20_000:20_049, "comment"] = addresses  # rows 20,001-20,050
    path = write_csv(frame, incoming / "ctr_clicks" / "late.csv")
    outcome = run_validate(catalog, storage, path, "ctr_clicks")
    assert outcome.decision == Decision.FAILED
    problems = outcome.records[0].details["problems"]
    assert any("column 'comment' holds email address values (50 rows" in p for p in problems)
    assert not any(address in outcome.refusal for address in addresses)
    assert not datasets_dir(modelops_home).exists()
    # Streamed: chunk by chunk, and all rows are counted.
    from modelops.stages.validation import scan_pii

    scan = scan_pii(str(path), catalog.dataset("ctr_clicks"), chunk_rows=1_000)
    assert scan.rows_scanned == rows and "comment" in scan.columns_scanned
    (finding,) = scan.findings
    assert (finding.column, finding.matching_rows) == ("comment", 50)


def _refused_unopened(
    catalog: Catalog, storage: ObjectStoragePath, uri: str, monkeypatch: pytest.MonkeyPatch
) -> StageOutcome:
    import modelops.stages.validation as stage

    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"{uri} was opened")

    for name in ("as_storage_path", "sha256_of", "read_dataset", "dataset_chunks", "validate_dataset"):
        monkeypatch.setattr(stage, name, never)
    outcome = validate(uri, catalog.dataset("ctr_clicks"), catalog, storage)
    monkeypatch.undo()
    return outcome


@pytest.mark.parametrize(
    "uri",
    [
        "file:///etc/os-release",
        "/etc/passwd",
        "/proc/self/environ",
        "s3://bucket/incoming/ctr_clicks/a.csv",
    ],
)
def test_a_location_outside_the_allowed_roots_is_refused_unopened(
    uri: str, modelops_home: Path, incoming: Path, catalog, storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    outcome = _refused_unopened(catalog, storage, uri, monkeypatch)
    assert outcome.decision == Decision.REFUSED and outcome.asset_extra is None
    assert outcome.refusal is not None and str(incoming / "ctr_clicks") in outcome.refusal
    assert str(incoming / "diabetes") in outcome.refusal and "allowed_roots" in outcome.refusal
    (record,) = outcome.records
    assert record.action == AuditAction.DATASET_VALIDATED and record.decision == Decision.REFUSED
    assert record.subject == dataset_location_subject(uri)
    everything = json.dumps([record.details, outcome.refusal, outcome.summary, outcome.details])
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.strip():
            assert line not in everything
    assert not datasets_dir(modelops_home).exists()


def test_dot_dot_and_symlinks_out_of_the_incoming_folder_are_refused(
    modelops_home: Path,
    incoming: Path,
    catalog,
    storage,
    audit_store: AuditStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder = incoming / "ctr_clicks"
    folder.mkdir(parents=True)
    dotted = f"{folder}/../../../../../../../../etc/passwd"
    assert Path(dotted).exists()
    for uri in (dotted, "file://" + dotted):
        assert _refused_unopened(catalog, storage, uri, monkeypatch).decision == Decision.REFUSED
    link = folder / "link.csv"
    link.symlink_to("/etc/os-release")
    for uri in (str(link), link.as_uri()):
        assert _refused_unopened(catalog, storage, uri, monkeypatch).decision == Decision.REFUSED
    # A sibling folder whose name extends the root's is not under it.
    assert _refused_unopened(catalog, storage, f"{folder}-evil/a.csv", monkeypatch).decision == (
        Decision.REFUSED
    )
    # Named explicitly, the plan refuses them too; polled, the link is planned (to record its refusal)
    # without being hashed, and not again once that refusal is recorded.
    for uri in (dotted, str(link)):
        with pytest.raises((DatasetError, SettingsError)):
            plan_validation(catalog=catalog, audit=audit_store, datasets=["ctr_clicks"], dataset_uri=uri)
    plan = plan_validation(catalog=catalog, audit=audit_store, datasets=[], dataset_uri=None)
    assert plan == [{"dataset": "ctr_clicks", "dataset_uri": link.as_uri()}]
    outcome = validate(plan[0]["dataset_uri"], catalog.dataset("ctr_clicks"), catalog, storage)
    assert outcome.decision == Decision.REFUSED
    (record,) = outcome.records
    audit_store.append(
        actor="test",
        action=record.action,
        subject=record.subject,
        decision=record.decision,
        details=record.details,
    )
    assert plan_validation(catalog=catalog, audit=audit_store, datasets=[], dataset_uri=None) == []
    assert "root:" not in json.dumps(record.details)


def test_operator_fails_a_refused_location_without_retry(
    modelops_home: Path, incoming: Path, audit_store: AuditStore
) -> None:
    operator = ValidateDatasetOperator(task_id="validate", dataset="ctr_clicks", dataset_uri="/etc/passwd")
    with pytest.raises(AirflowFailException, match="outside the folders datasets may be read from"):
        operator.execute(task_context())
    record = audit_store.last(action=AuditAction.DATASET_VALIDATED)
    assert record.decision == Decision.REFUSED
    assert record.subject == dataset_location_subject("/etc/passwd")
    assert "root:" not in json.dumps(record.details)


def test_a_text_file_that_is_no_dataset_is_not_echoed(
    modelops_home: Path, incoming: Path, catalog, storage
) -> None:
    content = Path("/etc/os-release").read_text()
    path = incoming / "ctr_clicks" / "os-release.csv"
    path.parent.mkdir(parents=True)
    path.write_text(content)
    outcome = run_validate(catalog, storage, path, "ctr_clicks")
    assert outcome.decision in (Decision.FAILED, Decision.UNREADABLE)
    everything = json.dumps([outcome.records[0].details, outcome.refusal, outcome.summary], default=str)
    for line in content.splitlines():
        for part in line.split(","):
            if len(part.strip()) > 3:
                assert part.strip() not in everything, part
    assert not datasets_dir(modelops_home).exists()
