"""Anchors of the audit chain's head, and the attacks they catch that the keyed chain alone cannot.

Each attack is carried out as someone with access to the audit database (plain SQL or a file copy)
would; anchors are written as tasks write them, after every decision. Local folder anchors everywhere,
S3 Object Lock against moto's real S3 server on loopback, and the attacks on PostgreSQL too.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import stat
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa

from modelops import cli
from modelops.audit import (
    Anchor,
    AnchorError,
    AuditKeyring,
    AuditStore,
    LocalFolderAnchorStore,
    Problem,
    S3ObjectLockAnchorStore,
    anchor_store_from_uri,
    compute_record_hash,
)
from modelops.audit.anchors import ANCHORS_ENV
from modelops.errors import AuditChainBroken, ConfigurationError
from modelops.hooks.audit import AuditHook
from modelops.vocabulary import AuditAction, Decision
from tests.support import TEST_KEY_ID, keyring_for_tests, moto_s3_server

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _url(folder: Path, name: str = "audit.db") -> str:
    return f"sqlite:///{folder / name}"


def _raw(url: str, sql: str, **params: Any) -> None:
    """Tamper the way an attacker with database access would: plain SQL, outside AuditStore."""
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(sql), params)
    engine.dispose()


def _decide(store: AuditStore, anchors: Any, n: int, *, first: int = 1) -> None:
    """``n`` lifecycle decisions, each followed by anchoring the head, as AuditHook.record does."""
    for i in range(first, first + n):
        store.append(
            actor="airflow:modelops_compliance_gate.evaluate",
            action=AuditAction.GATE_DECIDED,
            subject=f"model:ctr_recommender@{i}",
            decision=Decision.APPROVED,
            details={"i": i},
        )
        store.anchor_head(anchors)


@pytest.fixture
def keyring() -> AuditKeyring:
    return keyring_for_tests()


@pytest.fixture
def url(tmp_path: Path) -> str:
    return _url(tmp_path)


@pytest.fixture
def anchors(tmp_path: Path) -> LocalFolderAnchorStore:
    return LocalFolderAnchorStore(tmp_path / "anchors")


@pytest.fixture
def log(url: str, keyring: AuditKeyring) -> Iterator[AuditStore]:
    store = AuditStore(url, keyring=keyring)
    yield store
    store.dispose()


# --- anchors and the local folder ---------------------------------------------------------------


def test_an_anchor_is_signed_and_named_after_its_head(keyring: AuditKeyring) -> None:
    when = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
    anchor = Anchor.sign(seq=42, record_hash="ab" * 32, keyring=keyring, anchored_at=when)
    assert (anchor.seq, anchor.key_id, anchor.anchored_at) == (
        42,
        TEST_KEY_ID,
        "2026-11-27T12:00:00.000000+00:00",
    )
    assert anchor.name == "anchor-000000000042-abababababababab.json"
    assert anchor.authentic(keyring)
    assert Anchor.parse(anchor.to_json().encode()) == anchor
    for changed in ({"seq": 43}, {"record_hash": "cd" * 32}, {"anchored_at": "2027-01-01"}):
        assert not Anchor(**anchor.__dict__ | changed).authentic(keyring)
    other = AuditKeyring(current="other", keys={"other": "x" * 40})
    assert not anchor.authentic(other)
    with pytest.raises(ValueError):
        Anchor.parse(b'{"seq": 1}')


def test_the_local_folder_writes_each_anchor_once_read_only(
    tmp_path: Path, log: AuditStore, anchors: LocalFolderAnchorStore
) -> None:
    assert anchors.list() == []
    assert log.anchor_head(anchors) is None  # an empty log: nothing to anchor
    _decide(log, anchors, 2)
    anchor, written = log.anchor_head(anchors)
    assert (anchor.seq, written) == (2, False)  # re-anchoring the same head is a no-op

    files = sorted(path.name for path in (tmp_path / "anchors").iterdir())
    assert files == [listed.name for listed in anchors.list()]
    assert [name.split("-")[1] for name in files] == ["000000000001", "000000000002"]
    path = tmp_path / "anchors" / files[1]
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    stored = Anchor.parse(path.read_bytes())
    assert (stored.seq, stored.record_hash) == log.head() and stored.authentic(log.keyring)
    # Write once: an exclusive create of an existing anchor fails, and put never replaces one.
    with pytest.raises(FileExistsError):
        os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    assert anchors.put(Anchor(**stored.__dict__ | {"anchored_at": "later"})) is False
    assert Anchor.parse(path.read_bytes()) == stored


def test_anchor_store_uris(tmp_path: Path) -> None:
    store = anchor_store_from_uri((tmp_path / "a b").as_uri())
    assert isinstance(store, LocalFolderAnchorStore) and store.folder == tmp_path / "a b"
    with pytest.raises(ConfigurationError, match="neither file:// nor s3://"):
        anchor_store_from_uri("ftp://example.org/anchors")
    with pytest.raises(ConfigurationError, match="names a host"):
        anchor_store_from_uri("file://server/anchors")
    assert cli.ANCHORS_ENV == ANCHORS_ENV


def test_anchor_connections_name_what_is_missing(tmp_path: Path) -> None:
    from modelops.audit.anchors import anchor_store_from_connection_fields

    def no_s3() -> Any:
        raise AssertionError("no S3 client is needed here")

    fields = {"source": "Airflow connection 'modelops_audit_anchor'", "s3_client": no_s3}
    store = anchor_store_from_connection_fields(conn_type="fs", extra={"path": str(tmp_path)}, **fields)
    assert isinstance(store, LocalFolderAnchorStore) and store.folder == tmp_path
    with pytest.raises(ConfigurationError, match=r"\(conn_type fs\) needs extra.path"):
        anchor_store_from_connection_fields(conn_type="fs", extra={}, **fields)
    with pytest.raises(ConfigurationError, match=r"needs extra.anchor_uri = s3://bucket/prefix"):
        anchor_store_from_connection_fields(conn_type="aws", extra={"path": "/x"}, **fields)
    with pytest.raises(ConfigurationError, match="use fs or aws"):
        anchor_store_from_connection_fields(conn_type="sqlite", extra={}, **fields)
    with pytest.raises(ConfigurationError, match="not an absolute path"):
        anchor_store_from_connection_fields(conn_type="fs", extra={"path": "relative/anchors"}, **fields)


def test_an_intact_log_verifies_and_reports_what_is_not_anchored_yet(
    log: AuditStore, anchors: LocalFolderAnchorStore
) -> None:
    assert log.verify(anchors).ok  # empty log, no anchors: nothing to compare yet
    _decide(log, anchors, 5)
    result = log.verify(anchors)
    assert (
        result.ok,
        result.count,
        result.anchors_checked,
        result.newest_anchored_seq,
        result.unanchored,
    ) == (
        True,
        5,
        5,
        5,
        0,
    )
    assert result.anchor_store == anchors.uri
    log.append(
        actor="cli:alice", action=AuditAction.MODEL_RETIRED, subject="model:m@1", decision=Decision.RETIRED
    )
    result = log.verify(anchors)
    assert (result.ok, result.newest_anchored_seq, result.unanchored) == (True, 5, 1)


def test_a_log_without_any_anchor_fails(log: AuditStore, anchors: LocalFolderAnchorStore) -> None:
    log.append(actor="a", action=AuditAction.GATE_DECIDED, subject="model:m@1", decision=Decision.APPROVED)
    result = log.verify(anchors)
    assert (result.ok, result.attack) == (False, Problem.NOT_ANCHORED)
    assert result.problem == (
        f"the log has records up to seq=1 but {anchors.uri} holds no anchor: anchoring is off or the anchors "
        "were removed"
    )


def test_only_an_authentic_head_is_anchored(
    url: str, log: AuditStore, anchors: LocalFolderAnchorStore
) -> None:
    _decide(log, anchors, 2)
    _raw(url, "UPDATE modelops_audit_log SET decision = 'rejected' WHERE seq = 2")
    with pytest.raises(AuditChainBroken, match="seq=2"):
        log.anchor_head(anchors)


# --- the attacks --------------------------------------------------------------------------------


def test_deleting_the_newest_three_records_is_named(
    url: str, log: AuditStore, anchors: LocalFolderAnchorStore
) -> None:
    _decide(log, anchors, 10)
    _raw(url, "DELETE FROM modelops_audit_log WHERE seq > 7")

    assert log.verify().ok  # the chain alone cannot see it: what is left is a valid chain
    result = log.verify(anchors)
    assert (result.ok, result.attack, result.first_bad_seq) == (False, Problem.TAIL_TRUNCATED, 8)
    assert result.problem == (
        "the log ends at seq=7 but a genuine anchor names seq=10: records 8..10 were deleted, or the log was "
        "restored from an older backup"
    )
    assert (result.newest_anchored_seq, result.unanchored) == (7, 0)


def _rewrite_from(url: str, seq: int, keyring: AuditKeyring | None) -> None:
    """Change record ``seq``'s decision and recompute every later hash (and, with the key, the HMACs)."""
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        rows = conn.execute(
            sa.text("SELECT * FROM modelops_audit_log WHERE seq >= :s ORDER BY seq"), {"s": seq}
        )
        records = [dict(row._mapping) for row in rows]
        prev_hash = records[0]["prev_hash"]
        for fields in records:
            if fields["seq"] == seq:
                fields["decision"] = Decision.REJECTED.value
            fields["prev_hash"] = prev_hash
            hashed = fields | {
                "details": json.loads(fields["details"]),
                "evidence": json.loads(fields["evidence"]),
            }
            fields["record_hash"] = compute_record_hash(hashed)
            fields["hmac"] = keyring.sign(fields["record_hash"]) if keyring else "f" * 64
            # prev_hash and record_hash are UNIQUE: park the old row's values before writing the new ones.
            conn.execute(
                sa.text(
                    "UPDATE modelops_audit_log SET decision = :decision, prev_hash = :prev_hash, "
                    "record_hash = :record_hash, hmac = :hmac WHERE seq = :seq"
                ),
                fields,
            )
            prev_hash = fields["record_hash"]
    engine.dispose()


def test_a_rewrite_without_the_key_fails_the_hmac(
    url: str, log: AuditStore, anchors: LocalFolderAnchorStore
) -> None:
    _decide(log, anchors, 8)
    _rewrite_from(url, 5, keyring=None)
    result = log.verify(anchors)
    assert (result.attack, result.first_bad_seq) == (Problem.RECORD_FORGED, 5)
    assert result.problem.startswith("record seq=5 fails its HMAC check")
    # The anchors see it too.
    assert [finding.kind for finding in result.findings] == [Problem.RECORD_FORGED, Problem.LOG_REWRITTEN]


def test_a_rewrite_with_the_key_is_caught_by_the_anchors(
    url: str, log: AuditStore, anchors: LocalFolderAnchorStore, keyring: AuditKeyring
) -> None:
    _decide(log, anchors, 8)
    _rewrite_from(url, 5, keyring=keyring)

    assert log.verify().ok  # a key holder's rewrite is a valid keyed chain
    result = log.verify(anchors)
    assert (result.ok, result.attack, result.first_bad_seq) == (False, Problem.LOG_REWRITTEN, 5)
    assert result.problem.startswith(
        "the log was rewritten after seq=4: the anchor of seq=4 matches, but the anchor of seq=5 names hash "
    )
    assert result.newest_anchored_seq == 4


def test_an_emptied_table_is_named(url: str, log: AuditStore, anchors: LocalFolderAnchorStore) -> None:
    _decide(log, anchors, 4)
    _raw(url, "DELETE FROM modelops_audit_log")
    assert log.verify().ok
    result = log.verify(anchors)
    assert (result.attack, result.first_bad_seq) == (Problem.LOG_EMPTIED, 1)
    assert result.problem == (
        f"the log is empty but {anchors.uri} holds 4 genuine anchors, the newest naming seq=4: the log was "
        "emptied, or its database replaced by an empty one"
    )


def test_a_replaced_database_is_named(
    tmp_path: Path, url: str, log: AuditStore, anchors: LocalFolderAnchorStore, keyring: AuditKeyring
) -> None:
    _decide(log, anchors, 6)
    log.dispose()
    # Another valid log, signed with the same key (an insider's), written elsewhere and copied over.
    other = AuditStore(_url(tmp_path, "other.db"), keyring=keyring)
    _decide(other, LocalFolderAnchorStore(tmp_path / "other-anchors"), 6)
    other.dispose()
    shutil.copyfile(tmp_path / "other.db", tmp_path / "audit.db")

    replaced = AuditStore(url, keyring=keyring)
    assert replaced.verify().ok
    result = replaced.verify(anchors)
    assert (result.attack, result.first_bad_seq) == (Problem.LOG_REPLACED, 1)
    assert result.problem.startswith("no anchor matches the log: all 6 anchors within it name other records")
    assert result.problem.endswith("the whole log was rewritten, or the database replaced by another log")
    replaced.dispose()


def test_a_forged_gate_record_without_the_key_is_named(
    url: str, log: AuditStore, anchors: LocalFolderAnchorStore
) -> None:
    _decide(log, anchors, 3)
    seq, prev_hash = log.head()
    fields = {
        "seq": seq + 1,
        "recorded_at": datetime.now(UTC).isoformat(timespec="microseconds"),
        "actor": "airflow:modelops_compliance_gate.evaluate",
        "dag_id": None,
        "run_id": None,
        "task_id": None,
        "action": AuditAction.GATE_DECIDED.value,
        "subject": "model:ctr_recommender@9",
        "decision": Decision.APPROVED.value,
        "details": {},
        "evidence": {},
        "prev_hash": prev_hash,
        "key_id": TEST_KEY_ID,
    }
    fields["record_hash"] = compute_record_hash(fields)
    _raw(
        url,
        "INSERT INTO modelops_audit_log (seq, recorded_at, actor, action, subject, decision, details, evidence, "
        "prev_hash, record_hash, key_id, hmac) VALUES (:seq, :recorded_at, :actor, :action, :subject, :decision, "
        "'{}', '{}', :prev_hash, :record_hash, :key_id, :hmac)",
        **fields | {"hmac": "0" * 64},
    )
    result = log.verify(anchors)
    assert (result.attack, result.first_bad_seq) == (Problem.RECORD_FORGED, 4)
    assert result.problem == (
        "record seq=4 fails its HMAC check: it was written or rewritten by someone without the audit key "
        "(forged, or the chain recomputed after an edit)"
    )
    assert result.unanchored == 1
    # The head it created is not anchored either.
    with pytest.raises(AuditChainBroken):
        log.anchor_head(anchors)


def test_a_forged_anchor_is_named_and_ignored(
    tmp_path: Path, log: AuditStore, anchors: LocalFolderAnchorStore
) -> None:
    _decide(log, anchors, 3)
    # An anchor claiming a head far beyond the log (to fake a truncation), signed without the key.
    thief = AuditKeyring(current=TEST_KEY_ID, keys={TEST_KEY_ID: "guessed-" + "x" * 40})
    forged = Anchor.sign(seq=50, record_hash="e" * 64, keyring=thief)
    (tmp_path / "anchors" / forged.name).write_text(forged.to_json())
    (tmp_path / "anchors" / "anchor-000000000060-0000000000000000.json").write_text("not json")

    result = log.verify(anchors)
    assert [finding.kind for finding in result.findings] == [Problem.FORGED_ANCHOR, Problem.FORGED_ANCHOR]
    assert f"anchor {(tmp_path / 'anchors' / forged.name).as_uri()} fails its HMAC check" in result.problem
    assert "is not an anchor" in result.problem
    assert Problem.TAIL_TRUNCATED not in {finding.kind for finding in result.findings}
    assert result.newest_anchored_seq == 3


def test_a_replayed_old_anchor_is_named_and_cannot_hide_a_truncation(
    url: str, tmp_path: Path, log: AuditStore, anchors: LocalFolderAnchorStore
) -> None:
    _decide(log, anchors, 10)
    _raw(url, "DELETE FROM modelops_audit_log WHERE seq > 7")
    # The attacker, unable to delete anchors 8..10, copies the genuine anchor of seq 7 (the new head) under
    # a newer name, so that "the latest anchor" agrees with the truncated log.
    seventh = next(listed for listed in anchors.list() if listed.anchor.seq == 7)
    replay = tmp_path / "anchors" / "anchor-000000000011-ffffffffffffffff.json"
    replay.write_bytes(Path(seventh.location.removeprefix("file://")).read_bytes())

    result = log.verify(anchors)
    kinds = [finding.kind for finding in result.findings]
    assert kinds == [Problem.TAIL_TRUNCATED, Problem.REPLAYED_ANCHOR]
    assert "records 8..10 were deleted" in result.problem
    assert (
        f"{replay.as_uri()} holds the anchor of seq=7 ({seventh.name}) under another name" in result.problem
    )


def test_a_log_restored_from_an_older_backup_is_named(
    tmp_path: Path, url: str, log: AuditStore, anchors: LocalFolderAnchorStore, keyring: AuditKeyring
) -> None:
    _decide(log, anchors, 5)
    log.dispose()
    shutil.copyfile(tmp_path / "audit.db", tmp_path / "backup.db")
    writer = AuditStore(url, keyring=keyring)
    _decide(writer, anchors, 3, first=6)
    writer.dispose()
    shutil.copyfile(tmp_path / "backup.db", tmp_path / "audit.db")

    restored = AuditStore(url, keyring=keyring)
    assert restored.verify().ok
    result = restored.verify(anchors)
    assert (result.attack, result.first_bad_seq, result.newest_anchored_seq) == (Problem.TAIL_TRUNCATED, 6, 5)
    assert "records 6..8 were deleted, or the log was restored from an older backup" in result.problem
    restored.dispose()


def test_anchors_signed_with_a_dropped_key_are_named(
    url: str, log: AuditStore, anchors: LocalFolderAnchorStore
) -> None:
    _decide(log, anchors, 2)
    dropped = AuditKeyring(current="k2", keys={"k2": "y" * 40})
    reader = AuditStore(url, keyring=dropped)
    result = reader.verify(anchors)
    reader.dispose()
    kinds = {finding.kind for finding in result.findings}
    assert Problem.UNKNOWN_KEY in kinds
    assert "is signed with key 'test-k1', which is not in the keyring ['k2']" in result.problem


# --- PostgreSQL ---------------------------------------------------------------------------------


def test_postgresql_truncation_rewrite_and_emptied_log(
    postgres_url: str, tmp_path: Path, keyring: AuditKeyring
) -> None:
    anchors = LocalFolderAnchorStore(tmp_path / "anchors")
    store = AuditStore(postgres_url, keyring=keyring)
    try:
        _decide(store, anchors, 8)
        assert store.verify(anchors).ok

        _raw(postgres_url, "DELETE FROM modelops_audit_log WHERE seq > 5")
        assert store.verify(anchors).attack == Problem.TAIL_TRUNCATED

        _rewrite_from(postgres_url, 3, keyring=keyring)
        result = store.verify(anchors)
        assert [finding.kind for finding in result.findings] == [
            Problem.LOG_REWRITTEN,
            Problem.TAIL_TRUNCATED,
        ]
        assert result.problem.startswith("the log was rewritten after seq=2")

        _raw(postgres_url, "DELETE FROM modelops_audit_log")
        assert store.verify(anchors).attack == Problem.LOG_EMPTIED
    finally:
        store.dispose()


# --- S3 with Object Lock (moto's S3 server on loopback) -----------------------------------------

BUCKET = "modelops-audit-anchors"
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with moto_s3_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    import boto3

    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, ",".join(filter(None, [os.environ.get(name), "127.0.0.1"])))
    client = boto3.client("s3", endpoint_url=s3_endpoint, **CREDENTIALS)
    if BUCKET not in {bucket["Name"] for bucket in client.list_buckets()["Buckets"]}:
        client.create_bucket(Bucket=BUCKET, ObjectLockEnabledForBucket=True)
    return client


@pytest.fixture
def s3_anchors(s3: Any, request: pytest.FixtureRequest) -> S3ObjectLockAnchorStore:
    # A prefix per test: the module's server and bucket are shared, and locked objects cannot be removed.
    return S3ObjectLockAnchorStore(s3, BUCKET, f"tests/{request.node.name}", retention_days=30)


def test_s3_anchors_are_locked_in_compliance_mode(
    log: AuditStore, s3: Any, s3_anchors: S3ObjectLockAnchorStore
) -> None:
    _decide(log, s3_anchors, 3)
    assert log.anchor_head(s3_anchors)[1] is False  # already anchored: a no-op
    listed = s3_anchors.list()
    assert [item.anchor.seq for item in listed] == [1, 2, 3]
    key = f"{s3_anchors.prefix}{listed[-1].name}"
    head = s3.head_object(Bucket=BUCKET, Key=key)
    assert head["ObjectLockMode"] == "COMPLIANCE"
    retain_days = (head["ObjectLockRetainUntilDate"] - datetime.now(UTC)) / timedelta(days=1)
    assert 29 < retain_days <= 30
    assert log.verify(s3_anchors).ok

    from botocore.exceptions import ClientError

    version_id = head["VersionId"]
    # Deleting the locked version is refused; overwriting only stacks a new version on it.
    with pytest.raises(ClientError) as refused:
        s3.delete_object(Bucket=BUCKET, Key=key, VersionId=version_id)
    assert refused.value.response["Error"]["Code"] == "AccessDenied"
    s3.put_object(Bucket=BUCKET, Key=key, Body=b'{"seq": 1}')
    original = s3.get_object(Bucket=BUCKET, Key=key, VersionId=version_id)["Body"].read()
    assert Anchor.parse(original) == listed[-1].anchor


def test_s3_replayed_and_hidden_anchors_cannot_hide_a_truncation(
    url: str, log: AuditStore, s3: Any, s3_anchors: S3ObjectLockAnchorStore
) -> None:
    _decide(log, s3_anchors, 6)
    _raw(url, "DELETE FROM modelops_audit_log WHERE seq > 4")
    listed = {item.anchor.seq: item for item in s3_anchors.list()}
    # Hide the newest anchors behind delete markers, and replay the new head's anchor as a newer version
    # of the newest anchor's key.
    for seq in (5, 6):
        s3.delete_object(Bucket=BUCKET, Key=f"{s3_anchors.prefix}{listed[seq].name}")
    fourth = s3.get_object(Bucket=BUCKET, Key=f"{s3_anchors.prefix}{listed[4].name}")["Body"].read()
    s3.put_object(Bucket=BUCKET, Key=f"{s3_anchors.prefix}{listed[6].name}", Body=fourth)

    result = log.verify(s3_anchors)
    assert [finding.kind for finding in result.findings] == [Problem.TAIL_TRUNCATED, Problem.REPLAYED_ANCHOR]
    assert (
        "the log ends at seq=4 but a genuine anchor names seq=6: records 5..6 were deleted" in result.problem
    )
    assert result.anchors_checked == 7


def test_an_unreachable_s3_store_is_named() -> None:
    import boto3
    from botocore.config import Config

    from tests.support import free_port

    client = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        config=Config(connect_timeout=1, retries={"max_attempts": 1}),
        **CREDENTIALS,
    )
    with pytest.raises(AnchorError, match=f"cannot reach the audit anchor store s3://{BUCKET}/anchors/"):
        S3ObjectLockAnchorStore(client, BUCKET, "anchors")


def test_a_bucket_without_object_lock_is_refused(s3: Any) -> None:
    s3.create_bucket(Bucket="modelops-unlocked")
    with pytest.raises(ConfigurationError) as raised:
        S3ObjectLockAnchorStore(s3, "modelops-unlocked", "anchors")
    message = str(raised.value)
    assert "'modelops-unlocked' does not have Object Lock enabled" in message
    assert "--object-lock-enabled-for-bucket" in message


def test_s3_anchors_through_the_airflow_connection(
    modelops_home: Path, s3: Any, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "AIRFLOW_CONN_MODELOPS_AUDIT_ANCHOR",
        json.dumps(
            {
                "conn_type": "aws",
                "login": CREDENTIALS["aws_access_key_id"],
                "password": CREDENTIALS["aws_secret_access_key"],
                "extra": {
                    "anchor_uri": f"s3://{BUCKET}/hook",
                    "retention_days": 3650,
                    "endpoint_url": s3_endpoint,
                    "region_name": "us-east-1",
                },
            }
        ),
    )
    hook = AuditHook()
    context = {
        "dag_run": SimpleNamespace(dag_id="lifecycle", run_id="manual__1", triggering_user_name=None),
        "ti": SimpleNamespace(task_id="gate"),
    }
    record = hook.record(
        action=AuditAction.GATE_DECIDED, subject="model:m@1", decision=Decision.APPROVED, context=context
    )
    store = hook.anchor_store
    assert isinstance(store, S3ObjectLockAnchorStore) and store.retention_days == 3650
    assert any(item.anchor.record_hash == record["record_hash"] for item in store.list())
    head = s3.head_object(
        Bucket=BUCKET, Key=f"hook/anchor-{record['seq']:012d}-{record['record_hash'][:16]}.json"
    )
    assert head["ObjectLockMode"] == "COMPLIANCE"
    assert (head["ObjectLockRetainUntilDate"] - datetime.now(UTC)) > timedelta(days=3640)
    assert hook.store.verify(store).ok
    hook.store.dispose()


def test_cli_verifies_against_s3(
    tmp_path: Path,
    url: str,
    log: AuditStore,
    s3: Any,
    s3_endpoint: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # boto3's default chain, as outside Airflow: credentials and endpoint from the environment.
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", CREDENTIALS["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CREDENTIALS["aws_secret_access_key"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", CREDENTIALS["region_name"])
    monkeypatch.setenv("MODELOPS_AUDIT_ANCHORS", f"s3://{BUCKET}/cli")
    _decide(log, LocalFolderAnchorStore(tmp_path / "unused"), 2)
    assert cli.main(["audit", "anchor", "--url", url]) == 0
    assert capsys.readouterr().out.strip().endswith(f"anchored at s3://{BUCKET}/cli/")
    assert cli.main(["audit", "verify", "--url", url]) == 0
    assert "newest anchored: seq=2, 0 records not anchored yet" in capsys.readouterr().out

    _raw(url, "DELETE FROM modelops_audit_log")
    assert cli.main(["audit", "verify", "--url", url]) == 1
    assert capsys.readouterr().out.splitlines()[-1].startswith("audit chain BROKEN: the log is empty but")


# --- the periodic DAG ---------------------------------------------------------------------------


def _anchor_task() -> Any:
    spec = importlib.util.spec_from_file_location(
        "modelops_audit_anchor_dag", PROJECT_ROOT / "dags" / "modelops_audit_anchor.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dag = module.modelops_audit_anchor()
    return dag.get_task("anchor_and_verify").python_callable


def test_the_periodic_dag_anchors_then_verifies_and_fails_on_an_attack(
    modelops_home: Path, keyring: AuditKeyring
) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    url = _url(modelops_home)
    anchors = LocalFolderAnchorStore(modelops_home / "audit-anchors")
    store = AuditStore(url, keyring=keyring)
    _decide(store, anchors, 3)
    # A record written outside a task, not anchored yet: the periodic run anchors it.
    store.append(
        actor="cli:alice", action=AuditAction.MODEL_RETIRED, subject="model:m@1", decision=Decision.RETIRED
    )
    assert store.verify(anchors).unanchored == 1

    run = _anchor_task()
    summary = run()
    assert (summary["records"], summary["newest_anchored_seq"], summary["unanchored"]) == (4, 4, 0)
    assert summary["anchor_store"] == anchors.uri

    _raw(url, "DELETE FROM modelops_audit_log WHERE seq > 2")
    with pytest.raises(AirflowFailException, match=r"\(tail_truncated\): the log ends at seq=2"):
        run()
    store.dispose()
