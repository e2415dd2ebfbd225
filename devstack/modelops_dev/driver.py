"""``python -m modelops_dev up|down|status``: the lifecycle behind ``make demo``.

``up`` builds a project-local runtime folder ``.demo/`` (git-ignored), migrates Airflow's SQLite metadata
DB, loads ``airflow_settings.yaml``, starts each Airflow component, Airflow's two log servers, the MLflow
server and the scoring gateway as separate process groups (never ``airflow standalone``, whose children
outlive it), then runs two models through the six stages and prints a summary per model:

1. a new file in each dataset's incoming folder, then a triggered ``modelops_data_validation`` run;
2. training, the gate and deployment start on Asset events, for both models in one run or in several:
   a model is through when its ``champion`` alias (read from MLflow) points at a newer version than
   before; any failed run of those DAGs stops the demo with its failed task's log. A gate task that
   awaits a person's approval (``awaiting_input``: the high-risk model's ``strict`` policy) is answered
   through the REST API as the approver it names (``risk_officer``, its own login), after showing that
   Airflow refuses the admin (403);
3. scoring traffic for each model through the gateway, then ``modelops_drift_monitoring`` over that
   window and ``modelops_retirement`` as a dry run, both triggered;
4. the incident (``ctr_recommender``): a triggered ``modelops_training`` run gives the model a second
   champion (started while the stationary window is assessed), so that there is an earlier one to go back
   to; then drifted traffic whose users click far less, with its delayed labels, and monitoring over
   exactly that window: the verdict must be critical (drift and a click-through drop seen by several
   callers), the previous champion put back, a critical alert in the outbox
   (``.demo/modelops/outbox/alerts.jsonl``) and retraining requested, which Airflow carries through
   training, the gate and deployment to a new champion;
5. one live prediction per model, the audit chain verified, the summary.

The services keep running until ``down``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from modelops.errors import ConfigurationError, ModelOpsError
from modelops.settings import Catalog, ModelSpec, MonitoringPolicy
from modelops.vocabulary import Decision
from modelops_dev import LOOPBACK, processes
from modelops_dev.airflow_api import (
    AWAITING_INPUT,
    STAGE_TIMEOUT_SECONDS,
    AirflowApi,
    StageFailed,
    StageResult,
    TaskOutcome,
    stage_lines,
    task_label,
    wait_for_dags,
    wait_for_run,
)
from modelops_dev.approvals import Approver, approval_text
from modelops_dev.mlflow_api import MlflowApi, RegisteredModelFacts, is_newer
from modelops_dev.stack import (
    ADMIN_USER,
    AIRFLOW_USERS,
    APPROVER_USERS,
    SERVICE_NAMES,
    Layout,
    Ports,
    audit_url,
    ensure_passwords,
    known_passwords,
    services,
    stack_env,
)
from modelops_dev.workload import (
    CTR_DATASET,
    DATASET_WRITERS,
    INCIDENT_REQUESTS,
    ROWS_PER_REQUEST,
    SAMPLED_REQUESTS,
    SIMULATED_REQUESTS,
    CanaryTraffic,
    DatasetDrop,
    TrafficCount,
    describe_prediction,
    drop_dataset,
    example_row,
    model_base_url,
    predict,
    send_incident_traffic,
    send_traffic,
    write_diabetes_with_unit_bug,
)

DEMO_MODELS = ("ctr_recommender", "diabetes_progression")
INCIDENT_MODEL = "ctr_recommender"  # its traffic can drift (the click simulator), and its clicks can drop
CANARY_ROLLBACK_MODEL = "diabetes_progression"  # a version trained on data with a unit bug loses its canary
HEALTH_TIMEOUT_SECONDS = 180
CHAMPION_TIMEOUT_SECONDS = 15 * 60

VALIDATION_DAG = "modelops_data_validation"
TRAINING_DAG = "modelops_training"
GATE_DAG = "modelops_compliance_gate"
APPROVAL_SETTLE_SECONDS = 5.0
"""How long the demo's approver waits after a form appears (see approvals.Approver)."""
DEPLOYMENT_DAG = "modelops_deployment"
DRIFT_DAG = "modelops_drift_monitoring"
RETIREMENT_DAG = "modelops_retirement"
DAG_IDS = (
    VALIDATION_DAG,
    TRAINING_DAG,
    GATE_DAG,
    DEPLOYMENT_DAG,
    DRIFT_DAG,
    RETIREMENT_DAG,
    "modelops_audit_anchor",
)
# Started by Airflow on Asset events, never by the driver.
ASSET_STAGES = (("training", TRAINING_DAG), ("gate", GATE_DAG), ("deployment", DEPLOYMENT_DAG))
# Runs of these DAGs since the datasets were dropped must not fail.
WATCHED_STAGES = (("validation", VALIDATION_DAG), *ASSET_STAGES)

# The holdout metric the summary shows per task kind (training returns them under "metrics").
HOLDOUT_METRICS = {
    "binary_classification": ("holdout_roc_auc", "AUC", ".3f"),
    "regression": ("holdout_rmse", "RMSE", ".1f"),
}


# --- what a run of the lifecycle found -----------------------------------------------------------


@dataclass
class ModelReport:
    """Everything the summary says about one model."""

    spec: ModelSpec
    champion_before: str | None
    champion: str | None = None
    facts: RegisteredModelFacts | None = None
    results: dict[str, TaskOutcome] = field(default_factory=dict)  # stage -> this model's result
    traffic: TrafficCount | None = None
    example: dict[str, Any] | None = None
    prediction: Any = None

    @property
    def name(self) -> str:
        return self.spec.name

    def fact(self, stage: str) -> str:
        outcome = self.results.get(stage)
        return outcome.summary if outcome else "(no result for this model)"

    @property
    def trained_version(self) -> str | None:
        outcome = self.results.get("training")
        version = outcome.value.get("version") if outcome else None
        return str(version) if version is not None else None

    def holdout(self) -> str:
        key, label, number = HOLDOUT_METRICS.get(self.spec.task, ("holdout metric", "", ""))
        outcome = self.results.get("training")
        metrics = outcome.value.get("metrics") if outcome else None
        value = metrics.get(key) if isinstance(metrics, dict) else None
        if not isinstance(value, int | float) or isinstance(value, bool):
            return f"(training returned no {key})"
        return f"{label} {value:{number}}"

    def approval(self) -> str:
        """Who approved this model's version at the gate (the gate's summary when it does not say)."""
        outcome = self.results.get("gate")
        approval = outcome.value.get("approval") if outcome else None
        text = approval_text(approval) if isinstance(approval, dict) else None
        return text or self.fact("gate")

    def drift(self) -> str:
        outcome = self.results.get("monitoring")
        if outcome is None:
            return "(no result for this model)"
        # The stage's summary names the verdict and the rows already.
        return outcome.summary


@dataclass
class IncidentReport:
    """What the incident found: the second champion, the critical verdict, the rollback, the alert and the
    retrained champion."""

    model: str
    champion_before: str | None  # the champion the lifecycle left
    since: datetime  # when the second champion's training was triggered
    started: float  # the same moment on the monotonic clock
    training_run: str | None = None
    second: ModelReport | None = None  # the champion trained so that there is an earlier one to go back to
    traffic: TrafficCount | None = None
    monitoring: StageResult | None = None
    verdict: TaskOutcome | None = None
    drop: str | None = None
    rollback: TaskOutcome | None = None
    alert: dict[str, Any] | None = None
    outbox: Path | None = None
    request: TaskOutcome | None = None
    retrained: ModelReport | None = None
    seconds: float | None = None
    stages: list[StageResult] = field(default_factory=list)

    def trained_versions(self) -> list[str]:
        """The versions trained during the incident (the second champion's, the retrained one's)."""
        reports = (self.second, self.retrained)
        return [r.trained_version for r in reports if r is not None and r.trained_version is not None]


@dataclass
class CanaryRollback:
    """The demo's canary that must not win: a version trained on data with a unit bug, rolled back."""

    model: str
    champion_before: str | None
    drop: DatasetDrop
    since: datetime
    version: str | None = None
    status: str | None = None  # the version's deployment status when the canary ended
    seconds: float | None = None


@dataclass
class LifecycleReport:
    drops: dict[str, DatasetDrop]
    models: dict[str, ModelReport]
    stages: list[StageResult] = field(default_factory=list)
    incident: IncidentReport | None = None
    canary_rollback: CanaryRollback | None = None
    canary_traffic: CanaryTraffic | None = None


def _version(version: str | None) -> str:
    return f"v{version}" if version else "none"


def _assign(results: Sequence[StageResult], models: Mapping[str, ModelReport]) -> None:
    """Give each model its result of each stage; a later run's result wins."""
    for result in results:
        for report in models.values():
            # A deployment run's word on a model is its canary's decision when it ran one.
            canary = result.for_task("canary", report.name)
            decided = canary is not None and canary.value.get("decision") != "no_canary"
            outcome = canary if decided else result.for_model(report.name)
            if outcome is not None:
                report.results[result.stage] = outcome


# --- the lifecycle, through the REST APIs --------------------------------------------------------


def fail_on_failed_runs(
    api: AirflowApi, since: datetime, stages: Sequence[tuple[str, str]] = WATCHED_STAGES
) -> None:
    """Raise, with the failed task's log excerpt, if any run of ``stages`` since ``since`` failed."""
    for stage, dag_id in stages:
        for run in api.runs_since(dag_id, since):
            if run["state"] == "failed":
                raise StageFailed(
                    f"stage {stage} ({dag_id}) run {run['dag_run_id']} failed.\n"
                    f"{api.failure_excerpt(dag_id, run['dag_run_id'])}"
                )


def champion_timeout_message(
    api: AirflowApi,
    models: Mapping[str, ModelReport],
    current: Mapping[str, str | None],
    since: datetime,
    timeout: float,
    since_what: str = "the datasets were dropped",
) -> str:
    """Why the demo gave up waiting: each model's champion, the runs since the start, any task's log."""
    lines = [f"not every model has a new champion after {timeout:.0f} s:"]
    for name, report in models.items():
        done = "done" if report.champion else "waiting"
        lines.append(
            f"  {name}: champion before {_version(report.champion_before)}, now "
            f"{_version(current.get(name))} ({done})"
        )
    lines.append(f"runs since {since_what}:")
    excerpts = []
    for stage, dag_id in WATCHED_STAGES:
        runs = api.runs_since(dag_id, since)
        listed = ", ".join(f"{run['dag_run_id']} {run['state']}" for run in reversed(runs))
        lines.append(f"  {stage:<11} {dag_id}: {listed or 'none (Asset event not received?)'}")
        for run in runs:
            excerpt = api.problem_excerpt(dag_id, run["dag_run_id"])
            if excerpt:
                excerpts.append(f"{dag_id} run {run['dag_run_id']}: {excerpt}")
            if run["state"] == "running":
                excerpts.extend(
                    f"{dag_id} run {run['dag_run_id']}: task {ti['task_id']}[{task_label(ti)}] awaits input "
                    "(an approval: answer it under Required Actions in the Airflow UI as the user it names)"
                    for ti in api.task_instances(dag_id, run["dag_run_id"])
                    if ti.get("state") == AWAITING_INPUT
                )
    lines.extend(excerpts)
    lines.append("see the Airflow UI and .demo/logs/airflow-scheduler.log, then `make down`")
    return "\n".join(lines)


def wait_for_champions(
    api: AirflowApi,
    mlflow: MlflowApi,
    models: Mapping[str, ModelReport],
    since: datetime,
    *,
    timeout: float = CHAMPION_TIMEOUT_SECONDS,
    poll_seconds: float = 2.0,
    out: Callable[[str], None] = print,
    on_poll: Callable[[], int] | None = None,
    started_at: float | None = None,
    since_what: str = "the datasets were dropped",
) -> None:
    """Wait until every model's ``champion`` is newer than before; fail fast on a failed run.

    ``on_poll`` is called on every poll: the gate's approvals are answered there (a high-risk model's
    champion moves only once its version is approved). ``started_at`` (monotonic clock): what the printed
    "after N s" counts from, when not from this call; ``since_what`` names ``since`` in a timeout."""
    started = time.monotonic() if started_at is None else started_at
    waited_from = time.monotonic()
    current: dict[str, str | None] = {}
    while True:
        fail_on_failed_runs(api, since)
        if on_poll is not None:
            on_poll()
        for name, report in models.items():
            if report.champion:
                continue
            current[name] = mlflow.champion(name)
            if is_newer(current[name], report.champion_before):
                report.champion = current[name]
                out(
                    f"  champion     {name} {_version(report.champion)} (before: "
                    f"{_version(report.champion_before)}) after {time.monotonic() - started:.0f} s"
                )
        if all(report.champion for report in models.values()):
            return
        if time.monotonic() - waited_from > timeout:
            raise StageFailed(champion_timeout_message(api, models, current, since, timeout, since_what))
        time.sleep(poll_seconds)


def asset_stage_results(
    api: AirflowApi,
    since: datetime,
    *,
    timeout: float = STAGE_TIMEOUT_SECONDS,
    poll_seconds: float = 2.0,
    on_poll: Callable[[], int] | None = None,
) -> list[StageResult]:
    """Every run of training, the gate and deployment since ``since``, oldest first, once finished."""
    results = []
    for stage, dag_id in ASSET_STAGES:
        for run in reversed(api.runs_since(dag_id, since)):
            if run.get("run_type") == "scheduled":
                continue  # the gate's and deployment's 5-minute sweeps: catch-up, not a stage of the chain
            results.append(
                wait_for_run(
                    api,
                    stage,
                    dag_id,
                    run["dag_run_id"],
                    timeout=timeout,
                    poll_seconds=poll_seconds,
                    on_poll=on_poll,
                )
            )
    return results


# --- the incident: drift with a click-through drop, caught as critical --------------------------------


def start_incident(api: AirflowApi, model: ModelReport, out: Callable[[str], None] = print) -> IncidentReport:
    """Trigger the training of ``model``'s second champion (form ``{"model": ...}``); the gate and
    deployment follow through Assets. Returns at once: the driver waits for it in :func:`run_incident`."""
    incident = IncidentReport(
        model.name, champion_before=model.champion, since=datetime.now(UTC), started=time.monotonic()
    )
    incident.training_run = api.trigger(TRAINING_DAG, {"model": model.name})
    out(
        f"  incident     {model.name}: training a second champion after {_version(model.champion)} (run "
        f"{incident.training_run}), so that a rollback has a version to go back to"
    )
    return incident


def start_canary_rollback(
    api: AirflowApi, mlflow: MlflowApi, catalog: Catalog, model: str, out: Callable[[str], None] = print
) -> CanaryRollback:
    """Drop a version of ``model``'s dataset with a unit bug and have validation take it: training, the gate
    and deployment follow through Assets, and the new version goes live as a canary beside the champion."""
    spec = catalog.model(model)
    since = datetime.now(UTC)
    drop = drop_dataset(catalog.dataset(spec.dataset), since, {spec.dataset: write_diabetes_with_unit_bug})
    rollback = CanaryRollback(model, mlflow.champion(model), drop, since)
    api.trigger(VALIDATION_DAG, {})
    out(
        f"  canary       {model}: dropped {drop.path.name} ({drop.rows} rows, sha256 {drop.sha256[:12]}), whose "
        "s5 column arrives in mg/dL instead of its log: it validates, trains and passes the gate, and must "
        "lose its canary"
    )
    return rollback


def finish_canary_rollback(
    mlflow: MlflowApi,
    rollback: CanaryRollback,
    *,
    timeout: float = CHAMPION_TIMEOUT_SECONDS,
    poll_seconds: float = 2.0,
    on_poll: Callable[[], int] | None = None,
    out: Callable[[str], None] = print,
) -> None:
    """Wait (sending labelled traffic through ``on_poll``) until the canary of the new version ends."""
    from modelops.vocabulary import DeploymentStatus, Tag

    started = time.monotonic()
    while True:
        if on_poll is not None:
            on_poll()
        facts = mlflow.model(rollback.model)
        latest = facts.latest_version if facts else None
        if is_newer(latest, rollback.champion_before):
            rollback.version = latest
            status = mlflow.version_tags(rollback.model, latest).get(Tag.DEPLOYMENT_STATUS)
            if status in (DeploymentStatus.ROLLED_BACK, DeploymentStatus.LIVE):
                rollback.status, rollback.seconds = status, time.monotonic() - started
                break
        if time.monotonic() - started > timeout:
            raise StageFailed(
                f"canary: {rollback.model}'s version trained on {rollback.drop.path.name} did not finish its "
                f"canary within {timeout:.0f} s (latest version {_version(latest)}); see the runs of "
                f"{DEPLOYMENT_DAG} (task canary) in the Airflow UI"
            )
        time.sleep(poll_seconds)
    if rollback.status != DeploymentStatus.ROLLED_BACK:
        raise StageFailed(
            f"canary: {rollback.model} {_version(rollback.version)}, trained on data with a unit bug, won its "
            f"canary and is champion; the comparison should have rolled it back: see task canary of "
            f"{DEPLOYMENT_DAG}"
        )
    out(
        f"  canary       {rollback.model} {_version(rollback.version)}'s canary was rolled back; "
        f"{_version(mlflow.champion(rollback.model))} answers every caller"
    )


def drop_text(business: Mapping[str, Any], policy: MonitoringPolicy) -> str:
    """How the business metric fared in the window (an assessment's ``business``), and in how many callers'
    rows it dropped by the critical amount: an automatic action needs ``min_callers_for_action`` of them."""
    metric = business.get("metric") or "business metric"
    if business.get("status") != "measured":
        return (
            f"{metric} {business.get('status') or 'not measured'} "
            f"({business.get('labelled_rows', 0)} labelled rows)"
        )
    drop = float(business.get("drop") or 0.0)
    needed = policy.business.drop_critical
    witnesses = sorted(
        str(caller)
        for caller, seen in (business.get("by_caller") or {}).items()
        if isinstance(seen, Mapping) and (seen.get("drop") or 0) >= needed and seen.get("significant", True)
    )
    return (
        f"{metric} {business.get('value')} against the serving version's baseline {business.get('baseline')}: "
        f"{'down' if drop >= 0 else 'up'} {abs(drop):.1%} ({business.get('labelled_rows')} labelled rows, "
        f"z={business.get('z')}); down {needed:.0%} or more in the rows of {len(witnesses)} callers"
        f"{' (' + ', '.join(witnesses) + ')' if witnesses else ''}, critical needs "
        f"{policy.min_callers_for_action}"
    )


def find_alert(
    outbox: Path, model: str, version: str | None, since: datetime, tier: str = "critical"
) -> dict[str, Any] | None:
    """The newest alert of ``tier`` about ``model`` (``version`` when given) the outbox (one JSON object a
    line) recorded at or after ``since``; None when there is none (or no outbox yet)."""
    if not outbox.is_file():
        return None
    found = None
    for line in outbox.read_text(encoding="utf-8").splitlines():
        try:
            item = json.loads(line)
            recorded = datetime.fromisoformat(str(item["recorded_at"]))
        except (ValueError, TypeError, KeyError):
            continue  # not an alert line: a relay's note, a line cut short
        if recorded.tzinfo is None:
            recorded = recorded.replace(tzinfo=UTC)
        if item.get("model_name") != model or item.get("tier") != tier or recorded < since:
            continue
        if version is not None and str(item.get("version")) != str(version):
            continue
        found = item
    return found


def alert_text(alert: Mapping[str, Any]) -> str:
    """An outbox alert as one line: its tier, model and version, title and recipients."""
    recipients = ", ".join(str(r) for r in alert.get("recipients") or []) or "the policy's channels"
    return (
        f"{alert.get('tier')} alert about {alert.get('model_name')} v{alert.get('version')} to {recipients}: "
        f"{alert.get('title')}"
    )


def _incident_failed(
    api: AirflowApi, run: StageResult, task_id: str, model: str, problem: str
) -> StageFailed:
    """The incident did not go as the demo shows it: ``problem``, with the task's log excerpt."""
    excerpt = api.task_excerpt(run.dag_id, run.run_id, task_id, model)
    return StageFailed(
        f"incident: {problem}\nrun {run.run_id} of {run.dag_id}; last lines of task {task_id}[{model}]'s log:\n"
        f"{excerpt or '(no such task instance)'}"
    )


def run_incident(
    api: AirflowApi,
    mlflow: MlflowApi,
    gateway_url: str,
    spec: ModelSpec,
    policy: MonitoringPolicy,
    incident: IncidentReport,
    client: httpx.Client,
    *,
    outbox: Path,
    out: Callable[[str], None] = print,
    champion_timeout: float = CHAMPION_TIMEOUT_SECONDS,
    stage_timeout: float = STAGE_TIMEOUT_SECONDS,
    poll_seconds: float = 2.0,
    requests: int = INCIDENT_REQUESTS,
    on_poll: Callable[[], int] | None = None,
) -> None:
    """The rest of the incident :func:`start_incident` began; fills ``incident``, raises ``StageFailed``
    when a step does not show what it should (with the task's log excerpt)."""
    name = spec.name
    timing = {"timeout": stage_timeout, "poll_seconds": poll_seconds}
    waiting = {"timeout": champion_timeout, "poll_seconds": poll_seconds, "out": out, "on_poll": on_poll}

    def show(results: Sequence[StageResult], model: ModelReport) -> None:
        incident.stages.extend(results)
        _assign(results, {name: model})
        for result in results:
            for line in stage_lines(result):
                out(line)

    # 1. The second champion: its training, the gate and deployment all finished (the gateway serves it).
    second = incident.second = ModelReport(spec, champion_before=incident.champion_before)
    wait_for_champions(
        api,
        mlflow,
        {name: second},
        incident.since,
        started_at=incident.started,
        since_what="the incident's training was triggered",
        **waiting,
    )
    show(asset_stage_results(api, incident.since, on_poll=on_poll, **timing), second)

    # 2. Drifted traffic whose users click far less, and its labels: exactly the window monitoring assesses.
    window_start = datetime.now(UTC)
    traffic = incident.traffic = send_incident_traffic(gateway_url, spec, client, requests=requests)
    out(f"  traffic      {traffic.line()}; drifted, and its users click far less")
    if traffic.ok == 0 or not traffic.labels_delivered:
        raise StageFailed(
            f"incident: the gateway scored or labelled nothing for {name}: {traffic.line()}; "
            "see .demo/logs/gateway.log"
        )
    window_end = datetime.now(UTC)

    # 3. Monitoring of that window: critical, the rollback, the alert, the retraining request.
    monitoring_since = datetime.now(UTC)
    conf = {"models": [name], "window_start": window_start.isoformat(), "window_end": window_end.isoformat()}
    run = incident.monitoring = wait_for_run(
        api, "incident", DRIFT_DAG, api.trigger(DRIFT_DAG, conf), on_poll=on_poll, **timing
    )
    incident.stages.append(run)
    out(f"  incident     monitoring {run.state} in {run.seconds:.1f} s (run {run.run_id})")

    verdict = incident.verdict = run.for_task("assess_drift", name)
    if verdict is None:
        raise _incident_failed(api, run, "assess_drift", name, f"the window of {name} has no verdict")
    business = verdict.value.get("business")
    incident.drop = drop_text(business if isinstance(business, Mapping) else {}, policy)
    if verdict.value.get("verdict") != "critical":
        raise _incident_failed(
            api,
            run,
            "assess_drift",
            name,
            f"the drifted window with its click drop was assessed {verdict.value.get('verdict')!r}, not "
            f"critical: {verdict.summary}; drift {verdict.value.get('drift_level')}, {incident.drop}",
        )
    out(f"  verdict      {verdict.summary}")
    out(f"  drop         {incident.drop}")

    rollback = incident.rollback = run.for_task("roll_back_on_critical", name)
    if rollback is None or rollback.value.get("decision") != Decision.ROLLED_BACK:
        raise _incident_failed(
            api,
            run,
            "roll_back_on_critical",
            name,
            f"no rollback after the critical verdict: "
            f"{rollback.summary if rollback else '(the task returned nothing)'}",
        )
    out(f"  rollback     {rollback.summary}")

    assessed = verdict.value.get("version")
    incident.outbox = outbox
    alert = incident.alert = find_alert(
        outbox, name, None if assessed is None else str(assessed), monitoring_since
    )
    if alert is None:
        raise _incident_failed(
            api,
            run,
            "assess_drift",
            name,
            f"no critical alert about {name} v{assessed} in {outbox} since {monitoring_since.isoformat()}: "
            "the task recorded it as suppressed (a cold start: the stack's Airflow processes need "
            "MODELOPS_COLD_START_DAYS=0, see devstack/modelops_dev/stack.py; or the cool-down of the same "
            "alert) or its delivery failed",
        )
    out(f"  alert        {alert_text(alert)} (outbox {outbox})")

    request = incident.request = run.for_task("request_retraining", name)
    if request is None:
        raise _incident_failed(
            api,
            run,
            "request_retraining",
            name,
            f"the critical verdict did not request a retraining of {name}",
        )
    out(f"  retraining   {request.summary}")

    # 4. Airflow retrains through the retraining-request Asset: training, the gate, deployment.
    back_to = rollback.value.get("champion_version")  # modelops.evidence.CHAMPION_FIELD: the version put back
    retrained = incident.retrained = ModelReport(
        spec, champion_before=None if back_to is None else str(back_to)
    )
    wait_for_champions(
        api,
        mlflow,
        {name: retrained},
        monitoring_since,
        since_what="the incident's monitoring run",
        **waiting,
    )
    if not is_newer(retrained.champion, second.champion):
        raise StageFailed(
            f"incident: after the rollback {name}'s champion moved to {_version(retrained.champion)}, not to a "
            f"version newer than {_version(second.champion)}; see the runs of {TRAINING_DAG} in the Airflow UI"
        )
    show(asset_stage_results(api, monitoring_since, on_poll=on_poll, **timing), retrained)
    incident.seconds = time.monotonic() - incident.started


def drive(
    api: AirflowApi,
    mlflow: MlflowApi,
    gateway_url: str,
    catalog: Catalog,
    *,
    models: Sequence[str] = DEMO_MODELS,
    out: Callable[[str], None] = print,
    champion_timeout: float = CHAMPION_TIMEOUT_SECONDS,
    stage_timeout: float = STAGE_TIMEOUT_SECONDS,
    poll_seconds: float = 2.0,
    simulated_requests: int = SIMULATED_REQUESTS,
    sampled_requests: int = SAMPLED_REQUESTS,
    writers: Mapping[str, Callable[[Path], int]] = DATASET_WRITERS,
    approver_passwords: Mapping[str, str] | None = None,
    incident_model: str | None = INCIDENT_MODEL,
    incident_requests: int = INCIDENT_REQUESTS,
    outbox: Path | None = None,
    canary_rollback_model: str | None = CANARY_ROLLBACK_MODEL,
    staging: Path | None = None,
) -> LifecycleReport:
    """Run ``models`` through the six stages of a running stack; returns what the summary shows.

    ``approver_passwords`` (user -> password): the approvers the driver may answer the gate's approval
    forms as; None leaves a form unanswered (the run then waits, and the wait times out).
    ``incident_model``: the model of the incident (None: no incident), whose critical alert is looked for
    in ``outbox`` (default: ``$MODELOPS_HOME/outbox/alerts.jsonl``, as the stack's tasks write it).
    ``staging``: where dataset files are written before their upload to an object-storage incoming folder.
    """
    specs = [catalog.model(name) for name in models]
    if incident_model is not None and incident_model not in models:
        raise ConfigurationError(
            f"the incident's model {incident_model} is not one of the demo's {list(models)}"
        )
    reports = {spec.name: ModelReport(spec, champion_before=mlflow.champion(spec.name)) for spec in specs}
    timing = {"timeout": stage_timeout, "poll_seconds": poll_seconds}

    since = datetime.now(UTC)
    approver = (
        Approver(
            api,
            approver_passwords,
            dag_id=GATE_DAG,
            since=since,
            out=out,
            settle_seconds=APPROVAL_SETTLE_SECONDS,
        )
        if approver_passwords is not None
        else None
    )
    drops: dict[str, DatasetDrop] = {}
    for dataset in dict.fromkeys(spec.dataset for spec in specs):
        drop = drops[dataset] = drop_dataset(catalog.dataset(dataset), since, writers, staging=staging)
        out(f"  dataset      {dataset}: {drop.where} ({drop.rows} rows, sha256 {drop.sha256[:12]})")
    report = LifecycleReport(drops=drops, models=reports)

    def record(results: Sequence[StageResult]) -> None:
        report.stages.extend(results)
        _assign(results, reports)
        for result in results:
            for line in stage_lines(result):
                out(line)

    # Validation also runs every 5 minutes by itself: whichever run takes the new files, the Asset
    # events follow, and the champions say when each model is through.
    record([wait_for_run(api, "validation", VALIDATION_DAG, api.trigger(VALIDATION_DAG, {}), **timing)])
    wait_for_champions(
        api,
        mlflow,
        reports,
        since,
        timeout=champion_timeout,
        poll_seconds=poll_seconds,
        out=out,
        on_poll=approver,
    )
    record(asset_stage_results(api, since, on_poll=approver, **timing))

    window_start = datetime.now(UTC)
    with httpx.Client(timeout=30, trust_env=False) as client:
        # Canaries soak while the driver waits: labelled traffic on every poll gives their arms calls to
        # compare (the first versions above went live without one: nothing to compare with).
        pump = report.canary_traffic = CanaryTraffic(gateway_url, specs, drops, client)

        def poll() -> int:
            return (approver() if approver is not None else 0) + pump()

        for spec in specs:
            traffic = reports[spec.name].traffic = send_traffic(
                gateway_url,
                spec,
                drops[spec.dataset],
                client,
                simulated_requests=simulated_requests,
                sampled_requests=sampled_requests,
            )
            out(f"  traffic      {traffic.line()}")
            if traffic.ok == 0:
                raise StageFailed(
                    f"the gateway scored no request for {spec.name}: {traffic.line()}; see .demo/logs/gateway.log"
                )
        window_end = datetime.now(UTC)
        drift_conf = {
            "models": [],
            "window_start": window_start.isoformat(),
            "window_end": window_end.isoformat(),
        }
        drift_run = api.trigger(DRIFT_DAG, drift_conf)
        # The incident's second champion trains, passes the gate and deploys while the stationary window
        # (closed already, so served by the first champion only) is assessed and retirement runs: a minute
        # the demo would otherwise wait for.
        if incident_model is not None:
            report.incident = start_incident(api, reports[incident_model], out)
        if canary_rollback_model is not None:
            report.canary_rollback = start_canary_rollback(api, mlflow, catalog, canary_rollback_model, out)
        record([wait_for_run(api, "monitoring", DRIFT_DAG, drift_run, **timing)])
        retirement_conf = {"models": [], "versions": [], "reason": None, "dry_run": True}
        record(
            [
                wait_for_run(
                    api, "retirement", RETIREMENT_DAG, api.trigger(RETIREMENT_DAG, retirement_conf), **timing
                )
            ]
        )
        if report.incident is not None:
            if outbox is None:
                from modelops.notifications import default_outbox_path

                outbox = default_outbox_path()
            incident_spec = reports[report.incident.model].spec
            run_incident(
                api,
                mlflow,
                gateway_url,
                incident_spec,
                catalog.policies_for(incident_spec).monitoring,
                report.incident,
                client,
                outbox=outbox,
                out=out,
                champion_timeout=champion_timeout,
                stage_timeout=stage_timeout,
                poll_seconds=poll_seconds,
                requests=incident_requests,
                on_poll=poll,
            )
        if report.canary_rollback is not None:
            finish_canary_rollback(
                mlflow,
                report.canary_rollback,
                timeout=champion_timeout,
                poll_seconds=poll_seconds,
                on_poll=poll,
                out=out,
            )
            # Its deployment run (the canary's decision) may have started after the incident listed its
            # runs: shown and kept, not given to the model's report (its champion did not change).
            seen = {
                (r.dag_id, r.run_id)
                for r in [*report.stages, *(report.incident.stages if report.incident else [])]
            }
            for result in asset_stage_results(api, report.canary_rollback.since, on_poll=poll, **timing):
                if result.dag_id == DEPLOYMENT_DAG and (result.dag_id, result.run_id) not in seen:
                    report.stages.append(result)
                    for line in stage_lines(result):
                        out(line)

        for spec in specs:
            model = reports[spec.name]
            model.example = example_row(spec, drops[spec.dataset])
            model.prediction = predict(gateway_url, spec.name, model.example, client, team=spec.team)
            model.facts = mlflow.model(spec.name)
    return report


# --- the summary ---------------------------------------------------------------------------------


def incident_lines(incident: IncidentReport) -> list[str]:
    """The summary's lines about the incident (what it found so far, when it stopped early)."""
    second, retrained, traffic = incident.second, incident.retrained, incident.traffic
    lines = [
        f"  incident        {incident.model}: drifted traffic whose users click far less, with its labels"
    ]
    if second is not None:
        lines.append(
            f"    before        champion {_version(second.champion)} (before: {_version(second.champion_before)}), "
            "trained first so that there is an earlier champion to go back to"
        )
    if traffic is not None:
        lines.append(f"    traffic       {traffic.line()}")
    if incident.verdict is not None:
        lines.append(f"    verdict       {incident.verdict.summary}")
        lines.append(f"    drop          {incident.drop}")
    if incident.rollback is not None:
        lines.append(f"    rollback      {incident.rollback.summary}")
    if incident.alert is not None:
        lines.append(f"    alert         {alert_text(incident.alert)}")
        lines.append(f"    outbox        {incident.outbox}")
    if retrained is not None and retrained.champion is not None:
        lines.append(
            f"    retraining    {_version(retrained.trained_version)} trained on request ({retrained.holdout()}), "
            f"{retrained.approval()}; champion {_version(retrained.champion)} (before: "
            f"{_version(retrained.champion_before)})"
        )
    if incident.seconds is not None:
        lines.append(f"    took          {incident.seconds:.0f} s, from the second champion's training on")
    return lines


def summary_lines(
    report: LifecycleReport,
    *,
    ports: Ports,
    default_model: str,
    password: str,
    approver_passwords: Mapping[str, str] | None = None,
    audit: Any,
    logs: Path,
    wall_seconds: float,
    shares: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
) -> list[str]:
    """The summary ``make demo`` ends with (``audit``: a ``ChainVerification``; ``shares``: per model, the
    share history :func:`modelops.stages.canary.traffic_history` reads from the audit log)."""
    lines = ["", "ModelOps demo: summary"]
    for drop in report.drops.values():
        lines.append(
            f"  dataset         {drop.dataset}: {drop.where} ({drop.rows} rows, sha256 {drop.sha256})"
        )
    for model in report.models.values():
        spec = model.spec
        aliases = model.facts.aliases if model.facts else {}
        alias_text = ", ".join(f"{alias}=v{version}" for alias, version in sorted(aliases.items())) or "none"
        champion = (model.facts.champion if model.facts else None) or model.champion
        traffic = model.traffic
        incident = report.incident
        later = incident.trained_versions() if incident is not None and incident.model == spec.name else []
        trained = f"{_version(model.trained_version)} trained in this run" + (
            f", then {' and '.join(_version(v) for v in later)} in the incident" if later else ""
        )
        lines += [
            f"  model           {spec.name} ({spec.task.replace('_', ' ')}, dataset {spec.dataset})",
            f"    version       {trained}; champion "
            f"{_version(champion)} (before: {_version(model.champion_before)})",
            f"    aliases       {alias_text}",
            f"    holdout       {model.holdout()}",
            f"    gate          {model.approval()}",
            f"    deployment    {model.fact('deployment')}",
            f"    traffic       {traffic.line() if traffic else '(none sent)'}",
            f"    drift         {model.drift()}",
            f"    retirement    {model.fact('retirement')}",
            f"    serving       POST {model_base_url(ports.gateway_url, spec.name)}/invocations",
            f"      one row     {json.dumps(model.example, default=str)}",
            f"      answer      {describe_prediction(spec.task, model.prediction)}",
        ]
    if report.incident is not None:
        lines += incident_lines(report.incident)
    lines += canary_lines(report, shares or {})
    chain = (
        f"verified, {audit.count} records, HMACs and {audit.anchors_checked} anchors checked"
        if audit.ok
        else f"BROKEN after {audit.count} records: {audit.problem}"
    )
    lines += [
        f"  default model   {default_model} also answers POST {ports.gateway_url}/invocations",
        f"  audit chain     {chain}",
        f"  Airflow UI      {ports.airflow_url}  (login {ADMIN_USER} / {password})",
        *(
            f"  approver        {user} / {secret}  (answers the gate's approvals: Browse > Required Actions)"
            for user, secret in (approver_passwords or {}).items()
        ),
        f"  MLflow UI       {ports.mlflow_url}",
        f"  logs            {logs}/ (one file per service)",
        f"  wall time       {wall_seconds:.0f} s",
        "  services keep running until `make down`",
    ]
    return lines


def canary_lines(report: LifecycleReport, traffic: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[str]:
    """Each canary's outcome and who served which share from when to when, from the audit log."""
    lines: list[str] = []
    outcomes = {
        outcome.summary: outcome  # a run seen by the lifecycle and by the incident is one run
        for result in [*report.stages, *(report.incident.stages if report.incident else [])]
        for outcome in result.outcomes
        if outcome.task_id == "canary"
        and outcome.value.get("decision") in (Decision.PROMOTED, Decision.ROLLED_BACK)
    }.values()
    if not outcomes and not any(traffic.values()):
        return lines
    lines.append("  canaries")
    for outcome in outcomes:
        lines.append(f"    {outcome.value.get('decision'):<12}{outcome.summary}")
    if report.canary_traffic is not None:
        for model, arms in report.canary_traffic.sent.items():
            sent = ", ".join(f"{count} calls to the {arm}" for arm, count in sorted(arms.items())) or "none"
            labels = report.canary_traffic.labels.get(model, 0)
            lines.append(f"    traffic     {model}: {sent}; {labels} labels delivered while canaries soaked")
    for model, periods in traffic.items():
        if not periods:
            continue
        lines.append(f"    shares      {model}")
        for period in periods:
            until = period.get("to") or "now"
            lines.append(
                f"      v{period['version']:<4} {period['arm']:<10} {float(period['share']):>4.0%}  "
                f"{str(period['from'])[:19]} -> {str(until)[:19]}"
            )
    return lines


# --- up / down / status --------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.start = time.monotonic()

    def __call__(self, message: str) -> None:
        print(f"[{time.monotonic() - self.start:6.1f}s] {message}", flush=True)


def check_catalog(
    catalog: Catalog,
    models: Sequence[str] = DEMO_MODELS,
    approvers: Sequence[str] = APPROVER_USERS,
    incident_model: str | None = INCIDENT_MODEL,
) -> None:
    """Fail before anything starts if a demo model, data for its dataset, or a user of the demo who may
    approve it (where its policy needs a person's approval) is missing, or if the incident's model could
    not show a critical verdict's rollback and retraining."""
    for name in models:
        spec = catalog.model(name)
        if spec.dataset not in DATASET_WRITERS:
            raise ConfigurationError(
                f"model {name} trains on dataset {spec.dataset!r}, for which the demo writes no data "
                f"(it writes {sorted(DATASET_WRITERS)})"
            )
        approval = catalog.policies_for(spec).compliance.approval
        if approval.required and not set(approval.approvers) & set(approvers):
            raise ConfigurationError(
                f"model {name}'s compliance policy needs an approval by one of {approval.approvers}, none "
                f"of whom is an Airflow user of the demo ({', '.join(approvers)}); add one to "
                "APPROVER_USERS in devstack/modelops_dev/stack.py"
            )
    if incident_model is None:
        return
    if incident_model not in models:
        raise ConfigurationError(
            f"the incident's model {incident_model} is not one of the demo's {list(models)}"
        )
    spec = catalog.model(incident_model)
    if spec.dataset != CTR_DATASET:
        raise ConfigurationError(
            f"the incident sends click-through traffic; {incident_model} trains on {spec.dataset!r}, not "
            f"{CTR_DATASET!r}: set INCIDENT_MODEL in devstack/modelops_dev/driver.py"
        )
    policy = catalog.policies_for(spec).monitoring
    rows = INCIDENT_REQUESTS * ROWS_PER_REQUEST
    if not policy.rollback_on_critical or "critical" not in policy.request_retraining_on:
        raise ConfigurationError(
            f"{incident_model}'s monitoring policy {policy.name} does not roll back and request retraining on "
            "a critical verdict (rollback_on_critical, request_retraining_on), which the incident shows"
        )
    if rows < max(policy.min_rows, policy.business.min_labelled_rows):
        raise ConfigurationError(
            f"the incident sends {rows} rows; {incident_model}'s monitoring policy {policy.name} needs "
            f"{policy.min_rows} rows and {policy.business.min_labelled_rows} labelled ones for a verdict"
        )


def up() -> int:
    say = Clock()
    layout = Layout(processes.demo_dir())
    still_running = processes.running_services(layout.run)
    if still_running:
        print(
            f"services from a previous `make demo` still run ({', '.join(still_running)}); "
            "run `make down` first",
            file=sys.stderr,
        )
        return 1
    ports = Ports.from_env(os.environ)
    layout.create()
    passwords = ensure_passwords(layout.passwords_file, AIRFLOW_USERS)
    password = passwords[ADMIN_USER]
    approver_passwords = {user: passwords[user] for user in APPROVER_USERS}
    env = stack_env(layout, ports, os.environ)
    # This process reads the same settings files (MODELOPS_HOME expansion, the incoming folders).
    os.environ.update(
        {k: v for k, v in env.items() if k.startswith("MODELOPS_") or k == "MLFLOW_TRACKING_URI"}
    )

    from modelops import airflow_settings
    from modelops.settings import load_catalog

    catalog = load_catalog()
    check_catalog(catalog)
    settings = airflow_settings.load_settings_file()
    stack = services(layout, ports, env, airflow_settings.as_env(settings))
    for service in stack:
        processes.check_port(service)
    say(f"runtime folder {layout.root}")
    say("ports " + ", ".join(f"{name}={number}" for name, number in ports.by_variable().items()))

    t0 = time.monotonic()
    processes.run_to_log(
        [str(Path(sys.executable).with_name("airflow")), "db", "migrate"],
        env,
        layout.logs / "airflow-db-migrate.log",
        "airflow db migrate",
    )
    say(f"airflow db migrate done ({time.monotonic() - t0:.1f} s)")
    t0 = time.monotonic()
    airflow_settings.apply(settings, env)
    say(
        f"airflow_settings.yaml loaded: {len(settings.connections)} connections, {len(settings.pools)} pools, "
        f"{len(settings.variables)} variables ({time.monotonic() - t0:.1f} s)"
    )

    say("starting " + ", ".join(s.name for s in stack))
    try:
        processes.start_all(stack, layout.run, say, HEALTH_TIMEOUT_SECONDS)
    except ModelOpsError:
        print("start-up failed; stopping what was started", file=sys.stderr)
        down(quiet=True)
        raise

    api = AirflowApi(ports.airflow_url, ADMIN_USER, password)
    wait_for_dags(api, DAG_IDS)
    for dag_id in DAG_IDS:
        api.unpause(dag_id)
    say(f"{len(DAG_IDS)} DAGs parsed and unpaused; running {' and '.join(DEMO_MODELS)} through them")

    report = drive(
        api,
        MlflowApi(ports.mlflow_url),
        ports.gateway_url,
        catalog,
        approver_passwords=approver_passwords,
        outbox=layout.outbox_file,
    )

    from modelops.audit import AuditKeyring, AuditStore
    from modelops.audit.keys import KEYS_ENV

    keyring = AuditKeyring.from_json(os.environ[KEYS_ENV], source=KEYS_ENV)
    from modelops.audit.anchors import LocalFolderAnchorStore

    # The anchors the demo's tasks wrote (connection modelops_audit_anchor in airflow_settings.yaml).
    anchors = LocalFolderAnchorStore(layout.modelops_home / "audit-anchors")
    from modelops.stages.canary import traffic_history

    store = AuditStore(audit_url(layout), keyring=keyring)
    audit = store.verify(anchors)
    shares = {name: traffic_history(store, name) for name in DEMO_MODELS}
    from modelops.lineage import lineage, render_text

    # What `modelops lineage MODEL@VERSION` prints, for the champion the demo ends with.
    incident_model = report.incident.model if report.incident else DEMO_MODELS[0]
    champion = report.models[incident_model].facts.champion if report.models[incident_model].facts else None
    lineage_text = render_text(lineage(store, None, incident_model, champion)) if champion else ""
    store.dispose()
    for line in summary_lines(
        report,
        ports=ports,
        default_model=catalog.platform.default_model,
        password=password,
        approver_passwords=approver_passwords,
        audit=audit,
        logs=layout.logs,
        wall_seconds=time.monotonic() - say.start,
        shares=shares,
    ):
        print(line)
    if lineage_text:
        print(
            f"\nLineage of the champion ({incident_model}@{champion}; `modelops lineage {incident_model}@{champion}`):"
        )
        print(lineage_text)
    print(
        f"\nGovernance view: {ports.airflow_url}/plugin/modelops (Browse > Model governance in the Airflow UI)"
    )
    return 0 if audit.ok else 1


def down(quiet: bool = False) -> int:
    run_dir = Layout(processes.demo_dir()).run
    known = [name for name in SERVICE_NAMES if processes.pid_file(name, run_dir).exists()]
    others = (
        sorted(p.stem for p in run_dir.glob("*.pid") if p.stem not in SERVICE_NAMES)
        if run_dir.is_dir()
        else []
    )
    stopped = 0
    for name in [*others, *reversed(known)]:
        outcome = processes.stop(name, run_dir)
        if outcome in ("stopped", "killed"):
            stopped += 1
            if not quiet:
                print(f"stopped {name}" + (" (had to SIGKILL)" if outcome == "killed" else ""))
    if not quiet and stopped == 0:
        print("nothing was running")
    return 0


def status() -> int:
    layout = Layout(processes.demo_dir())
    ports = Ports.from_env(os.environ)
    urls = {
        "mlflow": ports.mlflow_url,
        "airflow-api-server": ports.airflow_url,
        "airflow-worker-log-server": f"{LOOPBACK}:{ports.worker_log}",
        "airflow-triggerer-log-server": f"{LOOPBACK}:{ports.triggerer_log}",
        "gateway": f"{ports.gateway_url}/invocations",
    }
    states = {state.name: state for state in processes.status(layout.run)}
    if not any(state.running for state in states.values()):
        print("nothing is running (start it with `make demo`)")
        return 0
    for name in SERVICE_NAMES:
        state = states.get(name)
        running = state is not None and state.running
        detail = f"pid {state.pid}, {state.processes} processes" if running and state else "not running"
        url = f"  {urls[name]}" if name in urls and running else ""
        print(f"  {name:<28} {detail}{url}")
    if layout.passwords_file.is_file():
        for user, secret in known_passwords(layout.passwords_file, AIRFLOW_USERS).items():
            print(f"  Airflow login: {user} / {secret}  (role {AIRFLOW_USERS[user]})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modelops_dev", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up", "down", "status"])
    args = parser.parse_args(argv)
    try:
        return {"up": up, "down": down, "status": status}[args.command]()
    except ModelOpsError as exc:
        print(f"\nmake demo: {exc}", file=sys.stderr)
        if args.command == "up":
            print(
                "services that started keep running for inspection; `make down` stops them", file=sys.stderr
            )
        return 1


if __name__ == "__main__":
    sys.exit(main())
