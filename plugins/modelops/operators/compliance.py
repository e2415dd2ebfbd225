"""Operator for stage 3: the compliance gate for one model version, with a human approval where the policy
asks for one.

The approval is Airflow's human-in-the-loop (``HITLOperator``): the task waits in ``awaiting_input``
holding no worker slot, the approval form (Approve / Reject and a comment) is in the Airflow UI and its
REST API, only the policy's approvers are assigned (Airflow answers anyone else 403), and no answer within
the policy's time is a rejection. The operator only asks and records; :mod:`modelops.stages.compliance`
decides.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.providers.standard.exceptions import HITLTimeoutError
from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.sdk import Param
from airflow.sdk.exceptions import TaskAwaitingInput

from modelops.operators.base import ModelOpsBaseOperator
from modelops.vocabulary import AuditAction, Decision, model_subject

if TYPE_CHECKING:
    from airflow.sdk import Context

    from modelops.stages.outcome import StageOutcome

COMMENT_PARAM = "comment"


class ComplianceGateOperator(ModelOpsBaseOperator, HITLOperator):
    """Evaluate a model's compliance policy against a version: approve (alias ``challenger``) or reject.

    When every check passes and the policy requires approval, the task asks the policy's approvers in the
    Airflow UI and resumes with their answer (``execute_complete``), which becomes the gate's decision.
    """

    # Inputs come from the plan task (expand_kwargs), not from templates: a value that started as an
    # Asset event extra or a trigger-form string is never rendered as Jinja. The approval form's subject
    # and body are written at run time from the decision, so they are not templated either.
    template_fields: Sequence[str] = ()
    ui_color = "#f8f0e0"
    audit_action = AuditAction.GATE_DECIDED

    def __init__(self, *, model: str, model_version: str | int | None = None, **kwargs: Any) -> None:
        from modelops.stages.compliance import APPROVAL_OPTIONS

        # The approval form's fields. A task rebuilt from its serialized DAG is given its params back.
        params = kwargs.pop("params", None) or {
            COMMENT_PARAM: Param(
                "", type="string", title="Comment", description="Why you approve or reject (kept on record)"
            )
        }
        super().__init__(
            subject="Compliance approval",  # replaced at run time with the model and version
            options=list(APPROVAL_OPTIONS),
            params=params,
            **kwargs,
        )
        self.model = model
        self.model_version = model_version

    def audit_subject(self) -> str:
        return model_subject(self.model, self.model_version or None)

    def run_stage(self, context: Context) -> StageOutcome:
        from modelops.stages.compliance import gate
        from modelops.storage import ObjectStorageFiles

        return gate(
            spec=self.catalog.model(self.model),
            catalog=self.catalog,
            registry=self.registry,
            audit=self.audit_hook.store,
            files=ObjectStorageFiles(),
            version=None if self.model_version in (None, "") else str(self.model_version),
        )

    def execute(self, context: Context) -> dict[str, Any]:
        outcome = self.decide(lambda: self.run_stage(context), context)
        result = self.act_on(outcome, context)
        if outcome.decision != Decision.AWAITING_APPROVAL:
            return result
        self._ask_approvers(outcome, context)
        raise AssertionError("unreachable: the approval request parks the task")  # pragma: no cover

    def _ask_approvers(self, outcome: StageOutcome, context: Context) -> None:
        """Write the approval request and park the task until an approver answers (or time runs out)."""
        policy = self.catalog.policies_for(self.model).compliance
        version = str(outcome.details["version"])
        self.subject = f"Approve {self.model} v{version} for release? (policy {policy.name}@{policy.version})"
        self.body = (
            f"Every check of policy **{policy.name}@{policy.version}** passed for **{self.model} v{version}** "
            f"(risk tier {self.catalog.model(self.model).risk_tier}). Read the model card "
            f"`compliance/model_card_v{version}.md` in the version's MLflow run before you answer.\n\n"
            f"Approvers: {', '.join(policy.approval.approvers)}. No answer within "
            f"{policy.approval.respond_within_hours:g} hours counts as a rejection."
        )
        self.assigned_users = [{"id": user, "name": user} for user in policy.approval.approvers]
        self.response_timeout = timedelta(hours=policy.approval.respond_within_hours)
        try:
            HITLOperator.execute(self, context)
        except TaskAwaitingInput as parked:
            # Carried into execute_complete: the version decided on, not whatever `candidate` points at then.
            parked.kwargs = {**(parked.kwargs or {}), "model_version": version}
            raise

    def execute_complete(
        self, context: Context, event: dict[str, Any], model_version: str | None = None
    ) -> dict[str, Any]:
        from modelops.stages.compliance import ApprovalResponse, decide_approval

        version = model_version or str(self.model_version)
        try:
            answer = HITLOperator.execute_complete(self, context, event)
        except HITLTimeoutError:
            response = ApprovalResponse(chosen=None, responder_id=None, timed_out=True)
        else:
            user = answer.get("responded_by_user") or {}
            responded_at = answer.get("responded_at")
            response = ApprovalResponse(
                chosen=(answer.get("chosen_options") or [None])[0],
                responder_id=user.get("id"),
                responder_name=user.get("name"),
                comment=str((answer.get("params_input") or {}).get(COMMENT_PARAM) or ""),
                responded_at=responded_at.isoformat() if hasattr(responded_at, "isoformat") else None,
                # A response filled in from defaults at the timeout is no one's answer.
                timed_out=bool(event.get("timedout")),
            )
        self.model_version = version  # names the subject of a failure record
        outcome = self.decide(
            lambda: decide_approval(
                spec=self.catalog.model(self.model),
                catalog=self.catalog,
                registry=self.registry,
                audit=self.audit_hook.store,
                version=version,
                response=response,
            ),
            context,
        )
        return self.act_on(outcome, context)
