"""``modelops lineage`` checking evidence stored in S3 (moto's S3 server on loopback): the dataset snapshot,
its data card and the archive manifest are read through fsspec with the environment's credentials, a
tampered or removed file breaks its link, and storage that cannot be reached is named as not checked."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from modelops import cli
from modelops.audit import AuditStore
from modelops.evidence import evidence_summary
from modelops.lineage import Lineage, Link, lineage, render_text
from modelops.stages.outcome import sha256_json
from modelops.vocabulary import AuditAction, Decision, Tag, dataset_subject, model_subject
from tests.conftest import PROJECT_ROOT
from tests.support import free_port, keyring_for_tests, moto_s3_server

BUCKET = "modelops-evidence"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
MODEL = "ctr_recommender"
FILES = {"MLmodel": "4" * 64, "model.skops": "5" * 64}
SNAPSHOT = b"user_age,clicked\n31,1\n45,0\n"


@dataclass
class RemoteLife:
    store: AuditStore
    url: str
    sha256: str
    prefix: str
    """Key prefix of this test's objects in the bucket."""
    keys: dict[str, str] = field(default_factory=dict)
    """snapshot, card, manifest -> object key."""


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with moto_s3_server() as endpoint:
        yield endpoint


def _clear_fs_cache() -> None:
    # fsspec keeps one S3 file system per set of arguments, with the endpoint and credentials it was made
    # with; each test changes them through the environment.
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A boto3 client of the moto server; the environment points fsspec (outside Airflow) at it."""
    import boto3

    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, ",".join(filter(None, [os.environ.get(name), "127.0.0.1"])))
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    # A retry after a refused connection only slows the unreachable case down.
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
    )
    if BUCKET not in {bucket["Name"] for bucket in client.list_buckets()["Buckets"]}:
        client.create_bucket(Bucket=BUCKET)
    _clear_fs_cache()
    yield client
    _clear_fs_cache()


@pytest.fixture
def life(tmp_path: Path, s3: Any, request: pytest.FixtureRequest) -> Iterator[RemoteLife]:
    """An audit log whose validation, registration and retirement records name evidence in S3, as the
    stages write it with ``storage_root: s3://...`` (the archive with a connection id in its URI, as
    ``ObjectStoragePath`` spells one)."""
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    store = AuditStore(url, keyring=keyring_for_tests())
    sha = hashlib.sha256(SNAPSHOT).hexdigest()
    prefix = f"tests/{request.node.name}"
    keys = {
        "snapshot": f"{prefix}/datasets/ctr_events/{sha}/data.csv",
        "card": f"{prefix}/datasets/ctr_events/{sha}/data_card.json",
        "manifest": f"{prefix}/archive/{MODEL}/v2/manifest.json",
    }
    s3.put_object(Bucket=BUCKET, Key=keys["snapshot"], Body=SNAPSHOT)
    card = {"dataset": "ctr_events", "sha256": sha, "row_count": 2}
    s3.put_object(Bucket=BUCKET, Key=keys["card"], Body=json.dumps(card, indent=2).encode())
    archive_uri = f"s3://aws_modelops@{BUCKET}/{prefix}/archive/{MODEL}/v2"
    manifest = {
        "model_name": MODEL,
        "version": "2",
        "archive_uri": archive_uri,
        "files": [{"path": "MLmodel", "sha256": "4" * 64, "bytes": 100}],
    }
    s3.put_object(Bucket=BUCKET, Key=keys["manifest"], Body=json.dumps(manifest, sort_keys=True).encode())
    store.append(
        actor="airflow:modelops_data_validation.validate",
        action=AuditAction.DATASET_VALIDATED,
        subject=dataset_subject(sha),
        decision=Decision.PASSED,
        details={
            "dataset": "ctr_events",
            "uri": f"s3://{BUCKET}/incoming/ctr_events.csv",
            "snapshot_uri": f"s3://{BUCKET}/{keys['snapshot']}",
            "data_card_uri": f"s3://{BUCKET}/{keys['card']}",
            "row_count": 2,
        },
        evidence={"dataset": sha},
    )
    tags = {Tag.TRAIN_DATA_SHA256: sha, Tag.DATASET: "ctr_events"}
    store.append(
        actor="airflow:modelops_training.train",
        action=AuditAction.MODEL_REGISTERED,
        subject=model_subject(MODEL, 2),
        decision=Decision.CANDIDATE,
        details={"run_id": "run-2", "tags": tags, **evidence_summary(FILES)},
        evidence={"dataset": sha, "lineage_tags": sha256_json(tags), "artifacts": sha256_json(FILES)},
    )
    store.append(
        actor="airflow:modelops_retirement.retire",
        action=AuditAction.MODEL_RETIRED,
        subject=model_subject(MODEL, 2),
        decision=Decision.RETIRED,
        details={"reason": "superseded", "archive_uri": archive_uri, "files": 1, "aliases_removed": []},
        evidence={"archive_manifest": sha256_json(manifest)},
    )
    yield RemoteLife(store, url, sha, prefix, keys)
    store.dispose()


def _link(result: Lineage, stage: str) -> Link:
    return next(link for link in result.links if link.stage == stage)


def test_remote_evidence_is_read_and_verifies(life: RemoteLife) -> None:
    result = lineage(life.store, None, MODEL, 2)
    assert result.verifies, [link.problems for link in result.broken]
    dataset, retirement = _link(result, "dataset"), _link(result, "retirement")
    assert "the dataset snapshot hashes to the dataset sha256" in dataset.checks
    assert "the data card names this dataset sha256" in dataset.checks
    assert "the archive manifest matches its evidence digest" in retirement.checks
    assert not any(link.unchecked for link in result.links)
    assert "not checked" not in render_text(result)


def test_a_tampered_snapshot_in_s3_breaks_the_dataset_link(
    life: RemoteLife, s3: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    s3.put_object(Bucket=BUCKET, Key=life.keys["snapshot"], Body=SNAPSHOT.replace(b"45,0", b"45,1"))
    result = lineage(life.store, None, MODEL, 2)
    assert [link.stage for link in result.broken] == ["dataset"]
    (problem,) = _link(result, "dataset").problems
    assert problem == (
        f"the dataset snapshot s3://{BUCKET}/{life.keys['snapshot']} no longer hashes to "
        f"{life.sha256[:12]}... (changed since validation)"
    )
    assert "the data card names this dataset sha256" in _link(result, "dataset").checks

    assert cli.main(["lineage", f"{MODEL}@2", "--url", life.url, "--no-registry"]) == 1
    out = capsys.readouterr().out
    assert (
        out.splitlines()[0].startswith(f"lineage of {MODEL} v2: DOES NOT VERIFY") and "broken: dataset" in out
    )
    assert f"FAILS: {problem}" in out


def test_a_tampered_card_or_manifest_and_a_removed_snapshot_are_named(life: RemoteLife, s3: Any) -> None:
    other = json.dumps({"dataset": "ctr_events", "sha256": "0" * 64}).encode()
    s3.put_object(Bucket=BUCKET, Key=life.keys["card"], Body=other)
    manifest = json.loads(s3.get_object(Bucket=BUCKET, Key=life.keys["manifest"])["Body"].read())
    manifest["files"][0]["sha256"] = "9" * 64  # a model file swapped in the archive, manifest rewritten
    s3.put_object(Bucket=BUCKET, Key=life.keys["manifest"], Body=json.dumps(manifest).encode())
    s3.delete_object(Bucket=BUCKET, Key=life.keys["snapshot"])

    result = lineage(life.store, None, MODEL, 2)
    assert [link.stage for link in result.broken] == ["dataset", "retirement"]
    assert _link(result, "dataset").problems == (
        f"snapshot s3://{BUCKET}/{life.keys['snapshot']} is gone",
        f"the data card s3://{BUCKET}/{life.keys['card']} is not the card of dataset {life.sha256[:12]}... "
        "(unreadable or another dataset's)",
    )
    archive_uri = f"s3://aws_modelops@{BUCKET}/{life.prefix}/archive/{MODEL}/v2"
    assert _link(result, "retirement").problems == (
        f"the archive manifest at {archive_uri} differs from the one retirement recorded",
    )


def test_a_card_that_is_not_text_is_named_not_a_traceback(life: RemoteLife, s3: Any) -> None:
    s3.put_object(Bucket=BUCKET, Key=life.keys["card"], Body=b"\xff\xfe\x00binary")
    (problem,) = _link(lineage(life.store, None, MODEL, 2), "dataset").problems
    assert problem.startswith(f"the data card s3://{BUCKET}/{life.keys['card']} is not the card of dataset")


def test_storage_that_cannot_be_reached_is_not_checked_naming_why(
    life: RemoteLife, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    _clear_fs_cache()
    result = lineage(life.store, None, MODEL, 2)
    assert result.verifies  # nothing was found wrong; what could not be read is listed as not checked
    dataset, retirement = _link(result, "dataset"), _link(result, "retirement")
    snapshot_note, card_note = dataset.unchecked
    assert snapshot_note.startswith(
        f"snapshot s3://{BUCKET}/{life.keys['snapshot']} cannot be read (EndpointConnectionError: "
        "Could not connect to the endpoint URL"
    )
    assert snapshot_note.endswith(
        "check the credentials and endpoint in the environment (AWS_* variables, AWS_ENDPOINT_URL) and the URI"
    )
    assert card_note.startswith(f"data card s3://{BUCKET}/{life.keys['card']} cannot be read (")
    (manifest_note,) = retirement.unchecked
    assert (
        "archive manifest s3://aws_modelops@" in manifest_note and "EndpointConnectionError" in manifest_note
    )
    text = render_text(result)
    assert f"    not checked: {snapshot_note}" in text and "Traceback" not in text


def test_missing_credentials_are_named(
    life: RemoteLife, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    _clear_fs_cache()
    assert cli.main(["lineage", f"{MODEL}@2", "--url", life.url, "--no-registry"]) == 0
    out = capsys.readouterr().out
    assert (
        f"    not checked: snapshot s3://{BUCKET}/{life.keys['snapshot']} cannot be read "
        "(NoCredentialsError: Unable to locate credentials)" in out
    )


def test_the_lineage_command_reads_s3_without_airflow(life: RemoteLife, s3: Any) -> None:
    s3.put_object(Bucket=BUCKET, Key=life.keys["snapshot"], Body=b"tampered\n")
    code = (
        "import sys\n"
        "from modelops import cli\n"
        f"code = cli.main(['lineage', '{MODEL}@2', '--url', {life.url!r}, '--no-registry', '--format', 'json'])\n"
        "print('AIRFLOW_IMPORTED', 'airflow' in sys.modules)\n"
        "sys.exit(code)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "plugins")}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1, done.stderr
    report, _, imported = done.stdout.rpartition("AIRFLOW_IMPORTED")
    assert imported.strip() == "False"
    loaded = json.loads(report)
    assert loaded["broken_links"] == [f"dataset ({AuditAction.DATASET_VALIDATED} {Decision.PASSED} seq=1)"]


def test_the_gate_checks_reader_takes_uris_that_name_a_connection(s3: Any) -> None:
    """``modelops gate check`` reads evidence outside Airflow: ``s3://conn@bucket/key`` (as
    ObjectStoragePath writes it) is the bucket's key, with the environment's credentials."""
    from modelops.evidence_files import FsspecFiles

    s3.put_object(Bucket=BUCKET, Key="evidence/card.md", Body=b"# card\n")
    files = FsspecFiles()
    uri = f"s3://modelops_s3@{BUCKET}/evidence/card.md"
    assert files.exists(uri) and files.read_text(uri) == "# card\n"
    assert files.sha256(uri) == files.sha256(f"s3://{BUCKET}/evidence/card.md")
