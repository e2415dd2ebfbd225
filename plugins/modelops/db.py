"""The one storage layer for the platform's own tables (the audit log, the prediction log).

:func:`create_engine` is the only place a SQLAlchemy engine for those tables is made, with the same
settings on each backend: on SQLite (the embedded default) write-ahead logging, a 30 s busy timeout
and foreign keys; on PostgreSQL (production) ``pool_pre_ping``. :func:`sqlalchemy_url` is the only
place a connection (an Airflow ``Connection`` or anything shaped like one) becomes a URL.
Imports no Airflow, so the gateway and the CLI can use it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, Engine, make_url

from modelops.errors import ConfigurationError

SQLITE_BUSY_TIMEOUT_MS = 30_000
# Execution option of a connection whose transactions take SQLite's write lock up front (BEGIN IMMEDIATE);
# honoured by engines made with ``create_engine(..., immediate_transactions=True)``.
BEGIN_IMMEDIATE = "modelops_begin_immediate"

_URL_EXAMPLES = "e.g. sqlite:////abs/path/file.db or postgresql+psycopg2://user@host:5432/db"


class ConnectionLike(Protocol):
    """What :func:`sqlalchemy_url` reads of a connection (``airflow.sdk.Connection`` has all of it)."""

    @property
    def conn_id(self) -> str: ...

    @property
    def conn_type(self) -> str | None: ...

    @property
    def host(self) -> str | None: ...

    @property
    def schema(self) -> str | None: ...

    @property
    def login(self) -> str | None: ...

    @property
    def password(self) -> str | None: ...

    @property
    def port(self) -> int | None: ...

    @property
    def extra_dejson(self) -> Mapping[str, Any]: ...


def sqlalchemy_url(conn: ConnectionLike) -> str:
    """The SQLAlchemy URL of a connection: conn_type ``sqlite`` (host = database file path) or
    ``postgres``; ``extra.url`` overrides both with any SQLAlchemy URL."""
    extra = conn.extra_dejson
    if extra.get("url"):
        return str(extra["url"])
    if conn.conn_type == "sqlite":
        if not conn.host:
            raise ConfigurationError(
                f"connection {conn.conn_id!r} (sqlite) has no host; set host to the database file path"
            )
        return f"sqlite:///{conn.host}"
    if conn.conn_type in ("postgres", "postgresql"):
        return URL.create(
            "postgresql+psycopg2",
            username=conn.login or None,
            password=conn.password or None,
            host=conn.host or "127.0.0.1",
            port=conn.port or 5432,
            database=conn.schema or "postgres",
        ).render_as_string(hide_password=False)
    raise ConfigurationError(
        f"connection {conn.conn_id!r} has conn_type {conn.conn_type!r}; use 'sqlite' (host = file path), "
        "'postgres', or put a SQLAlchemy URL in extra.url"
    )


def parse_url(url: str | URL) -> URL:
    """``url`` parsed; a string that is no SQLAlchemy URL is a ``ConfigurationError``."""
    if isinstance(url, URL):
        return url
    try:
        return make_url(url)
    except sa.exc.ArgumentError as exc:
        raise ConfigurationError(f"{url!r} is not a SQLAlchemy URL ({exc}); use {_URL_EXAMPLES}") from exc


def safe_url(url: str | URL) -> str:
    """``url`` with its password masked, for messages and reprs."""
    return parse_url(url).render_as_string(hide_password=True)


def sqlite_file(url: str | URL) -> Path | None:
    """The database file of a SQLite URL; None for other backends, in-memory and ``file:`` URI databases."""
    parsed = parse_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    if database.startswith("file:"):
        return None
    return Path(database)


def create_engine(
    url: str | URL, *, what: str = "the database", immediate_transactions: bool = False
) -> Engine:
    """An engine for ``url`` with the platform's settings for its backend.

    SQLite: the folder of the database file is created; every connection uses WAL (readers proceed
    while one writer writes), waits up to 30 s for a lock instead of failing with "database is locked",
    and enforces foreign keys. ``immediate_transactions=True`` additionally takes transaction control
    from the sqlite3 module (SQLAlchemy's documented recipe) so that a connection with the execution
    option :data:`BEGIN_IMMEDIATE` set (see :func:`write_transaction`) begins with ``BEGIN IMMEDIATE``.
    PostgreSQL and other backends: ``pool_pre_ping``, so a connection the server dropped is replaced.

    ``what`` names the store in errors: an unknown dialect or missing driver is a ``ConfigurationError``.
    """
    parsed = parse_url(url)
    engine_kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        engine_kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
        database_file = sqlite_file(parsed)
        if database_file is not None:
            database_file.parent.mkdir(parents=True, exist_ok=True)
    else:
        engine_kwargs["pool_pre_ping"] = True
    try:
        engine = sa.create_engine(parsed, **engine_kwargs)
    except sa.exc.ArgumentError as exc:  # includes NoSuchModuleError: unknown dialect or driver
        raise ConfigurationError(
            f"cannot open {what} at {safe_url(parsed)}: {exc}; check the URL's dialect and driver"
        ) from exc
    if engine.dialect.name == "sqlite":
        _configure_sqlite(engine, immediate_transactions=immediate_transactions)
    else:
        _name_refused_logins(engine, what, safe_url(parsed))
    return engine


# What PostgreSQL answers to a log-in it refuses (libpq's messages): the same answer on every retry.
_REFUSED_LOGIN = (
    "password authentication failed",
    "no password supplied",
    "does not exist",
    "no pg_hba.conf",
)


def _name_refused_logins(engine: Engine, what: str, where: str) -> None:
    """A refused log-in (wrong user, password or database) becomes one ``ConfigurationError`` naming the
    store, its URL without the password and the fix, instead of the driver's traceback in every task."""

    @sa.event.listens_for(engine, "handle_error")
    def _refused(context: Any) -> None:
        lines = str(context.original_exception).strip().splitlines()
        first_line = lines[0] if lines else ""
        if context.connection is None and any(text in first_line for text in _REFUSED_LOGIN):
            raise ConfigurationError(
                f"cannot log in to {what} at {where}: {first_line.removeprefix('FATAL:').strip()}; fix the "
                "user, password or database of its connection (or URL), retrying will not help"
            ) from None


def _configure_sqlite(engine: Engine, *, immediate_transactions: bool) -> None:
    # BEGIN can only be taken over from the standard sqlite3 module (pysqlite).
    take_over_begin = immediate_transactions and engine.dialect.driver == "pysqlite"

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        if take_over_begin:
            dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    if take_over_begin:

        @sa.event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            # IMMEDIATE takes the write lock up front (waiting up to busy_timeout): a deferred
            # transaction that reads and then writes would fail with SQLITE_BUSY instead.
            immediate = conn.get_execution_options().get(BEGIN_IMMEDIATE, False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A transaction that holds SQLite's write lock from its start (on an engine made with
    ``immediate_transactions=True``); on other backends an ordinary transaction."""
    with engine.connect() as conn:
        conn.execution_options(**{BEGIN_IMMEDIATE: True})
        with conn.begin():
            yield conn
