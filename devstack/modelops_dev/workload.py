"""What the demo feeds the stack: a new file per dataset, scoring traffic per model, one live prediction.

Each dataset gets one CSV in its incoming folder (written aside, then renamed into place, so the
validation DAG never sees half a file); every CSV there is a new version. Traffic goes to each model's
own gateway path, ``POST /models/<name>/invocations``, in MLflow's ``dataframe_split`` JSON, rotating over
three callers of the model's team, each with its own API key (``make demo`` writes them to an owner-only
keys file, ``$MODELOPS_GATEWAY_CLIENT_KEYS_FILE``): the click-through model gets the traffic simulator's synthetic rows, every other
model rows sampled from the file the demo dropped for its dataset. The incident sends the click-through
model drifted traffic whose users click far less, then delivers its labels (``POST /labels``): what the
business metric of monitoring is measured on.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from modelops.data.sklearn_datasets import write_diabetes_csv
from modelops.errors import ConfigurationError
from modelops.settings import DatasetSpec, ModelSpec

CTR_DATASET = "ctr_clicks"
DATASET_ROWS = 20_000
DATASET_SEED = 7
ROWS_PER_REQUEST = 5
SIMULATED_REQUESTS = 240  # one hour of the demo's traffic: 4 requests a minute, 5 rows each
SAMPLED_REQUESTS = 60  # 300 rows: enough for any monitoring policy's min_rows (at most 50 today)
TRAFFIC_SEED = 11
# The incident: 300 drifted rows (the click model's standard policy needs 200 rows and 100 labelled ones
# for a verdict), spread over every caller: a critical verdict needs the drop in two callers' rows or more.
INCIDENT_REQUESTS = 60
INCIDENT_SEED = 12
INCIDENT_SHIFT: dict[str, Any] = {
    "age_shift": 15,
    "out_of_range_share": 0.2,
    "category_weights": {"fashion": 5, "toys": 1},
    "price_factor": 1.5,
    "click_logit_shift": -2.5,
}
"""``modelops.data.synthetic.DriftShift`` arguments: users 15 years older (a fifth of them outside the training
range), a fashion-heavy mix at 1.5 times the prices, and clicks far fewer (the click-through drop)."""
PREDICTION_SEED = 2024
CALLERS = ("web-shop", "mobile-app", "email-campaign")
"""The click model's team's key ids (the traffic simulator's default callers)."""
CALLER_HEADER = "X-Caller-Id"  # sent as a label only: the gateway takes the caller id from the key


def team_keys(team: str) -> dict[str, str]:
    """``{key_id: key}`` of ``team`` in the demo's keys file (``$MODELOPS_GATEWAY_CLIENT_KEYS_FILE``); empty
    when no keys file is set (then no key is sent, and a real gateway answers 401, which the counts show)."""
    import os

    from modelops.serving.access import CLIENT_KEYS_ENV, read_client_keys

    path = os.environ.get(CLIENT_KEYS_ENV, "").strip()
    if not path:
        return {}
    keys = {key_id: entry["key"] for key_id, entry in read_client_keys(path).items() if entry["team"] == team}
    if not keys:
        raise ConfigurationError(
            f"the keys file {path} holds no key of team {team!r}; run `make down` and `make demo` again "
            "(it adds keys for every team the model specs name)"
        )
    return keys


# --- datasets ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetDrop:
    """One file the demo dropped into a dataset's incoming folder."""

    dataset: str
    path: Path  # a local copy: what the traffic is sampled from
    rows: int
    sha256: str
    uri: str = ""  # where it was dropped: ``path`` for a local folder, else the object's URI

    @property
    def where(self) -> str:
        return self.uri or str(self.path)


def write_ctr_clicks(target: Path) -> int:
    """The seeded synthetic click-through data (20,000 rows) as ``target``, renamed into place."""
    from modelops.data.synthetic import generate_clicks, write_csv

    frame = generate_clicks(DATASET_ROWS, seed=DATASET_SEED)
    partial = target.with_name(f".{target.name}.partial")
    write_csv(frame, partial)
    partial.rename(target)
    return len(frame)


DATASET_WRITERS: dict[str, Callable[[Path], int]] = {
    CTR_DATASET: write_ctr_clicks,
    "diabetes": write_diabetes_csv,
}
"""Dataset name -> writes one version of it as the given CSV path (atomically) and returns its rows."""


def incoming_folder(spec: DatasetSpec) -> Path:
    """The dataset's incoming folder as a local path."""
    uri = spec.incoming_uri.removeprefix("file://")
    if "://" in uri:
        raise ConfigurationError(
            f"dataset {spec.name}: incoming_uri {spec.incoming_uri} is not a local folder; pass a staging "
            "folder to drop_dataset to upload there, or unset MODELOPS_INCOMING_ROOT"
        )
    return Path(uri)


def drop_file_name(dataset: str, stamp: datetime) -> str:
    """A name of its own per drop: a second ``make demo`` on the same ``.demo/`` drops a new file."""
    return f"{dataset}-{stamp:%Y%m%dT%H%M%SZ}.csv"


def drop_dataset(
    spec: DatasetSpec,
    stamp: datetime,
    writers: Mapping[str, Callable[[Path], int]] = DATASET_WRITERS,
    *,
    staging: Path | None = None,
) -> DatasetDrop:
    """Write one new version of ``spec``'s dataset into its incoming folder; returns what was written.

    An incoming folder in object storage (``make stack``: ``s3://...``) takes the file written in
    ``staging`` first, uploaded through ``ObjectStoragePath`` with the platform's storage connection, as
    the pipeline reads it.
    """
    from modelops.settings import platform_settings
    from modelops.storage import as_storage_path, sha256_of

    if spec.name not in writers:
        raise ConfigurationError(
            f"the demo has no data for dataset {spec.name!r}; it writes {sorted(writers)}"
        )
    name = drop_file_name(spec.name, stamp)
    if "://" not in spec.incoming_uri.removeprefix("file://") or staging is None:
        folder = incoming_folder(spec)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / name
        rows = writers[spec.name](target)
        digest, _ = sha256_of(as_storage_path(target))
        return DatasetDrop(dataset=spec.name, path=target, rows=rows, sha256=digest)
    staging.mkdir(parents=True, exist_ok=True)
    local = staging / name
    rows = writers[spec.name](local)
    remote = as_storage_path(f"{spec.incoming_uri.rstrip('/')}/{name}", platform_settings().storage_conn_id)
    with local.open("rb") as source, remote.open("wb") as sink:
        while chunk := source.read(1 << 20):
            sink.write(chunk)
    digest, _ = sha256_of(remote)
    return DatasetDrop(dataset=spec.name, path=local, rows=rows, sha256=digest, uri=str(remote))


# --- traffic -------------------------------------------------------------------------------------


def model_base_url(gateway_url: str, model: str) -> str:
    """The gateway's base for one model: POST ``<this>/invocations`` scores with it."""
    return f"{gateway_url.rstrip('/')}/models/{model}"


@dataclass
class TrafficCount:
    """What the demo sent one model."""

    model: str
    requests: int = 0
    ok: int = 0
    failed: int = 0
    rows_scored: int = 0
    errors: list[str] = field(default_factory=list)
    labels_delivered: int | None = None  # rows whose true labels the gateway accepted (None: none sent)

    def line(self) -> str:
        text = f"{self.model}: {self.ok} ok, {self.failed} failed, {self.rows_scored} rows scored"
        if self.labels_delivered is not None:
            text += f", {self.labels_delivered} labels delivered"
        return text + (f" (first error: {self.errors[0]})" if self.errors else "")


def _rows_answered(answer: httpx.Response, expected: int) -> str | None:
    """None when ``answer`` scored ``expected`` rows, else what is wrong with it."""
    if answer.status_code != 200:
        return f"HTTP {answer.status_code}: {answer.text[:200]}"
    try:
        predictions = answer.json().get("predictions")
    except (ValueError, AttributeError):
        return f"HTTP 200 without a JSON object: {answer.text[:200]!r}"
    if not isinstance(predictions, list) or len(predictions) != expected:
        return f"HTTP 200 without {expected} predictions: {answer.text[:200]!r}"
    return None


def send_rows(
    gateway_url: str,
    model: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    client: httpx.Client,
    *,
    rows_per_request: int = ROWS_PER_REQUEST,
    callers: Sequence[str] = CALLERS,
    keys: Mapping[str, str] | None = None,
) -> TrafficCount:
    """Score ``rows`` with ``model``, ``rows_per_request`` at a time, rotating over ``callers``; with
    ``keys`` (key id -> key) over its key ids instead, each call with its key."""
    count = TrafficCount(model)
    if keys:
        callers = list(keys)
    endpoint = f"{model_base_url(gateway_url, model)}/invocations"
    for index, start in enumerate(range(0, len(rows), rows_per_request)):
        chunk = [list(row) for row in rows[start : start + rows_per_request]]
        payload = {"dataframe_split": {"columns": list(columns), "data": chunk}}
        count.requests += 1
        try:
            caller = callers[index % len(callers)]
            headers = {CALLER_HEADER: caller}
            if keys:
                headers["Authorization"] = f"Bearer {keys[caller]}"
            answer = client.post(endpoint, json=payload, headers=headers)
            problem = _rows_answered(answer, len(chunk))
        except httpx.TransportError as exc:
            problem = f"{type(exc).__name__}: {exc}"
        if problem is None:
            count.ok += 1
            count.rows_scored += len(chunk)
        else:
            count.failed += 1
            if len(count.errors) < 5:
                count.errors.append(f"request {index}: {problem}")
    return count


def sampled_rows(
    csv_path: Path, features: Sequence[str], rows: int, seed: int = TRAFFIC_SEED
) -> list[list[Any]]:
    """``rows`` rows of ``features`` drawn from ``csv_path`` (seeded; with replacement if it is short)."""
    import numpy as np
    import pandas as pd

    frame = pd.read_csv(csv_path, usecols=list(features))[list(features)]
    if frame.empty:
        raise ConfigurationError(f"{csv_path} has no rows to send as traffic")
    picks = np.random.default_rng(seed).choice(len(frame), size=rows, replace=rows > len(frame))
    return frame.iloc[picks].to_numpy(dtype=object).tolist()


def send_traffic(
    gateway_url: str,
    spec: ModelSpec,
    drop: DatasetDrop,
    client: httpx.Client,
    *,
    simulated_requests: int = SIMULATED_REQUESTS,
    sampled_requests: int = SAMPLED_REQUESTS,
) -> TrafficCount:
    """A window of scoring traffic for one model (see the module docstring for which rows)."""
    if spec.dataset == CTR_DATASET:
        from modelops.data.traffic import simulate_traffic

        report = simulate_traffic(
            model_base_url(gateway_url, spec.name),
            requests=simulated_requests,
            rows_per_request=ROWS_PER_REQUEST,
            seed=TRAFFIC_SEED,
            callers=CALLERS,
            client=client,
            keys=team_keys(spec.team),
        )
        return TrafficCount(
            model=spec.name,
            requests=report.requests_sent,
            ok=report.ok,
            failed=report.failed,
            rows_scored=report.rows_scored,
            errors=list(report.errors),
        )
    rows = sampled_rows(drop.path, spec.features, sampled_requests * ROWS_PER_REQUEST)
    return send_rows(gateway_url, spec.name, spec.features, rows, client, keys=team_keys(spec.team))


def send_incident_traffic(
    gateway_url: str, spec: ModelSpec, client: httpx.Client, *, requests: int = INCIDENT_REQUESTS
) -> TrafficCount:
    """The incident's window for the click-through model: drifted traffic (``INCIDENT_SHIFT``) rotating over
    every caller, then each scored request's true labels posted to the gateway's ``POST /labels``."""
    if spec.dataset != CTR_DATASET:
        raise ConfigurationError(
            f"the demo's incident sends click-through traffic; {spec.name} trains on {spec.dataset!r}, "
            f"not {CTR_DATASET!r}"
        )
    from modelops.data.synthetic import DriftShift
    from modelops.data.traffic import deliver_labels, simulate_traffic

    keys = team_keys(spec.team)
    report = simulate_traffic(
        model_base_url(gateway_url, spec.name),
        requests=requests,
        rows_per_request=ROWS_PER_REQUEST,
        seed=INCIDENT_SEED,
        callers=CALLERS,
        shift=DriftShift(**INCIDENT_SHIFT),
        client=client,
        keys=keys,
    )
    # Labels come from the model's own team (the gateway refuses another team's).
    labels = deliver_labels(gateway_url, report.pending_labels, client=client, api_key=keys.get(CALLERS[0]))
    return TrafficCount(
        model=spec.name,
        requests=report.requests_sent,
        ok=report.ok,
        failed=report.failed,
        rows_scored=report.rows_scored,
        errors=list(report.errors),
        labels_delivered=labels,
    )


# --- one live prediction per model ---------------------------------------------------------------


def example_row(spec: ModelSpec, drop: DatasetDrop) -> dict[str, Any]:
    """One row of the model's features to score in the summary."""
    if spec.dataset == CTR_DATASET:
        from modelops.data.synthetic import generate_clicks

        frame = generate_clicks(1, seed=PREDICTION_SEED)
        return {column: frame[column].tolist()[0] for column in spec.features}
    import pandas as pd

    frame = pd.read_csv(drop.path, usecols=list(spec.features), nrows=1)
    return {column: frame[column].tolist()[0] for column in spec.features}


def predict(gateway_url: str, model: str, row: Mapping[str, Any], client: httpx.Client, *, team: str) -> Any:
    """Score one row through the gateway as one of ``team``'s callers; returns its first prediction."""
    payload = {"dataframe_split": {"columns": list(row), "data": [list(row.values())]}}
    keys = team_keys(team)
    headers = {CALLER_HEADER: "make-demo"}
    if keys:
        headers["Authorization"] = f"Bearer {keys[sorted(keys)[0]]}"
    answer = client.post(f"{model_base_url(gateway_url, model)}/invocations", json=payload, headers=headers)
    if answer.status_code != 200:
        raise ConfigurationError(
            f"the gateway did not score one row with {model} (HTTP {answer.status_code}: "
            f"{answer.text[:300]}); see .demo/logs/gateway.log"
        )
    predictions = answer.json().get("predictions")
    if not isinstance(predictions, list) or not predictions:
        raise ConfigurationError(
            f"the gateway answered {model}'s row without predictions: {answer.text[:300]}"
        )
    return predictions[0]


def describe_prediction(task: str, prediction: Any) -> str:
    """A prediction as a person reads it: a click probability for a classifier, a number for a regressor."""
    value = prediction
    if isinstance(value, dict) and len(value) == 1:
        (value,) = value.values()
    if task == "binary_classification":
        # predict_proba's [P(no click), P(click)], or P(click) alone; a bare 0/1 is a class, not a probability.
        if isinstance(value, list) and len(value) == 2 and all(isinstance(v, float) for v in value):
            return f"probability of a click {value[1]:.3f}"
        if isinstance(value, float) and 0 <= value <= 1:
            return f"probability of a click {value:.3f}"
    elif isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, float):
        return f"{value:.1f}"
    return json.dumps(prediction, default=str)


# --- canaries ---------------------------------------------------------------------------------------

CANARY_REQUESTS_PER_BURST = 4
"""Requests per model each time the driver polls while a canary soaks: about two a second, labelled."""


def write_diabetes_with_unit_bug(target: Path) -> int:
    """The diabetes data with one upstream bug: ``s5`` (log of serum triglycerides) delivered as the
    triglycerides themselves (mg/dL). Every expectation still passes, a model trained on it scores well on
    its own holdout and passes the gate; on real callers, who send ``s5`` as before, it is far off. What a
    canary is for: the demo's canary of it is rolled back."""
    import math

    import pandas as pd

    # Hidden names until the renaming: the validation DAG never reads a half-made file.
    source = target.with_name(f".{target.name}.source")
    rows = write_diabetes_csv(source)
    frame = pd.read_csv(source)
    source.unlink()
    frame["s5"] = [round(math.exp(value), 1) for value in frame["s5"]]
    partial = target.with_name(f".{target.name}.partial")
    frame.to_csv(partial, index=False)
    partial.replace(target)
    return rows


class CanaryTraffic:
    """Labelled traffic for the models whose canaries soak: each call sends a burst of rows sampled from the
    file the demo dropped for the model's dataset, each request with its own routing key (a session), then
    posts the rows' true labels. Counts what it sent per model and arm."""

    def __init__(
        self,
        gateway_url: str,
        specs: Sequence[ModelSpec],
        drops: Mapping[str, DatasetDrop],
        client: httpx.Client,
        *,
        requests_per_burst: int = CANARY_REQUESTS_PER_BURST,
    ) -> None:
        import pandas as pd

        self.gateway_url, self.client, self.requests_per_burst = gateway_url, client, requests_per_burst
        self.specs = list(specs)
        self.frames = {
            spec.name: pd.read_csv(drops[spec.dataset].path, usecols=[*spec.features, spec.target])
            for spec in self.specs
        }
        self.sent: dict[str, dict[str, int]] = {spec.name: {} for spec in self.specs}
        self.labels: dict[str, int] = {spec.name: 0 for spec in self.specs}
        self._bursts = 0

    def soaking(self) -> set[str]:
        """The models whose canary the gateway serves now (its open ``GET /health``)."""
        try:
            answer = self.client.get(f"{self.gateway_url.rstrip('/')}/health")
            models = answer.json().get("models", {})  # also on a 503 (the default model not serving)
        except (httpx.TransportError, ValueError):
            return set()
        return {name for name, entry in models.items() if isinstance(entry, dict) and entry.get("canary")}

    def __call__(self) -> int:
        """One burst for every model with a canary; returns the requests answered (the driver's on_poll)."""
        from modelops.data.traffic import deliver_labels
        from modelops.vocabulary import ARM_HEADER, ROUTING_KEY_HEADER

        soaking = self.soaking()
        answered = 0
        self._bursts += 1
        for spec in self.specs:
            if spec.name not in soaking:
                continue
            frame, keys = self.frames[spec.name], team_keys(spec.team)
            callers = list(keys) or list(CALLERS)
            sample = frame.sample(
                n=self.requests_per_burst * ROWS_PER_REQUEST, random_state=self._bursts, replace=True
            )
            pending: dict[str, list[int]] = {}
            for index in range(self.requests_per_burst):
                chunk = sample.iloc[index * ROWS_PER_REQUEST : (index + 1) * ROWS_PER_REQUEST]
                caller = callers[index % len(callers)]
                headers = {CALLER_HEADER: caller, ROUTING_KEY_HEADER: f"canary-{self._bursts}-{index}"}
                if keys:
                    headers["Authorization"] = f"Bearer {keys[caller]}"
                payload = {"dataframe_split": chunk[spec.features].to_dict(orient="split", index=False)}
                try:
                    answer = self.client.post(
                        f"{model_base_url(self.gateway_url, spec.name)}/invocations",
                        json=payload,
                        headers=headers,
                    )
                except httpx.TransportError:
                    continue
                if answer.status_code != 200:
                    continue
                answered += 1
                arm = answer.headers.get(ARM_HEADER, "champion")
                self.sent[spec.name][arm] = self.sent[spec.name].get(arm, 0) + 1
                request_id = answer.headers.get("X-Request-Id")
                if request_id:
                    pending[request_id] = [int(round(float(v))) for v in chunk[spec.target]]
            if pending:
                self.labels[spec.name] += deliver_labels(
                    self.gateway_url, pending, client=self.client, api_key=next(iter(keys.values()), None)
                )
        return answered
