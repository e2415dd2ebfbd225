"""Input screening at the scoring gateway: what is refused before the model sees it, and how.

A real model (scikit-learn pipeline, MLflow signature ``age: long, income: double, city: string``) in a
real MLflow registry, authorised by the real audit log, behind the real gateway and prediction log. Every
refusal must answer with the right status, name the column or limit, never quote a value, and be written
to the prediction log as a failed call.
"""

# ruff: noqa: F811 (pytest fixtures imported from test_gateway are used as parameters)
from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from modelops.serving.gateway import ModelPolicy, create_app
from modelops.serving.screening import Screening
from modelops.settings import PiiPattern, ScreeningSpec
from tests.support import serve_in_thread
from tests.unit.test_gateway import (
    AUTH,
    TEAM,
    Registry,
    keyed,
    logged_calls,
    make_config,
    new_registry,
    register_folder,
    save_sklearn,
)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:Hint. Inferred schema:UserWarning")

MODEL = "ages_screening_test"
SECRET = "zq-secret-value-7731"  # a distinctive value that must never come back in an error
EMAIL = "jane.doe@example.com"
PII = [PiiPattern(name="email address", regex=r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")]
LIMITS = {"max_body_bytes": 512 * 1024, "max_rows": 50}
SMALL_BODY = 64 * 1024


def training_rows(rows: int, seed: int) -> tuple[pd.DataFrame, pd.Series]:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "age": rng.integers(18, 90, rows).astype("int64"),
            "income": rng.normal(3000, 800, rows),
            "city": rng.choice(["lyon", "oslo", "kyiv"], rows),
        }
    )
    return frame, (frame["income"] / 100 + frame["age"]).astype(float)


@pytest.fixture(scope="module")
def ages(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LinearRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder

    root = tmp_path_factory.mktemp("screening")
    reg = new_registry(root)
    frame, target = training_rows(200, seed=3)
    model = Pipeline(
        [
            (
                "pre",
                ColumnTransformer(
                    [
                        ("num", "passthrough", ["age", "income"]),
                        ("cat", OneHotEncoder(handle_unknown="ignore"), ["city"]),
                    ]
                ),
            ),
            ("reg", LinearRegression()),
        ]
    ).fit(frame, target)
    assert register_folder(reg.client, reg.experiment_id, MODEL, save_sklearn(model, frame, root)) == "1"
    reg.approve(MODEL, "1")
    reg.promote(MODEL, "1")
    yield reg
    reg.store.dispose()


def policy(**rules: Any) -> dict[str, ModelPolicy]:
    return {
        MODEL: ModelPolicy(
            allowed_teams=frozenset({TEAM}),
            screening=Screening.build(ScreeningSpec(**{**LIMITS, **rules}), PII),
        )
    }


@pytest.fixture
def gateway(ages: Registry, tmp_path: Path) -> Iterator[TestClient]:
    with keyed(
        create_app(make_config(ages, tmp_path, default_model=MODEL, models=(), policies=policy()))
    ) as client:
        yield client


def good_row(**changes: Any) -> dict[str, Any]:
    return {"age": 41, "income": 3120.5, "city": "oslo", **changes}


def post(client: TestClient, body: Any, *, raw: str | None = None) -> Any:
    if raw is not None:
        return client.post(
            f"/models/{MODEL}/invocations", content=raw, headers={"Content-Type": "application/json"}
        )
    return client.post(f"/models/{MODEL}/invocations", json=body)


def logged(client: TestClient, response: Any) -> dict[str, Any]:
    """The prediction log's row of ``response``'s call, inputs included."""
    client.app.state.prediction_writer.flush()  # calls are logged off the request path
    engine = client.app.state.prediction_log.engine
    with engine.connect() as conn:
        row = conn.execute(
            sa.text("SELECT * FROM modelops_predictions WHERE request_id = :id"),
            {"id": response.headers["X-Request-Id"]},
        ).one()
    return dict(row._mapping)


def assert_refused(client: TestClient, response: Any, status: int, code: str, *named: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error_code"] == code, body
    for text in named:
        assert text in body["message"], (text, body["message"])
    assert SECRET not in response.text and EMAIL not in response.text
    call = logged(client, response)
    assert call["status_code"] == status and call["error"].startswith(code)
    assert SECRET not in call["error"] and EMAIL not in call["error"]
    return call


def test_a_good_row_scores(gateway: TestClient) -> None:
    response = post(gateway, {"dataframe_records": [good_row(), good_row(age=70, city="lyon")]})
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == 2


def test_too_many_rows_is_413_naming_the_limit(gateway: TestClient) -> None:
    response = post(
        gateway, {"dataframe_split": {"columns": ["age", "income", "city"], "data": [[1, 2.0, "x"]] * 51}}
    )
    call = assert_refused(gateway, response, 413, "TOO_MANY_ROWS", "51 rows", "at most 50", "max_rows")
    assert call["n_rows"] == 0  # nothing of a refused oversized batch is stored
    records = post(gateway, {"dataframe_records": [good_row()] * 51})
    assert_refused(gateway, records, 413, "TOO_MANY_ROWS", "at most 50")


def test_malformed_and_deeply_nested_json_is_400_never_500(gateway: TestClient) -> None:
    malformed = post(gateway, None, raw='{"dataframe_records": [{"age": ' + SECRET)
    assert_refused(gateway, malformed, 400, "BAD_REQUEST", "not valid JSON")
    # Deeper than Python's parser can go (RecursionError, a 500 in MLflow's own server) ...
    deepest = post(gateway, None, raw='{"inputs": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert_refused(gateway, deepest, 400, "BAD_REQUEST", "nested deeper than 16 levels", "max_json_depth")
    # ... and deep enough to parse but not a table.
    deep = post(gateway, None, raw='{"inputs": ' + "[" * 500 + "1" + "]" * 500 + "}")
    assert_refused(gateway, deep, 400, "BAD_REQUEST", "nested deeper than 16 levels")
    not_an_object = post(gateway, [good_row()])
    assert_refused(gateway, not_an_object, 400, "BAD_REQUEST", "JSON dictionary")


def test_missing_and_unknown_columns_are_refused_naming_them(gateway: TestClient) -> None:
    missing = post(gateway, {"dataframe_records": [{"age": 30, "city": SECRET}]})
    assert_refused(gateway, missing, 400, "SCHEMA_MISMATCH", "missing columns ['income']")
    extra = post(gateway, {"dataframe_records": [good_row(ssn=SECRET, notes=SECRET)]})
    assert_refused(
        gateway, extra, 400, "SCHEMA_MISMATCH", "2 columns", "'ssn'", "'notes'", "extra_columns: drop"
    )
    # 10,000 extra columns: refused, and the message stays short (it names ten, then counts).
    wide = {f"junk_{i}": 1 for i in range(10_000)}
    many = post(gateway, {"dataframe_records": [good_row(**wide)]})
    assert_refused(gateway, many, 400, "SCHEMA_MISMATCH", "10000 columns", "and 9990 more")
    assert len(many.json()["message"]) < 1000


def test_unknown_columns_are_dropped_when_the_policy_says_so(ages: Registry, tmp_path: Path) -> None:
    config = make_config(
        ages, tmp_path, default_model=MODEL, models=(), policies=policy(extra_columns="drop")
    )
    with keyed(create_app(config)) as client:
        response = post(client, {"dataframe_records": [good_row(ssn="123", notes="x")]})
        assert response.status_code == 200, response.text
        inputs = json.loads(logged(client, response)["inputs"])
        assert set(inputs[0]) == {"age", "income", "city"}  # the dropped columns are not stored either


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (True, "a boolean"),
        ("SECRET", "text"),
        (float("nan"), "NaN"),
        (float("inf"), "Infinity"),
        (10**19, "outside the long range"),
        (41.5, "a fraction"),
        (None, "null"),
    ],
)
def test_a_value_of_the_wrong_type_is_422_naming_the_column(
    gateway: TestClient, value: Any, problem: str
) -> None:
    value = SECRET if value == "SECRET" else value
    # json.dumps writes NaN and Infinity as the bare literals clients send; Python's parser reads them.
    raw = json.dumps({"dataframe_records": [good_row(), good_row(age=value)]})
    response = post(gateway, None, raw=raw)
    call = assert_refused(gateway, response, 422, "INVALID_INPUT_VALUES", "column 'age' (long)", problem)
    assert call["n_rows"] == 2  # the rows as sent are kept for the investigation, not in the error


def test_wrong_types_in_several_columns_are_named_together(gateway: TestClient) -> None:
    raw = json.dumps({"dataframe_split": {"columns": ["age", "income", "city"], "data": [[True, SECRET, 7]]}})
    response = post(gateway, None, raw=raw)
    assert_refused(
        gateway, response, 422, "INVALID_INPUT_VALUES", "column 'age'", "column 'income'", "column 'city'"
    )


def test_pii_is_refused_or_masked_per_the_model(ages: Registry, tmp_path: Path) -> None:
    for mode in ("reject", "mask", "off"):
        config = make_config(ages, tmp_path / mode, default_model=MODEL, models=(), policies=policy(pii=mode))
        with keyed(create_app(config)) as client:
            response = post(client, {"dataframe_records": [good_row(city=f"write to {EMAIL} please")]})
            call = logged(client, response)
            if mode == "reject":
                assert_refused(client, response, 422, "PII_REFUSED", "column 'city'", "email address")
            else:
                assert response.status_code == 200, response.text
            # What the log keeps: masked unless the model's owner turned the check off.
            assert (EMAIL in call["inputs"]) is (mode == "off")
            if mode != "off":
                assert "ja***" in call["inputs"]


def test_a_large_body_is_413_before_it_is_read(ages: Registry, tmp_path: Path) -> None:
    config = make_config(
        ages, tmp_path, default_model=MODEL, models=(), policies=policy(max_body_bytes=SMALL_BODY)
    )
    app = create_app(config)
    with serve_in_thread(app) as url:
        host, port = url.removeprefix("http://").split(":")
        path = f"/models/{MODEL}/invocations"
        auth = AUTH["Authorization"]

        def exchange(head: str, body_parts: list[bytes]) -> tuple[bytes, float]:
            """Send the head and the given parts only (never the rest of the declared body); the answer."""
            with socket.create_connection((host, int(port)), timeout=10) as sock:
                started = time.monotonic()
                sock.sendall(head.encode())
                for part in body_parts:
                    sock.sendall(part)
                answer = b""
                while b"\r\n\r\n" not in answer:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    answer += chunk
                return answer, time.monotonic() - started

        # Declares 46 MB and sends 10 bytes: answered at once, from Content-Length alone.
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: {auth}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {46 * 1024 * 1024}\r\n\r\n"
        )
        answer, seconds = exchange(head, [b'{"inputs":'])
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert seconds < 5
        # Chunked, no length: 200 KiB sent of an endless body; refused once past the 64 KiB limit.
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: {auth}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"[1]," * 4096
        parts = [f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" for _ in range(12)]
        answer, seconds = exchange(head, parts)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert seconds < 5

    calls = [call for call in logged_calls(app) if call["model_name"] == MODEL]
    assert [(c["status_code"], c["n_rows"]) for c in calls] == [(413, 0), (413, 0)]
    assert all("max_body_bytes" in c["error"] for c in calls)


def test_a_large_body_through_the_test_client_is_413(gateway: TestClient) -> None:
    body = {"dataframe_records": [good_row(city=uuid.uuid4().hex * 4)] * 4000}
    response = post(gateway, body)
    assert_refused(gateway, response, 413, "PAYLOAD_TOO_LARGE", "524288 bytes", "max_body_bytes")
