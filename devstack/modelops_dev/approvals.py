"""The compliance gate's human approval, answered by the demo through Airflow's REST API.

A policy with ``approval.required`` (``strict``: high-risk models) parks the gate's task instance in
``awaiting_input`` with an approval form (Approve / Reject and a ``comment``) assigned to the policy's
approvers. While it waits for runs, the driver looks for such forms and answers them as the approver the
form names, with that user's own token; Airflow refuses anyone else, admins included (403), which the
driver shows once first. Nothing here decides: the gate's task reads the answer and records it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from modelops_dev.airflow_api import AWAITING_INPUT, AirflowApi, FormAnswer, StageFailed

# The gate's approval form (modelops.stages.compliance.APPROVE, modelops.operators.compliance.COMMENT_PARAM;
# the unit tests hold them equal). Kept as text: the driver does not import the operator.
APPROVE = "Approve"
COMMENT_PARAM = "comment"
DEMO_COMMENT = "Reviewed the model card and gate report (make demo)"
# Parked tasks that may hold an unanswered form: awaiting input (Airflow 3.3), deferred (older HITL).
WAITING_STATES = (AWAITING_INPUT, "deferred")


def _label(text: str) -> str:
    return f"  {'approval':<12} {text}"


@dataclass(frozen=True)
class PendingApproval:
    """One unanswered approval form, from an entry of ``GET .../hitlDetails``."""

    dag_id: str
    run_id: str
    task_id: str
    map_index: int
    state: str | None
    model: str
    version: str | None
    policy: str | None
    assigned: tuple[str, ...]
    options: tuple[str, ...]
    run_after: datetime | None
    created_at: str | None
    try_number: int | None = None

    @classmethod
    def from_detail(cls, detail: Mapping[str, Any]) -> PendingApproval:
        ti = detail.get("task_instance") or {}
        map_index = int(ti.get("map_index", -1))
        model = str(ti.get("rendered_map_index") or "") or (
            ti["task_id"] if map_index == -1 else f"{ti['task_id']}[{map_index}]"
        )
        subject = str(detail.get("subject") or "")
        # The gate writes "Approve <model> v<version> for release? (policy <name>@<version>)".
        version = re.search(rf"(?:^|\s){re.escape(model)} v([\w.]+)", subject)
        policy = re.search(r"\(policy ([^)\s]+)\)", subject)
        run_after = ti.get("run_after")
        return cls(
            dag_id=str(ti.get("dag_id", "")),
            run_id=str(ti.get("dag_run_id") or ti.get("run_id") or ""),
            task_id=str(ti.get("task_id", "")),
            map_index=map_index,
            state=ti.get("state"),
            model=model,
            version=version.group(1) if version else None,
            policy=policy.group(1) if policy else None,
            assigned=tuple(str(user.get("id")) for user in detail.get("assigned_users") or []),
            options=tuple(str(option) for option in detail.get("options") or []),
            run_after=datetime.fromisoformat(run_after) if run_after else None,
            created_at=detail.get("created_at"),
            try_number=ti.get("try_number"),
        )

    @property
    def key(self) -> tuple[str, str, str, int, str | None, int | None]:
        # A retried task asks again with the same form (Airflow keeps its subject and creation time), so
        # the try number tells a new question from one already answered.
        return (self.dag_id, self.run_id, self.task_id, self.map_index, self.created_at, self.try_number)

    @property
    def what(self) -> str:
        return f"{self.model} v{self.version}" if self.version else self.model


@dataclass(frozen=True)
class Answered:
    """An approval the demo gave: who, to what, with which comment."""

    pending: PendingApproval
    by: str
    comment: str
    refusal: FormAnswer | None  # the admin's refused attempt shown before it, if any


class Approver:
    """Answers the gate's approval forms **Approve** as the approver each names (its own login).

    ``passwords``: user -> password of the approvers the demo may log in as. Call it on every poll of a
    wait; it returns how many forms it answered. ``since``: forms of runs due before it are left alone
    (a previous ``make demo`` may have left one waiting). ``login``: how a user's client is made.
    """

    def __init__(
        self,
        admin: AirflowApi,
        passwords: Mapping[str, str],
        *,
        dag_id: str,
        since: datetime | None = None,
        comment: str = DEMO_COMMENT,
        out: Callable[[str], None] = print,
        login: Callable[[str, str, str], AirflowApi] = AirflowApi,
        settle_seconds: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.admin = admin
        # A person reads the model card before answering. An answer within the second the task parks can
        # race Airflow 3.3's scheduler, which then sees the resumed task as "changed externally" and
        # retries it (seen on the demo stack): the demo waits this long after it first sees a form.
        self.settle_seconds = settle_seconds
        self._clock = clock
        self._first_seen: dict[tuple[Any, ...], float] = {}
        self.passwords = dict(passwords)
        self.dag_id = dag_id
        self.since = since
        self.comment = comment
        self.out = out
        self._login = login
        self._clients: dict[str, AirflowApi] = {}
        self._done: set[tuple[Any, ...]] = set()
        self.refusal_shown = False
        self.answered: list[Answered] = []

    def client(self, user: str) -> AirflowApi:
        """``user``'s own client (logged in on first use)."""
        if user not in self._clients:
            self._clients[user] = self._login(self.admin.base_url, user, self.passwords[user])
        return self._clients[user]

    def pending(self) -> list[PendingApproval]:
        """The unanswered forms of the gate's runs since ``since`` whose task waits for the answer."""
        found = []
        for detail in self.admin.awaiting_input(self.dag_id):
            pending = PendingApproval.from_detail(detail)
            if pending.key in self._done or pending.state not in WAITING_STATES:
                continue
            if self.since and pending.run_after and pending.run_after < self.since:
                continue
            first_seen = self._first_seen.setdefault(pending.key, self._clock())
            if self._clock() - first_seen < self.settle_seconds:
                continue
            found.append(pending)
        return found

    def __call__(self) -> int:
        return sum(self.answer(pending) for pending in self.pending())

    def answer(self, pending: PendingApproval) -> int:
        """Approve ``pending`` as its approver; 1 when Airflow took the answer, else 0."""
        approver = next((user for user in pending.assigned if user in self.passwords), None)
        where = f"{pending.what} (gate run {pending.run_id}, map index {pending.map_index})"
        if approver is None:
            raise StageFailed(
                f"{where} awaits approval by {', '.join(pending.assigned) or 'nobody named'}; the demo "
                f"logs in only as {', '.join(self.passwords) or 'nobody'}. Answer it under Required "
                "actions in the Airflow UI as one of them, or `make down`"
            )
        if APPROVE not in pending.options:
            raise StageFailed(f"{where}: the form offers {list(pending.options)}, not {APPROVE!r}")
        policy = f" (policy {pending.policy})" if pending.policy else ""
        self.out(
            _label(
                f"{pending.what} awaits approval by {', '.join(pending.assigned)}{policy}; "
                f"approving through the REST API as {approver}"
            )
        )
        refusal = None
        if not self.refusal_shown and self.admin.username not in pending.assigned:
            refusal = self._show_refusal(pending)
            if refusal is None:  # answered or gone meanwhile
                return 0
        answer = self._respond(self.client(approver), pending)
        if answer.accepted:
            self._done.add(pending.key)
            self.answered.append(Answered(pending, approver, self.comment, refusal))
            self.out(_label(f"{approver} answered {APPROVE}: {self.comment!r} (HTTP 200); the gate resumes"))
            return 1
        if answer.status == 409:  # someone answered in the UI first: the gate records theirs
            self._done.add(pending.key)
            self.out(_label(f"{pending.what} was answered already (HTTP 409); the gate records that answer"))
            return 0
        if answer.status == 404:  # the form went away (the task was cleared or retried): look again later
            return 0
        raise StageFailed(
            f"Airflow refused {approver}'s approval of {where}: HTTP {answer.status} {answer.detail}"
        )

    def _respond(self, api: AirflowApi, pending: PendingApproval) -> FormAnswer:
        return api.respond(
            pending.dag_id,
            pending.run_id,
            pending.task_id,
            pending.map_index,
            [APPROVE],
            {COMMENT_PARAM: self.comment},
        )

    def _show_refusal(self, pending: PendingApproval) -> FormAnswer | None:
        """The admin tries to approve first: Airflow must answer 403 (only assigned users may answer)."""
        who = self.admin.username
        attempt = self._respond(self.admin, pending)
        if attempt.status == 403:
            self.refusal_shown = True
            self.out(_label(f"{who} tried first: HTTP 403 {attempt.detail} (admins are not approvers)"))
            return attempt
        if attempt.status == 409:
            self._done.add(pending.key)
            self.out(_label(f"{pending.what} was answered already (HTTP 409); the gate records that answer"))
            return None
        if attempt.status == 404:
            return None
        if attempt.accepted:
            raise StageFailed(
                f"Airflow took {who}'s answer to {pending.what}'s approval although only "
                f"{', '.join(pending.assigned)} may answer; is [core] simple_auth_manager_all_admins on? "
                "The gate rejects an answer from anyone but the policy's approvers."
            )
        raise StageFailed(
            f"{who}'s attempt at {pending.what}'s approval: HTTP {attempt.status} {attempt.detail}"
        )


def approval_text(approval: Mapping[str, Any]) -> str | None:
    """Who approved, from the ``approval`` of the gate's return value; None when it says nothing usable.

    ``approved automatically (policy standard@3)``, ``approved by risk_officer: <comment>``.
    """
    mode = approval.get("mode")
    if mode == "automatic":
        by = approval.get("by")
        return f"approved automatically ({by})" if by else "approved automatically"
    if mode == "human" and approval.get("by"):
        by, name = str(approval["by"]), approval.get("by_name")
        who = f"{by} ({name})" if name and name != by else by
        comment = str(approval.get("comment") or "").strip()
        return f"approved by {who}" + (f": {comment}" if comment else "")
    return None
