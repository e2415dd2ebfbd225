"""Retention of the sealed prediction log: whole batches removed on record once due, against a real SQLite
prediction log and audit store; early expiry refused, and removals without a due authentic record named."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from modelops import cli
from modelops.audit import AuditKeyring, AuditStore, LocalFolderAnchorStore
from modelops.audit import retention as retention_module
from modelops.audit.retention import ExpiryRefused, expire_batches
from modelops.audit.seals import (
    SEALS_TABLE,
    RecordExpired,
    SealProblem,
    inclusion_proof,
    seal,
    store_recorder,
    verify_proof,
    verify_seals,
)
from modelops.errors import SettingsError
from modelops.serving.prediction_log import (
    PredictionLog,
    PredictionRecord,
    labels_table,
    predictions_table,
    record_row,
)
from modelops.settings import PlatformSettings, load_model_file, platform_settings
from modelops.vocabulary import AuditAction, Decision, prediction_batch_subject
from tests.support import TEST_KEY_ID, keyring_for_tests

NOW = datetime.now(UTC)
OLD = NOW - timedelta(days=500)  # batches 1 and 2: past a year's retention
RECENT = NOW - timedelta(days=10)  # batch 3: kept for about another 355 days
YEAR = timedelta(days=365)

# Seven decimals: no timestamp (six) or hash can contain it by chance, so finding it means a leak.
RAW_SCORE = 0.7531246


def _record(at: datetime, i: int) -> PredictionRecord:
    return PredictionRecord(
        request_id=uuid.uuid4().hex,
        received_at=at,
        caller_id="shop:k1",
        model_name="ctr",
        model_version="1",
        status_code=200,
        latency_ms=1.5 + i,
        n_rows=1,
        inputs=[{"user_age": 30 + i}],
        outputs=[[RAW_SCORE, 1 - RAW_SCORE]],
        traceparent=None,
        flags=None,
    )


def _fill(log: PredictionLog, n: int, start: datetime) -> list[str]:
    records = [_record(start + timedelta(seconds=i), i) for i in range(n)]
    with log.engine.begin() as conn:
        conn.execute(predictions_table.insert(), [record_row(record) for record in records])
    return [record.request_id for record in records]


def _sql(log: PredictionLog, sql: str, **params: Any) -> None:
    with log.engine.begin() as conn:
        conn.execute(sa.text(sql), params)


def _count(log: PredictionLog, table: str) -> int:
    with log.engine.connect() as conn:
        return int(conn.execute(sa.text(f"SELECT COUNT(*) FROM {table}")).scalar_one())


def _expire(log: PredictionLog, store: AuditStore, **options: Any) -> Any:
    return expire_batches(log.engine, store, store_recorder(store, "test"), NOW, YEAR, **options)


def _expiry_records(store: AuditStore) -> list[Any]:
    return store.records(action=AuditAction.PREDICTIONS_EXPIRED)


@pytest.fixture
def store(tmp_path: Path):
    store = AuditStore(f"sqlite:///{tmp_path / 'audit.db'}", keyring=keyring_for_tests())
    yield store
    store.dispose()


@pytest.fixture
def log(tmp_path: Path):
    log = PredictionLog(f"sqlite:///{tmp_path / 'predictions.db'}")
    yield log
    log.dispose()


@pytest.fixture
def sealed(log: PredictionLog, store: AuditStore) -> list[str]:
    """20 old calls (batches 1, 2) and 5 recent ones (batch 3), sealed; one label each on calls 0 and 22."""
    ids = _fill(log, 20, OLD) + _fill(log, 5, RECENT)
    run = seal(log.engine, store, store_recorder(store, "test"), now=NOW, batch_size=10)
    assert run.batches == (1, 2, 3)
    log.add_labels(ids[0], [1])
    log.add_labels(ids[22], [0])
    return ids


def test_retention_settings_default_to_a_year_and_refuse_nonsense(tmp_path: Path) -> None:
    assert platform_settings().prediction_log_retention_days == 365  # include/modelops.yaml
    assert PlatformSettings(storage_root="/x", default_model="m").prediction_log_retention_days == 365
    bad = tmp_path / "modelops.yaml"
    bad.write_text("storage_root: /x\ndefault_model: m\nprediction_log_retention_days: 0\n")
    with pytest.raises(SettingsError, match="field 'prediction_log_retention_days': Input should be greater"):
        load_model_file(bad, PlatformSettings)


def test_expiry_removes_whole_due_batches_on_record_and_verify_stays_ok(
    log: PredictionLog, store: AuditStore, sealed: list[str]
) -> None:
    seals = store.records(action=AuditAction.PREDICTIONS_SEALED)
    run = _expire(log, store)
    assert (run.expired, run.records, run.labels, run.held) == ((1, 2), 20, 1, ())
    assert run.next_due is not None and run.next_due.startswith((RECENT + YEAR).date().isoformat())
    assert "expired 2 sealed batches (1..2): 20 prediction records and 1 labels" in run.summary

    records = _expiry_records(store)
    assert [(r.subject, r.decision) for r in records] == [
        (prediction_batch_subject(1), Decision.EXPIRED),
        (prediction_batch_subject(2), Decision.EXPIRED),
    ]
    assert all(store.authentic(record) for record in records)
    first = records[0].details
    assert (first["batch_id"], first["count"], first["root"], first["seal_seq"]) == (
        1,
        10,
        seals[0].details["root"],
        seals[0].seq,
    )
    assert first["last"] == seals[0].details["last"] and first["retention_days"] == 365
    assert (first["records"], first["labels"]) == (10, 1)
    assert records[0].evidence == {"merkle_root": seals[0].details["root"]}
    text = json.dumps([record.to_dict() for record in records])
    assert "user_age" not in text and str(RAW_SCORE) not in text and "shop:k1" not in text

    # Whole batches gone (rows, their labels, seal rows); batch 3 and its label untouched.
    assert _count(log, "modelops_predictions") == 5 and _count(log, "modelops_labels") == 1
    with log.engine.connect() as conn:
        assert conn.execute(sa.select(labels_table.c.request_id)).scalar_one() == sealed[22]
        assert [row[0] for row in conn.execute(sa.text(f"SELECT batch_id FROM {SEALS_TABLE}"))] == [3]

    result = verify_seals(log.engine, store)
    assert result.ok, result.problem
    assert (result.batches, result.records, result.expired) == (3, 5, 2)
    assert store.verify().ok

    # A proof of an expired call says so, naming the expiry record; an unexpired call still proves.
    with pytest.raises(RecordExpired, match=f"expiry record seq={records[0].seq}") as expired:
        inclusion_proof(log.engine, store, sealed[3])
    assert (expired.value.batch_id, expired.value.expiry_seq) == (1, records[0].seq)
    assert verify_proof(inclusion_proof(log.engine, store, sealed[21]), store).ok

    # A call forged into an expired range afterwards is named by verify; expiry neither removes nor
    # re-records it (the batch's expiry is done; the forged row stays as evidence).
    forged = _record(OLD + timedelta(seconds=4.5), 99)
    with log.engine.begin() as conn:
        conn.execute(predictions_table.insert().values(**record_row(forged)))
    (finding,) = verify_seals(log.engine, store).findings
    assert (finding.kind, finding.batch_id) == (SealProblem.BATCH_ALTERED, 1)
    assert _expire(log, store).expired == () and _count(log, "modelops_predictions") == 6
    assert len(_expiry_records(store)) == 2
    _sql(log, "DELETE FROM modelops_predictions WHERE request_id = :r", r=forged.request_id)

    # Nothing more is due: a second run writes nothing; sealing goes on after the newest batch.
    again = _expire(log, store)
    assert again.expired == () and len(_expiry_records(store)) == 2
    _fill(log, 2, NOW - timedelta(minutes=5))
    assert seal(log.engine, store, store_recorder(store, "test"), now=NOW).batches == (4,)
    assert verify_seals(log.engine, store).ok


def test_early_expiry_is_refused_naming_the_batch_and_changes_nothing(
    log: PredictionLog, store: AuditStore, sealed: list[str]
) -> None:
    before = store.count()
    due = datetime.fromisoformat(
        store.records(action=AuditAction.PREDICTIONS_SEALED)[2].details["last"]["received_at"]
    )
    with pytest.raises(ExpiryRefused, match=rf"batch 3 may not expire before {(due + YEAR).date()}"):
        _expire(log, store, batch_ids=[1, 3])  # one batch early refuses the whole request
    with pytest.raises(ExpiryRefused, match=r"batches \[9\] have no authentic seal record"):
        _expire(log, store, batch_ids=[9])
    assert store.count() == before and _count(log, "modelops_predictions") == 25
    assert _count(log, SEALS_TABLE) == 3
    # A due batch asked for by id is expired alone.
    assert _expire(log, store, batch_ids=[2]).expired == (2,)
    assert verify_seals(log.engine, store).ok


def test_a_batch_deleted_without_an_expiry_record_is_reported_and_not_covered_up(
    log: PredictionLog, store: AuditStore, sealed: list[str]
) -> None:
    _sql(log, "DELETE FROM modelops_labels")
    _sql(
        log,
        "DELETE FROM modelops_predictions WHERE request_id IN ("
        + ",".join(f"'{r}'" for r in sealed[:10])
        + ")",
    )
    _sql(log, f"DELETE FROM {SEALS_TABLE} WHERE batch_id = 1")
    (finding,) = verify_seals(log.engine, store).findings
    assert (finding.kind, finding.batch_id) == (SealProblem.BATCH_REMOVED, 1)
    # The scheduled expiry holds it back instead of recording an expiry that would excuse the deletion.
    run = _expire(log, store)
    assert run.expired == (2,) and [batch_id for batch_id, _ in run.held] == [1]
    assert "batch 1 (its rows were removed without an expiry record)" in run.summary
    assert [r.subject for r in _expiry_records(store)] == [prediction_batch_subject(2)]
    assert [f.kind for f in verify_seals(log.engine, store).findings] == [SealProblem.BATCH_REMOVED]


def test_a_tampered_batch_is_held_as_evidence(
    log: PredictionLog, store: AuditStore, sealed: list[str]
) -> None:
    _sql(log, "UPDATE modelops_predictions SET outputs = '[[0.1, 0.9]]' WHERE request_id = :r", r=sealed[4])
    run = _expire(log, store)
    assert run.expired == (2,) and run.held == ((1, "its rows do not match its authentic root"),)
    assert _count(log, "modelops_predictions") == 15
    (finding,) = verify_seals(log.engine, store).findings
    assert (finding.kind, finding.request_id) == (SealProblem.RECORD_ALTERED, sealed[4])


def test_an_expiry_record_forged_without_the_key_does_not_excuse_a_deletion(
    log: PredictionLog, store: AuditStore, sealed: list[str]
) -> None:
    batch = store.records(action=AuditAction.PREDICTIONS_SEALED)[0].details
    forger = AuditStore(store.url, keyring=AuditKeyring(current=TEST_KEY_ID, keys={TEST_KEY_ID: "x" * 48}))
    try:
        forged = forger.append(
            actor="test",
            action=AuditAction.PREDICTIONS_EXPIRED,
            subject=prediction_batch_subject(1),
            decision=Decision.EXPIRED,
            details={**batch, "retention_days": 365},
        )
    finally:
        forger.dispose()
    _sql(log, "DELETE FROM modelops_labels")
    _sql(
        log,
        "DELETE FROM modelops_predictions WHERE request_id IN ("
        + ",".join(f"'{r}'" for r in sealed[:10])
        + ")",
    )
    _sql(log, f"DELETE FROM {SEALS_TABLE} WHERE batch_id = 1")
    result = verify_seals(log.engine, store)
    assert [(f.kind, f.batch_id) for f in result.findings] == [
        (SealProblem.EXPIRY_RECORD_FORGED, None),
        (SealProblem.BATCH_REMOVED, 1),
    ]
    assert f"expiry record seq={forged.seq} fails its hash or HMAC check" in result.problem
    assert not store.verify().ok


def test_a_batch_removed_under_an_authentic_but_early_expiry_record_is_reported(
    log: PredictionLog, store: AuditStore, sealed: list[str]
) -> None:
    # Someone holding the key, around expire_batches: a record for batch 3 although it is not due.
    batch = store.records(action=AuditAction.PREDICTIONS_SEALED)[2].details
    store.append(
        actor="test",
        action=AuditAction.PREDICTIONS_EXPIRED,
        subject=prediction_batch_subject(3),
        decision=Decision.EXPIRED,
        details={**batch, "retention_days": 365},
    )
    _sql(log, "DELETE FROM modelops_labels")
    _sql(
        log,
        "DELETE FROM modelops_predictions WHERE request_id IN ("
        + ",".join(f"'{r}'" for r in sealed[20:])
        + ")",
    )
    _sql(log, f"DELETE FROM {SEALS_TABLE} WHERE batch_id = 3")
    (finding,) = verify_seals(log.engine, store).findings
    assert (finding.kind, finding.batch_id) == (SealProblem.BATCH_EXPIRED_EARLY, 3)
    assert "was removed early" in finding.message and "before its earliest expiry" in finding.message


def test_a_retry_after_a_crash_between_record_and_delete_completes_the_removal(
    log: PredictionLog, store: AuditStore, sealed: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(*args: Any) -> Any:
        raise OSError("the worker died")

    with monkeypatch.context() as patched:
        patched.setattr(retention_module, "_remove", crash)
        with pytest.raises(OSError):
            _expire(log, store)
    # Recorded, not removed: the rows still match their root, so nothing is reported.
    assert [r.subject for r in _expiry_records(store)] == [prediction_batch_subject(1)]
    assert _count(log, "modelops_predictions") == 25
    assert verify_seals(log.engine, store).ok

    run = _expire(log, store)
    assert (run.expired, run.completed, run.records) == ((1, 2), (1,), 20)
    # One expiry record per batch: the retry found the first one and wrote no second.
    assert [r.subject for r in _expiry_records(store)] == [prediction_batch_subject(b) for b in (1, 2)]
    result = verify_seals(log.engine, store)
    assert result.ok and result.expired == 2
    assert _expire(log, store).expired == ()


def test_a_dry_run_changes_nothing(log: PredictionLog, store: AuditStore, sealed: list[str]) -> None:
    before = store.count()
    run = _expire(log, store, dry_run=True)
    assert (run.expired, run.records, run.labels, run.dry_run) == ((1, 2), 20, 1, True)
    assert run.summary.startswith("would expire 2 sealed batches (1..2)")
    assert store.count() == before and _count(log, "modelops_predictions") == 25
    assert _count(log, "modelops_labels") == 2 and _count(log, SEALS_TABLE) == 3


def test_cli_expire_dry_run_refusal_and_removal(
    tmp_path: Path,
    log: PredictionLog,
    store: AuditStore,
    sealed: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    anchors = LocalFolderAnchorStore(tmp_path / "anchors")
    common = ["--url", store.url, "--predictions-url", str(log.engine.url), "--anchors", anchors.uri]
    before = store.count()
    assert cli.main(["audit", "expire", "--dry-run", *common]) == 0
    assert "would expire 2 sealed batches (1..2)" in capsys.readouterr().out
    assert store.count() == before

    assert cli.main(["audit", "expire", "--batch", "3", *common]) == 2
    assert "batch 3 may not expire before" in capsys.readouterr().err
    assert store.count() == before

    assert cli.main(["audit", "expire", *common]) == 0
    out = capsys.readouterr().out
    assert "expired 2 sealed batches (1..2)" in out and "anchored" in out
    assert cli.main(["audit", "verify", *common]) == 0
    assert "2 batches expired under retention" in capsys.readouterr().out

    # A proof of an expired call: exit 1, the expiry named, no proof printed.
    prove = ["--url", store.url, "--predictions-url", str(log.engine.url)]
    assert cli.main(["audit", "prove", sealed[3], *prove]) == 1
    answered = capsys.readouterr()
    assert json.loads(answered.out)["expired"] is True and "expiry record seq=" in answered.err


def test_the_operator_expires_on_record_and_anchors(modelops_home: Path) -> None:
    from types import SimpleNamespace

    from modelops.operators.sealing import ExpirePredictionBatchesOperator

    log = PredictionLog(f"sqlite:///{modelops_home}/predictions.db")
    store = AuditStore(f"sqlite:///{modelops_home}/audit.db", keyring=keyring_for_tests())
    try:
        _fill(log, 3, OLD)
        seal(log.engine, store, store_recorder(store, "test"), now=NOW, batch_size=2)
        operator = ExpirePredictionBatchesOperator(task_id="expire_predictions")
        context: Any = {
            "dag_run": SimpleNamespace(
                dag_id="modelops_audit_anchor", run_id="scheduled__1", triggering_user_name=None
            ),
            "ti": SimpleNamespace(task_id="expire_predictions"),
            "outlet_events": {},
        }
        result = operator.execute(context)
        assert (result["expired"], result["records"], result["decision"]) == ([1, 2], 3, Decision.EXPIRED)
        records = _expiry_records(store)
        assert {(r.dag_id, r.task_id) for r in records} == {("modelops_audit_anchor", "expire_predictions")}
        anchors = LocalFolderAnchorStore(modelops_home / "audit-anchors")
        assert store.verify(anchors).ok and store.verify(anchors).unanchored == 0
        assert verify_seals(log.engine, store).ok
        assert operator.execute(context)["expired"] == []  # a retry removes nothing twice
    finally:
        log.dispose()
        store.dispose()


def test_module_imports_no_airflow() -> None:
    import subprocess
    import sys

    code = "import sys, modelops.audit.retention; print('airflow' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
