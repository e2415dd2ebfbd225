"""Stage 3: the compliance gate, policy as code.

The policy in ``include/policies/compliance.yaml`` is evaluated in full against a registered version:
required lineage tags, holdout metric thresholds, and that its training data hash is a dataset version
that passed validation (looked up in the audit log, the system of record). Every check is reported,
not only the first failure.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from modelops.settings import CompliancePolicy

APPROVED = "approved"
REJECTED = "rejected"


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class GateReport:
    model_name: str
    version: str
    policy: str
    policy_version: str
    checks: list[Check]
    evaluated_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())

    @property
    def approved(self) -> bool:
        return all(check.passed for check in self.checks)

    @property
    def verdict(self) -> str:
        return APPROVED if self.approved else REJECTED

    @property
    def failures(self) -> list[Check]:
        return [check for check in self.checks if not check.passed]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "verdict": self.verdict}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def evaluate_policy(
    *,
    policy: CompliancePolicy,
    model_name: str,
    version: str,
    tags: dict[str, str],
    metrics: dict[str, float],
    dataset_validated: bool | None,
) -> GateReport:
    """Evaluate every rule of ``policy``; ``dataset_validated`` is None when it could not be looked up."""
    checks: list[Check] = []
    for tag in policy.required_tags:
        value = tags.get(tag, "")
        checks.append(
            Check(
                f"tag:{tag}", bool(value), f"{tag}={value!r}" if value else f"required tag {tag!r} is missing"
            )
        )
    for metric, threshold in policy.metric_thresholds.items():
        if metric not in metrics:
            checks.append(
                Check(f"metric:{metric}", False, f"metric {metric!r} was not logged by the training run")
            )
            continue
        value = metrics[metric]
        problems = []
        if threshold.min is not None and value < threshold.min:
            problems.append(f"below the minimum {threshold.min}")
        if threshold.max is not None and value > threshold.max:
            problems.append(f"above the maximum {threshold.max}")
        detail = f"{metric}={value:.4f} " + (" and ".join(problems) if problems else "within bounds")
        checks.append(Check(f"metric:{metric}", not problems, detail))
    if policy.require_validated_dataset:
        sha = tags.get("train_data_sha256", "")
        if not sha:
            checks.append(
                Check("data:validated", False, "no train_data_sha256 tag, so the data cannot be traced")
            )
        elif dataset_validated:
            checks.append(Check("data:validated", True, f"dataset sha256 {sha[:12]}... passed validation"))
        else:
            checks.append(
                Check(
                    "data:validated",
                    False,
                    f"dataset sha256 {sha[:12]}... has no passing validation record in the audit log; "
                    "run the data validation DAG on it first",
                )
            )
    return GateReport(model_name, str(version), policy.name, policy.version, checks)
