"""The compliance gate's checks, each a function registered by name with the settings it takes.

A compliance policy (``include/policies/compliance/``) lists the checks it runs by name, each with its
settings; a name no check is registered under, or a setting the check does not take, fails when the
policy loads. Adding a check is writing one function here::

    class MyCheckSettings(StrictModel):
        limit: int = 3

    @register_check("my_check", MyCheckSettings, proves="what passing it proves, in one line")
    def my_check(inputs: GateInputs, settings: MyCheckSettings) -> CheckResult: ...

Every check returns one :class:`CheckResult` (name, passed, detail, evidence references, and one line
per item it found wrong); the gate runs every check the policy lists and reports every failure. A check
reads lineage and metrics from the training stage's authentic registration record (``inputs.tags``,
``inputs.metrics``), never from registry tags anyone with an MLflow client can set. A check raises only
for a fault no decision should be made on (the registry down): the task fails and Airflow retries it.

Imports nothing of Airflow: the CLI (``modelops gate check``) runs the same checks outside it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from modelops.errors import DatasetError
from modelops.evidence import (
    CHAMPION_FIELD,
    EvidenceMismatch,
    champion_record,
    check_files,
    hash_tree,
    recorded_files,
)
from modelops.settings import TASK_METRICS, MetricThreshold, StrictModel, TaskKind
from modelops.vocabulary import (
    AuditAction,
    Decision,
    ModelTag,
    Tag,
    dataset_subject,
    latest_passed_validation,
)

if TYPE_CHECKING:
    import pandas as pd

    from modelops.audit import AuditRecord, AuditStore
    from modelops.registry import ModelRegistry
    from modelops.settings import Catalog, CompliancePolicy, ModelSpec

MODEL_CARD_FILE = "model_card.md"


# --- what a check returns, and what it is given ------------------------------------------------------


@dataclass(frozen=True)
class CheckResult:
    """One check's verdict: readable (``detail``, ``findings``) and traceable (``evidence``)."""

    name: str
    passed: bool
    detail: str
    evidence: dict[str, str] = field(default_factory=dict)
    """References a reader can follow: audit record seqs, file paths and hashes, versions."""
    findings: tuple[str, ...] = ()
    """One line per item the check found wrong (or, where useful, looked at)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "passed": self.passed,
            "detail": self.detail,
            "evidence": dict(self.evidence),
            "findings": list(self.findings),
        }


class EvidenceFiles(Protocol):
    """Reads the files audit records point at (snapshots, data cards): local or ``s3://``.

    Inside Airflow this is ``ObjectStoragePath`` with the platform's connection; the CLI uses fsspec.
    """

    def exists(self, uri: str) -> bool: ...

    def read_text(self, uri: str) -> str: ...

    def read_table(self, uri: str) -> pd.DataFrame: ...

    def sha256(self, uri: str) -> str: ...


@dataclass
class GateInputs:
    """Everything a check may look at for one version."""

    spec: ModelSpec
    policy: CompliancePolicy
    catalog: Catalog
    registry: ModelRegistry
    audit: AuditStore
    files: EvidenceFiles
    version: str
    run_id: str | None
    registration: AuditRecord | None
    """The training stage's authentic registration record; None when there is none (provenance fails)."""
    tags: dict[str, str]
    metrics: dict[str, float]
    model_dir: Path | None
    """The version's downloaded files (never loaded); None when they cannot be downloaded."""


S = TypeVar("S", bound=BaseModel)
CheckFunction = Callable[[GateInputs, Any], CheckResult]


@dataclass(frozen=True)
class RegisteredCheck:
    name: str
    settings: type[BaseModel]
    run: CheckFunction
    proves: str
    needs_files: bool = False
    """The check reads the version's downloaded files: without them it fails without running."""


CHECKS: dict[str, RegisteredCheck] = {}


def register_check(
    name: str, settings: type[S], *, proves: str, needs_files: bool = False
) -> Callable[[CheckFunction], CheckFunction]:
    """Register ``function`` as the check ``name``; policies name it and configure it with ``settings``."""

    def register(function: CheckFunction) -> CheckFunction:
        if name in CHECKS:
            raise ValueError(
                f"a check named {name!r} is already registered ({CHECKS[name].run.__qualname__})"
            )
        CHECKS[name] = RegisteredCheck(name, settings, function, proves, needs_files)
        return function

    return register


def parse_check_settings(raw: dict[str, Any]) -> dict[str, BaseModel]:
    """A policy's ``checks`` mapping with each entry validated by its check's settings model."""
    parsed: dict[str, BaseModel] = {}
    for name, values in raw.items():
        if name not in CHECKS:
            raise ValueError(
                f"checks names {name!r}, which is no registered check; registered checks: {sorted(CHECKS)} "
                "(fix the spelling, or register the check in modelops.checks)"
            )
        try:
            parsed[name] = CHECKS[name].settings.model_validate(values or {})
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}"
                for err in exc.errors()
            )
            raise ValueError(f"settings of check {name!r}: {problems}") from None
    return parsed


def run_checks(inputs: GateInputs) -> list[CheckResult]:
    """Run every check the policy lists, in its order; a check that cannot see what it needs fails."""
    results = []
    for name, settings in inputs.policy.checks.items():
        if CHECKS[name].needs_files and inputs.model_dir is None:
            results.append(CheckResult(name, False, "the version's files could not be downloaded"))
            continue
        try:
            results.append(CHECKS[name].run(inputs, settings))
        except (EvidenceMismatch, DatasetError) as exc:
            # Evidence that is missing or does not match is a verdict, not a fault to retry.
            results.append(CheckResult(name, False, str(exc)))
    return results


def _summary(what: str, problems: list[str], fine: str) -> str:
    if not problems:
        return fine
    shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
    return f"{len(problems)} {what}: {shown}"


# --- tags -------------------------------------------------------------------------------------------

_HEX64 = re.compile(r"[0-9a-f]{64}")
_COMMIT = re.compile(r"[0-9a-f]{40}(-dirty)?")
_VERSION = re.compile(r"\d+(\.\d+)*([.-]?\w+)?")

TAG_FORMATS: dict[str, tuple[re.Pattern[str], str]] = {
    Tag.TRAIN_DATA_SHA256: (_HEX64, "a SHA-256 hex digest"),
    Tag.CODE_COMMIT: (_COMMIT, "a 40-character git commit id"),
    Tag.FRAMEWORK_VERSION: (_VERSION, "a version number"),
    Tag.PYTHON_VERSION: (_VERSION, "a version number"),
}
"""How a well-formed value of a tag looks; tags not listed need only be present."""


class TagsSettings(StrictModel):
    required: list[Tag] = Field(description="Version tags training must have recorded, each well formed")
    model_tags: bool = Field(
        default=True,
        description="The registered model's owner, team, risk tier and compliance labels match its spec",
    )


@register_check(
    "tags",
    TagsSettings,
    proves="the version's lineage tags, as training recorded them, are present and well formed, and the "
    "registered model names the owner, risk tier and compliance labels its spec declares",
)
def check_tags(inputs: GateInputs, settings: TagsSettings) -> CheckResult:
    problems = []
    for tag in settings.required:
        value = inputs.tags.get(tag, "")
        if not value:
            problems.append(f"version tag {str(tag)!r} is missing")
        elif tag in TAG_FORMATS and not TAG_FORMATS[tag][0].fullmatch(value):
            problems.append(f"version tag {str(tag)!r} is not {TAG_FORMATS[tag][1]}")
    if settings.model_tags:
        spec = inputs.spec
        model = inputs.registry.model(spec.name)
        expected = {
            ModelTag.OWNER: spec.owner,
            ModelTag.TEAM: spec.team,
            ModelTag.RISK_TIER: spec.risk_tier,
            ModelTag.COMPLIANCE_LABELS: json.dumps(spec.compliance_labels),
        }
        actual = model.tags if model else {}
        for tag, want in expected.items():
            have = actual.get(tag)
            if have is None:
                problems.append(f"registered model tag {str(tag)!r} is missing")
            elif tag == ModelTag.COMPLIANCE_LABELS and _labels(have) != sorted(spec.compliance_labels):
                problems.append(
                    f"registered model tag 'compliance_labels' is {have}, the spec says {want} "
                    "(changed outside the pipeline: train the model again to restore it)"
                )
            elif tag != ModelTag.COMPLIANCE_LABELS and have != want:
                problems.append(
                    f"registered model tag {str(tag)!r} is {have!r}, the spec says {want!r} "
                    "(changed outside the pipeline: train the model again to restore it)"
                )
    checked = len(settings.required) + (4 if settings.model_tags else 0)
    return CheckResult(
        "tags",
        not problems,
        _summary("tag problems", problems, f"{checked} tags present and well formed"),
        evidence=_registration_ref(inputs),
        findings=tuple(problems),
    )


def _labels(text: str) -> list[str] | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return sorted(str(v) for v in value) if isinstance(value, list) else None


def _registration_ref(inputs: GateInputs) -> dict[str, str]:
    return {"registration_record_seq": str(inputs.registration.seq)} if inputs.registration else {}


# --- lineage ----------------------------------------------------------------------------------------


class LineageSettings(StrictModel):
    require_data_card: bool = Field(default=True, description="The validated dataset's data card must exist")


def quarantine_record(audit: AuditStore, sha256: str) -> AuditRecord | None:
    """The newest authentic quarantine of dataset version ``sha256`` (``modelops dataset quarantine``)."""
    for record in reversed(
        audit.records(action=AuditAction.DATASET_QUARANTINED, subject=dataset_subject(sha256))
    ):
        if record.decision == Decision.QUARANTINED and audit.authentic(record):
            return record
    return None


@register_check(
    "lineage",
    LineageSettings,
    proves="the version was trained for this model from a dataset version that passed validation as the "
    "model's own dataset, was not quarantined since, and has its data card",
)
def check_lineage(inputs: GateInputs, settings: LineageSettings) -> CheckResult:
    spec, problems, evidence = inputs.spec, [], _registration_ref(inputs)
    trained_as = inputs.tags.get(Tag.MODEL_SPEC, "")
    if trained_as != spec.name:
        problems.append(f"trained from model spec {trained_as!r}, not {spec.name!r}")
    sha = inputs.tags.get(Tag.TRAIN_DATA_SHA256, "")
    if not _HEX64.fullmatch(sha):
        problems.append("no well-formed train_data_sha256, so the training data cannot be traced")
    else:
        validation = latest_passed_validation(inputs.audit, sha, dataset=spec.dataset)
        if validation is None:
            problems.append(
                f"dataset sha256 {sha[:12]}... has no passing validation record as dataset {spec.dataset!r}; "
                "run the data validation DAG on it first"
            )
        else:
            evidence["validation_record_seq"] = str(validation.seq)
            quarantined = quarantine_record(inputs.audit, sha)
            if quarantined is not None and quarantined.seq > validation.seq:
                evidence["quarantine_record_seq"] = str(quarantined.seq)
                problems.append(
                    f"dataset sha256 {sha[:12]}... was quarantined by {quarantined.actor} "
                    f"(audit seq={quarantined.seq}): {quarantined.details.get('reason', 'no reason given')}"
                )
            card = validation.details.get("data_card_uri")
            if settings.require_data_card:
                if not card or not inputs.files.exists(str(card)):
                    problems.append(f"the data card of dataset sha256 {sha[:12]}... is missing ({card})")
                else:
                    evidence["data_card"] = str(card)
    return CheckResult(
        "lineage",
        not problems,
        _summary(
            "lineage problems",
            problems,
            f"trained for {spec.name} from dataset {spec.dataset} sha256 {sha[:12]}..., validated, not "
            "quarantined" + (", data card present" if settings.require_data_card else ""),
        ),
        evidence=evidence,
        findings=tuple(problems),
    )


# --- metrics ----------------------------------------------------------------------------------------


class MetricsSettings(StrictModel):
    thresholds: dict[TaskKind, dict[str, MetricThreshold]] = Field(
        default_factory=dict, description="Per task kind: holdout metric bounds every such model must meet"
    )

    @model_validator(mode="after")
    def _known_metrics(self) -> MetricsSettings:
        for task, thresholds in self.thresholds.items():
            unknown = sorted(set(thresholds) - set(TASK_METRICS[task]))
            if unknown:
                raise ValueError(
                    f"thresholds.{task} names {unknown}; a {task} model logs {list(TASK_METRICS[task])}"
                )
        return self


def _bound_problem(name: str, threshold: MetricThreshold, metrics: dict[str, float]) -> str | None:
    if name not in metrics:
        return f"{name} was not recorded by training"
    value = metrics[name]
    if threshold.min is not None and value < threshold.min:
        return f"{name}={value:.4f} is below the minimum {threshold.min}"
    if threshold.max is not None and value > threshold.max:
        return f"{name}={value:.4f} is above the maximum {threshold.max}"
    return None


@register_check(
    "metrics",
    MetricsSettings,
    proves="the holdout metrics training recorded meet the policy's bounds for the task kind and the "
    "model spec's own bounds",
)
def check_metrics(inputs: GateInputs, settings: MetricsSettings) -> CheckResult:
    spec = inputs.spec
    bounds = [
        (f"policy {inputs.policy.name}", name, threshold)
        for name, threshold in settings.thresholds.get(spec.task, {}).items()
    ] + [(f"model spec {spec.name}", name, threshold) for name, threshold in spec.metric_thresholds.items()]
    problems = []
    for source, name, threshold in bounds:
        problem = _bound_problem(name, threshold, inputs.metrics)
        if problem:
            problems.append(f"{problem} ({source})")
    values = ", ".join(
        f"{name}={inputs.metrics[name]:.4f}" for _, name, _ in bounds if name in inputs.metrics
    )
    return CheckResult(
        "metrics",
        not problems,
        _summary("metric bounds missed", problems, f"{len(bounds)} bounds met: {values}"),
        evidence=_registration_ref(inputs),
        findings=tuple(problems),
    )


HIGHER_IS_BETTER = {"holdout_roc_auc": True, "holdout_accuracy": True, "holdout_r2": True}
LOWER_IS_BETTER = {"holdout_log_loss": False, "holdout_rmse": False, "holdout_mae": False}
METRIC_DIRECTION = {**HIGHER_IS_BETTER, **LOWER_IS_BETTER}
"""Which way is better, for the metrics non-regression may compare (not rows or rates)."""


class NonRegressionRule(StrictModel):
    metric: str
    tolerance: float = Field(ge=0, description="How much worse than the champion still passes")

    @field_validator("metric")
    @classmethod
    def _comparable(cls, value: str) -> str:
        if value not in METRIC_DIRECTION:
            raise ValueError(f"{value!r} cannot be compared; use one of {sorted(METRIC_DIRECTION)}")
        return value


class NonRegressionSettings(StrictModel):
    rules: dict[TaskKind, NonRegressionRule] = Field(
        description="Per task kind: the metric and its tolerance"
    )

    @model_validator(mode="after")
    def _metric_of_task(self) -> NonRegressionSettings:
        for task, rule in self.rules.items():
            if rule.metric not in TASK_METRICS[task]:
                raise ValueError(f"rules.{task}.metric {rule.metric!r} is not a {task} metric")
        return self


@register_check(
    "non_regression",
    NonRegressionSettings,
    proves="the version is no worse than the serving champion, both scored on the version's own holdout "
    "(the champion's files verified against its promotion record before it is loaded); a first model "
    "passes by rule",
)
def check_non_regression(inputs: GateInputs, settings: NonRegressionSettings) -> CheckResult:
    spec = inputs.spec
    rule = settings.rules.get(spec.task)
    if rule is None:
        return CheckResult("non_regression", True, f"the policy compares no metric for {spec.task} models")
    champion = champion_record(inputs.audit, spec.name)
    if champion is None:
        return CheckResult(
            "non_regression",
            True,
            f"first model: {spec.name} has no champion, so the version passes by rule",
            evidence={"rule": "first model passes"},
        )
    champion_version = str(champion.details.get(CHAMPION_FIELD))
    evidence = {"champion_version": champion_version, "champion_record_seq": str(champion.seq)}
    if champion_version == inputs.version:
        return CheckResult(
            "non_regression", True, f"v{inputs.version} is the champion itself", evidence=evidence
        )
    if rule.metric not in inputs.metrics:
        return CheckResult(
            "non_regression", False, f"{rule.metric} was not recorded by training", evidence=evidence
        )
    champion_score = champion_on_holdout(inputs, champion, champion_version, rule.metric)
    candidate_score = inputs.metrics[rule.metric]
    higher_better = METRIC_DIRECTION[rule.metric]
    margin = candidate_score - champion_score if higher_better else champion_score - candidate_score
    passed = margin >= -rule.tolerance
    evidence.update(
        {
            "metric": rule.metric,
            "version_score": f"{candidate_score:.6f}",
            "champion_score": f"{champion_score:.6f}",
            "tolerance": str(rule.tolerance),
        }
    )
    verdict = "within" if passed else "beyond"
    return CheckResult(
        "non_regression",
        passed,
        f"{rule.metric} v{inputs.version}={candidate_score:.4f} against champion v{champion_version}="
        f"{champion_score:.4f} on the same holdout: {'better by' if margin >= 0 else 'worse by'} "
        f"{abs(margin):.4f}, {verdict} the tolerance {rule.tolerance}",
        evidence=evidence,
        findings=()
        if passed
        else (f"{rule.metric} regressed by {-margin:.4f} (tolerance {rule.tolerance})",),
    )


def champion_on_holdout(inputs: GateInputs, champion: AuditRecord, version: str, metric: str) -> float:
    """The champion's ``metric`` on the candidate's holdout rows (same data, same split, same seed).

    The champion's files are hashed against its promotion record before it is loaded: loading a model runs
    its code, so only files a promotion authorised are ever loaded.
    """
    import tempfile

    import mlflow.sklearn

    from modelops.stages.training import holdout_metrics, split_frame

    sha = inputs.tags.get(Tag.TRAIN_DATA_SHA256, "")
    validation = latest_passed_validation(inputs.audit, sha, dataset=inputs.spec.dataset) if sha else None
    if validation is None or not validation.details.get("snapshot_uri"):
        raise EvidenceMismatch(
            "the version's training data has no validated snapshot, so the champion cannot be scored on its "
            "holdout"
        )
    snapshot = str(validation.details["snapshot_uri"])
    if inputs.files.sha256(snapshot) != sha:
        raise EvidenceMismatch(
            f"the validated snapshot {snapshot} no longer has sha256 {sha[:12]}... (altered since validation)"
        )
    frame = inputs.files.read_table(snapshot)
    _, x_holdout, _, y_holdout = split_frame(frame, inputs.spec)
    with tempfile.TemporaryDirectory(prefix="modelops-champion-") as folder:
        model_dir = inputs.registry.download_version(inputs.spec.name, version, Path(folder))
        check_files(
            recorded_files(champion),
            hash_tree(model_dir),
            what=f"champion v{version}'s files differ from those its promotion record names",
        )
        model = mlflow.sklearn.load_model(str(model_dir))
        return holdout_metrics(inputs.spec, model, x_holdout, y_holdout)[metric]


# --- model files --------------------------------------------------------------------------------------


class ModelFilesSettings(StrictModel):
    allow_globals: list[str] = Field(
        default_factory=list,
        description="Imports a pickle may make besides the defaults ('module.name' or 'module.*')",
    )
    refuse_globals: list[str] = Field(
        default_factory=list, description="Imports refused besides the defaults; refusal wins"
    )


@register_check(
    "model_files",
    ModelFilesSettings,
    proves="every file of the version was scanned without being loaded: pickle-family files import "
    "nothing outside the allow-list, skops files hold only reviewed types, and no file is of a format the "
    "gate cannot read",
    needs_files=True,
)
def check_model_files(inputs: GateInputs, settings: ModelFilesSettings) -> CheckResult:
    from modelops import filescan

    policy = filescan.ScanPolicy(
        allowed_globals=(*filescan.DEFAULT_ALLOWED_GLOBALS, *settings.allow_globals),
        refused_globals=(*filescan.DEFAULT_REFUSED_GLOBALS, *settings.refuse_globals),
        skops_trusted_types=tuple(inputs.spec.skops_trusted_types),
    )
    scans = filescan.scan_folder(inputs.model_dir, policy)
    failed = [f"{scan.path} ({scan.format}): {scan.detail}" for scan in scans if not scan.passed]
    formats: dict[str, int] = {}
    for scan in scans:
        formats[scan.format] = formats.get(scan.format, 0) + 1
    scanners = sorted({scan.scanner for scan in scans if scan.scanner})
    return CheckResult(
        "model_files",
        bool(scans) and not failed,
        _summary(
            "unsafe or unreadable files",
            failed,
            f"{len(scans)} files scanned without loading ("
            + ", ".join(f"{n} {kind}" for kind, n in sorted(formats.items()))
            + f") with {', '.join(scanners) or 'no scanner'}: nothing outside the allow-list",
        )
        if scans
        else "the version has no files",
        evidence={scan.path: scan.format for scan in scans},
        findings=tuple(failed),
    )


# --- licences -----------------------------------------------------------------------------------------


class LicencesSettings(StrictModel):
    allow: list[str] = Field(description="SPDX licence ids allowed ('BSD-*' matches a family)")
    deny: list[str] = Field(default_factory=list, description="SPDX ids refused even if allowed")
    reviewed: dict[str, str] = Field(
        default_factory=dict, description="package -> SPDX expression a person reviewed, overriding metadata"
    )


REQUIREMENTS_FILE = "requirements.txt"


@register_check(
    "licences",
    LicencesSettings,
    proves="every pip requirement the version declares has a licence on the allow list and none on the deny "
    "list; an unknown licence fails",
    needs_files=True,
)
def check_licences(inputs: GateInputs, settings: LicencesSettings) -> CheckResult:
    from modelops import licences

    requirements_file = inputs.model_dir / REQUIREMENTS_FILE
    if not requirements_file.is_file():
        return CheckResult(
            "licences",
            False,
            f"the version declares no {REQUIREMENTS_FILE}, so its licences cannot be checked",
        )
    policy = licences.LicencePolicy(
        allow=tuple(settings.allow), deny=tuple(settings.deny), reviewed=dict(settings.reviewed)
    )
    findings = licences.check_licences(licences.read_requirements(requirements_file), policy)
    failed = [f"{f.requirement}: {f.detail}" for f in findings if not f.passed]
    return CheckResult(
        "licences",
        bool(findings) and not failed,
        _summary(
            "licence problems",
            failed,
            f"{len(findings)} requirements, all allowed: "
            + ", ".join(f"{f.package} {f.licence}" for f in findings),
        ),
        evidence={f.package or f.requirement: f"{f.licence} ({f.source})" for f in findings},
        findings=tuple(failed),
    )


# --- secrets ------------------------------------------------------------------------------------------


class SecretsSettings(StrictModel):
    pass


@register_check(
    "secrets",
    SecretsSettings,
    proves="the run's params, the version's and model's tags, the input example and every text file of the "
    "version carry no credential-like value (detect-secrets)",
    needs_files=True,
)
def check_secrets(inputs: GateInputs, settings: SecretsSettings) -> CheckResult:
    from modelops import secret_scan

    findings = []
    if inputs.run_id:
        findings += secret_scan.scan_values(inputs.registry.run(inputs.run_id).params, prefix="param")
    version_tags = inputs.registry.version(inputs.spec.name, inputs.version).tags
    findings += secret_scan.scan_values({**version_tags, **inputs.tags}, prefix="tag")
    model = inputs.registry.model(inputs.spec.name)
    if model is not None:
        findings += secret_scan.scan_values(model.tags, prefix="model tag")
    assert inputs.model_dir is not None  # needs_files: run_checks fails the check without them
    scanned = secret_scan.scan_text_files(inputs.model_dir)
    findings += scanned.findings
    # Binary files (the skops zip) are the file scanner's; named here so the report says what was read.
    skipped = {item.path: f"not scanned for secrets: {item.reason}" for item in scanned.skipped}
    lines = sorted({f"{finding.kind} in {finding.where}" for finding in findings})
    return CheckResult(
        "secrets",
        not lines,
        _summary(
            "credential-like values (values not shown)",
            lines,
            "no credential-like value in params, tags, the input example or config files",
        ),
        evidence=skipped,
        findings=tuple(lines),
    )


# --- PII ----------------------------------------------------------------------------------------------


class PiiSettings(StrictModel):
    allow_sensitive_columns: list[str] = Field(
        default_factory=list, description="Sensitive columns whose values artifacts may carry"
    )
    allow_patterns: list[str] = Field(
        default_factory=list, description="PII pattern names (the dataset spec's) artifacts may match"
    )


INPUT_EXAMPLE_FILES = ("input_example.json", "serving_input_example.json")


def _input_example_columns(model_dir: Path) -> Iterator[tuple[str, set[str]]]:
    for name in INPUT_EXAMPLE_FILES:
        path = model_dir / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            yield name, set()
            continue
        found: set[str] = set()
        _collect_columns(data, found)
        yield name, found


def _collect_columns(data: Any, found: set[str]) -> None:
    # MLflow writes examples as {"columns": [...], "data": [...]} (split) or {"dataframe_split": {...}} or
    # records; the column names are what a sensitive-column rule compares.
    if isinstance(data, dict):
        if isinstance(data.get("columns"), list):
            found.update(str(c) for c in data["columns"])
        for value in data.values():
            if isinstance(value, dict | list):
                _collect_columns(value, found)
    elif isinstance(data, list):
        for item in data:
            if isinstance(item, dict) and "columns" not in item:
                found.update(str(k) for k in item)
            elif isinstance(item, dict | list):
                _collect_columns(item, found)


def _card_sensitive_columns(inputs: GateInputs) -> set[str]:
    """The columns the training data's data card marks sensitive (none when there is no card to read)."""
    sha = inputs.tags.get(Tag.TRAIN_DATA_SHA256, "")
    validation = latest_passed_validation(inputs.audit, sha, dataset=inputs.spec.dataset) if sha else None
    card = validation.details.get("data_card_uri") if validation else None
    if not card or not inputs.files.exists(str(card)):
        return set()  # the lineage check fails a missing card
    try:
        data = json.loads(inputs.files.read_text(str(card)))
    except json.JSONDecodeError as exc:
        raise EvidenceMismatch(f"the data card {card} is not valid JSON: {exc.msg}") from exc
    return {str(column) for column in data.get("sensitive_columns", [])} if isinstance(data, dict) else set()


@register_check(
    "pii",
    PiiSettings,
    proves="the input example and the version's text artifacts match none of the dataset's PII patterns and "
    "carry no column its spec marks sensitive, unless the policy allows it",
    needs_files=True,
)
def check_pii(inputs: GateInputs, settings: PiiSettings) -> CheckResult:
    from modelops.pii import scan_text_files_for_pii

    dataset = inputs.catalog.dataset(inputs.spec.dataset)
    patterns = [p for p in dataset.pii_patterns if p.name not in settings.allow_patterns]
    problems = [
        f"{hit.file}: {hit.pattern} values ({hit.lines} lines)"
        for hit in scan_text_files_for_pii(inputs.model_dir, patterns)
    ]
    sensitive = (set(dataset.sensitive_columns) | _card_sensitive_columns(inputs)) - set(
        settings.allow_sensitive_columns
    )
    for file, columns in _input_example_columns(inputs.model_dir):
        for column in sorted(columns & sensitive):
            problems.append(
                f"{file}: column {column!r}, which dataset {dataset.name}'s data card marks sensitive"
            )
    return CheckResult(
        "pii",
        not problems,
        _summary(
            "PII findings (values not shown)",
            problems,
            f"no PII pattern of dataset {dataset.name} ({len(patterns)} patterns) and no sensitive column in "
            "the input example or the version's text files",
        ),
        findings=tuple(problems),
    )


__all__ = [
    "CHECKS",
    "CheckResult",
    "EvidenceFiles",
    "GateInputs",
    "register_check",
    "run_checks",
]
