"""The Airflow REST API v2 calls the demo needs, and what it reads from their answers.

Runs are triggered and read here; a task's result is its ``return_value`` XCom, per map index for a
mapped task (one per model or per dataset file), named by the rendered map index. Facts are extracted
by functions that return data; printing is the driver's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx

from modelops.errors import ConfigurationError, ModelOpsError

TERMINAL_RUN_STATES = frozenset({"success", "failed"})
STAGE_TIMEOUT_SECONDS = 6 * 60
DAG_PARSE_TIMEOUT_SECONDS = 180
# Task instance states whose log explains a problem: failed, or failed and waiting for its retry.
PROBLEM_TASK_STATES = ("failed", "up_for_retry")
# A human-in-the-loop task waiting for its form's answer (Airflow 3.3; its run stays "running").
AWAITING_INPUT = "awaiting_input"
PAGE_SIZE = 100  # Airflow's default maximum_page_limit: a listing of more entries is read page by page


class StageFailed(ModelOpsError):
    """A lifecycle stage failed or timed out during ``make demo``."""


@dataclass(frozen=True)
class FormAnswer:
    """Airflow's answer to a human-in-the-loop response: its status code and what it said."""

    status: int
    detail: str
    body: Any = None

    @property
    def accepted(self) -> bool:
        return self.status == 200


# --- facts (pure functions over API answers) -----------------------------------------------------


def unwrap_xcom(value: Any, *, top_level: bool = True) -> Any:
    """An XCom value as the REST API returns it, decoded to plain JSON data.

    The API returns the stored serialized form: plain JSON for simple values, sometimes a JSON string,
    and Airflow's serde envelopes for typed ones. Only the stored value itself may be a JSON string:
    strings inside it are data (a summary reading "1.50" stays a string).
    """
    if isinstance(value, str) and top_level:
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return value
    if isinstance(value, dict):
        if "__data__" in value and "__classname__" in value:
            return unwrap_xcom(value["__data__"], top_level=False)
        if "__var" in value and "__type" in value:
            return unwrap_xcom(value["__var"], top_level=False)
        return {key: unwrap_xcom(item, top_level=False) for key, item in value.items()}
    if isinstance(value, list):
        return [unwrap_xcom(item, top_level=False) for item in value]
    return value


@dataclass(frozen=True)
class TaskOutcome:
    """One task instance's return value (a dict with a "summary"); a mapped task has one per map index."""

    task_id: str
    map_index: int
    label: str
    value: dict[str, Any]

    @property
    def summary(self) -> str:
        return str(self.value.get("summary", "(no summary returned)"))

    @property
    def model_name(self) -> str | None:
        name = self.value.get("model_name")
        return str(name) if name is not None else None


def task_label(ti: Mapping[str, Any], value: Mapping[str, Any] | None = None) -> str:
    """How a task instance is named: its rendered map index (the model or file of a mapped task), else
    the model in its return value, else its task id (with ``[map index]`` when mapped)."""
    rendered = ti.get("rendered_map_index")
    if rendered not in (None, ""):
        return str(rendered)
    if value and value.get("model_name"):
        return str(value["model_name"])
    map_index = ti.get("map_index", -1)
    return ti["task_id"] if map_index in (-1, None) else f"{ti['task_id']}[{map_index}]"


def outcomes_of(entries: Iterable[tuple[Mapping[str, Any], Any]]) -> list[TaskOutcome]:
    """``(task instance, raw return value)`` pairs to outcomes; values without a "summary" are left out."""
    found = []
    for ti, raw in entries:
        value = unwrap_xcom(raw)
        if isinstance(value, dict) and "summary" in value:
            found.append(
                TaskOutcome(
                    task_id=ti["task_id"],
                    map_index=int(ti.get("map_index", -1)),
                    label=task_label(ti, value),
                    value=value,
                )
            )
    return found


def log_excerpt(log_answer: Any, lines: int = 40) -> str:
    """The last ``lines`` lines of a task log from ``GET .../logs/{try_number}`` (JSON answer)."""
    content = log_answer.get("content", log_answer) if isinstance(log_answer, dict) else log_answer
    if isinstance(content, str):
        text_lines = content.splitlines()
    else:
        text_lines = []
        for entry in content or []:
            if isinstance(entry, dict):
                event = str(entry.get("event", ""))
                level = entry.get("level")
                stamp = entry.get("timestamp")
                prefix = " ".join(str(part) for part in (stamp, level and str(level).upper()) if part)
                text_lines.extend(f"{prefix} {line}".strip() for line in event.splitlines() or [""])
                if entry.get("error_detail"):
                    text_lines.append(json.dumps(entry["error_detail"])[:2000])
            else:
                text_lines.extend(str(entry).splitlines())
    return "\n".join(text_lines[-lines:])


def run_seconds(run: Mapping[str, Any], fallback: float) -> float:
    """A finished run's duration from its start and end dates (``fallback`` when either is missing)."""
    if run.get("start_date") and run.get("end_date"):
        return (
            datetime.fromisoformat(run["end_date"]) - datetime.fromisoformat(run["start_date"])
        ).total_seconds()
    return fallback


@dataclass
class StageResult:
    """One finished run of a stage's DAG and the results of its tasks."""

    stage: str
    dag_id: str
    run_id: str
    state: str
    seconds: float
    outcomes: list[TaskOutcome] = field(default_factory=list)

    def for_model(self, name: str) -> TaskOutcome | None:
        """The result about model ``name`` (by rendered map index or the returned ``model_name``)."""
        found = [o for o in self.outcomes if name in (o.label, o.model_name)]
        return found[-1] if found else None

    def for_task(self, task_id: str, name: str) -> TaskOutcome | None:
        """The result of task ``task_id`` about model ``name`` (None: skipped, failed or not run)."""
        found = [o for o in self.outcomes if o.task_id == task_id and name in (o.label, o.model_name)]
        return found[-1] if found else None

    @property
    def fact(self) -> str:
        return "; ".join(o.summary for o in self.outcomes) or "(no summary returned)"


def stage_lines(result: StageResult) -> list[str]:
    """One progress line per task result (per model for a mapped task)."""
    head = f"  {result.stage:<12} {result.state:<8} {result.seconds:6.1f} s  "
    # A deployment's canary task with no canary to watch (a first version) has nothing to tell.
    outcomes = [o for o in result.outcomes if o.value.get("decision") != "no_canary"] or result.outcomes
    if not outcomes:
        return [head + "(no summary returned)"]
    # A summary that starts with the model's name needs no label in front of it.
    return [
        head
        + (o.summary if o.map_index == -1 or o.summary.startswith(o.label) else f"{o.label}: {o.summary}")
        for o in outcomes
    ]


# --- the client ----------------------------------------------------------------------------------


class AirflowApi:
    """The few REST API v2 calls the demo needs, authenticated as one user (``admin``, or an approver)
    with a JWT."""

    def __init__(self, base_url: str, username: str, password: str) -> None:
        self.base_url = base_url
        self.username = username
        self._http = httpx.Client(base_url=base_url, timeout=30, trust_env=False)
        answer = self._http.post("/auth/token", json={"username": username, "password": password})
        if answer.status_code not in (200, 201):
            raise ConfigurationError(
                f"Airflow refused the login of {username!r} ({answer.status_code}: {answer.text[:200]}); "
                "run `make down`, delete .demo/airflow/simple_auth_manager_passwords.json and retry"
            )
        self._http.headers["Authorization"] = f"Bearer {answer.json()['access_token']}"

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        answer = self._http.request(method, f"/api/v2{path}", **kwargs)
        if answer.status_code >= 400 and answer.status_code != 404:
            raise ConfigurationError(
                f"Airflow API {method} {path} answered {answer.status_code}: {answer.text[:500]}"
            )
        return answer

    def _found(self, path: str, what: str, **kwargs: Any) -> dict[str, Any]:
        answer = self._call("GET", path, **kwargs)
        if answer.status_code == 404:
            raise ConfigurationError(f"Airflow does not know {what}; check the Airflow UI and `make status`")
        return answer.json()

    def _every(self, path: str, key: str, params: Mapping[str, Any]) -> list[dict[str, Any]] | None:
        """Every entry of a listing, page by page: Airflow answers at most ``limit`` entries per call
        (``maximum_page_limit``, 100 by default), and many models' runs have more task instances than
        that. None when Airflow does not know the listing's DAG or run (404)."""
        found: list[dict[str, Any]] = []
        while True:
            answer = self._call("GET", path, params={**params, "limit": PAGE_SIZE, "offset": len(found)})
            if answer.status_code == 404:
                return None
            body = answer.json()
            page = body[key]
            found += page
            if not page or len(found) >= int(body.get("total_entries", 0)):
                return found

    def _every_found(self, path: str, what: str, key: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        found = self._every(path, key, params)
        if found is None:
            raise ConfigurationError(f"Airflow does not know {what}; check the Airflow UI and `make status`")
        return found

    def dag_exists(self, dag_id: str) -> bool:
        return self._call("GET", f"/dags/{dag_id}").status_code == 200

    def unpause(self, dag_id: str) -> None:
        answer = self._call("PATCH", f"/dags/{dag_id}", json={"is_paused": False})
        if answer.status_code == 404:
            raise ConfigurationError(
                f"DAG {dag_id} is not known to Airflow; check `airflow dags list-import-errors`"
            )

    def import_errors(self) -> list[str]:
        answer = self._call("GET", "/importErrors")
        return [
            f"{e['filename']}: {e['stack_trace'].strip().splitlines()[-1]}"
            for e in answer.json()["import_errors"]
        ]

    def trigger(self, dag_id: str, conf: Mapping[str, Any]) -> str:
        """Start a run with ``conf`` (JSON types: the trigger forms' params are typed); returns its id."""
        answer = self._call(
            "POST", f"/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": dict(conf)}
        )
        if answer.status_code == 404:
            raise ConfigurationError(f"cannot trigger {dag_id}: Airflow does not know the DAG")
        return str(answer.json()["dag_run_id"])

    def runs_since(self, dag_id: str, since: datetime) -> list[dict[str, Any]]:
        """Runs of ``dag_id`` due at or after ``since``, newest first (Asset-triggered ones included)."""
        params = {"run_after_gte": since.isoformat(), "order_by": "-run_after"}
        return self._every_found(f"/dags/{dag_id}/dagRuns", f"DAG {dag_id}", "dag_runs", params)

    def task_instances_since(self, since: datetime) -> list[dict[str, Any]]:
        """Every task instance of every DAG's runs due at or after ``since``, each map index on its own."""
        found = self._every(
            "/dags/~/dagRuns/~/taskInstances", "task_instances", {"run_after_gte": since.isoformat()}
        )
        return found or []

    def run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        return self._found(f"/dags/{dag_id}/dagRuns/{run_id}", f"run {run_id} of {dag_id}")

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        """Every task instance of the run, each map index of a mapped task on its own."""
        path = f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances"
        return self._every_found(path, f"run {run_id} of {dag_id}", "task_instances", {})

    def return_value(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> Any | None:
        path = f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value"
        answer = self._call("GET", path, params={"map_index": map_index})
        return answer.json().get("value") if answer.status_code == 200 else None

    def outcomes(self, dag_id: str, run_id: str) -> list[TaskOutcome]:
        """The results of the run's successful tasks, one per map index of a mapped task."""
        entries = []
        for ti in self.task_instances(dag_id, run_id):
            if ti.get("state") != "success":
                continue
            raw = self.return_value(dag_id, run_id, ti["task_id"], int(ti.get("map_index", -1)))
            if raw is not None:
                entries.append((ti, raw))
        entries.sort(key=lambda entry: (entry[0]["task_id"], int(entry[0].get("map_index", -1))))
        return outcomes_of(entries)

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int, map_index: int = -1) -> Any:
        path = f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}"
        answer = self._call(
            "GET",
            path,
            params={"full_content": "true", "map_index": map_index},
            headers={"Accept": "application/json"},
        )
        return answer.json() if answer.status_code == 200 else {"content": [f"(no log: {answer.text[:200]})"]}

    def problem_excerpt(
        self, dag_id: str, run_id: str, states: Sequence[str] = PROBLEM_TASK_STATES
    ) -> str | None:
        """The log excerpt of the run's first task instance in ``states``; None when there is none."""
        found = [ti for ti in self.task_instances(dag_id, run_id) if ti.get("state") in states]
        if not found:
            return None
        ti = found[0]
        map_index = int(ti.get("map_index", -1))
        log = self.task_log(dag_id, run_id, ti["task_id"], max(1, int(ti.get("try_number") or 1)), map_index)
        name = (
            ti["task_id"] if map_index == -1 else f"{ti['task_id']}[{task_label(ti)}] (map index {map_index})"
        )
        return f"task {name} {ti['state']}; last lines of its log:\n{log_excerpt(log)}"

    def task_excerpt(self, dag_id: str, run_id: str, task_id: str, label: str | None = None) -> str | None:
        """The last lines of the log of the run's task ``task_id`` (the instance named ``label`` when there
        is one: a mapped task's model), whatever its state; None when the run has no such task."""
        found = [ti for ti in self.task_instances(dag_id, run_id) if ti["task_id"] == task_id]
        named = [ti for ti in found if task_label(ti) == label]
        if not (named or found):
            return None
        ti = (named or found)[0]
        try_number = max(1, int(ti.get("try_number") or 1))
        return log_excerpt(self.task_log(dag_id, run_id, task_id, try_number, int(ti.get("map_index", -1))))

    def awaiting_input(self, dag_id: str) -> list[dict[str, Any]]:
        """The unanswered human-in-the-loop forms of ``dag_id``'s task instances that wait in
        ``awaiting_input``, every run (each with its ``task_instance``)."""
        found = self._every(
            f"/dags/{dag_id}/dagRuns/~/hitlDetails",
            "hitl_details",
            {"response_received": "false", "state": AWAITING_INPUT},
        )
        return found or []

    def respond(
        self,
        dag_id: str,
        run_id: str,
        task_id: str,
        map_index: int,
        chosen_options: Sequence[str],
        params_input: Mapping[str, Any],
    ) -> FormAnswer:
        """Answer a task instance's human-in-the-loop form as this client's user. A refusal (403: not an
        assigned user; 409: answered already; 404: no form; 400: an option it does not offer) is
        returned, not raised: the caller decides what it means."""
        path = f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/{map_index}/hitlDetails"
        answer = self._http.request(
            "PATCH",
            f"/api/v2{path}",
            json={"chosen_options": list(chosen_options), "params_input": dict(params_input)},
        )
        if answer.status_code not in (200, 400, 403, 404, 409):
            raise ConfigurationError(
                f"Airflow API PATCH {path} answered {answer.status_code}: {answer.text[:500]}"
            )
        try:
            body = answer.json()
        except ValueError:
            body = answer.text
        detail = body.get("detail", "") if isinstance(body, dict) else str(body)
        return FormAnswer(answer.status_code, str(detail), body)

    def failure_excerpt(self, dag_id: str, run_id: str) -> str:
        return self.problem_excerpt(dag_id, run_id, ("failed",)) or (
            "(no failed task instance: the run itself failed, e.g. a timeout or a removed task)"
        )


# --- waiting -------------------------------------------------------------------------------------


def wait_for_run(
    api: AirflowApi,
    stage: str,
    dag_id: str,
    run_id: str,
    *,
    timeout: float = STAGE_TIMEOUT_SECONDS,
    poll_seconds: float = 2.0,
    on_poll: Callable[[], int] | None = None,
) -> StageResult:
    """Wait for run ``run_id`` to finish; a failed run raises with its failed task's log excerpt.

    A task waiting in ``awaiting_input`` keeps its run ``running``: that is waiting, not a failure.
    ``on_poll`` is called on every poll of an unfinished run (the demo answers approval forms there);
    when it answered something (returns more than 0) the timeout starts again: the run resumes then.
    """
    started = deadline_from = time.monotonic()
    while True:
        run = api.run(dag_id, run_id)
        if run["state"] in TERMINAL_RUN_STATES:
            break
        if on_poll is not None and on_poll() > 0:
            deadline_from = time.monotonic()
        if time.monotonic() - deadline_from > timeout:
            raise StageFailed(
                f"stage {stage} ({dag_id}) did not finish within {timeout:.0f} s: run {run_id} is "
                f"{run['state']}{_awaiting_note(api, dag_id, run_id)}; see the Airflow UI and "
                ".demo/logs/airflow-scheduler.log, then `make down`"
            )
        time.sleep(poll_seconds)
    if run["state"] != "success":
        raise StageFailed(
            f"stage {stage} ({dag_id}) run {run_id} failed.\n{api.failure_excerpt(dag_id, run_id)}"
        )
    return StageResult(
        stage=stage,
        dag_id=dag_id,
        run_id=run_id,
        state=run["state"],
        seconds=run_seconds(run, time.monotonic() - started),
        outcomes=api.outcomes(dag_id, run_id),
    )


def _awaiting_note(api: AirflowApi, dag_id: str, run_id: str) -> str:
    """``", with <task> awaiting input (...)"`` when task instances of the run wait for a person's answer,
    else empty."""
    waiting = [
        task_label(ti) for ti in api.task_instances(dag_id, run_id) if ti.get("state") == AWAITING_INPUT
    ]
    if not waiting:
        return ""
    return (
        f", with {', '.join(waiting)} awaiting input (answer under Required Actions in the Airflow UI, "
        "as one of the users the form names)"
    )


def wait_for_dags(
    api: AirflowApi, dag_ids: Sequence[str], timeout: float = DAG_PARSE_TIMEOUT_SECONDS
) -> None:
    deadline = time.monotonic() + timeout
    missing = list(dag_ids)
    while missing:
        missing = [dag_id for dag_id in missing if not api.dag_exists(dag_id)]
        if not missing:
            return
        if time.monotonic() > deadline:
            problems = api.import_errors()
            detail = ("; import errors: " + " | ".join(problems)) if problems else ""
            raise StageFailed(
                f"the dag-processor has not parsed {', '.join(missing)} within {timeout:.0f} s{detail}; "
                "see .demo/logs/airflow-dag-processor.log"
            )
        time.sleep(2)
