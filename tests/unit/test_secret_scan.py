"""Credential-like values in params, tags and a model's files, found by detect-secrets."""

from __future__ import annotations

import hashlib
import random
import string
import zipfile
from pathlib import Path

import pytest

from modelops.secret_scan import FileScan, SecretFinding, scan_text_files, scan_values

# Random-looking but fixed (detect-secrets skips the documented AKIAIOSFODNN7EXAMPLE-style examples).
_RANDOM = random.Random(20261127)
AWS_KEY = "AKIA" + "".join(_RANDOM.choice(string.ascii_uppercase + string.digits) for _ in range(16))
PRIVATE_KEY = (
    "-----BEGIN RSA PRIVATE KEY-----\n"
    "MIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun\n"
    "VTLw7onLRnrq0/IzW7yWR7QkrmBL7jTKEn5u+qKhbwKfBstIs+bMY2Zkp18gnTxK\n"
    "-----END RSA PRIVATE KEY-----\n"
)


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def assert_no_value(findings: list[SecretFinding] | FileScan, *values: str) -> None:
    text = repr(findings)
    for value in values:
        assert value not in text
        assert sha256(value) not in text and hashlib.sha1(value.encode()).hexdigest() not in text


def test_an_aws_key_in_a_param_is_found_without_its_value() -> None:
    findings = scan_values({"C": "0.5", "aws_key": AWS_KEY, "max_iter": "1000"}, prefix="param")
    assert SecretFinding("param:aws_key", "AWS Access Key") in findings
    assert {f.where for f in findings} == {"param:aws_key"}
    assert_no_value(findings, AWS_KEY)


@pytest.mark.parametrize(
    ("key", "value", "kind"),
    [
        ("db_password", "hunter2hunter2", "Secret Keyword"),
        ("tracking_uri", "https://svc:Tr0ub4dor3xyz@mlflow.example.com", "Basic Auth Credentials"),
        ("signing_key", PRIVATE_KEY, "Private Key"),
        ("api_token", "9f8e7d6c5b4a39281706f5e4d3c2b1a0ffeeddcc", "Hex High Entropy String"),
        ("notes", "ghp_" + "".join(_RANDOM.choice(string.ascii_letters) for _ in range(36)), "GitHub Token"),
    ],
)
def test_credentials_in_tags(key: str, value: str, kind: str) -> None:
    findings = scan_values({key: value}, prefix="tag")
    assert SecretFinding(f"tag:{key}", kind) in findings
    assert_no_value(findings, value)


def test_legitimate_params_and_tags_raise_no_alarm() -> None:
    tags = {
        "train_data_sha256": sha256("train"),
        "compliance_report_sha256": sha256("report"),
        "model_sha256": sha256("model"),
        "git_commit": hashlib.sha1(b"commit").hexdigest(),
        "mlflow.source.git.commit": hashlib.sha1(b"other").hexdigest(),
        "run_id": "4f1c2d3e5a6b7c8d9e0f1a2b3c4d5e6f",
        "owner": "team-risk@example.com",
        "mlflow.user": "airflow",
        "description": "Logistic regression on the credit data, C=0.5",
    }
    params = {"C": "0.5", "max_iter": "1000", "features": "age,income,debt_ratio", "tokenizer": "bert-base"}
    assert scan_values(tags, prefix="tag") == []
    assert scan_values(params, prefix="param") == []


def test_an_unlabelled_hex_token_is_still_found() -> None:
    # A 40-hex value is only a digest when its key says so.
    findings = scan_values({"service": hashlib.sha1(b"token").hexdigest()}, prefix="tag")
    assert findings == [SecretFinding("tag:service", "Hex High Entropy String")]


def test_a_password_in_a_yaml_config_file(tmp_path: Path) -> None:
    (tmp_path / "conda.yaml").write_text(
        "name: mlflow-env\nchannels:\n- conda-forge\ndependencies:\n- python=3.11.7\n- pip:\n"
        "  - mlflow==3.17.2\nservice:\n  password: Sup3rS3cretPassw0rd\n",
        encoding="utf-8",
    )
    scan = scan_text_files(tmp_path)
    assert scan.findings == (SecretFinding("file:conda.yaml line 9", "Secret Keyword"),)
    assert scan.scanned == ("conda.yaml",) and not scan.clean
    assert_no_value(scan, "Sup3rS3cretPassw0rd")


def test_basic_auth_credentials_in_an_mlmodel_file(tmp_path: Path) -> None:
    (tmp_path / "MLmodel").write_text(
        "artifact_path: model\nflavors:\n  python_function:\n    loader_module: mlflow.sklearn\n"
        "model_uuid: 34acda25a73e4465b6b6a410c68fad43\n"
        "source: https://svc_user:Tr0ub4dor3xyz@mlflow.internal.example.com/artifacts\n",
        encoding="utf-8",
    )
    scan = scan_text_files(tmp_path)
    assert scan.findings == (SecretFinding("file:MLmodel line 6", "Basic Auth Credentials"),)
    assert_no_value(scan, "Tr0ub4dor3xyz")


def test_a_private_key_block_in_a_file(tmp_path: Path) -> None:
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "deploy.pem").write_text(PRIVATE_KEY, encoding="utf-8")
    scan = scan_text_files(tmp_path)
    assert SecretFinding("file:extra/deploy.pem line 1", "Private Key") in scan.findings


def test_binaries_and_big_files_are_skipped_and_said(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "model.skops", "w") as archive:
        archive.writestr("schema.json", f'{{"password": "{AWS_KEY}"}}')
    (tmp_path / "weights.bin").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 password: 'Sup3rS3cret'".encode("latin-1"))
    (tmp_path / "big.json").write_text('{"a": "' + "x" * 2000 + '"}', encoding="utf-8")
    (tmp_path / "link").symlink_to(tmp_path / "big.json")
    scan = scan_text_files(tmp_path, max_bytes=1000)
    assert scan.findings == () and scan.scanned == ()
    reasons = {skipped.path: skipped.reason for skipped in scan.skipped}
    assert set(reasons) == {"model.skops", "weights.bin", "latin1.txt", "big.json", "link"}
    assert "binary" in reasons["model.skops"] and "cap" in reasons["big.json"]
    assert "symbolic link" in reasons["link"]


def test_a_real_mlflow_skops_model_raises_no_alarm(tmp_path: Path) -> None:
    import mlflow.sklearn
    import pandas as pd
    from mlflow.models import infer_signature
    from sklearn.linear_model import LogisticRegression

    X = pd.DataFrame({"age": [30.0, 41.0, 52.0, 63.0], "income": [1.5, 2.5, 3.5, 4.5]})
    model = LogisticRegression().fit(X, [0, 1, 0, 1])
    folder = tmp_path / "model"
    mlflow.sklearn.save_model(
        model,
        str(folder),
        serialization_format=mlflow.sklearn.SERIALIZATION_FORMAT_SKOPS,
        signature=infer_signature(X, model.predict(X)),
        input_example=X.head(2),
    )
    scan = scan_text_files(folder)
    assert scan.findings == ()
    assert {"MLmodel", "requirements.txt", "conda.yaml", "python_env.yaml", "input_example.json"} <= set(
        scan.scanned
    )
    assert [s.path for s in scan.skipped] == ["model.skops"]

    tags = {
        "train_data_sha256": sha256("data"),
        "compliance_report_sha256": sha256("report"),
        "git_commit": hashlib.sha1(b"head").hexdigest(),
        **{f"file_sha256:{path}": sha256(path) for path in scan.scanned},
    }
    params = {name: str(value) for name, value in model.get_params().items()}
    assert scan_values(tags, prefix="tag") == []
    assert scan_values(params, prefix="param") == []


def test_settings_do_not_leak() -> None:
    from detect_secrets.settings import get_settings

    before = get_settings().json()
    scan_values({"aws_key": AWS_KEY}, prefix="param")
    assert get_settings().json() == before
