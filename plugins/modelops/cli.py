"""The ``modelops`` command line (also ``python -m modelops.cli``).

One function per command, registered in :func:`build_parser`; to add a command, add a ``_cmd_*``
function and a sub-parser that sets it as ``handler``. Exit codes: 0 success, 1 a check failed
(e.g. the audit chain is broken), 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from modelops.errors import AuditChainBroken, ConfigurationError, ModelOpsError
from modelops.vocabulary import AuditAction

if TYPE_CHECKING:
    from modelops.audit import AnchorStore, AuditStore

# SQLAlchemy and the audit store are imported by the commands, not here: `modelops --help` and a usage
# error answer without them, and no command imports Airflow unless it must resolve an Airflow connection.

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2

AUDIT_URL_ENV = "MODELOPS_AUDIT_URL"
# Spelled here as well as in modelops.audit.anchors, so the help text needs no import of the audit store.
ANCHORS_ENV = "MODELOPS_AUDIT_ANCHORS"


def _open_audit_store(url: str | None) -> AuditStore:
    """``--url``, else ``$MODELOPS_AUDIT_URL``, else the Airflow connection ``modelops_audit``."""
    from modelops.audit import AuditKeyring, AuditStore
    from modelops.audit.keys import KEYS_ENV

    url = url or os.environ.get(AUDIT_URL_ENV)
    keys = os.environ.get(KEYS_ENV, "").strip()
    keyring = AuditKeyring.from_json(keys, source=f"${KEYS_ENV}") if keys else None
    if not url or keyring is None:
        # Imported here: Airflow is slow to import and not needed when both are given.
        from modelops.hooks.audit import AuditHook

        hook = AuditHook()
        url = url or hook.url
        keyring = keyring or hook.keyring
    # Never create a log here: an empty new log would make a wrong URL look like a verified chain.
    return AuditStore(url, keyring=keyring, create=False)


def _open_anchor_store(uri: str | None) -> AnchorStore:
    """``--anchors``, else ``$MODELOPS_AUDIT_ANCHORS``, else the Airflow connection ``modelops_audit_anchor``."""
    from modelops.audit.anchors import anchor_store_from_uri

    uri = uri or os.environ.get(ANCHORS_ENV, "").strip()
    if uri:
        return anchor_store_from_uri(uri)
    from modelops.hooks.audit import AuditHook

    try:
        return AuditHook().anchor_store
    except ConfigurationError as exc:
        raise ConfigurationError(
            f"no audit anchor store is configured: pass --anchors file:///folder or s3://bucket/prefix, set "
            f"${ANCHORS_ENV}, or define the Airflow connection modelops_audit_anchor ({exc})"
        ) from exc


def _cmd_audit_verify(args: argparse.Namespace) -> int:
    store = _open_audit_store(args.url)
    try:
        anchors = _open_anchor_store(args.anchors)
        result = store.verify(anchors)
        head = store.head()
    finally:
        store.dispose()
    newest = "none" if result.newest_anchored_seq is None else f"seq={result.newest_anchored_seq}"
    print(
        f"checked: {result.count} records (hash chain, HMACs; keys: {', '.join(result.key_ids) or 'none'}), "
        f"{result.anchors_checked} anchors at {result.anchor_store} (newest anchored: {newest}, "
        f"{result.unanchored} records not anchored yet)"
    )
    if not result.ok:
        print(f"audit chain BROKEN: {result.problem}")
        return EXIT_CHECK_FAILED
    if head is None:
        print("audit chain OK: 0 records (empty log)")
    else:
        print(f"audit chain OK: {result.count} records, head seq={head[0]} hash={head[1]}")
    return EXIT_OK


def _cmd_audit_anchor(args: argparse.Namespace) -> int:
    store = _open_audit_store(args.url)
    try:
        anchors = _open_anchor_store(args.anchors)
        anchored = store.anchor_head(anchors)
    except AuditChainBroken as exc:
        print(f"audit chain BROKEN: {exc}")
        return EXIT_CHECK_FAILED
    finally:
        store.dispose()
    if anchored is None:
        print("audit log is empty: nothing to anchor")
        return EXIT_OK
    anchor, written = anchored
    state = "anchored" if written else "was already anchored"
    print(f"head seq={anchor.seq} hash={anchor.record_hash} {state} at {anchors.uri}")
    return EXIT_OK


def _cmd_audit_show(args: argparse.Namespace) -> int:
    store = _open_audit_store(args.url)
    try:
        records = store.records(action=args.action, subject=args.subject, limit=args.limit)
    finally:
        store.dispose()
    from modelops.audit.chain import canonical_json

    unreadable = []
    for record in records:
        line = record.to_dict()
        if record.unreadable is not None:
            # Listed, never hidden: its own line says it cannot be read and is not authentic.
            line["authentic"] = False
            unreadable.append(f"seq={record.seq} ({record.unreadable})")
        print(canonical_json(line))
    if unreadable:
        print(
            f"modelops: {len(unreadable)} record(s) cannot be read and are not authentic, altered in the "
            f"database: {'; '.join(unreadable)}; run `modelops audit verify`",
            file=sys.stderr,
        )
        return EXIT_CHECK_FAILED
    return EXIT_OK


def _cmd_gate_check(args: argparse.Namespace) -> int:
    """The compliance gate's checks on one version, outside Airflow: a JSON report on stdout, nothing
    written (no audit record, no tag, no alias), so CI can block a merge before any DAG runs."""
    import json
    from pathlib import Path

    tracking_uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not tracking_uri:
        raise ConfigurationError("no MLflow server: pass --tracking-uri URI or set $MLFLOW_TRACKING_URI")
    from modelops.evidence_files import FsspecFiles
    from modelops.registry import ModelRegistry
    from modelops.settings import load_catalog
    from modelops.stages.compliance import evaluate

    catalog = load_catalog(Path(args.include) if args.include else None)
    spec = catalog.model(args.model)
    policy = catalog.policies_for(spec).compliance
    store = _open_audit_store(args.url)
    try:
        evaluation = evaluate(
            spec=spec,
            catalog=catalog,
            registry=ModelRegistry(tracking_uri),
            audit=store,
            files=FsspecFiles(),
            version=args.version,
        )
        approval = _standing_approval(store, spec.name, evaluation.report.version, evaluation.files)
    finally:
        store.dispose()
    report = evaluation.report
    if not report.passed:
        verdict, code = "rejected", EXIT_CHECK_FAILED
    elif policy.approval.required and approval is not None:
        # A person already approved these exact files, and the approval has not expired.
        verdict, code = "approved", EXIT_OK
    elif policy.approval.required:
        # Not skipped: the checks pass, and a person named in the policy must still approve in Airflow.
        verdict = "approval_pending"
        code = EXIT_CHECK_FAILED if args.require_approval else EXIT_OK
    else:
        verdict, code = "approved", EXIT_OK
    output = {
        **report.to_dict(),
        "verdict": verdict,
        "gate_report_sha256": evaluation.report_sha256,
        "approval": {
            "required": policy.approval.required,
            "approvers": list(policy.approval.approvers),
            "state": "pending: approve in the Airflow UI (modelops_compliance_gate)"
            if verdict == "approval_pending"
            else (
                "not required"
                if not policy.approval.required
                else ("given" if verdict == "approved" else "not reached")
            ),
            "record": approval,
        },
    }
    print(json.dumps(output, indent=2, sort_keys=True))
    failed = ", ".join(check.name for check in report.failures)
    print(
        f"modelops gate: {spec.name} v{report.version} {verdict.replace('_', ' ')}"
        + (f" (failed: {failed})" if failed else ""),
        file=sys.stderr,
    )
    return code


def _standing_approval(store: AuditStore, name: str, version: str, files: dict[str, str]) -> dict | None:
    """The gate's authentic approval of exactly these files, still valid, with who gave it; else None."""
    from modelops.evidence import EvidenceMismatch, approval_still_valid, gate_record, recorded_files

    try:
        record = gate_record(store, name, version)
        if approval_still_valid(record) is not None or recorded_files(record) != files:
            return None
    except EvidenceMismatch:
        return None
    return {"seq": record.seq, **record.details.get("approval", {})}


def _cmd_dataset_quarantine(args: argparse.Namespace) -> int:
    """Withdraw a dataset version: the gate then rejects every version trained on it."""
    import re

    from modelops.vocabulary import Decision, dataset_subject

    if not re.fullmatch(r"[0-9a-f]{64}", args.sha256):
        raise ConfigurationError(f"{args.sha256!r} is not a dataset version's SHA-256 (64 hex digits)")
    store = _open_audit_store(args.url)
    try:
        record = store.append(
            actor=args.by or os.environ.get("USER") or "unknown",
            action=AuditAction.DATASET_QUARANTINED,
            subject=dataset_subject(args.sha256),
            decision=Decision.QUARANTINED,
            details={"reason": args.reason},
            evidence={"dataset": args.sha256},
        )
    finally:
        store.dispose()
    print(f"quarantined dataset sha256 {args.sha256} (audit seq={record.seq})")
    return EXIT_OK


def _cmd_gateway_create_key(args: argparse.Namespace) -> int:
    """A new API key for a team: the key once on stdout, and the entry (its digest) for the gateway."""
    import json
    import secrets

    from modelops.serving.access import KEY_ID_PATTERN, KEYS_ENV, TEAM_PATTERN, key_entry, new_key

    if not TEAM_PATTERN.match(args.team):
        raise ConfigurationError(
            f"--team {args.team!r} is not a team name: use letters, digits, '.', '_', '-'"
        )
    key_id = args.key_id or f"{args.team}-{secrets.token_hex(3)}"
    if not KEY_ID_PATTERN.match(key_id):
        raise ConfigurationError(
            f"--key-id {key_id!r} is not a key id: 1-64 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit"
        )
    key = new_key()
    print(f"key id   {key_id}")
    print(f"team     {args.team}  (the prediction log will name this caller {args.team}:{key_id})")
    print(f"API key  {key}")
    print("         shown once: hand it to the team (Authorization: Bearer <key>); it is stored nowhere")
    print(f"add this entry to the JSON object in {KEYS_ENV} (the gateway keeps only the digest):")
    print(json.dumps({key_id: key_entry(args.team, key)}))
    return EXIT_OK


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _add_url_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        help=f"SQLAlchemy URL of the audit log (default: ${AUDIT_URL_ENV}, else the Airflow connection "
        "modelops_audit)",
    )


def _add_anchors_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--anchors",
        metavar="URI",
        help=f"where the chain's head is anchored: file:///folder or s3://bucket/prefix (default: ${ANCHORS_ENV}, "
        "else the Airflow connection modelops_audit_anchor)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelops", description="ModelOps lifecycle tools.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    audit = commands.add_parser("audit", help="inspect the tamper-evident audit log")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True, metavar="AUDIT_COMMAND")

    verify = audit_commands.add_parser(
        "verify",
        help="check the hash chain, every record's and anchor's HMAC, and the log against the anchors; "
        "exit 1 naming the attack if anything does not verify",
    )
    _add_url_option(verify)
    _add_anchors_option(verify)
    verify.set_defaults(handler=_cmd_audit_verify)

    anchor = audit_commands.add_parser("anchor", help="anchor the chain's head to write-once storage now")
    _add_url_option(anchor)
    _add_anchors_option(anchor)
    anchor.set_defaults(handler=_cmd_audit_anchor)

    show = audit_commands.add_parser("show", help="print records as JSON lines, oldest first")
    _add_url_option(show)
    show.add_argument("--limit", type=_positive_int, help="only the newest N matching records")
    show.add_argument(
        "--action", choices=[action.value for action in AuditAction], help="only records with this action"
    )
    show.add_argument("--subject", help="only records about this subject, e.g. model:ctr_recommender@3")
    show.set_defaults(handler=_cmd_audit_show)

    gate = commands.add_parser("gate", help="the compliance gate, outside Airflow (for CI)")
    gate_commands = gate.add_subparsers(dest="gate_command", required=True, metavar="GATE_COMMAND")
    check = gate_commands.add_parser(
        "check",
        help="run the model's compliance policy on a version; JSON report on stdout; exit 0 approved (or "
        "approval pending), 1 rejected, 2 usage. Writes nothing.",
    )
    check.add_argument("model", help="the model's name (a spec under include/models/)")
    check.add_argument("version", help="the registered version number")
    check.add_argument("--tracking-uri", help="the MLflow server (default: $MLFLOW_TRACKING_URI)")
    check.add_argument(
        "--include", help="the settings folder (default: $MODELOPS_INCLUDE_DIR, else include/)"
    )
    check.add_argument(
        "--require-approval",
        action="store_true",
        help="exit 1 when the checks pass but the policy still needs a person's approval",
    )
    _add_url_option(check)
    check.set_defaults(handler=_cmd_gate_check)

    dataset = commands.add_parser("dataset", help="governed dataset versions")
    dataset_commands = dataset.add_subparsers(
        dest="dataset_command", required=True, metavar="DATASET_COMMAND"
    )
    quarantine = dataset_commands.add_parser(
        "quarantine", help="withdraw a dataset version: the gate rejects every model trained on it"
    )
    quarantine.add_argument("sha256", help="the dataset version's SHA-256")
    quarantine.add_argument("--reason", required=True, help="why, for the audit log")
    quarantine.add_argument("--by", help="who (default: $USER)")
    _add_url_option(quarantine)
    quarantine.set_defaults(handler=_cmd_dataset_quarantine)

    gateway = commands.add_parser("gateway", help="the scoring gateway's callers")
    gateway_commands = gateway.add_subparsers(
        dest="gateway_command", required=True, metavar="GATEWAY_COMMAND"
    )
    create_key = gateway_commands.add_parser(
        "create-key",
        help="make a team API key: prints the key once and the MODELOPS_GATEWAY_KEYS entry (its SHA-256)",
    )
    create_key.add_argument("--team", required=True, help="the team the key calls as (a model spec's team)")
    create_key.add_argument(
        "--key-id", help="a name for the key, unique in the gateway (default: team-<random>)"
    )
    create_key.set_defaults(handler=_cmd_gateway_create_key)

    _add_query_and_lineage_commands(commands, audit_commands)  # audit queries and lineage
    _add_seal_commands(audit_commands)  # prediction-log seals
    _add_expire_command(audit_commands)  # prediction-log retention
    return parser


# --- audit queries and lineage (modelops audit query, modelops lineage) --------------------------------------

PREDICTIONS_URL_ENV = "MODELOPS_PREDICTIONS_URL"


def _open_prediction_log(url: str | None) -> Any:
    """``--predictions-url``, else ``$MODELOPS_PREDICTIONS_URL``, else the Airflow connection
    ``modelops_predictions``; a SQLite file that does not exist is refused (never created by a query)."""
    from modelops import db
    from modelops.serving.prediction_log import PredictionLog

    url = url or os.environ.get(PREDICTIONS_URL_ENV, "").strip()
    if not url:
        from modelops.db import sqlalchemy_url
        from modelops.hooks.prediction_log import PredictionLogHook

        url = sqlalchemy_url(PredictionLogHook().connection)
    database_file = db.sqlite_file(url)
    if database_file is not None and not database_file.is_file():
        raise ConfigurationError(
            f"no prediction log database at {database_file}; check --predictions-url or "
            f"${PREDICTIONS_URL_ENV} (the gateway creates it with its first call)"
        )
    return PredictionLog(url)


def _cmd_audit_query(args: argparse.Namespace) -> int:
    """Audit records (or, with --predictions, scoring calls) matching every filter, as a table, JSON or CSV."""
    from modelops.audit.query import query_predictions, query_records, render_predictions, render_records

    dag_id = run_id = None
    if args.dag_run:
        dag_id, _, run_id = args.dag_run.partition("/")
        run_id = run_id or None
    if args.predictions:
        given = [
            flag
            for flag, value in (
                ("--dataset", args.dataset),
                ("--dag-run", args.dag_run),
                ("--action", args.action),
            )
            if value
        ]
        if given:
            raise ConfigurationError(
                f"{', '.join(given)} filter audit records, not scoring calls; drop them or drop --predictions"
            )
        log = _open_prediction_log(args.predictions_url)
        try:
            calls = query_predictions(
                log,
                caller_id=args.caller,
                model=args.model,
                version=args.version,
                since=args.since,
                until=args.until,
                limit=args.limit,
            )
        finally:
            log.dispose()
        print(render_predictions(calls, args.format))
        return EXIT_OK
    store = _open_audit_store(args.url)
    try:
        matches = query_records(
            store,
            caller_id=args.caller,
            model=args.model,
            version=args.version,
            dataset_sha256=args.dataset,
            since=args.since,
            until=args.until,
            dag_id=dag_id,
            run_id=run_id,
            action=args.action,
        )
    except AuditChainBroken as exc:
        print(f"audit chain BROKEN: {exc}")
        return EXIT_CHECK_FAILED
    finally:
        store.dispose()
    if args.limit:
        matches = matches[-args.limit :]
    print(render_records(matches, args.format))
    forged = [str(match.seq) for match in matches if match.authentic is False]
    if forged:
        print(
            f"modelops: {len(forged)} record(s) fail their hash or HMAC check (seq={', '.join(forged)}): altered "
            "or forged; run `modelops audit verify`",
            file=sys.stderr,
        )
        return EXIT_CHECK_FAILED
    return EXIT_OK


def _cmd_lineage(args: argparse.Namespace) -> int:
    """One version's lineage, each link with its evidence and whether it verifies; exit 1 if any does not."""
    import json

    from modelops.lineage import lineage, parse_model_version, render_text

    name, version = parse_model_version(args.model_version)
    tracking_uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    registry = None
    if tracking_uri and not args.no_registry:
        from modelops.registry import ModelRegistry

        registry = ModelRegistry(tracking_uri)
    store = _open_audit_store(args.url)
    try:
        result = lineage(store, registry, name, version)
    except AuditChainBroken as exc:
        print(f"audit chain BROKEN: {exc}")
        return EXIT_CHECK_FAILED
    finally:
        store.dispose()
    if args.format == "json":
        print(json.dumps(result.to_dict(), indent=2, sort_keys=True))
    else:
        print(render_text(result))
    return EXIT_OK if result.verifies else EXIT_CHECK_FAILED


def _add_query_and_lineage_commands(
    commands: argparse._SubParsersAction, audit_commands: argparse._SubParsersAction
) -> None:
    query = audit_commands.add_parser(
        "query",
        help="audit records by caller, model and version, dataset, time, dag run or action, each marked "
        "authentic or not (exit 1 if any is not); with --predictions, the scoring calls (never their inputs "
        "or outputs)",
    )
    _add_url_option(query)
    query.add_argument("--caller", metavar="ID", help="records naming this caller id; calls by it")
    query.add_argument("--model", metavar="NAME", help="the model's records (subjects model:NAME@...)")
    query.add_argument("--version", metavar="V", help="only this version of --model")
    query.add_argument("--dataset", metavar="SHA", help="records about this dataset version (its sha256)")
    query.add_argument("--since", metavar="ISO", help="written at or after this time (UTC unless it says)")
    query.add_argument("--until", metavar="ISO", help="written before this time (UTC unless it says)")
    query.add_argument("--dag-run", metavar="DAG_ID/RUN_ID", help="written by this Airflow run (or DAG_ID)")
    query.add_argument(
        "--action", choices=[action.value for action in AuditAction], help="only records with this action"
    )
    query.add_argument("--limit", type=_positive_int, help="only the newest N matches")
    query.add_argument(
        "--predictions",
        action="store_true",
        help="the prediction log's calls instead: request id, time, caller, model, version, arm, status, rows",
    )
    query.add_argument(
        "--predictions-url",
        metavar="URL",
        help=f"SQLAlchemy URL of the prediction log (default: ${PREDICTIONS_URL_ENV}, else the Airflow "
        "connection modelops_predictions)",
    )
    query.add_argument("--format", choices=("table", "json", "csv"), default="table")
    query.set_defaults(handler=_cmd_audit_query)

    lineage = commands.add_parser(
        "lineage",
        help="a version's chain from dataset to retirement, each link with its evidence and whether it "
        "verifies; exit 1 naming the links that do not",
    )
    lineage.add_argument("model_version", metavar="MODEL@VERSION", help="e.g. ctr_recommender@3")
    lineage.add_argument("--format", choices=("text", "json"), default="text")
    lineage.add_argument(
        "--tracking-uri",
        help="the MLflow server, to compare the registry version with the record (default: "
        "$MLFLOW_TRACKING_URI; neither: no registry link)",
    )
    lineage.add_argument("--no-registry", action="store_true", help="do not read the registry")
    _add_url_option(lineage)
    lineage.set_defaults(handler=_cmd_lineage)


# --- end of audit queries and lineage ------------------------------------------------------------------------


# --- prediction-log seals (modelops audit seal / prove / verify-seals; seals in audit verify) ----------------


def _seal_options(parser: argparse.ArgumentParser) -> None:
    _add_url_option(parser)
    parser.add_argument(
        "--predictions-url",
        metavar="URL",
        help="SQLAlchemy URL of the prediction log (default: $MODELOPS_PREDICTIONS_URL, else the Airflow "
        "connection modelops_predictions)",
    )


def _verify_seals(args: argparse.Namespace, *, required: bool) -> int:
    """Print the seals' verdict; print nothing when the audit log holds no seal record and no prediction
    log is named (unless ``required``)."""
    from modelops.audit.seals import verify_seals

    store = _open_audit_store(args.url)
    try:
        recorded = bool(store.records(action=AuditAction.PREDICTIONS_SEALED, limit=1))
        named = args.predictions_url or os.environ.get(PREDICTIONS_URL_ENV, "").strip()
        if not recorded and not named and not required:
            return EXIT_OK  # nothing sealed, no prediction log named: the chain's verdict is the whole answer
        log = _open_prediction_log(args.predictions_url)
        try:
            result = verify_seals(log.engine, store)
        finally:
            log.dispose()
    finally:
        store.dispose()
    if not result.ok:
        print(f"seals BROKEN: {result.problem}")
        return EXIT_CHECK_FAILED
    expired = f", {result.expired} batches expired under retention" if result.expired else ""
    print(
        f"seals OK: {result.batches} batches, {result.records} records sealed, {result.unsealed} not sealed yet"
        f"{expired}"
    )
    return EXIT_OK


def _cmd_audit_verify_with_seals(args: argparse.Namespace) -> int:
    chain = _cmd_audit_verify(args)
    seals = _verify_seals(args, required=False)
    return max(chain, seals)


def _cmd_audit_verify_seals(args: argparse.Namespace) -> int:
    return _verify_seals(args, required=True)


def _cmd_audit_seal(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime, timedelta

    from modelops.audit.seals import seal, store_recorder

    actor = f"modelops audit seal ({args.by or os.environ.get('USER') or 'unknown'})"
    store = _open_audit_store(args.url)
    try:
        anchors = _open_anchor_store(args.anchors)
        log = _open_prediction_log(args.predictions_url)
        try:
            run = seal(
                log.engine,
                store,
                store_recorder(store, actor),
                now=datetime.now(UTC),
                batch_size=args.batch_size,
                settle=timedelta(seconds=args.settle_seconds),
            )
        finally:
            log.dispose()
        anchored = store.anchor_head(anchors) if run.batches or run.restored else None
    except AuditChainBroken as exc:
        print(f"audit chain BROKEN: {exc}")
        return EXIT_CHECK_FAILED
    finally:
        store.dispose()
    print(run.summary)
    if anchored is not None:
        print(f"head seq={anchored[0].seq} anchored at {anchors.uri}")
    return EXIT_OK


def _cmd_audit_prove(args: argparse.Namespace) -> int:
    import json

    from modelops.audit.seals import RecordExpired, inclusion_proof, verify_proof

    store = _open_audit_store(args.url)
    try:
        log = _open_prediction_log(args.predictions_url)
        try:
            proof = inclusion_proof(log.engine, store, args.request_id)
        except RecordExpired as expired:
            # Not a failed check, and not a usage error: the record is gone on record, under retention.
            answer = {"request_id": args.request_id, "expired": True, "batch_id": expired.batch_id}
            print(json.dumps({**answer, "expiry_record_seq": expired.expiry_seq}, indent=2, sort_keys=True))
            print(f"modelops: no proof: {expired}", file=sys.stderr)
            return EXIT_CHECK_FAILED
        finally:
            log.dispose()
        check = verify_proof(proof, store)
    finally:
        store.dispose()
    print(json.dumps(proof.to_dict(), indent=2, sort_keys=True))
    if not check.ok:
        print(f"modelops: proof FAILS: {check.reason}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    print(f"modelops: proof verifies: {check.reason}", file=sys.stderr)
    return EXIT_OK


def _add_seal_commands(audit_commands: argparse._SubParsersAction) -> None:
    verify = audit_commands.choices["verify"]
    verify.add_argument(
        "--predictions-url",
        metavar="URL",
        help="the prediction log whose seals are verified too (default: $MODELOPS_PREDICTIONS_URL, else the "
        "Airflow connection modelops_predictions; needed only once the audit log holds seal records)",
    )
    verify.set_defaults(handler=_cmd_audit_verify_with_seals)

    seal = audit_commands.add_parser(
        "seal",
        help="seal the prediction log now: calls older than --settle-seconds, in batches whose Merkle roots "
        "are audit records; the head is then anchored",
    )
    _seal_options(seal)
    _add_anchors_option(seal)
    seal.add_argument("--batch-size", type=_positive_int, default=1_000, help="records per batch at most")
    seal.add_argument(
        "--settle-seconds",
        type=float,
        default=60.0,
        help="seal only calls received at least this long ago (the gateway may still be writing newer ones)",
    )
    seal.add_argument("--by", help="who seals, for the audit log (default: $USER)")
    seal.set_defaults(handler=_cmd_audit_seal)

    prove = audit_commands.add_parser(
        "prove",
        help="print the inclusion proof of one scoring call (JSON: leaf, audit path, root, audit seq) and "
        "check it against the authentic seal record; exit 1 if it does not verify",
    )
    prove.add_argument("request_id", metavar="REQUEST_ID", help="the call's X-Request-Id")
    _seal_options(prove)
    prove.set_defaults(handler=_cmd_audit_prove)

    verify_seals = audit_commands.add_parser(
        "verify-seals",
        help="only the prediction-log seals: recompute every sealed batch and compare it with its authentic "
        "audit record; exit 1 naming each altered, deleted or inserted record, removed batch or forged seal",
    )
    _seal_options(verify_seals)
    verify_seals.set_defaults(handler=_cmd_audit_verify_seals)


# --- end of prediction-log seals ------------------------------------------------------------------------------


# --- prediction-log retention (modelops audit expire) ---------------------------------------------------------


def _cmd_audit_expire(args: argparse.Namespace) -> int:
    """Remove whole the sealed batches past the retention of include/modelops.yaml, each on record first."""
    from datetime import UTC, datetime, timedelta

    from modelops.audit.retention import expire_batches
    from modelops.audit.seals import store_recorder
    from modelops.settings import platform_settings

    retention = timedelta(days=platform_settings().prediction_log_retention_days)
    actor = f"modelops audit expire ({args.by or os.environ.get('USER') or 'unknown'})"
    store = _open_audit_store(args.url)
    try:
        anchors = None if args.dry_run else _open_anchor_store(args.anchors)
        log = _open_prediction_log(args.predictions_url)
        try:
            run = expire_batches(
                log.engine,
                store,
                store_recorder(store, actor),
                datetime.now(UTC),
                retention,
                batch_ids=args.batch,
                dry_run=args.dry_run,
            )
        finally:
            log.dispose()
        anchored = store.anchor_head(anchors) if anchors is not None and run.expired else None
    except AuditChainBroken as exc:
        print(f"audit chain BROKEN: {exc}")
        return EXIT_CHECK_FAILED
    finally:
        store.dispose()
    print(run.summary)
    if anchored is not None and anchors is not None:
        print(f"head seq={anchored[0].seq} anchored at {anchors.uri}")
    return EXIT_CHECK_FAILED if run.held else EXIT_OK


def _add_expire_command(audit_commands: argparse._SubParsersAction) -> None:
    expire = audit_commands.add_parser(
        "expire",
        help="remove whole the sealed prediction batches older than prediction_log_retention_days "
        "(include/modelops.yaml), each after an audit record of the removal; exit 1 if a due batch is held "
        "back (its rows do not match its seal), 2 if a batch asked for is not due yet",
    )
    _seal_options(expire)
    _add_anchors_option(expire)
    expire.add_argument(
        "--batch",
        type=_positive_int,
        action="append",
        metavar="N",
        help="expire only this batch (repeatable); refused, changing nothing, unless it is due",
    )
    expire.add_argument("--dry-run", action="store_true", help="say what would be removed; change nothing")
    expire.add_argument("--by", help="who expires, for the audit log (default: $USER)")
    expire.set_defaults(handler=_cmd_audit_expire)


# --- end of prediction-log retention ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    import sqlalchemy as sa

    try:
        return args.handler(args)
    except ModelOpsError as exc:
        print(f"modelops: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except sa.exc.OperationalError as exc:
        print(
            f"modelops: error: cannot read the database: {exc.orig}; check the URL and that the database "
            "is running",
            file=sys.stderr,
        )
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
