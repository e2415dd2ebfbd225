"""Turn an Airflow connection into a SQLAlchemy URL for our own tables (audit log, prediction log).

SQLite is the embedded default (conn_type ``sqlite``, ``host`` = file path); PostgreSQL is production
(conn_type ``postgres``). ``extra.url`` overrides both with any SQLAlchemy URL.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy.engine import URL

from modelops.errors import ConfigurationError

if TYPE_CHECKING:
    from airflow.sdk import Connection


def sqlalchemy_url(conn: Connection) -> str:
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
