"""Per-team API keys at the scoring gateway: who may score which model and label its predictions.

The real gateway against the real MLflow registry, audit log and prediction log of ``test_gateway``'s
harness (its module fixtures are reused here). The key of every test call must never reach a response,
the prediction log's table or the configuration's repr.
"""

# ruff: noqa: F811 (the pytest fixture `registry` is imported from test_gateway and used as a parameter)
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from modelops.cli import main as cli_main
from modelops.errors import ConfigurationError
from modelops.serving.access import ApiKeyring, key_digest, key_entry, new_key
from modelops.serving.gateway import GatewayConfig, create_app
from modelops.vocabulary import SMOKE_TEST_CALLER
from tests.support import TEST_KEY_ID, keyring_for_tests
from tests.unit.test_gateway import (  # noqa: F401 (registry: a module fixture, reused)
    AUTH,
    CALLER_ID,
    CLASSIFIER,
    KEY,
    OTHER_KEY,
    OTHER_TEAM,
    REGRESSOR,
    Registry,
    keyed,
    logged_calls,
    make_config,
    registry,
)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

ADMIN_TOKEN = "admin-token-for-access-tests-0123456789"
UNKNOWN_KEY = "mok_not-a-key-this-gateway-knows-0123456789abcdefghij"
UNSPECCED = "clicks_gateway_unspecced"  # registered (same files as the classifier), named by no policy


@pytest.fixture
def gateway(registry: Registry, tmp_path: Path) -> Iterator[TestClient]:
    config = make_config(registry, tmp_path, admin_token=ADMIN_TOKEN)
    with keyed(create_app(config), headers={}) as client:
        yield client


def whole_log(client: TestClient) -> str:
    """Every column of every row of the prediction log and its labels, as text."""
    client.app.state.prediction_writer.flush()  # calls are logged off the request path
    engine = client.app.state.prediction_log.engine
    with engine.connect() as conn:
        tables = [name for name in sa.inspect(engine).get_table_names()]
        return "\n".join(
            str(list(row)) for table in tables for row in conn.execute(sa.text(f"SELECT * FROM {table}"))
        )


def test_a_call_without_a_known_key_is_401_and_logged_as_anonymous(
    gateway: TestClient, registry: Registry
) -> None:
    body = registry.records(CLASSIFIER)
    missing = gateway.post("/invocations", json=body)
    unknown = gateway.post("/invocations", json=body, headers={"Authorization": f"Bearer {UNKNOWN_KEY}"})
    unknown_header = gateway.post(
        f"/models/{CLASSIFIER}/invocations", json=body, headers={"X-Api-Key": UNKNOWN_KEY}
    )
    # X-Caller-Id is not a credential.
    claimed = gateway.post("/invocations", json=body, headers={"X-Caller-Id": CALLER_ID})
    for response in (missing, unknown, unknown_header, claimed):
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert response.json()["error_code"] == "UNAUTHENTICATED"
        assert "Authorization: Bearer" in response.json()["message"]
        assert UNKNOWN_KEY not in response.text
    calls = logged_calls(gateway.app)
    assert [(c["status_code"], c["caller_id"], c["n_rows"]) for c in calls] == [(401, "anonymous", 0)] * 4
    assert all(c["error"].startswith("UNAUTHENTICATED") for c in calls)
    assert UNKNOWN_KEY not in whole_log(gateway)


def test_the_key_names_the_caller_and_is_never_stored(gateway: TestClient, registry: Registry) -> None:
    body = registry.records(CLASSIFIER)
    bearer = gateway.post("/invocations", json=body, headers={**AUTH, "X-Caller-Id": "someone-else"})
    api_key = gateway.post(f"/models/{CLASSIFIER}/invocations", json=body, headers={"X-Api-Key": KEY})
    assert bearer.status_code == api_key.status_code == 200
    calls = logged_calls(gateway.app)
    # The authenticated team:key_id, whatever X-Caller-Id claims (it would let one key pose as many callers,
    # and monitoring's per-caller caps and "seen in several callers' rows" rule count caller ids).
    assert [c["caller_id"] for c in calls] == [CALLER_ID, CALLER_ID]
    stored = whole_log(gateway)
    assert KEY not in stored and key_digest(KEY) not in stored
    assert KEY not in bearer.text and KEY not in repr(gateway.app.state.config)


def test_another_teams_model_is_403_naming_the_model(registry: Registry, tmp_path: Path) -> None:
    config = make_config(registry, tmp_path)
    with keyed(create_app(config), headers={"Authorization": f"Bearer {OTHER_KEY}"}) as client:
        denied = client.post(f"/models/{REGRESSOR}/invocations", json=registry.records(REGRESSOR))
        assert denied.status_code == 403
        assert denied.json()["error_code"] == "PERMISSION_DENIED"
        message = denied.json()["message"]
        assert REGRESSOR in message and OTHER_TEAM in message and "serving.allowed_teams" in message
        assert OTHER_KEY not in denied.text
        [call] = logged_calls(client.app)
        assert (call["status_code"], call["caller_id"], call["model_name"]) == (
            403,
            f"{OTHER_TEAM}:rival",
            REGRESSOR,
        )
        assert OTHER_KEY not in whole_log(client)


def test_a_model_no_spec_names_is_403_and_an_unknown_one_404(registry: Registry, tmp_path: Path) -> None:
    registry.client.create_registered_model(UNSPECCED)
    with keyed(create_app(make_config(registry, tmp_path))) as client:
        body = registry.records(CLASSIFIER)
        unspecced = client.post(f"/models/{UNSPECCED}/invocations", json=body)
        assert unspecced.status_code == 403
        assert "no model spec" in unspecced.json()["message"]
        unknown = client.post("/models/no_such_model/invocations", json=body)
        assert unknown.status_code == 404
        assert CLASSIFIER in unknown.json()["message"]


def test_labels_need_a_key_of_a_team_that_may_call_the_model(gateway: TestClient, registry: Registry) -> None:
    scored = gateway.post("/invocations", json=registry.records(CLASSIFIER), headers=AUTH)
    request_id = scored.headers["X-Request-Id"]
    labels = {"request_id": request_id, "labels": [1, 0, 0, 1]}

    anonymous = gateway.post("/labels", json=labels)
    assert anonymous.status_code == 401 and anonymous.headers["WWW-Authenticate"] == "Bearer"
    # Refused before the body is even validated.
    assert gateway.post("/labels", json={"nonsense": True}).status_code == 401
    rival = gateway.post("/labels", json=labels, headers={"Authorization": f"Bearer {OTHER_KEY}"})
    assert rival.status_code == 403
    assert CLASSIFIER in rival.json()["message"] and OTHER_KEY not in rival.text
    owner = gateway.post("/labels", json=labels, headers=AUTH)
    assert owner.status_code == 200 and owner.json()["accepted"] == 4
    assert (
        gateway.post("/labels", json={"request_id": "nope", "labels": [1]}, headers=AUTH).status_code == 404
    )


def test_the_admin_token_scores_as_the_smoke_test_and_health_stays_open(
    gateway: TestClient, registry: Registry
) -> None:
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    # The deployment's smoke test: any model, logged under the caller id monitoring never counts.
    smoke = gateway.post(f"/models/{REGRESSOR}/invocations", json=registry.records(REGRESSOR), headers=admin)
    assert smoke.status_code == 200
    assert logged_calls(gateway.app)[-1]["caller_id"] == SMOKE_TEST_CALLER
    # A team key is no admin token.
    assert gateway.get("/admin/models", headers=AUTH).status_code == 401
    assert gateway.get("/admin/models", headers=admin).status_code == 200
    for path in (
        "/ping",
        "/health",
        "/version",
        f"/models/{REGRESSOR}/health",
        f"/models/{REGRESSOR}/version",
    ):
        assert gateway.get(path).status_code == 200, path


def test_the_gateway_refuses_to_start_without_keys_or_admin_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MODELOPS_DEFAULT_MODEL", raising=False)
    env = {
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "MODELOPS_PREDICTIONS_URL": "sqlite:///x.db",
        "MODELOPS_AUDIT_URL": "sqlite:///audit.db",
        "MODELOPS_AUDIT_KEYS": json.dumps(
            {"current": TEST_KEY_ID, "keys": {TEST_KEY_ID: keyring_for_tests().keys[TEST_KEY_ID]}}
        ),
        "MODELOPS_GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN,
    }
    with pytest.raises(ConfigurationError, match="MODELOPS_GATEWAY_KEYS is not set.*create-key"):
        GatewayConfig.from_env(env)
    keys = json.dumps({"shop": key_entry("growth-marketing", KEY)})
    with pytest.raises(ConfigurationError, match="MODELOPS_GATEWAY_ADMIN_TOKEN is not set"):
        GatewayConfig.from_env(
            {k: v for k, v in {**env, "MODELOPS_GATEWAY_KEYS": keys}.items() if "ADMIN" not in k}
        )
    # A key pasted where its digest belongs is refused without being echoed.
    with pytest.raises(ConfigurationError, match="'sha256' must be the 64 lowercase hex") as pasted:
        GatewayConfig.from_env(
            {
                **env,
                "MODELOPS_GATEWAY_KEYS": json.dumps({"shop": {"team": "growth-marketing", "sha256": KEY}}),
            }
        )
    assert KEY not in str(pasted.value)
    with pytest.raises(ConfigurationError, match="MODELOPS_GATEWAY_KEYS is not valid JSON"):
        GatewayConfig.from_env({**env, "MODELOPS_GATEWAY_KEYS": "{oops"})
    assert (
        GatewayConfig.from_env({**env, "MODELOPS_GATEWAY_KEYS": keys}).api_keys.authenticate(KEY) is not None
    )


def test_create_key_prints_the_key_once_and_only_its_digest_for_the_gateway(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli_main(["gateway", "create-key", "--team", "growth-marketing", "--key-id", "web-shop"]) == 0
    lines = capsys.readouterr().out.splitlines()
    key = next(line.split()[-1] for line in lines if line.startswith("API key"))
    entry = json.loads(lines[-1])
    assert entry == {"web-shop": {"team": "growth-marketing", "sha256": key_digest(key)}}
    assert key not in lines[-1]
    caller = ApiKeyring(entry).authenticate(key)
    assert caller is not None and caller.caller_id == "growth-marketing:web-shop"
    assert cli_main(["gateway", "create-key", "--team", "bad team"]) == 2
    assert len({new_key() for _ in range(100)}) == 100 and len(new_key()) > 40


def test_metrics_and_trace_context_follow_every_call(gateway: TestClient, registry: Registry) -> None:
    """/metrics in Prometheus' text format (parsed with the client library's parser) counts calls per
    model, version, arm and status class; the caller's W3C traceparent keeps its trace id into the response
    and the prediction log; a garbage one is replaced by a fresh trace."""
    from prometheus_client.parser import text_string_to_metric_families

    body = registry.records(CLASSIFIER)
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    incoming = f"00-{trace_id}-00f067aa0ba902b7-01"
    traced = gateway.post("/invocations", json=body, headers={**AUTH, "traceparent": incoming})
    garbage = gateway.post("/invocations", json=body, headers={**AUTH, "traceparent": "not-a-trace"})
    refused = gateway.post("/invocations", json=body, headers={"Authorization": f"Bearer {UNKNOWN_KEY}"})
    assert traced.status_code == garbage.status_code == 200 and refused.status_code == 401
    assert traced.headers["traceparent"].split("-")[1] == trace_id
    assert traced.headers["traceparent"] != incoming  # the gateway's own span in the same trace
    assert garbage.headers["traceparent"].split("-")[1] not in ("0" * 32, trace_id)

    gateway.app.state.prediction_writer.flush()
    with gateway.app.state.prediction_log.engine.connect() as conn:
        stored = dict(conn.execute(sa.text("select request_id, traceparent from modelops_predictions")).all())
    assert stored[traced.headers["X-Request-Id"]] == traced.headers["traceparent"]

    scraped = gateway.get("/metrics")
    assert scraped.status_code == 200 and scraped.headers["content-type"].startswith("text/plain")
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(scraped.text)
        for sample in family.samples
    }
    version = traced.headers["X-Model-Version"]
    ok = (("arm", "champion"), ("model", CLASSIFIER), ("status", "2xx"), ("version", version))
    assert samples[("modelops_gateway_requests_total", ok)] == 2
    unauthorised = (("arm", "champion"), ("model", CLASSIFIER), ("status", "4xx"), ("version", ""))
    assert samples[("modelops_gateway_errors_total", unauthorised)] == 1
    assert KEY not in scraped.text and UNKNOWN_KEY not in scraped.text


def test_made_up_model_names_do_not_grow_the_metrics(gateway: TestClient, registry: Registry) -> None:
    body = registry.records(CLASSIFIER)
    for index in range(5):  # without a key (401) and with one (403/404): neither adds a series
        path = f"/models/no_such_model_{index}/invocations"
        assert gateway.post(path, json=body).status_code == 401
        assert gateway.post(path, json=body, headers=AUTH).status_code in (403, 404)
    scraped = gateway.get("/metrics").text
    assert "no_such_model" not in scraped and 'model="_unknown"' in scraped
