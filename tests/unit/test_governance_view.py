"""The governance view (modelops.governance): the inventory read from a real SQLite audit log and a real
MLflow SQLite registry, rendered by the FastAPI app (TestClient), its links, the chain's status after a
record is tampered with, the login requirement, and the Airflow plugin that mounts it."""

from __future__ import annotations

import os
import re
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from fastapi import HTTPException, Request

from modelops.audit import AuditStore, LocalFolderAnchorStore
from modelops.registry import ModelRegistry
from modelops.settings import Catalog, load_catalog
from modelops.vocabulary import Alias, AuditAction, Decision, model_subject
from tests.support import keyring_for_tests, use_sqlite_registry

CLINICAL = "diabetes_progression"  # risk tier high: a person approves
CTR = "ctr_recommender"  # risk tier medium: approved by policy
FILES = {"MLmodel": "a" * 64, "model.skops": "b" * 64}


@dataclass
class Sources:
    """What the app reads, as AirflowSources would resolve it from the connections."""

    catalog_: Catalog
    registry_: ModelRegistry
    audit_: AuditStore
    anchors_: LocalFolderAnchorStore

    def catalog(self) -> Catalog:
        return self.catalog_

    def registry(self) -> ModelRegistry:
        return self.registry_

    def audit(self) -> AuditStore:
        return self.audit_

    def anchors(self) -> LocalFolderAnchorStore:
        return self.anchors_


def _iso(delta_hours: float = 0.0) -> str:
    return (datetime.now(UTC) + timedelta(hours=delta_hours)).isoformat()


class Pipeline:
    """Writes the records the stages would write (same actions, decisions and details keys)."""

    def __init__(self, audit: AuditStore, registry: ModelRegistry, experiments: dict[str, str], root: Path):
        self.audit, self.registry, self.root = audit, registry, root
        self.experiments = experiments

    def record(self, action: str, name: str, version: str, decision: str, **details: Any) -> int:
        return self.audit.append(
            actor=f"airflow:test.{action}",
            action=action,
            subject=model_subject(name, version),
            decision=decision,
            details=details,
            dag_id="modelops_test",
            run_id=f"manual__{name}_{version}_{action}_{decision}",
            task_id="task",
        ).seq

    def train(self, name: str) -> str:
        folder = self.root / f"model-{name}"
        folder.mkdir(exist_ok=True)
        (folder / "MLmodel").write_text("flavors: {}\n")
        run_id = self.registry.log_run(
            experiment=f"modelops/{name}", run_name=name, tags={}, artifact_dirs={"model": folder}
        )
        self.registry.ensure_model(name, {})
        version = self.registry.register_version(name, run_id=run_id, artifact_path="model", tags={}).version
        self.record(
            AuditAction.MODEL_REGISTERED,
            name,
            version,
            Decision.CANDIDATE,
            run_id=run_id,
            metrics={"holdout_rmse": 50.1},
            artifacts=FILES,
        )
        return version

    def approve(self, name: str, version: str, by: str, *, human: bool) -> int:
        approval = {"mode": "human" if human else "automatic", "by": by, "approved_at": _iso()}
        approval["valid_until"] = _iso(48)
        if human:
            self.record(AuditAction.GATE_DECIDED, name, version, Decision.AWAITING_APPROVAL, artifacts=FILES)
            approval |= {"comment": "Model card reviewed", "answer": ["Approve"]}
        seq = self.record(
            AuditAction.GATE_DECIDED, name, version, Decision.APPROVED, approval=approval, artifacts=FILES
        )
        self.registry.set_alias(name, Alias.CHALLENGER, version)
        return seq

    def promote(self, name: str, version: str, previous: str | None = None) -> None:
        self.record(
            AuditAction.MODEL_DEPLOYED,
            name,
            version,
            Decision.PROMOTED,
            champion_version=version,
            previous_version=previous,
            artifacts=FILES,
        )
        if previous is not None:  # the end of its canary
            self.record(
                AuditAction.TRAFFIC_SHARE_SET,
                name,
                version,
                Decision.PROMOTED,
                champion_version=version,
                challenger_version=None,
                challenger_share=0.0,
                canary_version=version,
            )
        self.registry.set_alias(name, Alias.CHAMPION, version)
        self.registry.delete_alias(name, Alias.CHALLENGER)

    def start_canary(self, name: str, champion: str, challenger: str, share: float) -> None:
        self.record(
            AuditAction.TRAFFIC_SHARE_SET,
            name,
            challenger,
            Decision.CANARY_STARTED,
            champion_version=champion,
            challenger_version=challenger,
            challenger_share=share,
            started_at=_iso(),
            artifacts=FILES,
        )
        self.registry.set_alias(name, Alias.CHALLENGER, challenger)

    def assess(self, name: str, version: str, verdict: str, hours_ago: float) -> int:
        return self.record(
            AuditAction.DRIFT_ASSESSED,
            name,
            version,
            verdict,
            window_start=_iso(-hours_ago - 1),
            window_end=_iso(-hours_ago),
            policy="standard",
            rows=500,
            drift_share=0.4,
        )

    def alert(self, name: str, version: str, tier: str, decision: str = Decision.SENT) -> int:
        return self.record(
            AuditAction.ALERT_NOTIFIED,
            name,
            version,
            decision,
            tier=tier,
            dedup_key=f"{name}.v{version}.{tier}",
            title=f"{tier}: {name} v{version}",
            recipients=["owner@example.com"],
            deliveries=[{"channel": "log", "delivered": decision == Decision.SENT}],
        )


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Sources:
    """Both demo models through training, the gate, deployment, a canary and monitoring."""
    root = tmp_path_factory.mktemp("governance")
    catalog = load_catalog()
    with pytest.MonkeyPatch.context() as patch:
        _, registry, experiments = use_sqlite_registry(root, patch, catalog=catalog)
    audit = AuditStore(f"sqlite:///{root / 'audit.db'}", keyring=keyring_for_tests())
    anchors = LocalFolderAnchorStore(root / "anchors")
    run = Pipeline(audit, registry, experiments, root)

    # diabetes_progression: v1 champion approved by a person, v2 on a 30 % canary, a critical alert open.
    v1 = run.train(CLINICAL)
    run.approve(CLINICAL, v1, "risk_officer", human=True)
    run.promote(CLINICAL, v1)
    run.assess(CLINICAL, v1, "ok", hours_ago=5)
    v2 = run.train(CLINICAL)
    run.approve(CLINICAL, v2, "risk_officer", human=True)
    run.start_canary(CLINICAL, v1, v2, 0.3)
    run.assess(CLINICAL, v1, "critical", hours_ago=1)
    run.alert(CLINICAL, v1, "critical")

    # ctr_recommender: v1, then v2 promoted through its canary; a warning closed by an ok window.
    c1 = run.train(CTR)
    run.approve(CTR, c1, "policy standard@3", human=False)
    run.promote(CTR, c1)
    c2 = run.train(CTR)
    run.approve(CTR, c2, "policy standard@3", human=False)
    run.start_canary(CTR, c1, c2, 0.5)
    run.promote(CTR, c2, previous=c1)
    run.assess(CTR, c2, "warning", hours_ago=3)
    run.alert(CTR, c2, "warning")
    run.assess(CTR, c2, "ok", hours_ago=1)
    audit.anchor_head(anchors)
    return Sources(catalog, registry, audit, anchors)


def client_for(sources: Any, **options: Any) -> Any:
    from fastapi.testclient import TestClient

    from modelops.governance.web import create_app

    return TestClient(create_app(sources, require_login=False, chain_cache_seconds=0, **options))


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        href = dict(attrs).get("href")
        if tag == "a" and href:
            self.links.append(href)


def links_of(html: str) -> list[str]:
    parser = _Links()
    parser.feed(html)
    return parser.links


def text_of(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def row_html(html: str, model: str) -> str:
    match = re.search(rf'<tr class="model" data-model="{model}">(.*?)</tr>', html, re.S)
    assert match, f"no row for {model}"
    return text_of(match.group(1))


# --- the inventory -----------------------------------------------------------------------------------


def test_inventory_reads_serving_versions_approvals_verdicts_and_alerts(demo: Sources) -> None:
    from modelops.governance import inventory

    rows = {row.name: row for row in inventory(demo.catalog(), demo.registry(), demo.audit())}
    assert set(rows) == {CLINICAL, CTR}

    clinical = rows[CLINICAL]
    assert (clinical.owner, clinical.team, clinical.risk_tier) == (
        "clinical-analytics@example.com",
        "care-management",
        "high",
    )
    assert clinical.champion is not None and clinical.challenger is not None
    assert (clinical.champion.version, clinical.champion.share) == ("1", pytest.approx(0.7))
    assert (clinical.challenger.version, clinical.challenger.share) == ("2", pytest.approx(0.3))
    assert clinical.champion.compliance.decision == "approved"
    assert clinical.champion.compliance.approved_by == "risk_officer"
    assert clinical.last_verdict is not None and clinical.last_verdict.decision == "critical"
    assert [(a.tier, a.version) for a in clinical.open_alerts] == [("critical", "1")]
    assert clinical.versions == ("1", "2")
    assert clinical.notes == ()

    ctr = rows[CTR]
    assert ctr.champion is not None and (ctr.champion.version, ctr.champion.share) == ("2", 1.0)
    assert ctr.challenger is None
    assert ctr.champion.compliance.approved_by == "policy standard@3"
    assert ctr.last_verdict is not None and ctr.last_verdict.decision == "ok"
    assert ctr.open_alerts == ()  # the warning was closed by the ok window after it


def test_an_alias_moved_around_the_pipeline_is_named_and_decides_nothing(
    demo: Sources, tmp_path: Path
) -> None:
    from modelops.governance.inventory import model_row

    demo.registry().set_alias(CTR, Alias.CHAMPION, "1")
    try:
        row = model_row(
            CTR, owner="o", team="t", risk_tier="medium", registry=demo.registry(), audit=demo.audit()
        )
    finally:
        demo.registry().set_alias(CTR, Alias.CHAMPION, "2")
    assert row.champion is not None and row.champion.version == "2"
    assert any("alias champion points at v1" in note for note in row.notes), row.notes


# --- the pages -------------------------------------------------------------------------------------


def test_page_renders_both_models_shares_approver_verdict_and_chain_status(demo: Sources) -> None:
    response = client_for(demo).get("/")
    assert response.status_code == 200, response.text
    html = response.text
    clinical = row_html(html, CLINICAL)
    assert "clinical-analytics@example.com" in clinical and "high" in clinical
    assert "v1 serving 70 %" in clinical and "v2 serving 30 %" in clinical
    assert "approved by risk_officer" in clinical
    assert "critical (v1)" in clinical
    assert "critical v1" in clinical  # the open alert
    ctr = row_html(html, CTR)
    assert "v2 serving 100 %" in ctr and "approved by policy standard@3" in ctr
    assert "ok (v2)" in ctr and "none" in ctr
    status = text_of(re.search(r'<div class="banner ok" id="chain-status">(.*?)</div>', html, re.S).group(1))
    assert "INTACT" in status and "anchors checked" in status and "0 not anchored yet" in status
    # No data values: neither the file hashes, the metrics nor the alert's recipients.
    for value in ("a" * 64, "50.1", "owner@example.com", "Model card reviewed"):
        assert value not in html


def test_every_link_resolves_and_a_version_page_lists_its_records(demo: Sources) -> None:
    client = client_for(demo)
    links = links_of(client.get("/").text)
    assert f"/models/{CLINICAL}/versions/2" in links and f"/models/{CTR}/versions/1" in links
    for link in links:
        response = client.get(link)
        assert response.status_code == 200, (link, response.text)
    page = client.get(f"/models/{CLINICAL}/versions/1").text
    text = text_of(page)
    for action in ("model.registered", "gate.decided", "model.deployed", "drift.assessed", "alert.notified"):
        assert action in text
    assert "approved_by=risk_officer" in text and "NO: fails" not in text
    # The lineage (modelops.lineage, the `modelops lineage` command) with who moved which alias when.
    assert "Lineage" in text and "modelops lineage diabetes_progression@1" in text
    assert re.search(r"champion set .*risk_officer|champion set", text), text
    back = links_of(page)
    assert "/" in back and client.get(back[0]).status_code == 200


def test_unknown_model_or_bad_version_is_404(demo: Sources) -> None:
    client = client_for(demo)
    assert client.get("/models/nope/versions/1").status_code == 404
    assert client.get(f"/models/{CLINICAL}/versions/1%3Cscript%3E").status_code == 404


def test_links_follow_the_mount_point(demo: Sources) -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from modelops.governance.web import create_app

    outer = FastAPI()
    outer.mount("/modelops", create_app(demo, require_login=False, chain_cache_seconds=0))
    client = TestClient(outer)
    links = links_of(client.get("/modelops/").text)
    assert f"/modelops/models/{CTR}/versions/2" in links
    assert all(client.get(link).status_code == 200 for link in links)


def test_a_tampered_record_breaks_the_chain_naming_its_seq(demo: Sources, tmp_path: Path) -> None:
    from contextlib import closing

    # A copy of the demo's log (the backup API: the log may be in WAL mode), so other tests keep it intact.
    database = Path(demo.audit().url.removeprefix("sqlite:///"))
    copy = tmp_path / "audit.db"
    with closing(sqlite3.connect(database)) as src, closing(sqlite3.connect(copy)) as dst:
        src.backup(dst)
    audit = AuditStore(f"sqlite:///{copy}", keyring=keyring_for_tests())
    gate = [
        r.seq for r in audit.records(action=AuditAction.GATE_DECIDED, subject=model_subject(CLINICAL, "2"))
    ][-1]
    with sqlite3.connect(copy) as conn:  # someone with database access edits the approver
        conn.execute(
            "UPDATE modelops_audit_log SET details = replace(details, 'risk_officer', 'mallory') WHERE seq = ?",
            (gate,),
        )
    tampered = Sources(demo.catalog(), demo.registry(), audit, demo.anchors())
    client = client_for(tampered)
    html = client.get("/").text
    status = text_of(re.search(r'<div class="banner bad" id="chain-status">(.*?)</div>', html, re.S).group(1))
    assert f"BROKEN at seq={gate}" in status and f"record seq={gate} was altered" in status
    # The altered approval counts for nothing: the challenger's newest authentic gate decision is the wait.
    clinical = row_html(html, CLINICAL)
    assert "mallory" not in clinical
    assert "v2 serving 30 % awaiting_approval" in clinical
    assert f"seq={gate} fail their HMAC check" in text_of(html)
    page = text_of(client.get(f"/models/{CLINICAL}/versions/2").text)
    assert "NO: fails its HMAC check" in page
    assert "DOES NOT VERIFY" in page and "NO (" in page  # the lineage names the broken link


def test_the_chain_status_is_cached_until_the_head_moves(demo: Sources, tmp_path: Path) -> None:
    from modelops.governance.inventory import CachedChainStatus

    calls: list[int] = []

    class Counting:
        url = "sqlite:///x"

        def __init__(self) -> None:
            self.seq = 1

        def head(self) -> tuple[int, str]:
            return (self.seq, "h")

        def verify(self, anchors: Any) -> Any:
            calls.append(self.seq)
            return demo.audit().verify(None)

    audit, cached = Counting(), CachedChainStatus(ttl_seconds=60)
    cached(audit, None)
    cached(audit, None)
    assert calls == [1]
    audit.seq = 2  # a new record: verified at once
    cached(audit, None)
    assert calls == [1, 2]


# --- login and the plugin ------------------------------------------------------------------------------


def test_pages_require_an_airflow_login_when_asked(demo: Sources) -> None:
    from fastapi.testclient import TestClient

    from modelops.governance.web import create_app

    async def refuse(request: Request) -> None:
        raise HTTPException(status_code=403, detail="Forbidden")

    client = TestClient(create_app(demo, require_login=True, login=refuse))
    assert client.get("/").status_code == 403
    assert client.get(f"/models/{CTR}/versions/1").status_code == 403


def test_without_a_session_the_real_airflow_check_refuses(demo: Sources) -> None:
    """The default login check is Airflow's own (get_user): no token, no page."""
    from airflow.api_fastapi.app import create_app as airflow_app
    from fastapi.testclient import TestClient

    from modelops.governance.web import create_app

    airflow_app(apps="core")  # initialises the auth manager the check asks
    client = TestClient(create_app(demo, require_login=True))
    response = client.get("/", headers={"accept": "application/json"})
    assert response.status_code == 401
    redirect = client.get("/", headers={"accept": "text/html"}, follow_redirects=False)
    assert redirect.status_code == 303 and "/auth/" in redirect.headers["location"]
    assert client.get("/", headers={"authorization": "Bearer not-a-token"}).status_code == 403


def test_airflow_loads_the_plugin_and_mounts_it_under_modelops() -> None:
    from airflow import plugins_manager

    plugins = {plugin.name: plugin for plugin in plugins_manager._get_plugins()[0]}
    assert plugins_manager._get_plugins()[1] == {}, plugins_manager._get_plugins()[1]
    plugin = plugins["modelops_governance"]
    assert [(app["url_prefix"], app["name"]) for app in plugin.fastapi_apps] == [
        ("/modelops", "ModelOps governance")
    ]
    view = plugin.external_views[0]
    assert (view["name"], view["destination"], view["href"]) == ("Model governance", "nav", "modelops/")

    from airflow.api_fastapi.app import create_app as airflow_app

    app = airflow_app(apps="core")
    mounted = [route.path for route in app.routes if getattr(route, "path", None) == "/modelops"]
    assert mounted == ["/modelops"]


# --- a real browser against the api-server ------------------------------------------------------------


def _chrome() -> Any:
    """Headless Chromium through Debian's chromium-driver; skips when either is absent."""
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        message = (
            "chromium and chromium-driver are not installed (apt-get install -y chromium chromium-driver)"
        )
        if os.environ.get("MODELOPS_REQUIRE_BROWSER") == "1":  # .ci/run: CI has the browser, or it fails
            pytest.fail(message)
        pytest.skip(message)
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1000"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_a_real_browser_sees_the_view_inside_the_airflow_ui(
    demo: Sources, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Airflow's api-server (its FastAPI app with the plugin, served by uvicorn), a logged-in session,
    headless Chromium: the page renders both models, its links work, the UI's nav entry shows it."""
    import json
    import os

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.support import serve_in_thread

    artifacts = Path(os.environ.get("MODELOPS_TEST_ARTIFACTS") or tmp_path) / "governance-view"
    artifacts.mkdir(parents=True, exist_ok=True)
    browser = _chrome()
    # The plugin's app resolves the audit log and the registry from Airflow's connections, as in production.
    audit_file = demo.audit().url.removeprefix("sqlite:///")
    monkeypatch.setenv("AIRFLOW_CONN_MODELOPS_AUDIT", json.dumps({"conn_type": "sqlite", "host": audit_file}))
    monkeypatch.setenv(
        "AIRFLOW_CONN_MODELOPS_AUDIT_ANCHOR",
        json.dumps({"conn_type": "fs", "extra": {"path": str(demo.anchors().folder)}}),
    )
    monkeypatch.setenv(
        "AIRFLOW_CONN_MLFLOW_DEFAULT",
        json.dumps({"conn_type": "http", "extra": {"tracking_uri": demo.registry().tracking_uri}}),
    )
    # A session token is checked against the metadata DB's revoked tokens: the session's DB needs its tables.
    import subprocess
    import sys

    migrated = subprocess.run(
        [str(Path(sys.executable).parent / "airflow"), "db", "migrate"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert migrated.returncode == 0, migrated.stderr[-3000:]
    from airflow.api_fastapi.app import create_app, get_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    try:
        with serve_in_thread(create_app(apps="core")) as base:
            token = get_auth_manager().generate_jwt(SimpleAuthManagerUser(username="admin", role="admin"))
            browser.get(f"{base}/modelops/")  # no session yet: sent to Airflow's login
            assert "/auth/" in browser.current_url, browser.current_url
            browser.add_cookie({"name": "_token", "value": token, "path": "/"})

            browser.get(f"{base}/modelops/")
            table = WebDriverWait(browser, 20).until(
                expected_conditions.presence_of_element_located((By.ID, "inventory"))
            )
            text = table.text
            assert CLINICAL in text and CTR in text and "risk_officer" in text, text
            assert "INTACT" in browser.find_element(By.ID, "chain-status").text
            browser.save_screenshot(str(artifacts / "inventory.png"))
            links = [a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, "td.versions a")]
            assert len(links) == 4, links
            browser.find_element(By.LINK_TEXT, "v2").click()
            WebDriverWait(browser, 20).until(
                expected_conditions.presence_of_element_located((By.ID, "trail"))
            )
            assert "/modelops/models/" in browser.current_url and "audit trail" in browser.title
            browser.save_screenshot(str(artifacts / "version.png"))
            for link in links:
                browser.get(link)
                assert browser.find_elements(By.ID, "trail"), link

            # The Airflow UI: the nav entry's page embeds the view in an iframe.
            browser.get(f"{base}/plugin/modelops")
            frame = WebDriverWait(browser, 60).until(
                expected_conditions.presence_of_element_located(
                    (By.CSS_SELECTOR, "iframe[title='Model governance']")
                )
            )
            browser.switch_to.frame(frame)
            WebDriverWait(browser, 30).until(
                expected_conditions.presence_of_element_located((By.ID, "inventory"))
            )
            browser.switch_to.default_content()
            browser.save_screenshot(str(artifacts / "airflow-ui.png"))
    finally:
        browser.quit()
    assert all(
        (artifacts / name).stat().st_size > 0 for name in ("inventory.png", "version.png", "airflow-ui.png")
    )
