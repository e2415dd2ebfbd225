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

from modelops.errors import ModelOpsError
from modelops.vocabulary import AuditAction

if TYPE_CHECKING:
    from modelops.audit import AuditStore

# SQLAlchemy and the audit store are imported by the commands, not here: `modelops --help` and a usage
# error answer without them, and no command imports Airflow unless it must resolve an Airflow connection.

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2

AUDIT_URL_ENV = "MODELOPS_AUDIT_URL"


def _open_audit_store(url: str | None) -> AuditStore:
    """``--url``, else ``$MODELOPS_AUDIT_URL``, else the Airflow connection ``modelops_audit``."""
    from modelops.audit import AuditStore

    url = url or os.environ.get(AUDIT_URL_ENV)
    if not url:
        # Imported here: Airflow is slow to import and not needed when a URL is given.
        from modelops.hooks.audit import AuditHook

        url = AuditHook().url
    # Never create a log here: an empty new log would make a wrong URL look like a verified chain.
    return AuditStore(url, create=False)


def _cmd_audit_verify(args: argparse.Namespace) -> int:
    store = _open_audit_store(args.url)
    try:
        result = store.verify()
        head = store.head()
    finally:
        store.dispose()
    if not result.ok:
        print(f"audit chain BROKEN: {result.problem}")
        return EXIT_CHECK_FAILED
    if head is None:
        print("audit chain OK: 0 records (empty log)")
    else:
        print(f"audit chain OK: {result.count} records, head seq={head[0]} hash={head[1]}")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelops", description="ModelOps lifecycle tools.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    audit = commands.add_parser("audit", help="inspect the tamper-evident audit log")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True, metavar="AUDIT_COMMAND")

    verify = audit_commands.add_parser("verify", help="check the hash chain; exit 1 if it is broken")
    _add_url_option(verify)
    verify.set_defaults(handler=_cmd_audit_verify)

    show = audit_commands.add_parser("show", help="print records as JSON lines, oldest first")
    _add_url_option(show)
    show.add_argument("--limit", type=_positive_int, help="only the newest N matching records")
    show.add_argument(
        "--action", choices=[action.value for action in AuditAction], help="only records with this action"
    )
    show.add_argument("--subject", help="only records about this subject, e.g. model:ctr_recommender@3")
    show.set_defaults(handler=_cmd_audit_show)

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
