"""An audit record edited in the database into details or evidence that are not a JSON object (``not json{``,
``[1,2]``, a NaN) is read as a record that is not authentic: ``modelops audit show`` lists it marked so,
and every evidence look-up skips it like any other forged record, on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from modelops import cli
from modelops.audit import AuditStore
from modelops.audit.chain import Problem
from modelops.errors import AuditChainBroken
from modelops.evidence import (
    CHALLENGER_FIELD,
    CHAMPION_FIELD,
    SHARE_FIELD,
    EvidenceMismatch,
    active_canary,
    champion_record,
    evidence_summary,
    gate_record,
    newest_authentic,
    registration_record,
    traffic_record,
)
from modelops.stages.canary import traffic_history
from modelops.vocabulary import (
    AuditAction,
    Decision,
    dataset_subject,
    latest_passed_validation,
    model_subject,
)
from tests.support import keyring_for_tests, valid_approval

MODEL = "ctr_recommender"
FILES = {"MLmodel": "1" * 64, "model.skops": "2" * 64}
SHA = "d" * 64


@dataclass
class Log:
    url: str
    store: AuditStore
    seqs: dict[str, int]


@pytest.fixture(params=["sqlite", "postgresql"])
def log(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Log]:
    """A real audit log (SQLite file, or a throw-away PostgreSQL database) with the records the pipeline
    writes over v1's deployment and v2's canary, each step's seq by name."""
    url = (
        f"sqlite:///{tmp_path / 'audit.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    store = AuditStore(url, keyring=keyring_for_tests())
    seqs: dict[str, int] = {}

    def add(step: str, action: str, subject: str, decision: str, details: dict[str, Any]) -> None:
        record = store.append(
            actor="test",
            action=action,
            subject=subject,
            decision=decision,
            details=details,
            evidence={"dataset": SHA},
        )
        seqs[step] = record.seq

    facts = evidence_summary(FILES)
    add(
        "validated",
        AuditAction.DATASET_VALIDATED,
        dataset_subject(SHA),
        Decision.PASSED,
        {"dataset": "ctr_events"},
    )
    for version in ("1", "2"):
        subject = model_subject(MODEL, version)
        add(f"registered_v{version}", AuditAction.MODEL_REGISTERED, subject, Decision.CANDIDATE, dict(facts))
        add(
            f"approved_v{version}",
            AuditAction.GATE_DECIDED,
            subject,
            Decision.APPROVED,
            facts | valid_approval(),
        )
    add(
        "promoted_v1",
        AuditAction.MODEL_DEPLOYED,
        model_subject(MODEL, 1),
        Decision.PROMOTED,
        {CHAMPION_FIELD: "1", **facts},
    )
    add(
        "canary_v2",
        AuditAction.TRAFFIC_SHARE_SET,
        model_subject(MODEL, 2),
        Decision.CANARY_STARTED,
        {CHAMPION_FIELD: "1", CHALLENGER_FIELD: "2", SHARE_FIELD: 0.1, **facts},
    )
    # What an attacker would then need: v2 promoted over the canary, and a newer validation.
    add(
        "promoted_v2",
        AuditAction.MODEL_DEPLOYED,
        model_subject(MODEL, 2),
        Decision.PROMOTED,
        {CHAMPION_FIELD: "2", "previous_version": "1", **facts},
    )
    add(
        "traffic_v2",
        AuditAction.TRAFFIC_SHARE_SET,
        model_subject(MODEL, 2),
        Decision.PROMOTED,
        {CHAMPION_FIELD: "2", CHALLENGER_FIELD: None, SHARE_FIELD: 0, **facts},
    )
    add(
        "validated_again",
        AuditAction.DATASET_VALIDATED,
        dataset_subject(SHA),
        Decision.PASSED,
        {"dataset": "ctr_events"},
    )
    yield Log(url, store, seqs)
    store.dispose()


def _edit(url: str, seq: int, column: str, text: str) -> None:
    """Tamper the way someone with database access would: plain SQL, outside AuditStore."""
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(f"UPDATE modelops_audit_log SET {column} = :text WHERE seq = :seq"),
            {"text": text, "seq": seq},
        )
    engine.dispose()


EDITS = {
    # step -> (column, stored text)
    "registered_v2": ("details", "not json{"),
    "approved_v2": ("details", "[1,2]"),
    "promoted_v2": ("evidence", "not json{"),
    "traffic_v2": ("details", "[1,2]"),
    "validated_again": ("details", '{"dataset": NaN}'),
}


@pytest.fixture
def edited(log: Log) -> Log:
    for step, (column, text) in EDITS.items():
        _edit(log.url, log.seqs[step], column, text)
    return log


def test_unreadable_records_are_read_as_not_authentic(edited: Log) -> None:
    store, seqs = edited.store, edited.seqs
    records = {record.seq: record for record in store.records()}
    assert len(records) == len(seqs)
    unreadable = {seqs[step] for step in EDITS}
    for seq, record in records.items():
        if seq in unreadable:
            assert record.unreadable and record.details == {} and record.evidence == {}
            assert store.authentic(record) is False
        else:
            assert record.unreadable is None and store.authentic(record)
    assert records[seqs["registered_v2"]].unreadable == "its details are not JSON ('not json{')"
    assert records[seqs["approved_v2"]].unreadable == "its details are a JSON list, not an object ('[1,2]')"
    assert records[seqs["promoted_v2"]].unreadable == "its evidence is not JSON ('not json{')"
    assert "unreadable" not in records[seqs["validated"]].to_dict()  # records as written are unchanged
    assert records[seqs["promoted_v2"]].to_dict()["unreadable"] == "its evidence is not JSON ('not json{')"


def test_evidence_look_ups_skip_unreadable_records_like_forged_ones(edited: Log) -> None:
    store, seqs = edited.store, edited.seqs
    with pytest.raises(
        EvidenceMismatch, match=f"seq={seqs['registered_v2']} claiming it fail their HMAC check"
    ):
        registration_record(store, MODEL, "2")
    with pytest.raises(
        EvidenceMismatch, match=f"seq={seqs['approved_v2']} claiming it fail their HMAC check"
    ):
        gate_record(store, MODEL, "2")
    assert registration_record(store, MODEL, "1").seq == seqs["registered_v1"]
    assert gate_record(store, MODEL, "1").seq == seqs["approved_v1"]
    # The champion and the canary are those of the authentic records, not of the edited promotion.
    assert champion_record(store, MODEL).seq == seqs["promoted_v1"]
    assert traffic_record(store, MODEL).seq == seqs["canary_v2"]
    assert active_canary(store, MODEL).seq == seqs["canary_v2"]
    record, skipped = newest_authentic(
        store, AuditAction.MODEL_DEPLOYED, model_subject(MODEL, 2), {Decision.PROMOTED}
    )
    assert record is None and skipped == [seqs["promoted_v2"]]
    assert latest_passed_validation(store, SHA).seq == seqs["validated"]
    periods = traffic_history(store, MODEL)
    assert [period["record_seq"] for period in periods] == [
        seqs["promoted_v1"],
        seqs["canary_v2"],
        seqs["canary_v2"],
    ]


def test_audit_show_lists_unreadable_records_marked_not_authentic(
    edited: Log, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["audit", "show", "--url", edited.url]) == 1
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert [line["seq"] for line in lines] == sorted(edited.seqs.values())
    by_seq = {line["seq"]: line for line in lines}
    for step in EDITS:
        line = by_seq[edited.seqs[step]]
        assert line["authentic"] is False and line["unreadable"].startswith("its ")
    assert all(
        "unreadable" not in line and "authentic" not in line
        for seq, line in by_seq.items()
        if seq not in {edited.seqs[s] for s in EDITS}
    )
    assert captured.err.startswith(
        f"modelops: {len(EDITS)} record(s) cannot be read and are not authentic, altered in the database: "
    )
    assert (
        f"seq={edited.seqs['approved_v2']} (its details are a JSON list, not an object ('[1,2]'))"
        in captured.err
    )
    assert captured.err.rstrip().endswith("run `modelops audit verify`")

    # A filter that leaves them out answers as before.
    argv = ["audit", "show", "--url", edited.url, "--subject", model_subject(MODEL, 1)]
    assert cli.main(argv) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_verify_query_and_lineage_name_the_record(edited: Log, capsys: pytest.CaptureFixture[str]) -> None:
    result = edited.store.verify()
    assert (result.attack, result.first_bad_seq) == (Problem.RECORD_ALTERED, edited.seqs["registered_v2"])
    assert cli.main(["audit", "query", "--url", edited.url, "--model", MODEL, "--version", "2"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("audit chain BROKEN: record(s) of the audit log at ")
    assert f"seq={edited.seqs['registered_v2']} (its details are not JSON ('not json{{'))" in out
    assert cli.main(["lineage", f"{MODEL}@2", "--url", edited.url, "--no-registry"]) == 1
    assert "altered in the database; run `modelops audit verify`" in capsys.readouterr().out
    with pytest.raises(AuditChainBroken, match="fails its hash or HMAC check"):
        edited.store.anchor_head(_NoAnchors())


class _NoAnchors:
    """Anchor store that must never be written: the head is not authentic."""

    uri = "memory://nowhere"

    def put(self, anchor: Any) -> bool:
        raise AssertionError("an unreadable head must not be anchored")


def test_audit_show_of_an_untouched_log_exits_0(log: Log, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["audit", "show", "--url", log.url, "--limit", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["seq"] for line in lines] == [len(log.seqs) - 1, len(log.seqs)]
