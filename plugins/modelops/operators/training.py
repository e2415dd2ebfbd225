"""Operator for stage 2: train one model on validated data and register a version with lineage.

This module is also the training entry point a pod runs (``python -m modelops.operators.training``, the
``train_in_pod`` task of ``modelops_training`` for specs with ``training.runner: kubernetes``): the same
stage call as :class:`TrainModelOperator`, with the same connections (from ``AIRFLOW_CONN_*`` variables the
pod gets from a Kubernetes Secret). The pod writes nothing to the audit log: it writes the stage's outcome
to the file KubernetesPodOperator returns as XCom, and the task records it as any stage task does.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.sdk.exceptions import AirflowSkipException

from modelops.errors import ModelOpsError
from modelops.operators.base import ModelOpsBaseOperator
from modelops.stages.outcome import json_safe
from modelops.vocabulary import AuditAction, Trigger, model_subject

if TYPE_CHECKING:
    from airflow.sdk import Context

    from modelops.audit import AuditStore
    from modelops.registry import ModelRegistry
    from modelops.settings import Catalog
    from modelops.stages.outcome import StageOutcome

POD_OUTCOME_FILE = "/airflow/xcom/return.json"
"""Where KubernetesPodOperator's XCom sidecar reads a pod's result from."""


def run_training(
    *,
    model: str,
    catalog: Catalog,
    registry: ModelRegistry,
    audit: AuditStore,
    dataset_sha256: str | None,
    trigger: str,
    dag_id: str,
    run_id: str,
) -> StageOutcome:
    """The training entry point: in the worker (TrainModelOperator) and in a pod (:func:`main`) alike."""
    from modelops.stages.training import train

    return train(
        spec=catalog.model(model),
        catalog=catalog,
        registry=registry,
        audit=audit,
        dataset_sha256=dataset_sha256 or None,
        trigger=Trigger(trigger),
        dag_id=dag_id,
        run_id=run_id,
    )


class TrainModelOperator(ModelOpsBaseOperator):
    """Train one model spec, register a version tagged with its lineage, move alias ``candidate``."""

    # Inputs come from the plan task (expand_kwargs), not from templates: a value that started as an
    # Asset event extra or a trigger-form string is never rendered as Jinja.
    template_fields: Sequence[str] = ()
    ui_color = "#e8eef8"
    audit_action = AuditAction.MODEL_REGISTERED

    def __init__(
        self,
        *,
        model: str,
        dataset_sha256: str | None = None,
        trigger: str = Trigger.MANUAL.value,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.model = model
        self.dataset_sha256 = dataset_sha256
        self.trigger = trigger

    def audit_subject(self) -> str:
        return model_subject(self.model)

    def execute(self, context: Context) -> dict[str, Any]:
        if self.catalog.model(self.model).training.runner == "kubernetes":
            raise AirflowSkipException(
                f"{self.model} trains in a pod (training.runner: kubernetes): train_in_pod"
            )
        return super().execute(context)

    def run_stage(self, context: Context) -> StageOutcome:
        dag_run = context["dag_run"]
        return run_training(
            model=self.model,
            catalog=self.catalog,
            registry=self.registry,
            audit=self.audit_hook.store,
            dataset_sha256=self.dataset_sha256,
            trigger=self.trigger,
            dag_id=dag_run.dag_id,
            run_id=dag_run.run_id,
        )


# --- the entry point a training pod runs -------------------------------------------------------------


def outcome_document(outcome: StageOutcome) -> dict[str, Any]:
    """The outcome as JSON for the task that launched the pod (effects are code: training has none)."""
    if outcome.effects:
        raise ModelOpsError("a training outcome with registry effects cannot cross a pod boundary")
    return json_safe(
        {
            "decision": outcome.decision,
            "summary": outcome.summary,
            "details": outcome.details,
            "records": [asdict(entry) for entry in outcome.records],
            "asset_extra": outcome.asset_extra,
            "refusal": outcome.refusal,
        }
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m modelops.operators.training",
        description="Train one model spec and register a candidate version (the train_in_pod task's pod).",
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset-sha256", default=None)
    parser.add_argument("--trigger", default=Trigger.MANUAL.value, choices=[t.value for t in Trigger])
    parser.add_argument("--dag-id", required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--outcome", type=Path, default=Path(POD_OUTCOME_FILE))
    args = parser.parse_args(argv)
    from modelops.hooks.audit import AuditHook
    from modelops.hooks.registry import MlflowRegistryHook
    from modelops.settings import load_catalog

    try:
        outcome = outcome_document(
            run_training(
                model=args.model,
                catalog=load_catalog(),
                registry=MlflowRegistryHook().get_conn(),
                audit=AuditHook().store,
                dataset_sha256=args.dataset_sha256,
                trigger=args.trigger,
                dag_id=args.dag_id,
                run_id=args.run_id,
            )
        )
    except ModelOpsError as exc:
        # Named for the task, which raises it again: a settings mistake then fails without a retry there,
        # exactly as in the worker. Anything else exits non-zero and the task retries.
        outcome = {"error": {"type": type(exc).__name__, "message": str(exc)}}
    args.outcome.parent.mkdir(parents=True, exist_ok=True)
    args.outcome.write_text(json.dumps(outcome))
    print(outcome.get("summary") or outcome["error"]["message"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
