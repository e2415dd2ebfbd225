"""Sealed prediction logs: batches of prediction records whose Merkle roots are audit records, checked
against a real SQLite prediction log and audit store (and PostgreSQL when it runs), and each attack."""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from modelops import cli
from modelops.audit import AuditStore, LocalFolderAnchorStore
from modelops.audit import seals as seals_module
from modelops.audit.seals import (
    SEALS_TABLE,
    InclusionProof,
    NotSealed,
    SealProblem,
    audit_path,
    inclusion_proof,
    leaf_hash,
    merkle_root,
    root_from_path,
    seal,
    store_recorder,
    verify_proof,
    verify_seals,
)
from modelops.serving.prediction_log import PredictionLog, PredictionRecord, predictions_table, record_row
from modelops.vocabulary import AuditAction, Decision
from tests.support import keyring_for_tests

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
NOW = T0 + timedelta(hours=1)

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


def _fill(log: PredictionLog, n: int, *, start: datetime = T0) -> list[str]:
    """``n`` calls one second apart from ``start``; returns their request ids in log order."""
    records = [_record(start + timedelta(seconds=i), i) for i in range(n)]
    with log.engine.begin() as conn:
        conn.execute(predictions_table.insert(), [record_row(record) for record in records])
    return [record.request_id for record in records]


def _sql(log: PredictionLog, sql: str, **params: Any) -> None:
    """Tamper the way someone with database access would: plain SQL, around the platform's code."""
    with log.engine.begin() as conn:
        conn.execute(sa.text(sql), params)


def _delete(log: PredictionLog, request_ids: list[str]) -> None:
    with log.engine.begin() as conn:
        conn.execute(sa.delete(predictions_table).where(predictions_table.c.request_id.in_(request_ids)))


def _seal(log: PredictionLog, store: AuditStore, **options: Any) -> Any:
    return seal(log.engine, store, store_recorder(store, "test"), now=NOW, **options)


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
    """25 calls sealed in batches of 10 (10, 10, 5); their request ids."""
    ids = _fill(log, 25)
    run = _seal(log, store, batch_size=10)
    assert run.batches == (1, 2, 3) and run.records == 25
    return ids


# --- the Merkle tree ----------------------------------------------------------------------------------


def _rfc6962_root(leaves: list[bytes]) -> bytes:
    """RFC 6962's MTH, written from the RFC's recursive definition."""
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return hashlib.sha256(b"\x01" + _rfc6962_root(leaves[:k]) + _rfc6962_root(leaves[k:])).digest()


def test_merkle_tree_is_rfc6962_and_every_path_verifies() -> None:
    assert merkle_root([]) == hashlib.sha256(b"").hexdigest()
    for size in range(1, 34):
        leaves = [hashlib.sha256(b"\x00" + bytes([i])).hexdigest() for i in range(size)]
        root = merkle_root(leaves)
        assert root == _rfc6962_root([bytes.fromhex(leaf) for leaf in leaves]).hex()
        for index in range(size):
            path = audit_path(leaves, index)
            assert root_from_path(leaves[index], index, size, path) == root
            if size > 1:  # the same path does not prove another position
                assert root_from_path(leaves[index], (index + 1) % size, size, path) != root


def test_every_column_is_in_the_leaf(log: PredictionLog) -> None:
    (request_id,) = _fill(log, 1)
    with log.engine.connect() as conn:
        row = dict(conn.execute(sa.select(predictions_table)).one()._mapping)
    before = leaf_hash(row)
    changed = {
        "caller_id": "other",
        "model_version": "2",
        "status_code": 500,
        "latency_ms": 1.25,
        "n_rows": 2,
        "inputs": "[]",
        "outputs": None,
        "error": "x",
        "traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01",
        "arm": "challenger",
        "flags": "f",
        "received_at": row["received_at"] + timedelta(microseconds=1),
        "request_id": "f" * 32,  # a uuid4 hex is never all f
    }
    assert set(changed) | {"model_name"} == {column.name for column in predictions_table.columns}
    for name, value in {**changed, "model_name": "m"}.items():
        assert leaf_hash({**row, name: value}) != before, name


# --- sealing ------------------------------------------------------------------------------------------


def test_seal_records_each_batch_root_in_the_chain_and_verifies(
    log: PredictionLog, store: AuditStore, sealed: list[str]
) -> None:
    records = store.records(action=AuditAction.PREDICTIONS_SEALED)
    assert [(r.subject, r.decision, r.details["count"]) for r in records] == [
        ("predictions:batch:1", Decision.SEALED, 10),
        ("predictions:batch:2", Decision.SEALED, 10),
        ("predictions:batch:3", Decision.SEALED, 5),
    ]
    assert all(store.authentic(record) for record in records)
    assert records[0].details["after"] is None
    assert records[1].details["after"] == records[0].details["last"]
    assert records[0].evidence == {"merkle_root": records[0].details["root"]}
    # No data value reaches the audit log: ids, timestamps, counts and hashes only.
    text = json.dumps([record.to_dict() for record in records])
    assert "user_age" not in text and str(RAW_SCORE) not in text and "shop:k1" not in text

    result = verify_seals(log.engine, store)
    assert result.ok, result.problem
    assert (result.batches, result.records, result.unsealed) == (3, 25, 0)
    assert store.verify().ok

    # Nothing new: nothing sealed, no record written.
    again = _seal(log, store, batch_size=10)
    assert again.batches == () and store.count() == 3


def test_rows_younger_than_the_settle_time_wait_for_the_next_run(
    log: PredictionLog, store: AuditStore
) -> None:
    old = _fill(log, 3, start=NOW - timedelta(minutes=5))
    young = _fill(log, 2, start=NOW - timedelta(seconds=30))
    run = _seal(log, store, settle=timedelta(minutes=1))
    assert run.batches == (1,) and run.records == len(old)
    assert verify_seals(log.engine, store).unsealed == len(young)
    with pytest.raises(NotSealed, match="is in no sealed batch"):
        inclusion_proof(log.engine, store, young[0])

    later = seal(log.engine, store, store_recorder(store, "test"), now=NOW + timedelta(minutes=2))
    assert later.batches == (2,) and later.records == 2
    result = verify_seals(log.engine, store)
    assert result.ok and result.unsealed == 0


def test_a_run_stopped_between_record_and_seal_row_is_completed(
    log: PredictionLog, store: AuditStore, sealed: list[str]
) -> None:
    _sql(log, f"DELETE FROM {SEALS_TABLE} WHERE batch_id = 3")
    result = verify_seals(log.engine, store)
    assert [finding.kind for finding in result.findings] == [SealProblem.SEAL_ROW_MISSING]

    _fill(log, 2, start=T0 + timedelta(minutes=10))
    run = _seal(log, store, batch_size=10)
    assert run.restored == (3,) and run.batches == (4,)
    assert verify_seals(log.engine, store).ok


# --- attacks ------------------------------------------------------------------------------------------


def test_an_altered_output_is_named(log: PredictionLog, store: AuditStore, sealed: list[str]) -> None:
    _sql(log, "UPDATE modelops_predictions SET outputs = '[[0.1, 0.9]]' WHERE request_id = :r", r=sealed[12])
    result = verify_seals(log.engine, store)
    assert not result.ok
    (finding,) = result.findings
    assert (finding.kind, finding.batch_id, finding.request_id) == (SealProblem.RECORD_ALTERED, 2, sealed[12])
    assert finding.message == (
        f"prediction record {sealed[12]} in batch 2 (audit seq=2) was altered after sealing"
    )
    assert "0.9" not in result.problem  # the data never reaches the message


def test_a_deleted_record_is_named(log: PredictionLog, store: AuditStore, sealed: list[str]) -> None:
    _sql(log, "DELETE FROM modelops_predictions WHERE request_id = :r", r=sealed[3])
    (finding,) = verify_seals(log.engine, store).findings
    assert (finding.kind, finding.batch_id, finding.request_id) == (SealProblem.RECORD_DELETED, 1, sealed[3])


def test_a_forged_record_inserted_in_a_sealed_range_is_named(
    log: PredictionLog, store: AuditStore, sealed: list[str]
) -> None:
    forged = _record(T0 + timedelta(seconds=14.5), 99)  # between the 15th and 16th call: batch 2
    with log.engine.begin() as conn:
        conn.execute(predictions_table.insert().values(**record_row(forged)))
    (finding,) = verify_seals(log.engine, store).findings
    assert (finding.kind, finding.batch_id, finding.request_id) == (
        SealProblem.RECORD_INSERTED,
        2,
        forged.request_id,
    )


def test_a_record_inserted_between_two_batches_is_named(
    log: PredictionLog, store: AuditStore, sealed: list[str]
) -> None:
    # After batch 1's last call and before batch 2's first: batch 2's range starts right after batch 1.
    forged = _record(T0 + timedelta(seconds=9.5), 99)
    with log.engine.begin() as conn:
        conn.execute(predictions_table.insert().values(**record_row(forged)))
    (finding,) = verify_seals(log.engine, store).findings
    assert (finding.kind, finding.batch_id) == (SealProblem.RECORD_INSERTED, 2)


def test_a_batch_removed_whole_is_named(log: PredictionLog, store: AuditStore, sealed: list[str]) -> None:
    _delete(log, sealed[10:20])
    _sql(log, f"DELETE FROM {SEALS_TABLE} WHERE batch_id = 2")
    result = verify_seals(log.engine, store)
    (finding,) = result.findings
    assert (finding.kind, finding.batch_id) == (SealProblem.BATCH_REMOVED, 2)
    assert finding.message.startswith("batch 2 (audit seq=2) was removed whole: the audit log holds its root")
    # Sealing again neither restores a seal row for it nor hides it.
    _seal(log, store, batch_size=10)
    assert [f.kind for f in verify_seals(log.engine, store).findings] == [SealProblem.BATCH_REMOVED]


def test_the_newest_batch_removed_whole_is_named(
    log: PredictionLog, store: AuditStore, sealed: list[str]
) -> None:
    _delete(log, sealed[20:])
    _sql(log, f"DELETE FROM {SEALS_TABLE} WHERE batch_id = 3")
    (finding,) = verify_seals(log.engine, store).findings
    assert (finding.kind, finding.batch_id) == (SealProblem.BATCH_REMOVED, 3)


def test_a_forged_seal_row_is_named(log: PredictionLog, store: AuditStore, sealed: list[str]) -> None:
    with log.engine.connect() as conn:
        row = dict(conn.execute(sa.text(f"SELECT * FROM {SEALS_TABLE} WHERE batch_id = 3")).one()._mapping)
    # A fourth batch nobody sealed, claiming an audit seq that is not a seal record.
    forged = {**row, "batch_id": 4, "audit_seq": 99, "root": "ab" * 32}
    _sql(log, f"INSERT INTO {SEALS_TABLE} VALUES ({', '.join(':' + name for name in forged)})", **forged)
    # And batch 1's seal row edited to a root of the tamperer's choosing.
    _sql(log, f"UPDATE {SEALS_TABLE} SET root = :root WHERE batch_id = 1", root="cd" * 32)
    result = verify_seals(log.engine, store)
    assert [(f.kind, f.batch_id) for f in result.findings] == [
        (SealProblem.SEAL_ROW_FORGED, 1),
        (SealProblem.SEAL_ROW_FORGED, 4),
    ]
    assert "differs from its authentic audit record seq=1 in root" in result.findings[0].message
    assert "matches no authentic seal record" in result.findings[1].message


def test_a_seal_record_forged_without_the_key_is_named_and_ignored(
    log: PredictionLog, store: AuditStore, sealed: list[str], tmp_path: Path
) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'audit.db'}")
    with engine.begin() as conn:
        details = json.loads(
            conn.execute(sa.text("SELECT details FROM modelops_audit_log WHERE seq = 2")).scalar()
        )
        details["root"] = "ef" * 32
        conn.execute(
            sa.text("UPDATE modelops_audit_log SET details = :d WHERE seq = 2"), {"d": json.dumps(details)}
        )
    engine.dispose()
    kinds = [finding.kind for finding in verify_seals(log.engine, store).findings]
    assert SealProblem.SEAL_RECORD_FORGED in kinds and SealProblem.BATCHES_NOT_CONTIGUOUS in kinds


def test_leaves_of_a_broken_batch_that_were_also_edited_still_fail_the_batch(
    log: PredictionLog, store: AuditStore, sealed: list[str]
) -> None:
    _sql(log, "UPDATE modelops_predictions SET caller_id = 'x' WHERE request_id = :r", r=sealed[0])
    _sql(log, f"UPDATE {SEALS_TABLE} SET leaves = '[]' WHERE batch_id = 1")
    kinds = [(f.kind, f.batch_id) for f in verify_seals(log.engine, store).findings]
    assert (SealProblem.BATCH_ALTERED, 1) in kinds


# --- proofs -------------------------------------------------------------------------------------------


def test_a_proof_verifies_and_fails_after_tampering(
    log: PredictionLog, store: AuditStore, sealed: list[str]
) -> None:
    proof = inclusion_proof(log.engine, store, sealed[13])
    assert (proof.batch_id, proof.leaf_index, proof.tree_size, proof.audit_seq) == (2, 3, 10, 2)
    assert proof.root == store.records(action=AuditAction.PREDICTIONS_SEALED)[1].details["root"]
    check = verify_proof(proof, store)
    assert check.ok, check.reason
    # JSON round trip: what `modelops audit prove` prints can be checked elsewhere.
    assert verify_proof(InclusionProof.from_dict(json.loads(json.dumps(proof.to_dict()))), store).ok
    # Another record of the batch altered: this record's proof still holds (the sealed leaves decide).
    _sql(log, "UPDATE modelops_predictions SET latency_ms = 9 WHERE request_id = :r", r=sealed[14])
    assert verify_proof(inclusion_proof(log.engine, store, sealed[13]), store).ok

    _sql(log, "UPDATE modelops_predictions SET outputs = '[[0.2, 0.8]]' WHERE request_id = :r", r=sealed[13])
    tampered = inclusion_proof(log.engine, store, sealed[13])
    check = verify_proof(tampered, store)
    assert not check.ok
    assert "does not lead to the root of batch 2" in check.reason
    # A proof whose root was swapped for one that fits: the authentic record says otherwise.
    leaves = [tampered.leaf]
    fitted = InclusionProof(
        **{**proof.to_dict(), "leaf": tampered.leaf, "path": [], "tree_size": 1, "leaf_index": 0}
    )
    fitted = InclusionProof(**{**fitted.to_dict(), "root": merkle_root(leaves)})
    assert verify_proof(fitted).ok  # the path alone holds...
    assert not verify_proof(fitted, store).ok  # ...but not against the audit log


def test_a_proof_needs_the_seal_row_of_its_batch(
    log: PredictionLog, store: AuditStore, sealed: list[str]
) -> None:
    _sql(log, f"DELETE FROM {SEALS_TABLE} WHERE batch_id = 2")
    with pytest.raises(NotSealed, match="the seal table has no row for the batch that holds it"):
        inclusion_proof(log.engine, store, sealed[12])
    _seal(log, store, batch_size=10)  # repairs only the newest batch's missing row
    assert [f.kind for f in verify_seals(log.engine, store).findings] == [SealProblem.SEAL_ROW_MISSING]


def test_a_seal_row_forged_ahead_of_the_sealer_stops_it_by_name(
    log: PredictionLog, store: AuditStore, sealed: list[str]
) -> None:
    forged = {"batch_id": 4, "audit_seq": 1, "root": "ab" * 32, "count": 1, "sealed_at": "x", "leaves": "[]"}
    forged |= {f"{end}_{name}": "x" for end in ("first", "last") for name in ("received_at", "request_id")}
    _sql(
        log,
        f"INSERT INTO {SEALS_TABLE} ({', '.join(forged)}) VALUES ({', '.join(':' + k for k in forged)})",
        **forged,
    )
    _fill(log, 3, start=T0 + timedelta(minutes=10))
    with pytest.raises(seals_module.SealError, match="already holds a row for batch 4 that its authentic"):
        _seal(log, store, batch_size=10)


def test_proof_of_an_unknown_request(log: PredictionLog, store: AuditStore, sealed: list[str]) -> None:
    with pytest.raises(NotSealed, match="is not in the prediction log"):
        inclusion_proof(log.engine, store, "0" * 32)


# --- the CLI ------------------------------------------------------------------------------------------


def test_cli_seal_prove_and_verify(
    tmp_path: Path, log: PredictionLog, store: AuditStore, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = _fill(log, 12)
    anchors = LocalFolderAnchorStore(tmp_path / "anchors")
    common = ["--url", store.url, "--predictions-url", str(log.engine.url), "--anchors", anchors.uri]
    assert cli.main(["audit", "seal", "--batch-size", "5", *common]) == 0
    out = capsys.readouterr().out
    assert "sealed 12 prediction records in 3 batches (1..3)" in out and "anchored" in out

    assert cli.main(["audit", "prove", ids[7], *common[:4]]) == 0
    captured = capsys.readouterr()
    proof = json.loads(captured.out)
    assert (proof["batch_id"], proof["leaf_index"], proof["tree_size"]) == (2, 2, 5)
    assert "verifies" in captured.err

    assert cli.main(["audit", "verify", *common]) == 0
    out = capsys.readouterr().out
    assert "seals OK: 3 batches, 12 records sealed, 0 not sealed yet" in out

    _sql(log, "DELETE FROM modelops_predictions WHERE request_id = :r", r=ids[1])
    assert cli.main(["audit", "verify", *common]) == 1
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"seals BROKEN: prediction record {ids[1]} in batch 1 (audit seq=1) was deleted after sealing"
    )
    assert cli.main(["audit", "verify-seals", *common[:4]]) == 1
    capsys.readouterr()
    _sql(log, "UPDATE modelops_predictions SET error = 'x' WHERE request_id = :r", r=ids[7])
    assert cli.main(["audit", "prove", ids[7], *common[:4]]) == 1
    assert "does not lead to the root" in capsys.readouterr().err


# --- PostgreSQL ---------------------------------------------------------------------------------------


@pytest.mark.services
def test_seal_verify_and_prove_on_postgres(postgres_url: str) -> None:
    log = PredictionLog(postgres_url)
    store = AuditStore(postgres_url, keyring=keyring_for_tests())
    try:
        ids = _fill(log, 7)
        # Two calls at the same instant: ordered byte by byte ("B" < "a"), whatever the server's locale.
        twins = [_record(T0 + timedelta(seconds=30), i) for i in range(2)]
        twins = [
            PredictionRecord(**{**vars(twin), "request_id": rid})
            for twin, rid in zip(twins, ("a" * 32, "B" * 32), strict=True)
        ]
        with log.engine.begin() as conn:
            conn.execute(predictions_table.insert(), [record_row(twin) for twin in twins])
        assert _seal(log, store, batch_size=3).batches == (1, 2, 3)
        with log.engine.connect() as conn:
            leaves = json.loads(
                conn.execute(sa.text(f"SELECT leaves FROM {SEALS_TABLE} WHERE batch_id = 3")).scalar()
            )
        assert [request_id for request_id, _ in leaves][-2:] == ["B" * 32, "a" * 32]
        assert verify_seals(log.engine, store).ok
        assert verify_proof(inclusion_proof(log.engine, store, ids[4]), store).ok
        _sql(log, "UPDATE modelops_predictions SET inputs = '[]' WHERE request_id = :r", r=ids[4])
        (finding,) = verify_seals(log.engine, store).findings
        assert (finding.kind, finding.request_id) == (SealProblem.RECORD_ALTERED, ids[4])
        assert not verify_proof(inclusion_proof(log.engine, store, ids[4]), store).ok
    finally:
        log.dispose()
        store.dispose()


def test_module_imports_no_airflow() -> None:
    import subprocess
    import sys

    code = "import sys, modelops.audit.seals; print('airflow' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
    assert seals_module.__doc__ and "Labels" in seals_module.__doc__


# --- inside Airflow -----------------------------------------------------------------------------------


def test_the_operator_seals_on_record_and_anchors(modelops_home: Path) -> None:
    from types import SimpleNamespace

    from modelops.operators.sealing import SealPredictionLogOperator

    log = PredictionLog(f"sqlite:///{modelops_home}/predictions.db")
    store = AuditStore(f"sqlite:///{modelops_home}/audit.db", keyring=keyring_for_tests())
    try:
        ids = _fill(log, 5, start=datetime.now(UTC) - timedelta(minutes=10))
        operator = SealPredictionLogOperator(task_id="seal_predictions", batch_size=2)
        dag_run = SimpleNamespace(
            dag_id="modelops_audit_anchor", run_id="scheduled__1", triggering_user_name=None
        )
        context: Any = {
            "dag_run": dag_run,
            "ti": SimpleNamespace(task_id="seal_predictions"),
            "outlet_events": {},
        }
        result = operator.execute(context)
        assert result["batches"] == [1, 2, 3] and result["records"] == 5
        assert result["decision"] == Decision.SEALED
        records = store.records(action=AuditAction.PREDICTIONS_SEALED)
        assert {(r.dag_id, r.task_id) for r in records} == {("modelops_audit_anchor", "seal_predictions")}
        anchors = LocalFolderAnchorStore(modelops_home / "audit-anchors")
        assert store.verify(anchors).ok and store.verify(anchors).unanchored == 0
        assert verify_seals(log.engine, store).ok
        # A retry of the same run seals nothing twice.
        assert operator.execute(context)["batches"] == []
        assert verify_proof(inclusion_proof(log.engine, store, ids[2]), store).ok
    finally:
        log.dispose()
        store.dispose()


def test_request_ids_are_ordered_bytewise_on_postgres_whatever_its_locale() -> None:
    from sqlalchemy.dialects import postgresql

    query = seals_module._ordered(sa.select(predictions_table.c.request_id), "postgresql")
    assert 'request_id COLLATE "C"' in str(query.compile(dialect=postgresql.dialect()))
