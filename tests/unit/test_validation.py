"""Stage 1, dataset hashing and validation, on real CSV files under tmp_path with the real GX suite."""

from __future__ import annotations

import hashlib
import json
import tracemalloc
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from modelops.assets import VALIDATED_DATASET
from modelops.audit import AuditStore
from modelops.data.synthetic import generate_clicks, write_csv
from modelops.errors import DatasetError, DataValidationFailed
from modelops.operators.validation import ValidateDatasetOperator
from modelops.settings import DatasetSpec, dataset_spec
from modelops.stages.validation import snapshot_uri, validate_dataset
from modelops.storage import as_storage_path, sha256_of

ROWS = 500


class OutletEvents(dict):
    """Stand-in for Airflow's outlet event accessors: an accessor (with ``extra``) per asset on demand."""

    def __missing__(self, key: Any) -> SimpleNamespace:
        self[key] = SimpleNamespace(extra={})
        return self[key]


def task_context(task_id: str = "validate", run_id: str = "manual__1") -> dict[str, Any]:
    dag_run = SimpleNamespace(dag_id="modelops_data_validation", run_id=run_id, triggering_user_name="alice")
    return {"dag_run": dag_run, "ti": SimpleNamespace(task_id=task_id), "outlet_events": OutletEvents()}


@pytest.fixture
def spec() -> DatasetSpec:
    return dataset_spec()


@pytest.fixture
def audit_store(modelops_home: Path):
    store = AuditStore(f"sqlite:///{modelops_home}/audit.db")
    yield store
    store.dispose()


def datasets_dir(home: Path) -> Path:
    return home / "storage" / "datasets"


def csv_of(tmp_path: Path, name: str, **kwargs: Any) -> Path:
    return write_csv(generate_clicks(ROWS, seed=3, **kwargs), tmp_path / "incoming" / f"{name}.csv")


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


def test_missing_file_names_the_path_and_the_fix(modelops_home: Path, tmp_path: Path, spec) -> None:
    missing = tmp_path / "incoming" / "nowhere.csv"
    with pytest.raises(DatasetError) as raised:
        validate_dataset(str(missing), spec)
    message = str(raised.value)
    assert str(missing) in message
    assert "dataset_uri" in message and "drop the file there" in message
    assert not datasets_dir(modelops_home).exists()


def test_empty_file_is_refused(modelops_home: Path, tmp_path: Path, spec) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(DatasetError, match=r"is empty \(0 bytes\); it needs a header row and data"):
        validate_dataset(str(empty), spec)
    assert not datasets_dir(modelops_home).exists()


def test_header_only_csv_is_refused(modelops_home: Path, tmp_path: Path, spec) -> None:
    header_only = tmp_path / "header.csv"
    header_only.write_text(",".join(generate_clicks(1).columns) + "\n")
    with pytest.raises(DatasetError, match="has a header but no data rows"):
        validate_dataset(str(header_only), spec)
    assert not datasets_dir(modelops_home).exists()


# --- failing expectations and PII ----------------------------------------------------------------


def test_missing_column_is_named(modelops_home: Path, tmp_path: Path, spec) -> None:
    report = validate_dataset(str(csv_of(tmp_path, "missing", defects=["missing_column"])), spec)
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


def test_wrong_column_type_names_the_type_expectation(modelops_home: Path, tmp_path: Path, spec) -> None:
    report = validate_dataset(str(csv_of(tmp_path, "words", defects=["wrong_types"])), spec)
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


def test_pii_is_found_and_masked(modelops_home: Path, tmp_path: Path, spec) -> None:
    path = csv_of(tmp_path, "pii", with_pii=True)
    report = validate_dataset(str(path), spec)
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
    assert not datasets_dir(modelops_home).exists()


def test_out_of_range_values_are_named(modelops_home: Path, tmp_path: Path, spec) -> None:
    report = validate_dataset(str(csv_of(tmp_path, "range", defects=["out_of_range"])), spec)
    failed = {
        o.column for o in report.failed_expectations if o.expectation == "expect_column_values_to_be_between"
    }
    assert failed == {"hour_of_day", "item_price"}
    problems = " | ".join(report.problems())
    assert "27" in problems  # the sample of bad hours
    assert "25 unexpected values (5.00%)" in problems
    assert not report.pii_findings
    assert not datasets_dir(modelops_home).exists()


# --- passing dataset -----------------------------------------------------------------------------


def test_a_passing_dataset_is_snapshotted_once_with_a_data_card(
    modelops_home: Path, tmp_path: Path, spec
) -> None:
    path = csv_of(tmp_path, "good")
    raw = path.read_bytes()
    sha = hashlib.sha256(raw).hexdigest()

    report = validate_dataset(str(path), spec)
    assert report.passed and report.problems() == []
    assert (report.sha256, report.size_bytes, report.row_count) == (sha, len(raw), ROWS)
    assert report.suite == "ctr_clicks" and all(o.success for o in report.expectations)
    assert report.snapshot_uri == snapshot_uri("ctr_clicks", sha)
    snapshot = datasets_dir(modelops_home) / "ctr_clicks" / sha / "data.csv"
    assert report.snapshot_uri == snapshot.as_uri()
    assert snapshot.read_bytes() == raw

    card = json.loads((snapshot.parent / "data_card.json").read_text())
    assert card["sha256"] == sha and card["row_count"] == ROWS and card["size_bytes"] == len(raw)
    assert card["expectation_suite"] == "ctr_clicks"
    assert card["expectations_evaluated"] == len(report.expectations)
    assert set(card["columns"]) == set(report.columns)
    assert card["columns"]["user_age"]["min"] >= 18 and card["columns"]["device"]["distinct"] <= 3
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
    again = validate_dataset(str(path), spec)
    assert again.passed and again.snapshot_uri == report.snapshot_uri
    assert snapshot.stat().st_mtime_ns == written_at  # kept, not rewritten
    assert [p.name for p in (datasets_dir(modelops_home) / "ctr_clicks").iterdir()] == [sha]
    assert sorted(p.name for p in snapshot.parent.iterdir()) == ["data.csv", "data_card.json"]


# --- operator ------------------------------------------------------------------------------------


def test_operator_records_every_problem_before_failing(
    modelops_home: Path, tmp_path: Path, audit_store: AuditStore
) -> None:
    path = csv_of(tmp_path, "bad", defects=["out_of_range"], with_pii=True)
    operator = ValidateDatasetOperator(task_id="validate", dataset_uri=str(path), outlets=[VALIDATED_DATASET])
    context = task_context()
    with pytest.raises(DataValidationFailed) as raised:
        operator.execute(context)

    record = audit_store.last(action="dataset.validated")
    assert record is not None and record.decision == "failed"
    assert record.subject == f"dataset:sha256:{hashlib.sha256(path.read_bytes()).hexdigest()}"
    assert (record.dag_id, record.run_id, record.task_id) == (
        "modelops_data_validation",
        "manual__1",
        "validate",
    )
    problems = record.details["problems"]
    assert len(problems) == 4  # column set, hour_of_day, item_price, email
    for needle in ("expect_table_columns_to_match_set", "hour_of_day", "item_price", "column 'email'"):
        assert any(needle in problem for problem in problems), needle
    assert record.details["snapshot_uri"] is None
    assert set(record.evidence) == {"dataset", "expectation_suite", "report"}

    message = str(raised.value)
    assert "4 problem(s)" in message and all(problem in message for problem in problems)
    assert "nothing was snapshotted" in message
    assert not context["outlet_events"]
    assert not datasets_dir(modelops_home).exists()


def test_operator_passes_and_puts_the_lineage_on_the_asset_event(
    modelops_home: Path, tmp_path: Path, audit_store: AuditStore
) -> None:
    path = csv_of(tmp_path, "good")
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    operator = ValidateDatasetOperator(task_id="validate", dataset_uri=str(path), outlets=[VALIDATED_DATASET])
    context = task_context()
    result = operator.execute(context)

    extra = context["outlet_events"][VALIDATED_DATASET].extra
    assert extra["sha256"] == sha and extra["snapshot_uri"] == snapshot_uri("ctr_clicks", sha)
    assert extra["row_count"] == ROWS and extra["dataset"] == "ctr_clicks"
    assert {key: result[key] for key in extra} == extra
    assert result["summary"].startswith(f"sha256 {sha[:12]}... {ROWS} rows")
    json.dumps(result)  # JSON-safe XCom

    record = audit_store.last(action="dataset.validated")
    assert record.decision == "passed" and record.subject == f"dataset:sha256:{sha}"
    assert record.details["problems"] == [] and record.details["snapshot_uri"] == extra["snapshot_uri"]
    assert record.evidence["dataset"] == sha
    assert audit_store.verify().ok

    # A retry of the same task run writes no second record.
    operator.execute(task_context())
    assert audit_store.count() == 1


def test_operator_records_an_unreadable_dataset(modelops_home: Path, tmp_path: Path, audit_store) -> None:
    missing = tmp_path / "nowhere.csv"
    operator = ValidateDatasetOperator(task_id="validate", dataset_uri=str(missing))
    with pytest.raises(DatasetError):
        operator.execute(task_context())
    record = audit_store.last(action="dataset.validated")
    assert record.decision == "unreadable" and record.subject == f"dataset-uri:{missing}"
    assert str(missing) in record.details["error"]
