"""A database that refuses our log-in is named once, with the fix, whichever store asks."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa

from modelops.audit import AuditStore
from modelops.db import create_engine
from modelops.errors import ConfigurationError
from tests.conftest import require_service


@pytest.fixture(autouse=True)
def _postgres() -> None:
    require_service("PostgreSQL", "127.0.0.1", 5432)


def test_an_unknown_role_is_one_configuration_error_naming_the_store() -> None:
    role = f"nobody_{uuid.uuid4().hex[:8]}"
    url = f"postgresql+psycopg2://{role}:the-secret@127.0.0.1:5432/postgres"
    engine = create_engine(url, what="the audit log")
    with pytest.raises(ConfigurationError) as refused, engine.connect():
        pass
    message = str(refused.value)
    assert message.startswith("cannot log in to the audit log at postgresql+psycopg2://")
    assert f'role "{role}" does not exist' in message and "retrying will not help" in message
    assert "the-secret" not in message and "***" in message


def test_a_missing_database_is_named_too_and_a_store_raises_it() -> None:
    url = f"postgresql+psycopg2://postgres@127.0.0.1:5432/missing_{uuid.uuid4().hex[:8]}"
    with pytest.raises(ConfigurationError, match=r"database \"missing_\w+\" does not exist"):
        AuditStore(url).records()


def test_errors_of_a_connected_session_are_left_alone(postgres_url: str) -> None:
    engine = create_engine(postgres_url)
    with pytest.raises(sa.exc.ProgrammingError, match="does not exist"), engine.connect() as conn:
        conn.execute(sa.text("select * from no_such_table"))
    engine.dispose()
