"""Turn an Airflow connection into a SQLAlchemy URL for our own tables (audit log, prediction log).

The conversion itself lives in :func:`modelops.db.sqlalchemy_url` (no Airflow import there, so the
gateway and the CLI share it); this module keeps the hooks' import path.
"""

from __future__ import annotations

from modelops.db import sqlalchemy_url

__all__ = ["sqlalchemy_url"]
