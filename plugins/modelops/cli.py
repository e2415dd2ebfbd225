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
from typing import TYPE_CHECKING

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

    for record in records:
        print(canonical_json(record.to_dict()))
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

    return parser


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
