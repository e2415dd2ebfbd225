"""Helpers the version stages share: which model versions a run acts on."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

from modelops.errors import GateFailed
from modelops.settings import Catalog
from modelops.vocabulary import Alias, Decision, EventField, model_subject

if TYPE_CHECKING:
    from modelops.audit import AuditRecord, AuditStore
    from modelops.registry import ModelRegistry


def resolve_version(registry: ModelRegistry, name: str, version: str | int | None, alias: Alias) -> str:
    """The version a stage acts on: the one given, else the one ``alias`` points at."""
    if version not in (None, ""):
        return str(version)
    found = registry.version_by_alias(name, alias)
    if found is None:
        raise GateFailed(
            f"model {name!r} has no version with alias {str(alias)!r}; give model_version explicitly"
        )
    return found.version


def plan_versions(
    *,
    catalog: Catalog,
    events: list[dict[str, Any]],
    model: str | None,
    model_version: int | str | None,
    serving_only: bool = False,
    pending: dict[str, str] | None = None,
    sweep: bool = False,
    acted_on: set[str] | None = None,
) -> list[dict[str, Any]]:
    """One entry per model a version-stage (gate, deployment) acts on: ``{"model", "model_version"}``.

    ``pending`` (model -> version): versions the record says are still to act on (see
    :func:`newest_unacted_version`), added to an event-triggered run whatever its events, and all a
    ``sweep`` (the DAG's periodic run, no events, no form) acts on. ``acted_on``: subjects
    (``model:NAME@VERSION``) the stage has already decided on: an event for one of them is not acted on
    twice (a catch-up may have acted on it before its event, which Airflow kept, started a run).

    From the triggering events, the newest version per model a spec declares (an event of an unknown
    model, or with a version that is not a number, is ignored; with ``serving_only``, so is a model whose
    spec disables serving); with no event (a manual run), the form's model and version (None: its alias),
    which the stage then accepts or refuses on the record.
    """
    newest: dict[str, str] = {}
    for event in events:
        name, version = event.get(EventField.MODEL_NAME), str(event.get(EventField.VERSION, ""))
        if name not in catalog.models or not version.isdigit():
            continue
        if acted_on and model_subject(name, version) in acted_on:
            continue
        if serving_only and not catalog.models[name].serving.enabled:
            continue
        if name not in newest or int(version) > int(newest[name]):
            newest[name] = version
    if events:
        for name, version in (pending or {}).items():
            if name in catalog.models and (name not in newest or int(version) > int(newest[name])):
                newest[name] = version
        return [{"model": name, "model_version": newest[name]} for name in sorted(newest)]
    if sweep:
        # A scheduled run's form holds only its defaults: it acts on what the record says is owed.
        return [
            {"model": name, "model_version": version} for name, version in sorted((pending or {}).items())
        ]
    if not model:
        raise GateFailed("a manual run needs a model: pick one in the trigger form")
    catalog.model(model)
    return [{"model": model, "model_version": None if model_version in (None, "") else str(model_version)}]


def newest_unacted_version(
    audit: AuditStore, model: str, *, wanted: tuple[str, str], acted_on: set[str], above: int = 0
) -> str | None:
    """The newest version of ``model`` above ``above`` with an authentic record ``wanted`` (action,
    decision) whose subject is not in ``acted_on`` (see :func:`acted_on_subjects`): what a stage still
    owes a version.

    Airflow 3.3 drops Asset events that arrive while their DAG is at ``max_active_runs``
    (apache/airflow#56050; the 20-model benchmark lost ten of twenty candidates that way), so the gate
    and deployment plans ask the record, not only the events, what is left to do.
    """
    action, decision = wanted
    newest = above
    for record in audit.records(action=action, subject_prefix=model_subject(model, "")):
        version = record.subject.rpartition("@")[2]
        if (
            version.isdigit()
            and int(version) > newest
            and record.decision == decision
            and record.subject not in acted_on
            and audit.authentic(record)
        ):
            newest = int(version)
    return str(newest) if newest > above else None


def version_number(subject: str) -> int:
    """The version of a ``model:NAME@VERSION`` subject; 0 when it names none."""
    version = subject.rpartition("@")[2]
    return int(version) if version.isdigit() else 0


def acted_on_subjects(audit: AuditStore, action: str) -> set[str]:
    """Subjects of the authentic records of ``action``: the versions a stage has decided on."""
    return {record.subject for record in audit.records(action=action) if audit.authentic(record)}


def take_up(
    audit: AuditStore,
    *,
    subject: str,
    taken_up: str,
    decided: str | None,
    actor: str,
    dag_id: str,
    run_id: str,
    task_id: str,
    run_is_live: Callable[[str, str], bool],
    redo_decided: bool = False,
    still_working: Collection[str] = (),
) -> str | None:
    """Take ``subject`` up for this run, so that it is the only run that acts on it; None when taken,
    else why not.

    A stage that runs several runs at once (the gate: one may wait hours for a person) sees the same
    undecided version in each run's catch-up and in its sweep. The run's ``taken_up`` record is appended
    only if nothing newer was recorded for the version meanwhile (:meth:`AuditStore.append_if_newest`),
    so two runs never both take it. A version taken up by a run that is still queued or running
    (``run_is_live(dag_id, run_id)``) is not taken; nor is one already ``decided`` unless ``redo_decided``
    (a person's manual run asks again). A run holds a version only until it records a decision on it
    (its failure included, so a run that still waits for another model's approver does not hold a version
    whose evaluation failed), unless that decision is one of ``still_working`` (the gate's
    ``awaiting_approval``: the run waits for the approver's answer). A run that ended without deciding
    (its task failed) leaves the version to the next run. With ``decided`` None (deployment takes a whole
    model up, and its run decides many things on it), the hold lasts exactly while the run is live.
    """
    watch = (taken_up,) if decided is None else (taken_up, decided)
    for _ in range(3):  # each lost race means another run recorded something new: look again
        claim = audit.newest_authentic(subject, (taken_up,))
        decision = None if decided is None else audit.newest_authentic(subject, (decided,))
        if claim is not None and (claim.dag_id, claim.run_id) == (dag_id, run_id):
            return None  # this run took it up (its plan task is being retried)
        since_claim = (
            decision if claim is not None and decision is not None and decision.seq > claim.seq else None
        )
        if (
            claim is not None
            and (since_claim is None or since_claim.decision in still_working)
            and claim.dag_id
            and claim.run_id
            and run_is_live(claim.dag_id, claim.run_id)
        ):
            doing = f", which is {since_claim.decision}" if since_claim is not None else ""
            return f"run {claim.run_id} took it up (audit record {claim.seq}) and has not finished{doing}"
        if decision is not None and not redo_decided:
            return f"already decided: {decision.decision} (audit record {decision.seq})"
        newest: AuditRecord | None = max(
            (r for r in (claim, decision) if r is not None), key=lambda r: r.seq, default=None
        )
        details = {"after_run": claim.run_id} if claim is not None else {}
        _, appended = audit.append_if_newest(
            expected=newest,
            watch=watch,
            actor=actor,
            action=taken_up,
            subject=subject,
            decision=Decision.TAKEN_UP,
            details=details,
            dag_id=dag_id,
            run_id=run_id,
            task_id=task_id,
        )
        if appended:
            return None
    return "other runs kept recording decisions on it at the same moment"
