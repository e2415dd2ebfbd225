"""The shared names: subjects, the validation lookup, and that no other module spells a name itself."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path

import pytest

from modelops import vocabulary
from modelops.audit import AuditStore
from modelops.vocabulary import (
    Alias,
    AuditAction,
    ComplianceStatus,
    Decision,
    DeploymentStatus,
    EventField,
    ModelTag,
    RunTag,
    Tag,
    Trigger,
    dataset_location_subject,
    dataset_subject,
    latest_passed_validation,
    model_subject,
    sha256_from_subject,
)
from tests.support import keyring_for_tests

PACKAGE = Path(vocabulary.__file__).resolve().parent
SHA_A1, SHA_A2, SHA_B1, SHA_A3 = ("a1" * 32, "a2" * 32, "b1" * 32, "a3" * 32)

# Tag values that are also plain English words used as ordinary dict keys (a validation record's
# details carry "dataset", a plan entry "trigger"): a literal of these says nothing about tag use.
GENERIC_TAG_VALUES = {Tag.DATASET, Tag.TRIGGER, Tag.TASK, Tag.FRAMEWORK, Tag.ESTIMATOR, Tag.RETIRED}
GUARDED = sorted(
    {str(alias) for alias in Alias}
    | {str(tag) for tag in Tag if tag not in GENERIC_TAG_VALUES}
    | {str(action) for action in AuditAction}
)


# --- subjects ------------------------------------------------------------------------------------


def test_model_subjects() -> None:
    assert model_subject("ctr_recommender") == "model:ctr_recommender"
    assert model_subject("ctr_recommender", 3) == "model:ctr_recommender@3"
    assert model_subject("ctr_recommender", "3") == "model:ctr_recommender@3"


def test_dataset_subjects() -> None:
    sha = "0f" * 32
    assert dataset_subject(sha) == f"dataset:{sha}"
    assert sha256_from_subject(dataset_subject(sha)) == sha
    assert dataset_location_subject("s3://bucket/in/x.csv") == "dataset-uri:s3://bucket/in/x.csv"


@pytest.mark.parametrize(
    "enum",
    [
        Alias,
        Tag,
        ModelTag,
        RunTag,
        ComplianceStatus,
        DeploymentStatus,
        Trigger,
        AuditAction,
        Decision,
        EventField,
    ],
)
def test_names_are_plain_distinct_strings(enum: type[StrEnum]) -> None:
    # A repeated value would silently make two members one (an enum alias), so a typo could hide.
    assert len(enum.__members__) == len({member.value for member in enum})
    for member in enum:
        assert isinstance(member, str) and f"{member}" == member.value == str(member)


def test_model_tags_and_event_fields_agree_where_they_name_the_same_thing() -> None:
    assert EventField.TRAIN_DATA_SHA256 == Tag.TRAIN_DATA_SHA256
    assert EventField.DATASET == Tag.DATASET == ModelTag.DATASET
    assert ModelTag.TASK == Tag.TASK


# --- the newest passing validation ---------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[AuditStore]:
    audit = AuditStore(f"sqlite:///{tmp_path / 'a.db'}", keyring=keyring_for_tests())
    yield audit
    audit.dispose()


def validated(store: AuditStore, sha: str, dataset: str, decision: Decision = Decision.PASSED) -> None:
    store.append(
        actor="test",
        action=AuditAction.DATASET_VALIDATED,
        subject=dataset_subject(sha),
        decision=decision,
        details={"dataset": dataset, "snapshot_uri": f"/snapshots/{dataset}/{sha}/data.csv"},
    )


def test_latest_passed_validation_of_an_empty_log(store: AuditStore) -> None:
    assert latest_passed_validation(store) is None
    assert latest_passed_validation(store, SHA_A1) is None
    assert latest_passed_validation(store, dataset="clicks") is None


def test_latest_passed_validation_filters_by_dataset_and_decision(store: AuditStore) -> None:
    validated(store, SHA_A1, "clicks")
    validated(store, SHA_A2, "clicks")
    validated(store, SHA_B1, "diabetes")  # another dataset, validated later
    validated(store, SHA_A3, "clicks", Decision.FAILED)  # newer, but failed
    store.append(
        actor="test",
        action=AuditAction.MODEL_REGISTERED,  # another action about the same subject
        subject=dataset_subject(SHA_A3),
        decision=Decision.PASSED,
        details={"dataset": "clicks"},
    )
    store.append(
        actor="test",
        action=AuditAction.DATASET_VALIDATED,
        subject=dataset_location_subject("/in/clicks/gone.csv"),
        decision=Decision.UNREADABLE,
        details={"dataset": "clicks"},
    )

    def sha_of(record: object) -> str | None:
        return None if record is None else sha256_from_subject(record.subject)  # type: ignore[attr-defined]

    # The newest passing version of each dataset, never another dataset's.
    assert sha_of(latest_passed_validation(store, dataset="clicks")) == SHA_A2
    assert sha_of(latest_passed_validation(store, dataset="diabetes")) == SHA_B1
    assert latest_passed_validation(store, dataset="no_such_dataset") is None
    # Without a dataset: any dataset's newest passing version.
    assert sha_of(latest_passed_validation(store)) == SHA_B1
    # By hash: only a passing record of that hash, and only as the dataset asked for.
    assert sha_of(latest_passed_validation(store, SHA_A1)) == SHA_A1
    assert sha_of(latest_passed_validation(store, SHA_A1, dataset="clicks")) == SHA_A1
    assert latest_passed_validation(store, SHA_B1, dataset="clicks") is None
    assert latest_passed_validation(store, SHA_A3) is None
    assert latest_passed_validation(store, SHA_A3, dataset="clicks") is None

    record = latest_passed_validation(store, dataset="clicks")
    assert record is not None and record.action == AuditAction.DATASET_VALIDATED
    assert record.decision == Decision.PASSED and record.details["dataset"] == "clicks"

    # A version that passes again later (dropped a second time) becomes the newest.
    validated(store, SHA_A1, "clicks")
    assert sha_of(latest_passed_validation(store, dataset="clicks")) == SHA_A1


# --- nobody else spells the names ----------------------------------------------------------------


def literal_names(path: Path) -> list[tuple[int, str]]:
    """Each string literal in ``path`` that is exactly a guarded name (docstrings and comments aside)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return sorted(
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in GUARDED
    )


def test_the_literal_finder_finds_literals_and_nothing_else(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        '"""Moves the champion alias."""\n'
        "# 'champion' in a comment\n"
        'ALIAS = "champion"\n'
        "tags = {'train_data_sha256': 1, 'train_data_sha256_old': 2}\n"
        'source = f"models:/{name}@champion"\n'
        'text = "the champion serves"\n'
    )
    assert literal_names(sample) == [(3, "champion"), (4, "train_data_sha256")]


def test_no_module_spells_an_alias_tag_key_or_audit_action_itself() -> None:
    """Only vocabulary.py spells them: a typo in a literal would fail silently (MLflow accepts any
    string), a typo in an enum attribute fails on import."""
    assert "champion" in GUARDED and "dataset.validated" in GUARDED and "compliance_status" in GUARDED
    hits = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "vocabulary.py" and path.parent == PACKAGE:
            continue
        hits += [
            f"{path.relative_to(PACKAGE.parent)}:{line}: {value!r}" for line, value in literal_names(path)
        ]
    assert not hits, "use the modelops.vocabulary enums instead of these literals:\n" + "\n".join(hits)
