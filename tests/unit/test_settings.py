"""The settings catalog: every file under include/ loaded through strict models and cross-checked.

Broken catalogs are built by copying the shipped include/ into tmp_path and editing one file, so each
test shows the one mistake it is about and the error that names its file and field.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from modelops import settings
from modelops.errors import SettingsError, UnknownModel
from modelops.settings import TASK_METRICS, Catalog, load_catalog
from modelops.vocabulary import Tag

SHIPPED = settings.PROJECT_ROOT / "include"


@pytest.fixture
def include(tmp_path: Path) -> Path:
    """A private copy of the shipped include/ to break."""
    return Path(shutil.copytree(SHIPPED, tmp_path / "include"))


def edit_yaml(path: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def load_error(root: Path) -> str:
    with pytest.raises(SettingsError) as raised:
        load_catalog(root)
    return str(raised.value)


# --- the shipped catalog -------------------------------------------------------------------------


def test_the_shipped_catalog_loads() -> None:
    catalog = load_catalog()
    assert isinstance(catalog, Catalog)
    assert sorted(catalog.models) == ["ctr_recommender", "diabetes_progression"]
    assert sorted(catalog.datasets) == ["ctr_clicks", "diabetes"]
    assert catalog.platform.default_model in catalog.models

    ctr = catalog.model("ctr_recommender")
    assert (ctr.task, ctr.dataset, ctr.risk_tier) == ("binary_classification", "ctr_clicks", "medium")
    assert ctr.owner and ctr.team and ctr.department and ctr.compliance_labels == ["GDPR"]
    assert ctr.metrics == TASK_METRICS["binary_classification"]
    assert set(ctr.metric_thresholds) <= set(ctr.metrics)
    assert ctr.experiment_name == "modelops/ctr_recommender"

    diabetes = catalog.model("diabetes_progression")
    assert (diabetes.task, diabetes.dataset, diabetes.risk_tier) == ("regression", "diabetes", "high")
    assert diabetes.metrics == TASK_METRICS["regression"] and "holdout_rmse" in diabetes.metrics
    assert set(diabetes.metric_thresholds) <= set(diabetes.metrics)
    assert diabetes.experiment_name == "modelops/diabetes_progression"
    assert diabetes.categorical_features == [] and diabetes.target not in diabetes.features

    assert [spec.name for spec in catalog.models_for_dataset("ctr_clicks")] == ["ctr_recommender"]
    assert [spec.name for spec in catalog.models_for_dataset("diabetes")] == ["diabetes_progression"]
    assert catalog.models_for_dataset("nobody_trains_on_this") == []

    for name in catalog.datasets:
        assert catalog.suite_path(name).is_file()
        assert catalog.suite_path(catalog.dataset(name)) == SHIPPED / "expectations" / f"{name}.json"
        assert catalog.source_of("datasets", name) == SHIPPED / "datasets" / f"{name}.yaml"
    for name in catalog.models:
        assert catalog.source_of("models", name) == SHIPPED / "models" / f"{name}.yaml"


def test_policies_follow_the_risk_tier() -> None:
    catalog = load_catalog()
    medium = catalog.policies_for("ctr_recommender")
    assert (medium.compliance.name, medium.monitoring.name, medium.retirement.name) == (
        "standard",
        "standard",
        "standard",
    )
    high = catalog.policies_for(catalog.model("diabetes_progression"))
    assert (high.compliance.name, high.monitoring.name, high.retirement.name) == (
        "strict",
        "sensitive",
        "long-retention",
    )
    # The stricter tier really is stricter.
    assert high.monitoring.min_rows < medium.monitoring.min_rows
    assert high.retirement.superseded_for_days > medium.retirement.superseded_for_days
    strict = high.compliance.settings_of("metrics").thresholds
    standard = medium.compliance.settings_of("metrics").thresholds
    assert (
        strict["binary_classification"]["holdout_roc_auc"].min
        > standard["binary_classification"]["holdout_roc_auc"].min
    )
    assert high.compliance.approval.required and not medium.compliance.approval.required
    for policy in catalog.compliance_policies.values():
        required = policy.settings_of("tags").required
        assert required and all(isinstance(tag, Tag) for tag in required)
        assert set(policy.settings_of("metrics").thresholds) <= set(TASK_METRICS)


def test_a_model_may_override_one_policy_of_its_tier(include: Path) -> None:
    edit_yaml(
        include / "models" / "ctr_recommender.yaml",
        lambda data: data.update(policies={"monitoring": "sensitive"}),
    )
    policies = load_catalog(include).policies_for("ctr_recommender")
    assert (policies.compliance.name, policies.monitoring.name, policies.retirement.name) == (
        "standard",
        "sensitive",
        "standard",
    )


def test_unknown_model_and_dataset_names_list_the_known_ones() -> None:
    catalog = load_catalog()
    with pytest.raises(UnknownModel) as raised:
        catalog.model("no_such_model")
    message = str(raised.value)
    assert "'no_such_model'" in message and "ctr_recommender" in message and "diabetes_progression" in message
    assert "include/models/no_such_model.yaml" in message
    with pytest.raises(SettingsError) as raised:
        catalog.dataset("no_such_data")
    message = str(raised.value)
    assert "'no_such_data'" in message and "ctr_clicks" in message and "diabetes" in message


def test_the_catalog_loads_from_the_include_dir_in_the_environment(
    include: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (include / "models" / "diabetes_progression.yaml").unlink()
    monkeypatch.setenv("MODELOPS_INCLUDE_DIR", str(include))
    catalog = load_catalog()
    assert catalog.root == include and sorted(catalog.models) == ["ctr_recommender"]
    assert settings.model_names() == ["ctr_recommender"]


def test_names_are_listed_cheaply(include: Path) -> None:
    assert settings.model_names() == ["ctr_recommender", "diabetes_progression"]
    assert settings.dataset_names() == ["ctr_clicks", "diabetes"]
    # The listing does not validate: a file with a name but broken fields is listed (the catalog reports
    # it), one that does not parse is skipped, and one name in two files is listed once.
    (include / "models" / "half.yaml").write_text("name: half_written\nowner: [\n")
    (include / "models" / "broken.yaml").write_text("name: broken\ntask: astrology\n")
    shutil.copy(include / "models" / "ctr_recommender.yaml", include / "models" / "copy.yaml")
    (include / "models" / "notes.txt").write_text("name: not_a_spec\n")
    assert settings.model_names(include) == ["broken", "ctr_recommender", "diabetes_progression"]
    (include / "datasets" / "diabetes.yaml").unlink()
    assert settings.dataset_names(include) == ["ctr_clicks"]
    assert settings.model_names(include / "nowhere") == []


# --- platform settings and the environment -------------------------------------------------------


def test_storage_root_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MODELOPS_HOME", str(tmp_path))
    monkeypatch.delenv("MODELOPS_STORAGE_ROOT", raising=False)
    assert settings.platform_settings().storage_root == f"{tmp_path}/storage"
    assert load_catalog().platform.storage_root == f"{tmp_path}/storage"
    monkeypatch.setenv("MODELOPS_STORAGE_ROOT", "s3://bucket/prefix")
    assert settings.platform_settings().storage_root == "s3://bucket/prefix"
    assert load_catalog().platform.storage_root == "s3://bucket/prefix"


def test_incoming_folders_follow_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MODELOPS_HOME", str(tmp_path))
    monkeypatch.delenv("MODELOPS_INCOMING_ROOT", raising=False)
    assert load_catalog().dataset("diabetes").incoming_uri == f"{tmp_path}/incoming/diabetes"
    monkeypatch.setenv("MODELOPS_INCOMING_ROOT", "s3://bucket/in")
    assert load_catalog().dataset("ctr_clicks").incoming_uri == "s3://bucket/in/ctr_clicks"


def test_default_model_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELOPS_DEFAULT_MODEL", "diabetes_progression")
    assert load_catalog().platform.default_model == "diabetes_progression"
    monkeypatch.setenv("MODELOPS_DEFAULT_MODEL", "nobody")
    with pytest.raises(
        SettingsError, match=r"modelops\.yaml: field 'default_model': model 'nobody' has no spec"
    ):
        load_catalog()


def test_env_reference_without_default_is_an_error() -> None:
    with pytest.raises(SettingsError, match=r"\$\{NOPE_NOT_SET\} is not set"):
        settings.expand_env("${NOPE_NOT_SET}", env={})
    assert settings.expand_env("${A:-${B:-x}}/y", env={"B": "b"}) == "b/y"
    assert settings.expand_env("${A:-${B:-x}}/y", env={}) == "x/y"


# --- one file at a time --------------------------------------------------------------------------


def test_unknown_field_names_file_and_field(tmp_path: Path) -> None:
    policy = tmp_path / "compliance.yaml"
    policy.write_text(
        "name: p\nversion: '1'\nchecks: {metrics: {}}\napproval: {required: false}\nrequire_validated_datset: true\n"
    )
    with pytest.raises(SettingsError) as info:
        settings.load_model_file(policy, settings.CompliancePolicy)
    message = str(info.value)
    assert str(policy) in message
    assert "require_validated_datset" in message and "unknown field" in message


def test_wrong_type_says_what_was_expected(tmp_path: Path) -> None:
    policy = tmp_path / "monitoring.yaml"
    policy.write_text(
        "name: m\nmin_rows: lots\ndrift_share_warning: 0.2\ndrift_share_critical: 0.5\n"
        "out_of_range_share_critical: 0.1\n"
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
    listed = tmp_path / "list.yaml"
    listed.write_text("- name: standard\n")
    with pytest.raises(SettingsError, match="expected a mapping of fields at the top level, got list"):
        settings.load_model_file(listed, settings.RetirementPolicy)


# --- a broken catalog names the file and the field -----------------------------------------------


def test_a_missing_field_of_a_model_spec(include: Path) -> None:
    spec = edit_yaml(include / "models" / "diabetes_progression.yaml", lambda data: data.pop("owner"))
    message = load_error(include)
    assert str(spec) in message and "field 'owner': required field is missing" in message


def test_a_wrong_type_in_a_model_spec(include: Path) -> None:
    spec = edit_yaml(
        include / "models" / "ctr_recommender.yaml", lambda data: data.update(random_seed="lots")
    )
    message = load_error(include)
    assert str(spec) in message
    assert "field 'random_seed'" in message and "integer" in message and "'lots'" in message


def test_an_unknown_task_kind(include: Path) -> None:
    spec = edit_yaml(include / "models" / "ctr_recommender.yaml", lambda data: data.update(task="ranking"))
    message = load_error(include)
    assert str(spec) in message and "field 'task'" in message
    assert "'binary_classification'" in message and "'regression'" in message and "'ranking'" in message


def test_a_model_naming_a_dataset_that_does_not_exist(include: Path) -> None:
    spec = edit_yaml(
        include / "models" / "diabetes_progression.yaml", lambda data: data.update(dataset="diabetis")
    )
    message = load_error(include)
    assert f"{spec}: field 'dataset': dataset 'diabetis' does not exist" in message
    assert "['ctr_clicks', 'diabetes']" in message


def test_a_model_naming_a_risk_tier_that_does_not_exist(include: Path) -> None:
    spec = edit_yaml(
        include / "models" / "ctr_recommender.yaml", lambda data: data.update(risk_tier="extreme")
    )
    message = load_error(include)
    assert f"{spec}: field 'risk_tier': risk tier 'extreme' does not exist" in message
    assert "['high', 'low', 'medium']" in message and "risk_tiers.yaml" in message


def test_a_policy_override_that_does_not_exist(include: Path) -> None:
    spec = edit_yaml(
        include / "models" / "ctr_recommender.yaml",
        lambda data: data.update(policies={"retirement": "forever"}),
    )
    message = load_error(include)
    assert f"{spec}: field 'policies.retirement': retirement policy 'forever' does not exist" in message
    assert "['long-retention', 'standard']" in message


def test_a_tier_naming_a_policy_that_does_not_exist(include: Path) -> None:
    tiers = edit_yaml(
        include / "policies" / "risk_tiers.yaml", lambda data: data["tiers"]["low"].update(monitoring="lax")
    )
    message = load_error(include)
    assert f"{tiers}: field 'tiers.low.monitoring': monitoring policy 'lax' does not exist" in message


def test_a_metric_the_task_kind_does_not_log(include: Path) -> None:
    spec = edit_yaml(
        include / "models" / "diabetes_progression.yaml",
        lambda data: data["metric_thresholds"].update(holdout_roc_auc={"min": 0.7}),
    )
    message = load_error(include)
    assert str(spec) in message and "metric_thresholds" in message and "'holdout_roc_auc'" in message
    assert "regression" in message and "holdout_rmse" in message


def test_a_compliance_policy_metric_the_task_kind_does_not_log(include: Path) -> None:
    policy = edit_yaml(
        include / "policies" / "compliance" / "strict.yaml",
        lambda data: data["checks"]["metrics"]["thresholds"]["regression"].update(
            holdout_accuracy={"min": 0.9}
        ),
    )
    message = load_error(include)
    assert str(policy) in message and "thresholds.regression" in message
    assert "'holdout_accuracy'" in message


def test_a_threshold_without_a_bound(include: Path) -> None:
    spec = edit_yaml(
        include / "models" / "ctr_recommender.yaml",
        lambda data: data["metric_thresholds"].update(holdout_accuracy={}),
    )
    message = load_error(include)
    assert str(spec) in message and "metric_thresholds.holdout_accuracy" in message
    assert "give at least one of min, max" in message


@pytest.mark.parametrize(
    ("folder", "original"),
    [
        ("models", "ctr_recommender.yaml"),
        ("datasets", "diabetes.yaml"),
        ("policies/compliance", "standard.yaml"),
        ("policies/monitoring", "sensitive.yaml"),
    ],
)
def test_two_files_claiming_one_name(include: Path, folder: str, original: str) -> None:
    shutil.copy(include / folder / original, include / folder / f"zz_{original}")
    message = load_error(include)
    assert f"{include / folder / f'zz_{original}'}: field 'name'" in message
    assert f"is already declared in {include / folder / original}" in message


def test_a_dataset_whose_suite_file_is_missing(include: Path) -> None:
    (include / "expectations" / "diabetes.json").unlink()
    message = load_error(include)
    assert f"{include / 'datasets' / 'diabetes.yaml'}: field 'expectation_suite'" in message
    assert str(include / "expectations" / "diabetes.json") in message and "does not exist" in message


def test_a_default_model_without_a_spec(include: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MODELOPS_DEFAULT_MODEL", raising=False)
    (include / "models" / "ctr_recommender.yaml").unlink()
    message = load_error(include)
    assert (
        f"{include / 'modelops.yaml'}: field 'default_model': model 'ctr_recommender' has no spec" in message
    )
    assert "['diabetes_progression']" in message


def test_a_required_tag_that_is_not_a_known_tag(include: Path) -> None:
    policy = edit_yaml(
        include / "policies" / "compliance" / "standard.yaml",
        lambda data: data["checks"]["tags"]["required"].append("trian_data_sha256"),
    )
    message = load_error(include)
    assert str(policy) in message and "settings of check 'tags': required." in message
    assert "'trian_data_sha256'" in message and "'train_data_sha256'" in message


def test_a_dataset_with_a_bad_pii_regex(include: Path) -> None:
    spec = edit_yaml(
        include / "datasets" / "ctr_clicks.yaml",
        lambda data: data["pii_patterns"].append({"name": "broken", "regex": "[unclosed"}),
    )
    message = load_error(include)
    assert str(spec) in message and "field 'pii_patterns.3.regex'" in message
    assert "not a valid regular expression" in message


def test_a_name_that_is_unsafe_in_a_path(include: Path) -> None:
    spec = edit_yaml(include / "models" / "ctr_recommender.yaml", lambda data: data.update(name="../ctr"))
    message = load_error(include)
    assert str(spec) in message and "field 'name'" in message and "'../ctr'" in message


# --- which dataset a dropped file belongs to -----------------------------------------------------


def test_dataset_for_location_finds_the_incoming_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODELOPS_INCOMING_ROOT", str(tmp_path / "incoming"))
    catalog = load_catalog()
    dropped = tmp_path / "incoming" / "diabetes" / "2026-01.csv"
    assert catalog.dataset_for_location(str(dropped)).name == "diabetes"
    assert catalog.dataset_for_location(dropped.as_uri()).name == "diabetes"
    assert (
        catalog.dataset_for_location(str(tmp_path / "incoming" / "ctr_clicks" / "a.csv")).name == "ctr_clicks"
    )
    # Relative paths and ".." resolve before they are compared.
    relative = tmp_path / "incoming" / "ctr_clicks" / "sub" / ".." / "b.csv"
    assert catalog.dataset_for_location(str(relative)).name == "ctr_clicks"


def test_dataset_for_location_refuses_a_file_elsewhere_naming_the_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODELOPS_INCOMING_ROOT", str(tmp_path / "incoming"))
    catalog = load_catalog()
    for elsewhere in (
        tmp_path / "downloads" / "diabetes.csv",
        # A sibling folder whose name merely starts with a dataset's folder name is not that folder.
        tmp_path / "incoming" / "diabetes_old" / "x.csv",
        tmp_path / "incoming" / "x.csv",
    ):
        with pytest.raises(SettingsError) as raised:
            catalog.dataset_for_location(str(elsewhere))
        message = str(raised.value)
        assert str(elsewhere) in message and "in no dataset's incoming folder" in message
        assert str(tmp_path / "incoming" / "diabetes") in message
        assert str(tmp_path / "incoming" / "ctr_clicks") in message
        assert "'dataset' field" in message


def test_dataset_for_location_on_object_storage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELOPS_INCOMING_ROOT", "s3://bucket/in")
    catalog = load_catalog()
    assert catalog.dataset_for_location("s3://bucket/in/diabetes/2026.csv").name == "diabetes"
    with pytest.raises(SettingsError, match="s3://bucket/in/ctr_clicks"):
        catalog.dataset_for_location("s3://other/in/diabetes/2026.csv")
