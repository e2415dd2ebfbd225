"""``modelops audit query`` and its Python API over a real SQLite audit log and prediction log."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from modelops import cli
from modelops.audit.query import (
    PREDICTION_COLUMNS,
    QueryError,
    query_predictions,
    query_records,
    render_predictions,
    render_records,
)
from modelops.serving.prediction_log import PredictionLog, PredictionRecord
from modelops.vocabulary import AuditAction, Decision, dataset_subject, model_subject
from tests.lifecycle_records import BATCH_CALLER, CALLER, MODEL, OTHER_MODEL, Lifecycle, build_lifecycle

SECRET_INPUT = "user-email-ada@example.org"
SECRET_OUTPUT = 0.8765432
T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def life(tmp_path_factory: pytest.TempPathFactory) -> Lifecycle:
    life = build_lifecycle(tmp_path_factory.mktemp("query"))
    yield life
    life.store.dispose()


@pytest.fixture(scope="module")
def predictions_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('predictions') / 'predictions.db'}"
    log = PredictionLog(url)
    calls = [
        ("r1", 0, CALLER, "1", "champion", 200),
        ("r2", 10, CALLER, "2", "challenger", 200),
        ("r3", 20, "ads:ads-9f", "1", "champion", 500),
        ("r4", 30, CALLER, "2", "champion", 200),
    ]
    for request_id, minutes, caller, version, arm, status in calls:
        log.record(
            PredictionRecord(
                request_id=request_id,
                received_at=T0 + timedelta(minutes=minutes),
                caller_id=caller,
                model_name=MODEL,
                model_version=version,
                status_code=status,
                latency_ms=3.5,
                n_rows=2,
                inputs=[{"email": SECRET_INPUT, "user_age": 31}, {"email": SECRET_INPUT, "user_age": 45}],
                outputs=[SECRET_OUTPUT, SECRET_OUTPUT],
                arm=arm,
            )
        )
    log.record(PredictionRecord("o1", T0, CALLER, OTHER_MODEL, "1", 200, 1.0, 1, [{"bmi": 22.1}], [140.0]))
    log.dispose()
    return url


def _seqs(matches) -> list[int]:
    return [match.seq for match in matches]


# --- the Python API ------------------------------------------------------------------------------------


def test_model_and_version_select_by_subject(life: Lifecycle) -> None:
    v2 = query_records(life.store, model=MODEL, version="2")
    assert v2 and {match.subject for match in v2} == {model_subject(MODEL, 2)}
    assert all(match.authentic for match in v2)
    every = query_records(life.store, model=MODEL)
    assert {match.subject for match in every} == {model_subject(MODEL, 1), model_subject(MODEL, 2)}
    assert _seqs(every) == sorted(_seqs(every))  # oldest first
    assert life.seqs["other"] not in _seqs(every)


def test_dataset_hash_finds_its_validation_and_the_models_trained_on_it(life: Lifecycle) -> None:
    found = query_records(life.store, dataset_sha256=life.dataset_sha256.upper())
    seqs = set(_seqs(found))
    assert {life.seqs[step] for step in ("validated", "registered_v1", "registered_v2", "gate_v1")} <= seqs
    assert life.seqs["drift_v2"] in seqs  # monitoring compared with it (reference_dataset evidence)
    assert life.seqs["other"] not in seqs  # another dataset
    assert found[0].subject == dataset_subject(life.dataset_sha256)


def test_caller_dag_run_action_and_time(life: Lifecycle) -> None:
    by_caller = query_records(life.store, caller_id=CALLER)
    assert _seqs(by_caller) == [life.seqs["drift_v2"]]  # the drift record's per-caller drift names it
    assert _seqs(query_records(life.store, caller_id=BATCH_CALLER)) == [life.seqs["batch_v2"]]

    run = query_records(
        life.store, dag_id="modelops_compliance_gate", run_id="manual__2026-11-05T09:00:00+00:00"
    )
    assert _seqs(run) == [life.seqs["awaiting_v2"], life.seqs["gate_v2"]]
    assert len(query_records(life.store, dag_id="modelops_compliance_gate")) == 3

    gates = query_records(life.store, action=AuditAction.GATE_DECIDED, model=MODEL, version="2")
    assert [match.decision for match in gates] == [Decision.AWAITING_APPROVAL, Decision.APPROVED]

    records = life.store.records()
    middle = records[len(records) // 2].recorded_at
    before = query_records(life.store, until=middle)
    after = query_records(life.store, since=middle)
    assert len(before) + len(after) == len(records)  # since inclusive, until exclusive
    assert after[0].recorded_at == middle
    assert query_records(life.store, since=datetime.now(UTC) + timedelta(days=1)) == []


def test_bad_questions_name_the_fix(life: Lifecycle) -> None:
    with pytest.raises(QueryError, match="needs its model"):
        query_records(life.store, version="2")
    with pytest.raises(QueryError, match="not an ISO 8601 time"):
        query_records(life.store, since="last tuesday")
    with pytest.raises(QueryError, match="not after since"):
        query_records(life.store, since="2026-11-02", until="2026-11-01")
    with pytest.raises(QueryError, match="unknown format"):
        render_records([], "xml")


def test_formats_parse_back(life: Lifecycle) -> None:
    matches = query_records(life.store, model=MODEL, version="1")
    table = render_records(matches, "table").splitlines()
    assert table[0].split()[:3] == ["seq", "recorded_at", "action"] and len(table) == len(matches) + 1
    rows = list(csv.DictReader(io.StringIO(render_records(matches, "csv"))))
    assert [int(row["seq"]) for row in rows] == _seqs(matches)
    assert {row["authentic"] for row in rows} == {"yes"}
    assert json.loads(rows[0]["details"]) == matches[0].details
    loaded = json.loads(render_records(matches, "json"))
    assert [item["seq"] for item in loaded] == _seqs(matches)
    assert loaded[0]["record_hash"] == matches[0].record_hash and loaded[0]["authentic"] is True
    assert render_records([], "table") == "no matching records"


def test_predictions_never_show_inputs_or_outputs(predictions_url: str) -> None:
    log = PredictionLog(predictions_url)
    try:
        calls = query_predictions(log, model=MODEL)
        assert [call.request_id for call in calls] == ["r1", "r2", "r3", "r4"]
        assert [
            call.request_id for call in query_predictions(log, caller_id=CALLER, model=MODEL, version="2")
        ] == [
            "r2",
            "r4",
        ]
        window = query_predictions(log, since=T0 + timedelta(minutes=10), until=T0 + timedelta(minutes=30))
        assert [call.request_id for call in window] == ["r2", "r3"]
        assert [call.request_id for call in query_predictions(log, caller_id=CALLER, limit=2)] == ["r2", "r4"]
        first = calls[0]
        assert (first.arm, first.status, first.n_rows, first.version) == ("champion", 200, 2, "1")
        assert set(first.to_dict()) == set(PREDICTION_COLUMNS)
        for fmt in ("table", "json", "csv"):
            text = render_predictions(calls, fmt)
            assert SECRET_INPUT not in text and str(SECRET_OUTPUT) not in text and "user_age" not in text
        assert [
            row["request_id"] for row in csv.DictReader(io.StringIO(render_predictions(calls, "csv")))
        ] == [
            "r1",
            "r2",
            "r3",
            "r4",
        ]
        assert json.loads(render_predictions(calls, "json"))[2]["status"] == 500
    finally:
        log.dispose()


# --- the command -----------------------------------------------------------------------------------------


def test_cli_query_formats(life: Lifecycle, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["audit", "query", "--url", life.url, "--model", MODEL, "--version", "2"]
    assert cli.main([*argv, "--format", "json"]) == 0
    loaded = json.loads(capsys.readouterr().out)
    assert {item["subject"] for item in loaded} == {model_subject(MODEL, 2)}
    assert cli.main([*argv, "--action", "gate.decided", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [row["decision"] for row in rows] == ["awaiting_approval", "approved"]
    assert cli.main(["audit", "query", "--url", life.url, "--dag-run", "modelops_retirement"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and "model.retired" in out[1]
    assert (
        cli.main(["audit", "query", "--url", life.url, "--dataset", life.dataset_sha256, "--limit", "1"]) == 0
    )
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert cli.main(["audit", "query", "--url", life.url, "--version", "2"]) == 2
    assert "needs its model" in capsys.readouterr().err


def test_cli_query_predictions(
    predictions_url: str, life: Lifecycle, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["audit", "query", "--predictions", "--predictions-url", predictions_url, "--caller", CALLER]
    assert cli.main([*argv, "--model", MODEL, "--format", "csv"]) == 0
    out = capsys.readouterr().out
    assert [row["request_id"] for row in csv.DictReader(io.StringIO(out))] == ["r1", "r2", "r4"]
    assert SECRET_INPUT not in out
    assert cli.main([*argv, "--since", "2026-11-20T12:05:00Z"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == list(PREDICTION_COLUMNS) and len(table) == 3
    assert cli.main([*argv, "--dataset", life.dataset_sha256]) == 2
    assert "--dataset filter audit records, not scoring calls" in capsys.readouterr().err
    missing = f"sqlite:///{Path(predictions_url.removeprefix('sqlite:///')).parent / 'nope.db'}"
    assert cli.main(["audit", "query", "--predictions", "--predictions-url", missing]) == 2
    assert "no prediction log database" in capsys.readouterr().err


def test_an_altered_record_is_listed_as_not_authentic(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    life = build_lifecycle(tmp_path)
    seq = life.seqs["gate_v2"]
    engine = sa.create_engine(life.url)
    with engine.begin() as conn:  # an attacker with database access: plain SQL
        details = json.loads(
            conn.execute(sa.text(f"SELECT details FROM modelops_audit_log WHERE seq={seq}")).scalar()
        )
        details["approval"]["by"] = "intern"
        conn.execute(
            sa.text("UPDATE modelops_audit_log SET details = :d WHERE seq = :s"),
            {"d": json.dumps(details), "s": seq},
        )
    engine.dispose()
    found = {match.seq: match for match in query_records(life.store, model=MODEL, version="2")}
    assert found[seq].authentic is False and found[seq].details["approval"]["by"] == "intern"
    assert all(match.authentic for s, match in found.items() if s != seq)
    assert cli.main(["audit", "query", "--url", life.url, "--model", MODEL, "--version", "2"]) == 1
    captured = capsys.readouterr()
    assert f"seq={seq}" in captured.err and "altered or forged" in captured.err
    line = next(row for row in captured.out.splitlines() if row.startswith(f"{seq} "))
    assert line.rstrip().endswith("NO")
    life.store.dispose()
