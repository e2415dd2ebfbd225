from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
import structlog

from modelops import cli
from modelops.audit import (
    GENESIS_HASH,
    AuditKeyring,
    AuditStore,
    LocalFolderAnchorStore,
    Problem,
    compute_record_hash,
)
from modelops.audit.anchors import AnchorError
from modelops.audit.chain import audit_table, canonical_json, rotation_message
from modelops.errors import ConfigurationError, ModelOpsError
from modelops.hooks.audit import AuditHook
from modelops.vocabulary import AUDIT_KEYRING_SUBJECT, AuditAction, Decision
from tests.support import TEST_KEY_ID, TEST_KEY_SECRET, keyring_for_tests

SHA_A = "a" * 64
SHA_B = "b" * 64


def _url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'audit.db'}"


def _fill(store: AuditStore, n: int) -> None:
    for i in range(1, n + 1):
        store.append(
            actor="test",
            action="model.registered",
            subject=f"model:ctr_recommender@{i}",
            decision="ok",
            details={"i": i},
            evidence={"model": SHA_A},
            dag_id="lifecycle",
            run_id="run-1",
            task_id=f"register_{i}",
        )


def _raw(url: str, sql: str, **params: Any) -> None:
    """Tamper the way an attacker with database access would: plain SQL, outside AuditStore."""
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(sql), params)
    engine.dispose()


@pytest.fixture
def store(tmp_path: Path):
    store = AuditStore(_url(tmp_path), keyring=keyring_for_tests())
    yield store
    store.dispose()


# --- appending ---------------------------------------------------------------------------------


def test_append_links_records_and_verifies(store: AuditStore) -> None:
    assert store.verify().ok and store.verify().count == 0
    assert store.head() is None
    _fill(store, 3)

    result = store.verify()
    assert (result.ok, result.count, result.problem, result.first_bad_seq) == (True, 3, None, None)
    records = store.records()
    assert [r.seq for r in records] == [1, 2, 3]
    assert records[0].prev_hash == GENESIS_HASH
    assert [r.prev_hash for r in records[1:]] == [r.record_hash for r in records[:-1]]
    assert all(r.record_hash == compute_record_hash(r.to_dict()) for r in records)
    assert store.head() == (3, records[-1].record_hash)
    assert store.count() == 3
    assert store.last(subject="model:ctr_recommender@2").seq == 2
    assert store.last(action="dataset.validated") is None
    assert [r.seq for r in store.records(limit=2)] == [2, 3]
    assert records[0].recorded_at.endswith("+00:00")

    line = records[0].to_log_line()
    assert line.startswith("AUDIT {") and "\n" not in line
    assert json.loads(line.removeprefix("AUDIT ")) == records[0].to_dict()


def test_retry_of_the_same_decision_writes_nothing(store: AuditStore) -> None:
    decision = dict(action="gate.decided", subject="model:m@1", dag_id="d", run_id="r", task_id="gate")
    first = store.append(actor="a", decision="rejected", details={"try": 1}, **decision)
    retry = store.append(actor="a", decision="rejected", details={"try": 2}, **decision)
    assert retry == first
    assert store.count() == 1

    changed = store.append(actor="a", decision="approved", **decision)
    assert changed.seq == 2
    other_run = store.append(actor="a", decision="rejected", **{**decision, "run_id": "r2"})
    assert other_run.seq == 3
    assert store.verify().ok


def test_records_outside_a_run_are_never_deduplicated(store: AuditStore) -> None:
    for _ in range(2):
        store.append(actor="cli:alice", action="model.retired", subject="model:m@1", decision="retired")
    assert store.count() == 2


def test_details_and_evidence_are_checked(store: AuditStore) -> None:
    with pytest.raises(ModelOpsError, match="not JSON-safe"):
        store.append(actor="a", action="x", subject="s", decision="ok", details={"when": object()})
    with pytest.raises(ModelOpsError, match="sha256 hex digest"):
        store.append(actor="a", action="x", subject="s", decision="ok", evidence={"data": "not-a-hash"})
    assert store.count() == 0


def test_a_lost_race_rereads_the_tail_and_retries(store: AuditStore, monkeypatch: pytest.MonkeyPatch) -> None:
    _fill(store, 2)
    real_tail = AuditStore._tail
    calls = []

    def stale_once(conn: sa.Connection) -> tuple[int, str]:
        calls.append(1)
        # First read sees the tail as it was before a racing writer appended seq=2.
        return (1, store.records()[0].record_hash) if len(calls) == 1 else real_tail(conn)

    monkeypatch.setattr(AuditStore, "_tail", staticmethod(stale_once))
    record = store.append(actor="a", action="x", subject="s", decision="ok")
    assert (record.seq, len(calls)) == (3, 2)
    assert store.verify().ok

    monkeypatch.setattr(AuditStore, "_tail", staticmethod(lambda conn: (0, GENESIS_HASH)))
    with pytest.raises(ModelOpsError, match="after 10 attempts"):
        store.append(actor="a", action="x", subject="s", decision="ok")
    assert store.count() == 3


# --- tamper detection --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("column", "value"),
    [("details", '{"i":99}'), ("decision", "approved"), ("actor", "mallory"), ("evidence", "{}")],
)
def test_an_edited_record_is_named(tmp_path: Path, store: AuditStore, column: str, value: str) -> None:
    _fill(store, 6)
    _raw(_url(tmp_path), f"UPDATE modelops_audit_log SET {column} = :value WHERE seq = 4", value=value)

    result = store.verify()
    assert not result.ok and result.first_bad_seq == 4
    assert result.problem == "record seq=4 was altered: its stored hash does not match its content"


def test_an_edit_with_a_recomputed_hash_fails_its_hmac(tmp_path: Path, store: AuditStore) -> None:
    _fill(store, 5)
    forged = store.records()[2].to_dict() | {"decision": "approved"}
    _raw(
        _url(tmp_path),
        "UPDATE modelops_audit_log SET decision = 'approved', record_hash = :h WHERE seq = 3",
        h=compute_record_hash(forged),
    )
    result = store.verify()
    assert result.first_bad_seq == 3
    assert result.problem.startswith("record seq=3 fails its HMAC check")


def test_a_deleted_record_is_named(tmp_path: Path, store: AuditStore) -> None:
    _fill(store, 6)
    _raw(_url(tmp_path), "DELETE FROM modelops_audit_log WHERE seq = 4")

    result = store.verify()
    assert not result.ok and result.first_bad_seq == 4 and result.count == 4
    assert result.problem == "record seq=4 is missing (deleted): seq=5 follows seq=3"


def test_a_deleted_first_record_is_named(tmp_path: Path, store: AuditStore) -> None:
    _fill(store, 3)
    _raw(_url(tmp_path), "DELETE FROM modelops_audit_log WHERE seq = 1")
    result = store.verify()
    assert result.first_bad_seq == 1
    assert result.problem == "record seq=1 is missing (deleted): the chain starts at seq=2"


def _forge(store: AuditStore, seq: int, prev_hash: str) -> dict[str, Any]:
    """A record with a self-consistent hash, as a forger who knows the algorithm would write it."""
    fields = {
        "seq": seq,
        "recorded_at": "2026-01-01T00:00:00.000000+00:00",
        "actor": "mallory",
        "dag_id": None,
        "run_id": None,
        "task_id": None,
        "action": "gate.decided",
        "subject": "model:ctr_recommender@9",
        "decision": "approved",
        "details": {},
        "evidence": {},
        "prev_hash": prev_hash,
        "key_id": TEST_KEY_ID,
    }
    fields["record_hash"] = compute_record_hash(fields)
    # Without the key, the forger can only guess the HMAC.
    return fields | {"hmac": "0" * 64, "details": "{}", "evidence": "{}", "idempotency_key": None}


def test_an_inserted_record_is_named(tmp_path: Path, store: AuditStore) -> None:
    _fill(store, 5)
    engine = sa.create_engine(_url(tmp_path))
    with engine.begin() as conn:
        conn.execute(audit_table.insert().values(**_forge(store, 6, "f" * 64)))
    engine.dispose()

    result = store.verify()
    assert not result.ok and result.first_bad_seq == 6
    assert result.problem.startswith(
        "record seq=6 does not follow seq=5: prev_hash mismatch (inserted or reordered)"
    )


def test_a_fork_is_refused_by_the_database(tmp_path: Path, store: AuditStore) -> None:
    _fill(store, 3)
    # Shift seq 3 out of the way and slip a forged record in after seq=2 with a valid link: the record
    # that already follows seq=2 holds that prev_hash, and prev_hash is UNIQUE.
    _raw(_url(tmp_path), "UPDATE modelops_audit_log SET seq = 4 WHERE seq = 3")
    engine = sa.create_engine(_url(tmp_path))
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        conn.execute(audit_table.insert().values(**_forge(store, 3, store.records()[1].record_hash)))
    engine.dispose()


def test_swapped_records_are_named(tmp_path: Path, store: AuditStore) -> None:
    _fill(store, 6)
    url = _url(tmp_path)
    _raw(url, "UPDATE modelops_audit_log SET seq = -1 WHERE seq = 3")
    _raw(url, "UPDATE modelops_audit_log SET seq = 3 WHERE seq = 5")
    _raw(url, "UPDATE modelops_audit_log SET seq = 5 WHERE seq = -1")

    result = store.verify()
    assert not result.ok and result.first_bad_seq == 3
    assert result.problem == (
        "record seq=3 does not follow seq=2: prev_hash mismatch (inserted or reordered); "
        "its prev_hash is the hash of seq=4, so records were reordered"
    )


def test_an_edited_last_record_is_named(tmp_path: Path, store: AuditStore) -> None:
    _fill(store, 4)
    _raw(_url(tmp_path), "UPDATE modelops_audit_log SET decision = 'approved' WHERE seq = 4")
    result = store.verify()
    assert result.first_bad_seq == 4
    assert result.problem == "record seq=4 was altered: its stored hash does not match its content"


# --- key rotation ------------------------------------------------------------------------------

NEW_KEY_ID = "test-k2"
NEW_KEY_SECRET = "second-test-secret-0123456789-abcdefghijklmn"


def _rotated_keyring() -> AuditKeyring:
    """The test key retired, a new one current: what an operator configures to rotate."""
    return AuditKeyring(current=NEW_KEY_ID, keys={TEST_KEY_ID: TEST_KEY_SECRET, NEW_KEY_ID: NEW_KEY_SECRET})


def _insert_signed(url: str, keyring: AuditKeyring, key_id: str, **values: Any) -> None:
    """A record signed with ``key_id`` and inserted with plain SQL (by whoever holds that key)."""
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        seq, prev_hash = conn.execute(
            sa.text("SELECT seq, record_hash FROM modelops_audit_log ORDER BY seq DESC")
        ).first()
        fields = {
            "seq": seq + 1,
            "recorded_at": "2026-01-01T00:00:00.000000+00:00",
            "actor": "someone",
            "dag_id": None,
            "run_id": None,
            "task_id": None,
            "subject": "model:ctr_recommender@9",
            "evidence": {},
            "prev_hash": prev_hash,
            "key_id": key_id,
            **values,
        }
        fields["record_hash"] = compute_record_hash(fields)
        fields["hmac"] = keyring.sign(fields["record_hash"], key_id=key_id)
        conn.execute(
            audit_table.insert().values(
                **fields
                | {"details": canonical_json(fields["details"]), "evidence": "{}", "idempotency_key": None}
            )
        )
    engine.dispose()


def test_key_rotation_is_a_recorded_event_and_old_records_still_verify(
    tmp_path: Path, store: AuditStore
) -> None:
    _fill(store, 3)
    rotated = AuditStore(_url(tmp_path), keyring=_rotated_keyring())
    record = rotated.append(
        actor="cli:alice", action="model.retired", subject="model:m@1", decision="retired"
    )

    assert (record.seq, record.key_id) == (5, NEW_KEY_ID)
    rotation = rotated.records()[3]
    assert (rotation.seq, rotation.action, rotation.subject, rotation.decision, rotation.key_id) == (
        4,
        AuditAction.KEY_ROTATED,
        AUDIT_KEYRING_SUBJECT,
        Decision.ROTATED,
        NEW_KEY_ID,
    )
    assert (rotation.details["from_key_id"], rotation.details["to_key_id"]) == (TEST_KEY_ID, NEW_KEY_ID)
    # Endorsed by the old key, bound to the rotation's place in the chain.
    assert keyring_for_tests().check(
        rotation_message(NEW_KEY_ID, rotation.prev_hash), rotation.details["endorsement"], key_id=TEST_KEY_ID
    )
    # Later appends need no second rotation.
    assert rotated.append(actor="a", action="model.retired", subject="model:m@2", decision="retired").seq == 6
    result = rotated.verify()
    assert (result.ok, result.count, result.key_ids) == (True, 6, (TEST_KEY_ID, NEW_KEY_ID))
    rotated.dispose()

    # A writer still configured with only the old key is refused, naming the fix.
    with pytest.raises(ConfigurationError) as raised:
        store.append(actor="a", action="x", subject="s", decision="ok")
    assert "'test-k2', which is not in the keyring ['test-k1']" in str(raised.value)
    assert "keep it as a retired key" in str(raised.value)


def test_rotating_without_the_old_key_is_refused(tmp_path: Path, store: AuditStore) -> None:
    _fill(store, 2)
    new_only = AuditStore(
        _url(tmp_path), keyring=AuditKeyring(current=NEW_KEY_ID, keys={NEW_KEY_ID: NEW_KEY_SECRET})
    )
    with pytest.raises(ConfigurationError, match=r"last signed with key 'test-k1'.*keep it as a retired key"):
        new_only.append(actor="a", action="x", subject="s", decision="ok")
    assert new_only.count() == 2
    new_only.dispose()


def test_a_dropped_key_is_named(tmp_path: Path, store: AuditStore) -> None:
    _fill(store, 2)
    rotated = AuditStore(_url(tmp_path), keyring=_rotated_keyring())
    rotated.append(actor="a", action="x", subject="s", decision="ok")
    rotated.dispose()
    dropped = AuditStore(
        _url(tmp_path), keyring=AuditKeyring(current=NEW_KEY_ID, keys={NEW_KEY_ID: NEW_KEY_SECRET})
    )
    result = dropped.verify()
    assert (result.ok, result.attack, result.first_bad_seq) == (False, Problem.UNKNOWN_KEY, 1)
    assert result.problem == (
        "record seq=1 is signed with key 'test-k1', which is not in the keyring ['test-k2']; add it as a "
        "retired key to verify the records it signed"
    )
    dropped.dispose()


def test_a_record_signed_with_a_retired_key_after_the_rotation_is_named(
    tmp_path: Path, store: AuditStore
) -> None:
    _fill(store, 2)
    keyring = _rotated_keyring()
    rotated = AuditStore(_url(tmp_path), keyring=keyring)
    rotated.append(actor="a", action="x", subject="s", decision="ok")
    # Someone holding the old (leaked, hence rotated) key appends with it, as if nothing had changed.
    _insert_signed(
        _url(tmp_path), keyring, TEST_KEY_ID, action="gate.decided", decision="approved", details={}
    )
    result = rotated.verify()
    assert (result.attack, result.first_bad_seq) == (Problem.KEY_CHANGED_WITHOUT_ROTATION, 5)
    assert result.problem.startswith("record seq=5 is signed with key 'test-k1' but seq=4 with 'test-k2'")
    rotated.dispose()


def test_a_rotation_not_endorsed_by_the_old_key_is_named(tmp_path: Path, store: AuditStore) -> None:
    _fill(store, 2)
    keyring = _rotated_keyring()
    # A rotation to the new key, signed by it, but with an endorsement the old key never made.
    _insert_signed(
        _url(tmp_path),
        keyring,
        NEW_KEY_ID,
        action=AuditAction.KEY_ROTATED.value,
        subject=AUDIT_KEYRING_SUBJECT,
        decision=Decision.ROTATED.value,
        details={"from_key_id": TEST_KEY_ID, "to_key_id": NEW_KEY_ID, "endorsement": "0" * 64},
    )
    rotated = AuditStore(_url(tmp_path), keyring=keyring)
    result = rotated.verify()
    assert (result.attack, result.first_bad_seq) == (Problem.BAD_ROTATION, 3)
    assert result.problem == (
        "key rotation record seq=3 fails its endorsement: the holder of the old key 'test-k1' did not sign it"
    )
    rotated.dispose()


def test_rotating_through_the_key_connection(modelops_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = AuditHook()
    first.record(action="gate.decided", subject="model:m@1", decision="approved", context=_context())
    first.store.dispose()
    # The operator rotates: a new current key, the old one kept as retired.
    monkeypatch.setenv(
        "AIRFLOW_CONN_MODELOPS_AUDIT_KEY",
        json.dumps(
            {
                "conn_type": "generic",
                "login": NEW_KEY_ID,
                "password": NEW_KEY_SECRET,
                "extra": {"retired_keys": {TEST_KEY_ID: TEST_KEY_SECRET}},
            }
        ),
    )
    hook = AuditHook()
    record = hook.record(
        action="model.deployed", subject="model:m@1", decision="deployed", context=_context()
    )
    assert (record["seq"], record["key_id"]) == (3, NEW_KEY_ID)
    assert hook.store.records()[1].action == AuditAction.KEY_ROTATED
    result = hook.store.verify(hook.anchor_store)
    assert (result.ok, result.key_ids, result.newest_anchored_seq) == (True, (TEST_KEY_ID, NEW_KEY_ID), 3)
    hook.store.dispose()


# --- concurrency -------------------------------------------------------------------------------


def _append_many(url: str, worker: int, n: int, start: Any) -> None:
    store = AuditStore(url, keyring=keyring_for_tests())
    start.wait()
    for i in range(n):
        store.append(
            actor=f"worker-{worker}",
            action="prediction.logged",
            subject=f"batch:{worker}-{i}",
            decision="ok",
            dag_id="monitor",
            run_id=f"run-{worker}",
            task_id="log",
        )
    store.dispose()


def _concurrent_appends(url: str, processes: int = 4, per_process: int = 25) -> None:
    AuditStore(
        url, keyring=keyring_for_tests()
    ).dispose()  # create the table once, as the first task run would
    # Separate processes, each with its own engine; fork on Linux because spawning re-imports Airflow
    # in every child (seconds each), spawn elsewhere where fork is unsafe.
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    start = ctx.Event()
    workers = [ctx.Process(target=_append_many, args=(url, w, per_process, start)) for w in range(processes)]
    for worker in workers:
        worker.start()
    start.set()
    for worker in workers:
        worker.join(timeout=120)
    assert [w.exitcode for w in workers] == [0] * processes


def test_concurrent_writers_in_several_processes_keep_one_chain(tmp_path: Path) -> None:
    url = _url(tmp_path)
    _concurrent_appends(url)
    store = AuditStore(url, keyring=keyring_for_tests())
    result = store.verify()
    assert (result.ok, result.count, store.count()) == (True, 100, 100)
    assert {r.actor for r in store.records()} == {f"worker-{w}" for w in range(4)}
    store.dispose()


# --- hook --------------------------------------------------------------------------------------


def _context(user: str | None = "alice") -> dict[str, Any]:
    dag_run = SimpleNamespace(dag_id="lifecycle", run_id="manual__1", triggering_user_name=user)
    return {"dag_run": dag_run, "ti": SimpleNamespace(task_id="compliance_gate")}


def test_hook_records_the_task_run_and_logs_the_record(modelops_home: Path) -> None:
    hook = AuditHook()
    # The task SDK's LoggingMixin logs through structlog (which is what lands in the task log), not
    # the stdlib logging that caplog captures.
    with structlog.testing.capture_logs() as logs:
        record = hook.record(
            action="gate.decided",
            subject="model:ctr_recommender@3",
            decision="approved",
            details={"policy": "default@1"},
            evidence={"metrics": SHA_B},
            context=_context(),
        )
        retry = hook.record(
            action="gate.decided", subject="model:ctr_recommender@3", decision="approved", context=_context()
        )
    assert retry == record
    assert record["dag_id"] == "lifecycle" and record["run_id"] == "manual__1"
    assert record["task_id"] == "compliance_gate"
    assert record["actor"] == "airflow:lifecycle.compliance_gate (triggered by alice)"
    assert json.loads(json.dumps(record)) == record
    audit_lines = [e["event"] for e in logs if e["log_level"] == "info" and e["event"].startswith("AUDIT ")]
    assert len(audit_lines) == 2
    assert json.loads(audit_lines[0].removeprefix("AUDIT ")) == record

    assert hook.store.url == f"sqlite:///{modelops_home}/audit.db"
    assert hook.store.count() == 1
    # The head was anchored after the decision, into the test's home (the connection modelops_audit_anchor).
    anchors = LocalFolderAnchorStore(modelops_home / "audit-anchors")
    assert [listed.anchor.seq for listed in anchors.list()] == [1]
    result = hook.store.verify(anchors)
    assert (result.ok, result.newest_anchored_seq, result.unanchored) == (True, 1, 0)
    hook.store.dispose()


def test_hook_fails_loudly_when_the_head_cannot_be_anchored_and_a_retry_anchors_it(
    modelops_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = modelops_home / "not-a-folder"
    blocker.write_text("a file where the anchor folder should be")
    monkeypatch.setenv(
        "AIRFLOW_CONN_MODELOPS_AUDIT_ANCHOR",
        json.dumps({"conn_type": "fs", "extra": {"path": str(blocker / "anchors")}}),
    )
    decision = dict(action="gate.decided", subject="model:m@1", decision="approved", context=_context())
    with pytest.raises(AnchorError) as raised:
        AuditHook().record(**decision)
    message = str(raised.value)
    assert "audit record seq=1 was written" in message and (blocker / "anchors").as_uri() in message
    assert "retry the task" in message

    # The record is in the log before the failure; the retry writes no second one and anchors the head.
    monkeypatch.setenv(
        "AIRFLOW_CONN_MODELOPS_AUDIT_ANCHOR",
        json.dumps({"conn_type": "fs", "extra": {"path": str(modelops_home / "audit-anchors")}}),
    )
    hook = AuditHook()
    record = hook.record(**decision)
    assert record["seq"] == 1 and hook.store.count() == 1
    assert hook.store.verify(hook.anchor_store).ok
    hook.store.dispose()


def test_hook_without_its_anchor_connection_fails_after_recording(
    modelops_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AIRFLOW_CONN_MODELOPS_AUDIT_ANCHOR")
    hook = AuditHook()
    with pytest.raises(AnchorError, match="AIRFLOW_CONN_MODELOPS_AUDIT_ANCHOR") as raised:
        hook.record(action="gate.decided", subject="model:m@1", decision="approved", context=_context())
    assert "the connection 'modelops_audit_anchor'" in str(raised.value)
    assert hook.store.count() == 1
    hook.store.dispose()


def test_hook_without_a_triggering_user(modelops_home: Path) -> None:
    hook = AuditHook()
    record = hook.record(action="model.trained", subject="model:m@1", decision="ok", context=_context(None))
    assert record["actor"] == "airflow:lifecycle.compliance_gate"
    hook.store.dispose()


def test_hook_without_its_connection_says_how_to_define_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIRFLOW_CONN_MODELOPS_AUDIT", raising=False)
    with pytest.raises(ConfigurationError) as raised:
        _ = AuditHook().store
    message = str(raised.value)
    assert "'modelops_audit'" in message
    assert "airflow_settings.yaml" in message and "AIRFLOW_CONN_MODELOPS_AUDIT" in message


# --- CLI ---------------------------------------------------------------------------------------


def test_cli_verify_ok_and_broken(
    tmp_path: Path, store: AuditStore, capsys: pytest.CaptureFixture[str]
) -> None:
    url = _url(tmp_path)
    anchors = LocalFolderAnchorStore(tmp_path / "anchors")
    _fill(store, 3)
    store.anchor_head(anchors)
    store.append(actor="a", action="dataset.validated", subject="dataset:x", decision="passed")
    head_seq, head_hash = store.head()
    argv = ["audit", "verify", "--url", url, "--anchors", anchors.uri]

    assert cli.main(argv) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"checked: 4 records (hash chain, HMACs; keys: {TEST_KEY_ID}), 1 anchors at {anchors.uri} "
        "(newest anchored: seq=3, 1 records not anchored yet)",
        f"audit chain OK: 4 records, head seq={head_seq} hash={head_hash}",
    ]

    _raw(url, "UPDATE modelops_audit_log SET details = '{}' WHERE seq = 2")
    assert cli.main(argv) == 1
    assert capsys.readouterr().out.splitlines()[-1] == (
        "audit chain BROKEN: record seq=2 was altered: its stored hash does not match its content"
    )


def test_cli_anchor_then_verify_names_a_truncated_tail(
    tmp_path: Path, store: AuditStore, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = _url(tmp_path)
    monkeypatch.setenv("MODELOPS_AUDIT_ANCHORS", (tmp_path / "anchors").as_uri())
    assert cli.main(["audit", "anchor", "--url", url]) == 0
    assert capsys.readouterr().out.strip() == "audit log is empty: nothing to anchor"

    _fill(store, 5)
    head_seq, head_hash = store.head()
    assert cli.main(["audit", "anchor", "--url", url]) == 0
    anchors_uri = (tmp_path / "anchors").as_uri()
    assert capsys.readouterr().out.strip() == f"head seq=5 hash={head_hash} anchored at {anchors_uri}"
    assert cli.main(["audit", "anchor", "--url", url]) == 0
    assert (
        capsys.readouterr().out.strip()
        == f"head seq=5 hash={head_hash} was already anchored at {anchors_uri}"
    )

    _raw(url, "DELETE FROM modelops_audit_log WHERE seq >= 3")
    assert cli.main(["audit", "verify", "--url", url]) == 1
    checked, verdict = capsys.readouterr().out.splitlines()
    assert checked.startswith("checked: 2 records") and "1 anchors at" in checked
    assert verdict == (
        "audit chain BROKEN: the log ends at seq=2 but a genuine anchor names seq=5: records 3..5 were "
        "deleted, or the log was restored from an older backup"
    )


def test_cli_show_prints_json_lines(
    tmp_path: Path, store: AuditStore, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _fill(store, 4)
    store.append(actor="a", action="dataset.validated", subject="dataset:sha256:ab12", decision="passed")
    monkeypatch.setenv("MODELOPS_AUDIT_URL", _url(tmp_path))

    assert cli.main(["audit", "show", "--limit", "2", "--action", "model.registered"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["seq"] for line in lines] == [3, 4]

    assert cli.main(["audit", "show", "--subject", "dataset:sha256:ab12"]) == 0
    (only,) = capsys.readouterr().out.splitlines()
    assert json.loads(only)["decision"] == "passed" and only == canonical_json(json.loads(only))


def test_cli_uses_the_airflow_connections(
    modelops_home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only the Airflow connections: modelops_audit, modelops_audit_key, modelops_audit_anchor.
    for name in ("MODELOPS_AUDIT_URL", "MODELOPS_AUDIT_KEYS", "MODELOPS_AUDIT_ANCHORS"):
        monkeypatch.delenv(name, raising=False)
    AuditStore(f"sqlite:///{modelops_home}/audit.db", keyring=keyring_for_tests()).dispose()
    assert cli.main(["audit", "verify"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "audit chain OK: 0 records (empty log)"

    hook = AuditHook()
    hook.record(action="gate.decided", subject="model:m@1", decision="approved", context=_context())
    hook.store.dispose()
    capsys.readouterr()  # the hook's own log lines
    assert cli.main(["audit", "verify"]) == 0
    checked = capsys.readouterr().out.splitlines()[0]
    assert f"1 anchors at {(modelops_home / 'audit-anchors').as_uri()}" in checked
    assert "newest anchored: seq=1, 0 records not anchored yet" in checked


def test_cli_configuration_errors_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MODELOPS_AUDIT_URL", raising=False)
    monkeypatch.delenv("AIRFLOW_CONN_MODELOPS_AUDIT", raising=False)
    assert cli.main(["audit", "verify"]) == 2
    assert "AIRFLOW_CONN_MODELOPS_AUDIT" in capsys.readouterr().err

    missing = tmp_path / "nowhere" / "audit.db"
    assert cli.main(["audit", "verify", "--url", f"sqlite:///{missing}"]) == 2
    assert f"no audit log database at {missing}" in capsys.readouterr().err
    assert not missing.exists()

    assert cli.main(["audit", "bogus"]) == 2

    # No anchor store configured anywhere: a configuration error, not a verdict.
    url = _url(tmp_path)
    AuditStore(url, keyring=keyring_for_tests()).dispose()
    monkeypatch.delenv("MODELOPS_AUDIT_ANCHORS")
    monkeypatch.delenv("AIRFLOW_CONN_MODELOPS_AUDIT_ANCHOR")
    capsys.readouterr()
    assert cli.main(["audit", "verify", "--url", url]) == 2
    err = capsys.readouterr().err
    assert (
        "no audit anchor store is configured" in err
        and "--anchors" in err
        and "MODELOPS_AUDIT_ANCHORS" in err
    )

    # No key: a configuration error too.
    monkeypatch.delenv("MODELOPS_AUDIT_KEYS")
    monkeypatch.delenv("AIRFLOW_CONN_MODELOPS_AUDIT_KEY")
    assert cli.main(["audit", "verify", "--url", url, "--anchors", (tmp_path / "a").as_uri()]) == 2
    assert "modelops_audit_key" in capsys.readouterr().err


def test_cli_anchor_refuses_a_head_that_does_not_verify(
    tmp_path: Path, store: AuditStore, capsys: pytest.CaptureFixture[str]
) -> None:
    _fill(store, 2)
    _raw(_url(tmp_path), "UPDATE modelops_audit_log SET decision = 'approved' WHERE seq = 2")
    anchors = (tmp_path / "anchors").as_uri()
    assert cli.main(["audit", "anchor", "--url", _url(tmp_path), "--anchors", anchors]) == 1
    assert capsys.readouterr().out.startswith("audit chain BROKEN: the head of the audit log")
    assert not (tmp_path / "anchors").exists()


def test_python_dash_m_runs_the_cli(tmp_path: Path, store: AuditStore) -> None:
    _fill(store, 2)
    anchors = LocalFolderAnchorStore(tmp_path / "anchors")
    store.anchor_head(anchors)
    _raw(_url(tmp_path), "DELETE FROM modelops_audit_log WHERE seq = 1")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "modelops.cli",
            "audit",
            "verify",
            "--url",
            _url(tmp_path),
            "--anchors",
            anchors.uri,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    # Last line: in unit-test mode Airflow announces its test configuration on stdout when imported.
    assert (
        done.stdout.strip().splitlines()[-1]
        == "audit chain BROKEN: record seq=1 is missing (deleted): the chain starts at seq=2"
    )


# --- PostgreSQL --------------------------------------------------------------------------------


def test_postgresql_chain(postgres_url: str) -> None:
    store = AuditStore(postgres_url, keyring=keyring_for_tests())
    try:
        _fill(store, 4)
        again = store.append(
            actor="test",
            action="model.registered",
            subject="model:ctr_recommender@2",
            decision="ok",
            dag_id="lifecycle",
            run_id="run-1",
            task_id="register_2",
        )
        assert again.seq == 2 and store.count() == 4
        assert store.verify().ok and store.verify().count == 4

        _raw(postgres_url, "UPDATE modelops_audit_log SET details = :d WHERE seq = 3", d='{"i":42}')
        result = store.verify()
        assert result.first_bad_seq == 3
        assert result.problem == "record seq=3 was altered: its stored hash does not match its content"
    finally:
        store.dispose()


def test_postgresql_concurrent_writers(postgres_url: str) -> None:
    _concurrent_appends(postgres_url)
    store = AuditStore(postgres_url, keyring=keyring_for_tests())
    try:
        assert (store.verify().ok, store.count()) == (True, 100)
    finally:
        store.dispose()


def test_a_subject_prefix_matches_literally_not_as_a_like_pattern(store: AuditStore) -> None:
    for subject in ("model:a_b@1", "model:a_b@2", "model:aXb@1", "model:a_bc@1"):
        store.append(
            actor="test", action=AuditAction.GATE_DECIDED, subject=subject, decision=Decision.APPROVED
        )
    found = [record.subject for record in store.records(subject_prefix="model:a_b@")]
    assert found == ["model:a_b@1", "model:a_b@2"]
