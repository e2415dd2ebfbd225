"""The model inventory the governance view shows, read from the settings, the registry and the audit log.

Every governance fact comes from an authentic audit record (a record failing its HMAC check is skipped
and named), never from registry tags; the registry only adds which versions exist and where its aliases
point, so the page can show an alias that disagrees with the records. Imports nothing of Airflow.

Rules, kept simple on purpose:

- **Champion and challenger, with their shares:** the open periods of
  :func:`modelops.stages.canary.traffic_history` (the newest promotion, rollback and traffic records).
- **Compliance and approver** of a serving version: its newest authentic ``gate.decided`` record
  (approved, rejected or awaiting approval) and that record's ``approval.by``.
- **Last verdict:** the newest authentic ``drift.assessed`` record of any version of the model.
- **Open alerts:** ``alert.notified`` records (sent, or failed on every channel) of tier warning or
  critical written after the model's newest ``ok`` verdict and after its newest sent ``recovered`` alert.
  An ok window, or a recovery, closes every alert before it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from modelops.errors import ModelOpsError
from modelops.vocabulary import Alias, Arm, AuditAction, Decision, model_subject

if TYPE_CHECKING:
    from modelops.audit import AnchorStore, AuditRecord, AuditStore, ChainVerification
    from modelops.registry import ModelRegistry
    from modelops.settings import Catalog

ALERT_TIERS = ("warning", "critical")
"""Alert tiers that stay open until an ok verdict or a recovery (monitoring's ``ALERT_TIERS``)."""
_GATE_DECISIONS = {Decision.APPROVED, Decision.REJECTED, Decision.AWAITING_APPROVAL}


@dataclass(frozen=True)
class Compliance:
    """The compliance gate's newest authentic decision on one version."""

    decision: str | None
    """approved, rejected, awaiting_approval, or None when no authentic gate record exists."""
    approved_by: str | None = None
    decided_at: str | None = None
    valid_until: str | None = None
    expired: bool = False
    seq: int | None = None


@dataclass(frozen=True)
class ServingVersion:
    version: str
    arm: str
    """champion or challenger."""
    share: float
    since: str | None
    record_seq: int | None
    compliance: Compliance


@dataclass(frozen=True)
class Verdict:
    decision: str
    version: str | None
    window_start: str | None
    window_end: str | None
    recorded_at: str
    seq: int


@dataclass(frozen=True)
class OpenAlert:
    tier: str
    version: str | None
    decision: str
    """sent, or failed (no channel delivered it)."""
    recorded_at: str
    seq: int


@dataclass(frozen=True)
class ModelRow:
    name: str
    owner: str
    team: str
    risk_tier: str
    champion: ServingVersion | None
    challenger: ServingVersion | None
    last_verdict: Verdict | None
    open_alerts: tuple[OpenAlert, ...]
    versions: tuple[str, ...]
    """Every version the registry or the audit log knows, oldest first."""
    registry_aliases: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    """What a reader must know: forged records skipped, an alias disagreeing with the records."""


@dataclass(frozen=True)
class TrailEntry:
    """One audit record about a version, without its data values (names, versions, decisions, times)."""

    seq: int
    recorded_at: str
    action: str
    decision: str
    actor: str
    dag_id: str | None
    run_id: str | None
    authentic: bool
    facts: tuple[tuple[str, str], ...] = ()


def _version_of(subject: str, name: str) -> str | None:
    prefix = model_subject(name, "")
    return subject[len(prefix) :] if subject.startswith(prefix) else None


def _sort_versions(versions: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(set(versions), key=lambda v: (0, int(v), "") if v.isdigit() else (1, 0, v)))


class _Authenticity:
    """``audit.authentic`` memoised per seq, collecting the seqs that fail."""

    def __init__(self, audit: AuditStore) -> None:
        self.audit = audit
        self._known: dict[int, bool] = {}
        self.forged: set[int] = set()

    def __call__(self, record: AuditRecord) -> bool:
        if record.seq not in self._known:
            ok = self.audit.authentic(record)
            self._known[record.seq] = ok
            if not ok:
                self.forged.add(record.seq)
        return self._known[record.seq]


def compliance_of(
    records: list[AuditRecord], version: str, name: str, authentic: Callable[..., bool]
) -> Compliance:
    subject = model_subject(name, version)
    for record in reversed(records):
        if record.subject != subject or record.action != AuditAction.GATE_DECIDED:
            continue
        if record.decision not in _GATE_DECISIONS or not authentic(record):
            continue
        approval = record.details.get("approval")
        approval = approval if isinstance(approval, dict) else {}
        valid_until = approval.get("valid_until")
        expired = False
        if valid_until and record.decision == Decision.APPROVED:
            try:
                expired = datetime.fromisoformat(str(valid_until)) < datetime.now(UTC)
            except ValueError:
                expired = False
        return Compliance(
            decision=record.decision,
            approved_by=str(approval["by"]) if approval.get("by") else None,
            decided_at=str(approval.get("approved_at") or record.recorded_at),
            valid_until=str(valid_until) if valid_until else None,
            expired=expired,
            seq=record.seq,
        )
    return Compliance(decision=None)


def _serving(
    audit: AuditStore, name: str, records: list[AuditRecord], authentic: Callable[..., bool]
) -> tuple[ServingVersion | None, ServingVersion | None]:
    # Imported here: the stage module is light, but the inventory should not need it to be importable.
    from modelops.stages.canary import traffic_history

    found: dict[str, ServingVersion] = {}
    for period in traffic_history(audit, name):
        if period["to"] is not None:
            continue
        version = str(period["version"])
        found[period["arm"]] = ServingVersion(
            version=version,
            arm=period["arm"],
            share=float(period["share"]),
            since=period["from"],
            record_seq=period.get("record_seq"),
            compliance=compliance_of(records, version, name, authentic),
        )
    return found.get(Arm.CHAMPION.value), found.get(Arm.CHALLENGER.value)


def _last_verdict(records: list[AuditRecord], name: str, authentic: Callable[..., bool]) -> Verdict | None:
    for record in reversed(records):
        if record.action == AuditAction.DRIFT_ASSESSED and authentic(record):
            return Verdict(
                decision=record.decision,
                version=_version_of(record.subject, name),
                window_start=record.details.get("window_start"),
                window_end=record.details.get("window_end"),
                recorded_at=record.recorded_at,
                seq=record.seq,
            )
    return None


def _open_alerts(
    records: list[AuditRecord], name: str, authentic: Callable[..., bool]
) -> tuple[OpenAlert, ...]:
    closed_at = 0
    for record in records:
        if not authentic(record):
            continue
        if record.action == AuditAction.DRIFT_ASSESSED and record.decision == "ok":
            closed_at = max(closed_at, record.seq)
        elif (
            record.action == AuditAction.ALERT_NOTIFIED
            and record.decision == Decision.SENT
            and record.details.get("tier") == "recovered"
        ):
            closed_at = max(closed_at, record.seq)
    return tuple(
        OpenAlert(
            tier=str(record.details.get("tier")),
            version=_version_of(record.subject, name),
            decision=record.decision,
            recorded_at=record.recorded_at,
            seq=record.seq,
        )
        for record in records
        if record.seq > closed_at
        and record.action == AuditAction.ALERT_NOTIFIED
        and record.decision in (Decision.SENT, Decision.FAILED)
        and record.details.get("tier") in ALERT_TIERS
        and authentic(record)
    )


def model_row(
    name: str,
    *,
    owner: str,
    team: str,
    risk_tier: str,
    registry: ModelRegistry | None,
    audit: AuditStore,
) -> ModelRow:
    authentic = _Authenticity(audit)
    records = audit.records(subject_prefix=model_subject(name, ""))
    versions = {v for v in (_version_of(r.subject, name) for r in records) if v}
    aliases: dict[str, str] = {}
    notes: list[str] = []
    if registry is not None:
        from mlflow.exceptions import MlflowException

        try:
            versions |= {info.version for info in registry.versions(name)}
            aliases = registry.aliases(name)
        except (MlflowException, ModelOpsError, OSError) as exc:  # the page still shows the audit log's word
            notes.append(f"the registry could not be read ({type(exc).__name__})")
    champion, challenger = _serving(audit, name, records, authentic)
    for alias, serving in ((Alias.CHAMPION.value, champion), (Alias.CHALLENGER.value, challenger)):
        recorded = serving.version if serving else None
        if registry is not None and aliases.get(alias) != recorded and (aliases.get(alias) or recorded):
            notes.append(
                f"the registry alias {alias} points at "
                f"{'v' + aliases[alias] if aliases.get(alias) else 'nothing'}, the audit records at "
                f"{'v' + recorded if recorded else 'nothing'}; the records decide"
            )
    row = ModelRow(
        name=name,
        owner=owner,
        team=team,
        risk_tier=risk_tier,
        champion=champion,
        challenger=challenger,
        last_verdict=_last_verdict(records, name, authentic),
        open_alerts=_open_alerts(records, name, authentic),
        versions=_sort_versions(versions),
        registry_aliases=aliases,
    )
    # The authenticity of every record of the model is known once its alerts were read.
    for record in records:
        authentic(record)
    if authentic.forged:
        seqs = ", ".join(str(seq) for seq in sorted(authentic.forged))
        notes.append(f"record(s) seq={seqs} fail their HMAC check and are ignored")
    return replace(row, notes=tuple(notes))


def inventory(catalog: Catalog, registry: ModelRegistry | None, audit: AuditStore) -> list[ModelRow]:
    """One row per model of the catalog, by name (``registry`` None: the audit log alone)."""
    return [
        model_row(
            name,
            owner=spec.owner,
            team=spec.team,
            risk_tier=spec.risk_tier,
            registry=registry,
            audit=audit,
        )
        for name, spec in sorted(catalog.models.items())
    ]


# --- one version's trail ------------------------------------------------------------------------------

_FACT_KEYS = (
    "champion_version",
    "challenger_version",
    "challenger_share",
    "previous_version",
    "failed_version",
)


def _facts(record: AuditRecord) -> tuple[tuple[str, str], ...]:
    """A few named facts of a record (versions, shares, approver, window); never data values."""
    details = record.details
    facts = [(key, str(details[key])) for key in _FACT_KEYS if details.get(key) not in (None, "")]
    approval = details.get("approval")
    if isinstance(approval, dict) and approval.get("by"):
        facts.append(("approved_by", str(approval["by"])))
    if details.get("window_start") and details.get("window_end"):
        facts.append(("window", f"{details['window_start']} to {details['window_end']}"))
    if record.action == AuditAction.ALERT_NOTIFIED and details.get("tier"):
        facts.append(("tier", str(details["tier"])))
    return tuple(facts)


def version_trail(audit: AuditStore, name: str, version: str) -> list[TrailEntry]:
    """Every audit record about ``name`` v``version``, oldest first, each with whether it is authentic."""
    return [
        TrailEntry(
            seq=record.seq,
            recorded_at=record.recorded_at,
            action=record.action,
            decision=record.decision,
            actor=record.actor,
            dag_id=record.dag_id,
            run_id=record.run_id,
            authentic=audit.authentic(record),
            facts=_facts(record),
        )
        for record in audit.records(subject=model_subject(name, version))
    ]


@dataclass(frozen=True)
class LineageView:
    """What the version page shows of :func:`modelops.lineage.lineage`: names, decisions, times, whether
    each link verifies (never a link's summary, which quotes reasons, comments and paths)."""

    verifies: bool
    links: tuple[tuple[str, str, str, int | None, str | None, bool, int], ...]
    """(stage, action, decision, seq, recorded_at, verifies, problems found) per link."""
    alias_moves: tuple[tuple[str, str, str | None, str, str, int, bool], ...]
    """(alias, set/removed, to version, by, at, seq, authentic) per move."""
    traffic: tuple[tuple[str, float, str, str | None], ...]
    """(arm, share, from, to) per period this version served."""


def lineage_view(
    audit: AuditStore, registry: ModelRegistry | None, name: str, version: str
) -> LineageView | None:
    """The version's lineage from :mod:`modelops.lineage` (the ``modelops lineage`` command), or None when
    it cannot be drawn (the page then lists the version's records alone)."""
    from mlflow.exceptions import MlflowException

    from modelops.lineage import lineage

    try:
        found = lineage(audit, registry, name, version)
    except (
        ModelOpsError,
        MlflowException,
        OSError,
    ):  # no record of it, the registry unreachable: the trail shows
        return None
    return LineageView(
        verifies=found.verifies,
        links=tuple(
            (
                link.stage,
                link.action,
                link.decision,
                link.seq,
                link.recorded_at,
                link.verifies,
                len(link.problems),
            )
            for link in found.links
        ),
        alias_moves=tuple(
            (m.alias, m.change, m.to, m.by, m.at, m.seq, m.authentic) for m in found.alias_moves
        ),
        traffic=tuple(
            (str(p.get("arm")), float(p.get("share") or 0), str(p.get("from")), p.get("to"))
            for p in found.traffic
        ),
    )


# --- the chain's verification --------------------------------------------------------------------------


@dataclass(frozen=True)
class ChainStatus:
    ok: bool
    records: int
    problem: str | None
    first_bad_seq: int | None
    anchored: bool
    """Whether the anchors were checked too (False: no anchor store configured or readable)."""
    newest_anchored_seq: int | None
    unanchored: int | None
    checked_at: str
    seconds: float
    note: str | None = None


def chain_status(audit: AuditStore, anchors: AnchorStore | None) -> ChainStatus:
    """:meth:`AuditStore.verify` with the anchors (when there are any), as the page shows it."""
    started = time.perf_counter()
    note = None
    try:
        result: ChainVerification = audit.verify(anchors)
    except (ModelOpsError, OSError) as exc:  # the anchors unreachable: say so, and check the chain alone
        if anchors is None:
            raise
        note = f"the anchors at {anchors.uri} could not be read ({type(exc).__name__}); chain checked alone"
        anchors = None
        result = audit.verify(None)
    return ChainStatus(
        ok=result.ok,
        records=result.count,
        problem=result.problem,
        first_bad_seq=result.first_bad_seq,
        anchored=anchors is not None,
        newest_anchored_seq=result.newest_anchored_seq,
        unanchored=result.unanchored,
        checked_at=datetime.now(UTC).isoformat(timespec="seconds"),
        seconds=round(time.perf_counter() - started, 3),
        note=note,
    )


class CachedChainStatus:
    """:func:`chain_status` at most once per ``ttl_seconds`` while the log's head is unchanged.

    Verifying reads and HMAC-checks every record: milliseconds for a demo's few hundred, seconds for
    millions. A new record (a new head) is always verified at once; an edit of an older record shows
    within ``ttl_seconds``.
    """

    def __init__(self, ttl_seconds: float = 60.0) -> None:
        self.ttl_seconds = ttl_seconds
        self._lock = threading.Lock()
        self._cached: tuple[Any, float, ChainStatus] | None = None

    def __call__(self, audit: AuditStore, anchors: AnchorStore | None) -> ChainStatus:
        head = (audit.url, audit.head())
        with self._lock:
            if self._cached is not None:
                cached_head, at, status = self._cached
                if cached_head == head and time.monotonic() - at < self.ttl_seconds:
                    return status
            status = chain_status(audit, anchors)
            self._cached = (head, time.monotonic(), status)
            return status
