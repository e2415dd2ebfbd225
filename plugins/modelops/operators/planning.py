"""What each stage DAG's first task does: decide which models (or files) this run concerns.

Each function reads the run's triggering Asset events and trigger-form params, calls the stage's plan
function and returns a JSON-safe list, one entry per mapped task instance (``expand_kwargs``). A plan
that cannot be made from the inputs (an unknown model, a settings error) fails the task without retry.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import Asset, BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from modelops.errors import GateFailed, ModelOpsError
from modelops.hooks.audit import AuditHook
from modelops.hooks.registry import MlflowRegistryHook
from modelops.stages.outcome import json_safe
from modelops.vocabulary import Tag

if TYPE_CHECKING:
    from airflow.sdk import Context

    from modelops.settings import Catalog


def triggering_extras(context: Context, asset: Asset) -> list[dict[str, Any]]:
    """The ``extra`` of each event of ``asset`` that triggered this run, oldest first (empty if none)."""
    events = context.get("triggering_asset_events") or {}
    found: list[dict[str, Any]] = []
    for triggered, asset_events in events.items():
        if getattr(triggered, "name", None) == asset.name:
            found.extend(dict(event.extra or {}) for event in asset_events)
    return found


def _planned(make: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    try:
        plan = make()
    except ModelOpsError as exc:
        # The same inputs would give the same error: fail without a retry, naming the problem.
        raise AirflowFailException(str(exc)) from exc
    return json_safe(plan)


def _catalog() -> Catalog:
    from modelops.settings import load_catalog

    return load_catalog()


def validation_plan(*, datasets: list[str] | None, dataset_uri: str | None) -> list[dict[str, Any]]:
    from modelops.stages.validation import plan_validation

    return _planned(
        lambda: plan_validation(
            catalog=_catalog(),
            audit=AuditHook().get_conn(),
            datasets=list(datasets or []),
            dataset_uri=dataset_uri or None,
        )
    )


def training_plan(context: Context, *, model: str | None, dataset_sha256: str | None) -> list[dict[str, Any]]:
    from modelops.assets import RETRAINING_REQUEST, VALIDATED_DATASET
    from modelops.stages.training import plan_training, untrained_datasets

    def make() -> list[dict[str, Any]]:
        catalog = _catalog()
        dataset_events = triggering_extras(context, VALIDATED_DATASET)
        retraining_events = triggering_extras(context, RETRAINING_REQUEST)
        registry = MlflowRegistryHook().get_conn() if dataset_events or retraining_events else None
        untrained = untrained_datasets(catalog, AuditHook().get_conn(), registry) if registry else {}

        def trained_on(model: str, sha256: str) -> bool:
            return bool(registry and registry.find_versions(model, **{Tag.TRAIN_DATA_SHA256: sha256}))

        return plan_training(
            catalog=catalog,
            dataset_events=dataset_events,
            retraining_events=retraining_events,
            model=model or None,
            dataset_sha256=dataset_sha256 or None,
            untrained=untrained,
            trained_on=trained_on,
        )

    return _planned(make)


def is_scheduled(run_type: object) -> bool:
    """Whether a run is the DAG's timetable run. The task SDK's ``DagRunType`` is a str enum whose
    ``str()`` is ``"DagRunType.SCHEDULED"``, not its value: compare the value."""
    return getattr(run_type, "value", run_type) == "scheduled"


def version_plan(
    context: Context,
    *,
    asset: Asset,
    model: str | None,
    model_version: int | str | None,
    serving_only: bool = False,
) -> list[dict[str, Any]]:
    from modelops.stages.common import plan_versions

    def make() -> list[dict[str, Any]]:
        catalog = _catalog()
        events = triggering_extras(context, asset)
        # The DAG's periodic run: no events and no form, it only catches up on what events were lost.
        sweep = is_scheduled(context["dag_run"].run_type)
        pending, acted_on = None, None
        if events or sweep:
            from modelops.stages.common import acted_on_subjects
            from modelops.vocabulary import AuditAction

            if serving_only:
                from modelops.stages.deployment import undeployed_approvals as still_owed
            else:
                from modelops.stages.compliance import ungated_candidates as still_owed
            audit = AuditHook().get_conn()
            action = AuditAction.MODEL_DEPLOYED if serving_only else AuditAction.GATE_DECIDED
            acted_on = acted_on_subjects(audit, action)  # read once: the catch-up and the events use it
            pending = still_owed(catalog, audit, acted_on)
        plan = plan_versions(
            catalog=catalog,
            events=events,
            model=model or None,
            model_version=model_version,
            serving_only=serving_only,
            pending=pending,
            sweep=sweep,
            acted_on=acted_on,
        )
        return taken_up(
            context, plan, manual=not (events or sweep), stage="deployment" if serving_only else "gate"
        )

    return _planned(make)


log = logging.getLogger(__name__)
LIVE_RUN_STATES = ["queued", "running"]


def taken_up(
    context: Context, plan: list[dict[str, Any]], *, manual: bool, stage: str
) -> list[dict[str, Any]]:
    """The entries of a gate or deployment plan this run takes up (:func:`modelops.stages.common.take_up`).

    Both stages run several runs at once: a gate run may wait hours for an approver, a deployment run
    soaks a canary for as long as the model's spec says. Each run's catch-up and every sweep see the same
    pending work, so without a take-up two runs act on it (the 20-model benchmark recorded 42 approvals of
    10 versions). The gate takes up a version until its run decides it; deployment takes up a whole model
    while its run is live, as only one run may move a model's aliases and traffic. A manual run pins the
    gate version its form left empty (the alias ``candidate`` now) and fails, naming the run, if another
    run has it; automatic runs leave such entries to the run that has them.
    """
    from modelops.stages.common import resolve_version, take_up
    from modelops.vocabulary import Alias, AuditAction, Decision, model_subject

    hook = AuditHook()
    actor, dag_id, run_id, task_id = hook.run_identity(context)
    task_instance = context["ti"]

    def run_is_live(other_dag_id: str, other_run_id: str) -> bool:
        # The task SDK's count (not get_dagrun_state): a run deleted from Airflow counts 0, not an error.
        return task_instance.get_dr_count(other_dag_id, run_ids=[other_run_id], states=LIVE_RUN_STATES) > 0

    registry = None
    taken: list[dict[str, Any]] = []
    for entry in plan:
        name, version = entry["model"], entry["model_version"]
        if stage == "gate":
            if version is None:
                registry = registry or MlflowRegistryHook().get_conn()
                version = resolve_version(registry, name, None, Alias.CANDIDATE)
            what, subject, action = (
                f"{name} v{version}",
                model_subject(name, version),
                AuditAction.GATE_TAKEN_UP,
            )
            rules: dict[str, Any] = {
                "decided": AuditAction.GATE_DECIDED,
                "redo_decided": manual,
                "still_working": (Decision.AWAITING_APPROVAL,),
            }
        else:
            what, subject, action = name, model_subject(name), AuditAction.DEPLOYMENT_TAKEN_UP
            rules = {"decided": None}
        why_not = take_up(
            hook.store,
            subject=subject,
            taken_up=action,
            actor=actor,
            dag_id=dag_id,
            run_id=run_id,
            task_id=task_id,
            run_is_live=run_is_live,
            **rules,
        )
        if why_not is None:
            taken.append({**entry, "model_version": None if version is None else str(version)})
            log.info("%s is taken up by this run (%s)", what, action)
        elif manual:
            doing = "gated" if stage == "gate" else "deployed"
            waiting = (
                "an approval waits in Required actions" if stage == "gate" else "a canary may be soaking"
            )
            raise GateFailed(
                f"{what} is not {doing} by this run: {why_not}. Wait for that run ({waiting}), or, if it is "
                "stuck, mark it failed in the Airflow UI and trigger again"
            )
        else:
            log.info("%s is left out of this run: %s", what, why_not)
    recorded = bool(taken)
    if taken and stage == "deployment" and not manual:
        # Read after the take-ups: a run that held a model until just now may have deployed the version this
        # plan read as owed. Then there is nothing left to do for it.
        for entry in list(taken):
            subject = model_subject(entry["model"], entry["model_version"])
            if hook.store.newest_authentic(subject, (AuditAction.MODEL_DEPLOYED,)) is not None:
                log.info(
                    "%s v%s was deployed by another run meanwhile", entry["model"], entry["model_version"]
                )
                taken.remove(entry)
    if recorded:
        # The take-ups are on the chain now: anchor its head, as every task that records does.
        hook.anchor_head()
    return taken


def monitoring_plan(*, models: list[str] | None) -> list[dict[str, Any]]:
    from modelops.stages.monitoring import plan_monitoring

    return _planned(
        lambda: plan_monitoring(
            catalog=_catalog(), registry=MlflowRegistryHook().get_conn(), models=list(models or [])
        )
    )


def retirement_plan(
    *, models: list[str] | None, versions: list[int] | None, reason: str | None, dry_run: bool
) -> list[dict[str, Any]]:
    from modelops.stages.retirement import plan_retirement

    return _planned(
        lambda: plan_retirement(
            catalog=_catalog(),
            registry=MlflowRegistryHook().get_conn(),
            models=list(models or []),
            versions=list(versions or []),
            reason=reason or None,
            dry_run=bool(dry_run),
        )
    )


PLANS = ("validation", "training", "gate", "deployment", "monitoring", "retirement")


class StagePlanOperator(BaseOperator):
    """The first task of a stage DAG: the list its mapped task expands over, one entry per model or file.

    A classic operator rather than ``@task``: DAG files then need no ``airflow.sdk.task`` import, which
    costs ~150 ms of parse time per file (the TaskFlow decorators and the standard provider).
    """

    template_fields: Sequence[str] = ()
    ui_color = "#f4f4f4"

    def __init__(self, *, stage: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if stage not in PLANS:
            raise ValueError(f"stage must be one of {PLANS}, got {stage!r}")
        self.stage = stage

    def execute(self, context: Context) -> list[dict[str, Any]]:
        from modelops.assets import MODEL_APPROVED, MODEL_CANDIDATE

        params = context["params"]
        if self.stage == "validation":
            plan = validation_plan(datasets=params["datasets"], dataset_uri=params["dataset_uri"])
        elif self.stage == "training":
            plan = training_plan(context, model=params["model"], dataset_sha256=params["dataset_sha256"])
        elif self.stage in ("gate", "deployment"):
            asset = MODEL_CANDIDATE if self.stage == "gate" else MODEL_APPROVED
            plan = version_plan(
                context,
                asset=asset,
                model=params["model"],
                model_version=params["model_version"],
                # An approved version of a model whose spec disables serving is not deployed, not refused.
                serving_only=self.stage == "deployment",
            )
        elif self.stage == "monitoring":
            plan = monitoring_plan(models=params["models"])
        else:
            plan = retirement_plan(
                models=params["models"],
                versions=params["versions"],
                reason=params["reason"],
                dry_run=params["dry_run"],
            )
        self.log.info("%s plan: %d item(s): %s", self.stage, len(plan), plan)
        return plan
