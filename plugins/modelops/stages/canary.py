"""Stage 4, second half: the canary. A new version answers a share of a model's callers beside the champion,
then the two arms are compared and the challenger is promoted or rolled back, all on record.

The traffic record (``traffic.share_set``, :func:`modelops.evidence.active_canary`) is what the gateway
splits by: the champion it names, the challenger, its share and the challenger's file hashes. Every share
change is such a record, written before the registry's aliases move: starting a canary (the policy's
initial share), promoting (the challenger becomes champion, 100 %), rolling back (0 %).

Comparing the arms: calls answered by each version since the canary started, from the prediction log.
Failed calls (only calls an arm answered count: input the gateway refused before choosing an arm counts for
neither) and latency once both arms have ``min_calls``; the business metric of the model's monitoring policy and, for a classifier, ROC AUC
(for a regressor RMSE) once both arms have ``min_labelled_rows`` labels. A metric counts against the
challenger only when it is worse by more than the spec's tolerance *and* the difference is significant (two
standard errors by default), so a small canary's sampling noise neither promotes nor rolls back by itself.
A challenger whose calls fail outright is rolled back without waiting for ``min_calls``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from modelops.errors import DeploymentFailed
from modelops.evidence import (
    CHALLENGER_FIELD,
    CHAMPION_FIELD,
    SHARE_FIELD,
    active_canary,
    champion_record,
    evidence_summary,
    recorded_files,
)
from modelops.stages.outcome import AuditEntry, Recorder, StageOutcome, sha256_json
from modelops.vocabulary import Alias, Arm, AuditAction, Decision, DeploymentStatus, Tag, model_subject

if TYPE_CHECKING:
    import pandas as pd

    from modelops.audit import AuditRecord, AuditStore
    from modelops.registry import ModelRegistry
    from modelops.serving.client import GatewayClient
    from modelops.serving.prediction_log import PredictionLog
    from modelops.settings import CanarySpec, ModelSpec, MonitoringPolicy

FAILING_CALLS = 5
"""Failed calls after which a challenger failing at least half its calls is rolled back at once."""
LATENCY_SLACK_MS = 5.0
"""A challenger counts as slower only when its latency is also this many milliseconds above the
champion's: at 1-2 ms a ratio alone would be noise."""
P95_MIN_CALLS = 200
"""Calls each arm needs before p95 latencies are compared; below that the medians are (the p95 of a few
dozen calls is its two or three slowest, which one busy second on the host decides)."""
LATENCY_P_VALUE = 0.01
"""And the challenger's latencies must be slower by a one-sided Mann-Whitney U test at this level."""
SOAK_FIELD, MAX_SOAK_FIELD = "soak_until", "max_soak_until"


class CanaryError(DeploymentFailed):
    """A canary cannot start or end as asked (another one runs, the gateway does not take it)."""


@dataclass
class ArmFacts:
    """What one arm did during the canary."""

    version: str
    calls: int = 0
    failed: int = 0
    error_rate: float | None = None
    p50_ms: float | None = None
    p95_ms: float | None = None
    labelled_rows: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class CanaryEvaluation:
    """The comparison of the two arms: ``verdict`` is promote, roll_back or wait."""

    verdict: str
    reasons: list[str]
    champion: ArmFacts
    challenger: ArmFacts
    compared: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- starting ---------------------------------------------------------------------------------------


def start_canary(
    *,
    registry: ModelRegistry,
    gateway: GatewayClient,
    audit: AuditStore,
    record: Recorder,
    spec: ModelSpec,
    version: str,
    files: dict[str, str],
    champion: AuditRecord,
    smoke_test: dict[str, Any],
    now: datetime | None = None,
) -> dict[str, Any]:
    """Give the smoke-tested ``version`` the spec's initial share beside ``champion``; returns the traffic
    record's details. Safe to retry: a canary of the same version already running is only re-verified."""
    model, canary = spec.name, spec.serving.canary
    now = now or datetime.now(UTC)
    running = active_canary(audit, model)
    if running is not None and str(running.details.get(CHALLENGER_FIELD)) != str(version):
        raise CanaryError(
            f"{model}: the canary of v{running.details.get(CHALLENGER_FIELD)} (traffic record seq={running.seq}) "
            f"is still running; v{version} can start its canary once that one is promoted or rolled back "
            "(wait for the deployment run's canary task, or roll it back with the modelops_rollback DAG), then "
            f"run modelops_deployment for v{version} again"
        )
    if running is None:
        details = {
            CHAMPION_FIELD: str(champion.details.get(CHAMPION_FIELD)),
            CHALLENGER_FIELD: str(version),
            SHARE_FIELD: canary.initial_share,
            "started_at": now.isoformat(),
            SOAK_FIELD: (now + timedelta(minutes=canary.soak_minutes)).isoformat(),
            MAX_SOAK_FIELD: (now + timedelta(minutes=canary.max_soak_minutes)).isoformat(),
            "smoke_test": smoke_test,
            **evidence_summary(files),
        }
        record(
            AuditEntry(
                AuditAction.TRAFFIC_SHARE_SET,
                model_subject(model, version),
                Decision.CANARY_STARTED,
                details=details,
                evidence={"artifacts": sha256_json(files)},
            )
        )
        running = active_canary(audit, model)
        if running is None:  # the record just written does not authorise itself: a keyring problem
            raise CanaryError(
                f"{model}: the canary record of v{version} is not authentic; check the audit keys"
            )
    registry.set_alias(model, Alias.CHALLENGER, version)
    registry.set_version_tags(
        model, version, {Tag.DEPLOYMENT_STATUS: DeploymentStatus.CANARY, Tag.DEPLOYED_AT: now.isoformat()}
    )
    try:
        gateway.unstage(model)
        gateway.reload(model)
        serving = gateway.serving(model)
        if str(serving.get("challenger_version")) != str(version):
            raise DeploymentFailed(
                f"the gateway serves challenger {serving.get('challenger_version')!r}, not v{version}"
                + (f": {serving['canary_problem']}" if serving.get("canary_problem") else "")
            )
    except DeploymentFailed as exc:
        end_canary(
            registry,
            gateway,
            audit,
            record,
            model,
            running,
            decision=Decision.ROLLED_BACK,
            reason=f"the gateway did not take the canary of v{version}: {exc}",
        )
        raise CanaryError(
            f"{model} v{version} passed its smoke test but the gateway did not serve its canary ({exc}); "
            "rolled back: the champion answers every caller"
        ) from exc
    return dict(running.details)


# --- comparing the arms -----------------------------------------------------------------------------


def _metric_names(spec: ModelSpec, policy: MonitoringPolicy) -> list[str]:
    business = policy.business.metric.get(spec.task)
    quality = "roc_auc" if spec.task == "binary_classification" else "rmse"
    return [name for name in dict.fromkeys([business, quality]) if name]


def _standard_error(metric: str, labelled: pd.DataFrame, value: float) -> float | None:
    """The standard error of ``metric`` measured on ``labelled`` (closed forms; None when undefined)."""
    import numpy as np

    from modelops.stages.monitoring import pd_numeric

    n = len(labelled)
    if n < 2:
        return None
    labels = labelled["label"].astype(float).to_numpy()
    if metric in ("click_through_rate", "accuracy"):
        return math.sqrt(max(value * (1 - value), 1e-12) / n)
    if metric == "roc_auc":  # Hanley & McNeil (1982)
        positives, negatives = int(labels.sum()), int(n - labels.sum())
        if not positives or not negatives:
            return None
        q1, q2 = value / (2 - value), 2 * value**2 / (1 + value)
        variance = (
            value * (1 - value) + (positives - 1) * (q1 - value**2) + (negatives - 1) * (q2 - value**2)
        ) / (positives * negatives)
        return math.sqrt(max(variance, 1e-12))
    errors = pd_numeric(labelled["prediction"]) - labels
    if metric == "rmse":  # delta method on the mean squared error
        squared = errors**2
        return float(np.std(squared, ddof=1) / math.sqrt(n) / (2 * max(value, 1e-12)))
    return float(np.std(np.abs(errors), ddof=1) / math.sqrt(n))


def _arm_metrics(
    frame: pd.DataFrame, names: list[str], min_rows: int
) -> tuple[int, dict[str, float], dict[str, float]]:
    from modelops.stages.monitoring import metric_value

    labelled = frame[frame["label"].notna()] if len(frame) else frame
    values: dict[str, float] = {}
    errors: dict[str, float] = {}
    if len(labelled) < min_rows:
        return len(labelled), values, errors
    for name in names:
        value = metric_value(name, labelled)
        if value is None:
            continue
        values[name] = round(value, 6)
        error = _standard_error(name, labelled, value)
        if error is not None:
            errors[name] = error
    return len(labelled), values, errors


def evaluate_canary(
    *,
    spec: ModelSpec,
    policy: MonitoringPolicy,
    canary_record: AuditRecord,
    prediction_log: PredictionLog,
    now: datetime | None = None,
) -> CanaryEvaluation:
    """Compare the arms of the canary ``canary_record`` started, on the calls logged since."""
    from modelops.stages.monitoring import HIGHER_IS_BETTER

    canary: CanarySpec = spec.serving.canary
    now = now or datetime.now(UTC)
    details = canary_record.details
    started = datetime.fromisoformat(str(details["started_at"]))
    soak_until = datetime.fromisoformat(str(details[SOAK_FIELD]))
    max_soak_until = datetime.fromisoformat(str(details[MAX_SOAK_FIELD]))
    versions = {Arm.CHAMPION: str(details[CHAMPION_FIELD]), Arm.CHALLENGER: str(details[CHALLENGER_FIELD])}
    facts: dict[Arm, ArmFacts] = {}
    for arm, version in versions.items():
        stats = prediction_log.request_stats(spec.name, started, now, version=version)
        facts[arm] = ArmFacts(
            version=version,
            calls=stats.requests,
            failed=stats.failed,
            error_rate=None if stats.error_rate is None else round(stats.error_rate, 6),
            p50_ms=None if stats.p50_ms is None else round(stats.p50_ms, 3),
            p95_ms=None if stats.p95_ms is None else round(stats.p95_ms, 3),
        )
    champion, challenger = facts[Arm.CHAMPION], facts[Arm.CHALLENGER]
    reasons: list[str] = []
    compared: dict[str, Any] = {}

    def result(verdict: str) -> CanaryEvaluation:
        return CanaryEvaluation(verdict, reasons, champion, challenger, compared)

    # A challenger that fails outright is rolled back now, not after the soak.
    if challenger.failed >= FAILING_CALLS and (challenger.error_rate or 0) >= 0.5:
        reasons.append(
            f"v{challenger.version} failed {challenger.failed} of its {challenger.calls} calls "
            f"({challenger.error_rate:.0%})"
        )
        return result("roll_back")
    if now < soak_until:
        reasons.append(f"soaking until {soak_until.isoformat()}")
        return result("wait")
    if champion.calls < canary.min_calls or challenger.calls < canary.min_calls:
        reasons.append(
            f"too few calls to compare: champion {champion.calls}, challenger {challenger.calls}, "
            f"each arm needs {canary.min_calls} (serving.canary.min_calls)"
        )
        return result("wait" if now < max_soak_until else "roll_back")

    worse: list[str] = []
    increase = (challenger.error_rate or 0) - (champion.error_rate or 0)
    compared["error_rate_increase"] = round(increase, 6)
    if increase > canary.max_error_rate_increase:
        worse.append(
            f"error rate {challenger.error_rate:.2%} against the champion's {champion.error_rate:.2%} "
            f"(more than {canary.max_error_rate_increase:.2%} above)"
        )
    quantile = "p95" if min(champion.calls, challenger.calls) >= P95_MIN_CALLS else "p50"
    theirs_ms, ours_ms = getattr(champion, f"{quantile}_ms"), getattr(challenger, f"{quantile}_ms")
    if theirs_ms is not None and ours_ms is not None:
        ratio = ours_ms / max(theirs_ms, 1e-9)
        compared[f"{quantile}_latency_ratio"] = round(ratio, 3)
        slower = ratio > canary.max_latency_ratio and ours_ms - theirs_ms > LATENCY_SLACK_MS
        if slower:
            from scipy.stats import mannwhitneyu

            p_value = float(
                mannwhitneyu(
                    prediction_log.latencies(spec.name, started, now, version=challenger.version),
                    prediction_log.latencies(spec.name, started, now, version=champion.version),
                    alternative="greater",
                ).pvalue
            )
            compared["latency_p_value"] = round(p_value, 6)
            slower = p_value < LATENCY_P_VALUE
        if slower:
            worse.append(
                f"{quantile} latency {ours_ms:.1f} ms against the champion's {theirs_ms:.1f} ms "
                f"({ratio:.2f}x, more than {canary.max_latency_ratio}x; Mann-Whitney p={compared['latency_p_value']:.4f})"
            )

    names = _metric_names(spec, policy)
    window = prediction_log.window(spec.name, started, now, features=spec.features)
    versions_column = window["model_version"].astype(str) if len(window) else window.get("model_version")
    standard_errors: dict[Arm, dict[str, float]] = {}
    for arm, arm_facts in facts.items():
        rows = window[versions_column == arm_facts.version] if len(window) else window
        arm_facts.labelled_rows, arm_facts.metrics, standard_errors[arm] = _arm_metrics(
            rows, names, canary.min_labelled_rows
        )
    for name in names:
        ours, theirs = challenger.metrics.get(name), champion.metrics.get(name)
        if ours is None or theirs is None:
            compared[name] = "pending labels"
            continue
        better_higher = name in HIGHER_IS_BETTER
        drop = ((theirs - ours) if better_higher else (ours - theirs)) / max(abs(theirs), 1e-12)
        spread = math.hypot(
            standard_errors[Arm.CHAMPION].get(name, 0.0), standard_errors[Arm.CHALLENGER].get(name, 0.0)
        )
        z = None if not spread else drop * abs(theirs) / spread
        compared[name] = {
            Arm.CHAMPION.value: theirs,
            Arm.CHALLENGER.value: ours,
            "drop": round(drop, 6),
            "z": z and round(z, 2),
        }
        if drop > canary.max_metric_drop and (z is None or z >= canary.min_z):
            worse.append(
                f"{name} {ours} against the champion's {theirs} ({drop:.1%} worse, "
                f"{'z=' + format(z, '.1f') if z is not None else 'no spread'}) on "
                f"{challenger.labelled_rows} and {champion.labelled_rows} labelled rows"
            )
    if worse:
        reasons.extend(worse)
        return result("roll_back")
    reasons.append(
        f"v{challenger.version} is as good as v{champion.version} or better on "
        + ", ".join(key for key in compared if compared[key] != "pending labels")
        + (
            f" ({', '.join(key for key, value in compared.items() if value == 'pending labels')} pending labels)"
            if "pending labels" in compared.values()
            else ""
        )
    )
    return result("promote")


# --- ending -----------------------------------------------------------------------------------------


def end_canary(
    registry: ModelRegistry,
    gateway: GatewayClient,
    audit: AuditStore,
    record: Recorder,
    model: str,
    canary_record: AuditRecord,
    *,
    decision: Decision,
    reason: str,
    evaluation: CanaryEvaluation | None = None,
) -> None:
    """Promote the canary's challenger (``Decision.PROMOTED``) or roll it back (``Decision.ROLLED_BACK``).

    Records first (the gateway follows the records), then the aliases and tags, then the gateway reload.
    """
    from modelops.stages.deployment import take_live

    champion_version = str(canary_record.details[CHAMPION_FIELD])
    challenger = str(canary_record.details[CHALLENGER_FIELD])
    now = datetime.now(UTC).isoformat()
    summary = None if evaluation is None else evaluation.to_dict()
    subject = model_subject(model, challenger)
    if decision == Decision.PROMOTED:
        files = recorded_files(canary_record)
        previous = champion_record(audit, model)
        record(
            AuditEntry(
                AuditAction.MODEL_DEPLOYED,
                subject,
                Decision.PROMOTED,
                details={
                    CHAMPION_FIELD: challenger,
                    "previous_version": champion_version,
                    "canary_record_seq": canary_record.seq,
                    "reason": reason[:2000],
                    **evidence_summary(files),
                },
                evidence={"artifacts": sha256_json(files), "canary": sha256_json(summary or {})},
            )
        )
    record(
        AuditEntry(
            AuditAction.TRAFFIC_SHARE_SET,
            subject,
            decision,
            details={
                CHAMPION_FIELD: challenger if decision == Decision.PROMOTED else champion_version,
                CHALLENGER_FIELD: None,
                SHARE_FIELD: 0.0,
                "canary_version": challenger,
                "canary_record_seq": canary_record.seq,
                "reason": reason[:2000],
                "evaluation": summary,
            },
        )
    )
    current = registry.version_by_alias(model, Alias.CHALLENGER)
    if current is not None and str(current.version) == challenger:
        registry.delete_alias(model, Alias.CHALLENGER)
    if decision != Decision.PROMOTED:
        registry.set_version_tags(model, challenger, {Tag.DEPLOYMENT_STATUS: DeploymentStatus.ROLLED_BACK})
        gateway.reload(model)
        return
    try:
        take_live(
            registry,
            gateway,
            audit,
            record,
            model,
            challenger,
            previous=previous,
            now=now,
            why="won its canary",
        )
    except DeploymentFailed as exc:
        raise CanaryError(str(exc)) from exc


def canary_step(
    *,
    spec: ModelSpec,
    policy: MonitoringPolicy,
    registry: ModelRegistry,
    gateway: GatewayClient,
    audit: AuditStore,
    record: Recorder,
    prediction_log: PredictionLog,
    now: datetime | None = None,
) -> StageOutcome:
    """One look at ``spec``'s canary: wait (``details['next_check']`` says until when), promote or roll back.

    No running canary (a first deployment, a refused one, a canary someone already ended) is ``no_canary``.
    """
    now = now or datetime.now(UTC)
    model = spec.name
    canary_record = active_canary(audit, model)
    if canary_record is None:
        return StageOutcome(
            decision="no_canary",
            summary=f"{model}: no canary running",
            details={"model_name": model, "traffic": traffic_history(audit, model)},
        )
    evaluation = evaluate_canary(
        spec=spec, policy=policy, canary_record=canary_record, prediction_log=prediction_log, now=now
    )
    challenger, champion = evaluation.challenger, evaluation.champion
    details = {
        "model_name": model,
        "version": challenger.version,
        "champion_version": champion.version,
        "challenger_share": canary_record.details.get(SHARE_FIELD),
        "evaluation": evaluation.to_dict(),
    }
    if evaluation.verdict == "wait":
        soak_until = datetime.fromisoformat(str(canary_record.details[SOAK_FIELD]))
        max_soak = datetime.fromisoformat(str(canary_record.details[MAX_SOAK_FIELD]))
        check = spec.serving.canary.soak_minutes / 4
        next_check = soak_until if now < soak_until else min(max_soak, now + timedelta(minutes=check))
        pending = now >= soak_until
        return StageOutcome(
            decision=Decision.CANARY_PENDING if pending else "soaking",
            summary=f"{model} v{challenger.version} canary: {'; '.join(evaluation.reasons)}; next look at "
            f"{next_check.isoformat()}",
            details={**details, "next_check": next_check.isoformat()},
            records=(
                (
                    AuditEntry(
                        AuditAction.TRAFFIC_SHARE_SET,
                        model_subject(model, challenger.version),
                        Decision.CANARY_PENDING,
                        details={"reasons": evaluation.reasons, "evaluation": evaluation.to_dict()},
                    ),
                )
                if pending
                else ()
            ),
        )
    decision = Decision.PROMOTED if evaluation.verdict == "promote" else Decision.ROLLED_BACK
    reason = "; ".join(evaluation.reasons)
    end_canary(
        registry,
        gateway,
        audit,
        record,
        model,
        canary_record,
        decision=decision,
        reason=reason,
        evaluation=evaluation,
    )
    verb = (
        "promoted to champion"
        if decision == Decision.PROMOTED
        else f"rolled back; v{champion.version} serves"
    )
    return StageOutcome(
        decision=decision,
        summary=f"{model} v{challenger.version} canary {verb} (calls {champion.calls}/{challenger.calls}, "
        f"champion/challenger): {reason}",
        details={**details, "reason": reason, "traffic": traffic_history(audit, model)},
    )


def roll_back_canary_now(
    *,
    model: str,
    registry: ModelRegistry,
    gateway: GatewayClient,
    audit: AuditStore,
    record: Recorder,
    reason: str,
) -> StageOutcome | None:
    """End ``model``'s running canary at once (a manual rollback); None when no canary runs."""
    canary_record = active_canary(audit, model)
    if canary_record is None:
        return None
    challenger = str(canary_record.details[CHALLENGER_FIELD])
    end_canary(
        registry, gateway, audit, record, model, canary_record, decision=Decision.ROLLED_BACK, reason=reason
    )
    return StageOutcome(
        decision=Decision.ROLLED_BACK,
        summary=f"{model}: canary of v{challenger} rolled back ({reason}); "
        f"v{canary_record.details[CHAMPION_FIELD]} answers every caller",
        details={
            "model_name": model,
            "version": challenger,
            CHAMPION_FIELD: str(canary_record.details[CHAMPION_FIELD]),
            "reason": reason,
            "traffic": traffic_history(audit, model),
        },
    )


def manual_rollback(
    *,
    spec: ModelSpec,
    registry: ModelRegistry,
    gateway: GatewayClient,
    audit: AuditStore,
    record: Recorder,
    reason: str,
) -> StageOutcome:
    """The rollback trigger form: end the running canary; with none, put the previous champion back."""
    from modelops.stages.deployment import roll_back_to_previous

    if not reason.split(":", 1)[-1].strip():
        raise CanaryError("a manual rollback needs a reason: say why in the trigger form's reason field")
    ended = roll_back_canary_now(
        model=spec.name, registry=registry, gateway=gateway, audit=audit, record=record, reason=reason
    )
    if ended is not None:
        return ended
    outcome = roll_back_to_previous(
        model=spec.name, registry=registry, gateway=gateway, audit=audit, record=record, reason=reason
    )
    if outcome.decision == Decision.REFUSED:  # asked for by a person: fail the run, naming why
        return replace(outcome, refusal=outcome.summary)
    return outcome


# --- the record of shares ---------------------------------------------------------------------------


def traffic_history(audit: AuditStore, model: str) -> list[dict[str, Any]]:
    """Which version served which share of ``model``'s callers from when to when, oldest first.

    Read from the authentic promotion, rollback and traffic records; the last period has ``to`` None.
    """
    prefix = model_subject(model, "")
    changes: list[AuditRecord] = []
    for action, decisions in (
        (AuditAction.MODEL_DEPLOYED, {Decision.PROMOTED}),
        (AuditAction.MODEL_ROLLED_BACK, {Decision.ROLLED_BACK}),
        (AuditAction.TRAFFIC_SHARE_SET, {Decision.CANARY_STARTED, Decision.PROMOTED, Decision.ROLLED_BACK}),
    ):
        changes.extend(
            record
            for record in audit.records(action=action, subject_prefix=prefix)
            if record.decision in decisions and audit.authentic(record)
        )
    changes.sort(key=lambda record: record.seq)
    periods: list[dict[str, Any]] = []
    state: tuple[Any, ...] | None = None
    for record in changes:
        champion = record.details.get(CHAMPION_FIELD)
        challenger = (
            record.details.get(CHALLENGER_FIELD) if record.action == AuditAction.TRAFFIC_SHARE_SET else None
        )
        share = float(record.details.get(SHARE_FIELD) or 0) if challenger else 0.0
        if (champion, challenger, share) == state:
            continue  # a promotion's two records (champion and share) are one change of who serves
        state = (champion, challenger, share)
        for period in periods:
            if period["to"] is None:
                period["to"] = record.recorded_at
        if champion:
            periods.append(
                {
                    "version": str(champion),
                    "arm": Arm.CHAMPION.value,
                    "share": round(1 - share, 6),
                    "from": record.recorded_at,
                    "to": None,
                    "record_seq": record.seq,
                }
            )
        if challenger:
            periods.append(
                {
                    "version": str(challenger),
                    "arm": Arm.CHALLENGER.value,
                    "share": share,
                    "from": record.recorded_at,
                    "to": None,
                    "record_seq": record.seq,
                }
            )
    return periods
