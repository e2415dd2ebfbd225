"""``modelops lineage MODEL@VERSION`` over a real SQLite audit log filled with the records the stages write."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import sqlalchemy as sa

from modelops import cli
from modelops.errors import RegistryError
from modelops.lineage import LineageError, lineage, parse_model_version, render_text
from modelops.vocabulary import AuditAction, Decision, model_subject
from tests.conftest import PROJECT_ROOT
from tests.lifecycle_records import APPROVER, MODEL, Lifecycle, build_lifecycle


@pytest.fixture
def life(tmp_path: Path) -> Lifecycle:
    life = build_lifecycle(tmp_path)
    yield life
    life.store.dispose()


def _sql(url: str, statement: str, **params: object) -> object:
    """Tamper the way an attacker with database access would: plain SQL, outside AuditStore."""
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        result = conn.execute(sa.text(statement), params)
        value = result.scalar() if result.returns_rows else None
    engine.dispose()
    return value


class _Registry:
    """The registry's answer for one version (what lineage reads of a ModelRegistry)."""

    def __init__(self, tags: dict[str, str], run_id: str = "run-2") -> None:
        self.found = SimpleNamespace(
            run_id=run_id, source="models:/m-123", tags=tags, aliases=("champion",), version="2"
        )

    def version(self, name: str, version: str | int) -> SimpleNamespace:
        if str(version) != "2":
            raise RegistryError(f"{name} has no version {version}")
        return self.found


def _registered_tags(life: Lifecycle) -> dict[str, str]:
    return dict(life.store.records(action="model.registered", subject=f"model:{MODEL}@2")[0].details["tags"])


def test_lineage_verifies_end_to_end(life: Lifecycle) -> None:
    result = lineage(life.store, _Registry(_registered_tags(life)), MODEL, 2)
    assert result.verifies, [link.problems for link in result.broken]
    assert result.dataset_sha256 == life.dataset_sha256
    stages = [link.stage for link in result.links]
    assert stages == [
        "dataset",
        "training",
        "registry",
        "gate",
        "gate",
        "traffic",
        "traffic",
        "deployment",
        "traffic",
        "monitoring",
        "alert",
        "deployment",
        "rollback",
        "retirement",
    ]
    dataset, training, registry = result.links[:3]
    assert dataset.uris["data_card_uri"] == str(life.data_card)
    assert "the dataset snapshot hashes to the dataset sha256" in dataset.checks
    assert "the data card names this dataset sha256" in dataset.checks
    assert training.evidence["dataset"] == life.dataset_sha256 and training.record_hash
    assert "its lineage tags are those training recorded" in registry.checks
    gate = result.links[4]
    assert gate.decision == "approved" and f"approved by {APPROVER}" in gate.summary
    assert "the files the gate decided on are those training registered" in gate.checks
    assert "the archive manifest matches its evidence digest" in result.links[-1].checks
    assert all(
        any("in place in the chain" in check for check in link.checks) for link in result.links if link.seq
    )

    moves = [(move.alias, move.change, move.to) for move in result.alias_moves]
    assert moves == [
        ("candidate", "set", None),
        ("challenger", "set", None),
        ("challenger", "set", None),
        ("champion", "set", None),
        ("challenger", "removed", None),
        ("champion", "removed", "1"),
    ]
    assert f"approved by {APPROVER}" in result.alias_moves[1].by
    assert [(period["arm"], period["share"]) for period in result.traffic] == [
        ("challenger", 0.5),
        ("champion", 1.0),
    ]

    text = render_text(result)
    assert text.startswith(f"lineage of {MODEL} v2: VERIFIES")
    assert "champion removed (to v1) by airflow:modelops_monitoring.roll_back" in text
    loaded = json.loads(json.dumps(result.to_dict()))
    assert loaded["verifies"] is True and loaded["broken_links"] == []


def test_the_earlier_version_shows_where_the_champion_went_and_came_back(life: Lifecycle) -> None:
    result = lineage(life.store, None, MODEL, "1")
    assert result.verifies
    moves = [(move.alias, move.change, move.to, move.seq) for move in result.alias_moves]
    assert ("champion", "set", None, life.seqs["promoted_v1"]) in moves
    assert ("champion", "removed", "2", life.seqs["promoted_v2"]) in moves
    assert ("previous_champion", "set", None, life.seqs["promoted_v2"]) in moves
    assert ("champion", "set", None, life.seqs["rollback_v2"]) in moves
    assert life.seqs["retired_v2"] not in [link.seq for link in result.links]  # v2's retirement is v2's


def test_a_gate_take_up_is_a_gate_link_naming_its_run(life: Lifecycle) -> None:
    """The record by which one gate run took the version up reads as the gate's, with the runs it names."""
    life.store.append(
        actor="airflow:modelops_compliance_gate.plan_gate",
        action=AuditAction.GATE_TAKEN_UP,
        subject=model_subject(MODEL, 2),
        decision=Decision.TAKEN_UP,
        details={"after_run": "manual__earlier"},
        dag_id="modelops_compliance_gate",
        run_id="manual__again",
        task_id="plan_gate",
    )
    result = lineage(life.store, _Registry(_registered_tags(life)), MODEL, 2)
    (link,) = [link for link in result.links if link.action == AuditAction.GATE_TAKEN_UP]
    assert (link.stage, link.decision) == ("gate", Decision.TAKEN_UP) and link.verifies
    assert link.summary == "taken up for evaluation by run manual__again, after run manual__earlier"
    assert "[ok] gate: " in render_text(result) and "[ok] other: " not in render_text(result)


def test_an_altered_gate_record_is_named_as_not_verifying(
    life: Lifecycle, capsys: pytest.CaptureFixture[str]
) -> None:
    seq = life.seqs["gate_v2"]
    details = json.loads(_sql(life.url, "SELECT details FROM modelops_audit_log WHERE seq = :s", s=seq))
    details["approval"]["by"] = "intern"  # who approved, rewritten in the database
    _sql(life.url, "UPDATE modelops_audit_log SET details = :d WHERE seq = :s", d=json.dumps(details), s=seq)

    result = lineage(life.store, None, MODEL, "2")
    assert not result.verifies
    assert [link.name for link in result.broken] == [f"gate (gate.decided approved seq={seq})"]
    problems = result.broken[0].problems
    assert any(f"seq={seq} fails its hash or HMAC check" in problem for problem in problems)
    assert any("approval" in problem for problem in problems)  # its own digest no longer matches either
    assert next(move for move in result.alias_moves if move.seq == seq).authentic is False

    assert cli.main(["lineage", f"{MODEL}@2", "--url", life.url, "--no-registry"]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith(f"; broken: gate (gate.decided approved seq={seq}))")
    assert "DOES NOT VERIFY" in out.splitlines()[0]
    assert "[NOT VERIFIED] gate" in out


def test_a_deleted_record_and_a_changed_snapshot_break_their_links(life: Lifecycle) -> None:
    _sql(life.url, "DELETE FROM modelops_audit_log WHERE seq = :s", s=life.seqs["pending_v2"])
    life.snapshot.write_text("user_age,clicked\n31,1\n45,1\n")
    result = lineage(life.store, None, MODEL, "2")
    broken = {link.seq: link for link in result.broken}
    assert set(broken) == {life.seqs["validated"], life.seqs["canary_v2"], life.seqs["promoted_v2"]}
    assert any("no longer hashes" in problem for problem in broken[life.seqs["validated"]].problems)
    assert any("is missing (deleted)" in problem for problem in broken[life.seqs["canary_v2"]].problems)
    assert any("does not follow" in problem for problem in broken[life.seqs["promoted_v2"]].problems)


def test_registry_tags_changed_since_training_break_the_registry_link(life: Lifecycle) -> None:
    tags = {**_registered_tags(life), "train_data_sha256": "0" * 64}
    result = lineage(life.store, _Registry(tags), MODEL, "2")
    assert [link.stage for link in result.broken] == ["registry"]
    assert "train_data_sha256" in result.broken[0].problems[0]


def test_unknown_versions_and_bad_names(life: Lifecycle, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(LineageError, match="no record of ctr_recommender v9"):
        lineage(life.store, None, MODEL, "9")
    assert parse_model_version("model:ctr_recommender@3") == ("ctr_recommender", "3")
    with pytest.raises(LineageError, match="MODEL@VERSION"):
        parse_model_version("ctr_recommender")
    assert cli.main(["lineage", f"{MODEL}@9", "--url", life.url, "--no-registry"]) == 2
    assert "no record of" in capsys.readouterr().err


def test_cli_lineage_json_in_a_subprocess(life: Lifecycle) -> None:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "plugins")}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "modelops.cli",
            "lineage",
            f"{MODEL}@2",
            "--url",
            life.url,
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout)
    assert loaded["verifies"] is True and loaded["dataset_sha256"] == life.dataset_sha256
    assert [link["stage"] for link in loaded["links"]][:2] == ["dataset", "training"]


def test_details_edited_into_no_json_object_are_refused_naming_the_fix(
    life: Lifecycle, capsys: pytest.CaptureFixture[str]
) -> None:
    _sql(
        life.url, "UPDATE modelops_audit_log SET details = 'approved!' WHERE seq = :s", s=life.seqs["gate_v2"]
    )
    assert cli.main(["lineage", f"{MODEL}@2", "--url", life.url, "--no-registry"]) == 1
    assert "altered in the database; run `modelops audit verify`" in capsys.readouterr().out
    _sql(life.url, "UPDATE modelops_audit_log SET details = '[]' WHERE seq = :s", s=life.seqs["gate_v2"])
    assert cli.main(["audit", "query", "--url", life.url, "--model", MODEL]) == 1
    assert "audit chain BROKEN" in capsys.readouterr().out
