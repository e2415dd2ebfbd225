from __future__ import annotations

from pathlib import Path

import pytest

from modelops import settings
from modelops.errors import SettingsError


def test_every_shipped_settings_file_loads() -> None:
    platform = settings.platform_settings()
    assert platform.served_model == settings.model_spec().name
    assert settings.dataset_spec().name == platform.dataset
    assert settings.expectation_suite_path(settings.dataset_spec()).is_file()
    assert settings.compliance_policy().required_tags
    assert settings.monitoring_policy().min_rows > 0
    assert settings.retirement_policy().superseded_for_days >= 0


def test_storage_root_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MODELOPS_HOME", str(tmp_path))
    monkeypatch.delenv("MODELOPS_STORAGE_ROOT", raising=False)
    assert settings.platform_settings().storage_root == f"{tmp_path}/storage"
    monkeypatch.setenv("MODELOPS_STORAGE_ROOT", "s3://bucket/prefix")
    assert settings.platform_settings().storage_root == "s3://bucket/prefix"


def test_unknown_field_names_file_and_field(tmp_path: Path) -> None:
    policy = tmp_path / "compliance.yaml"
    policy.write_text(
        "name: p\nversion: '1'\nrequired_tags: []\nmetric_thresholds: {}\nrequire_validated_datset: true\n"
    )
    with pytest.raises(SettingsError) as info:
        settings.load_model_file(policy, settings.CompliancePolicy)
    message = str(info.value)
    assert str(policy) in message
    assert "require_validated_datset" in message and "unknown field" in message


def test_wrong_type_says_what_was_expected(tmp_path: Path) -> None:
    policy = tmp_path / "monitoring.yaml"
    policy.write_text(
        "min_rows: lots\ndrift_share_warning: 0.2\ndrift_share_critical: 0.5\nout_of_range_share_critical: 0.1\n"
    )
    with pytest.raises(SettingsError, match=r"field 'min_rows': .*integer.*'lots'"):
        settings.load_model_file(policy, settings.MonitoringPolicy)


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="not found"):
        settings.load_model_file(tmp_path / "absent.yaml", settings.RetirementPolicy)
    bad = tmp_path / "bad.yaml"
    bad.write_text("superseded_for_days: [1\n")
    with pytest.raises(SettingsError, match="not valid YAML"):
        settings.load_model_file(bad, settings.RetirementPolicy)


def test_env_reference_without_default_is_an_error() -> None:
    with pytest.raises(SettingsError, match=r"\$\{NOPE_NOT_SET\} is not set"):
        settings.expand_env("${NOPE_NOT_SET}", env={})
    assert settings.expand_env("${A:-${B:-x}}/y", env={"B": "b"}) == "b/y"
