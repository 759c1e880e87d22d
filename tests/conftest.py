"""Shared fixtures: a database of each kind the store runs on.

PostgreSQL databases are created fresh on 127.0.0.1:5432 (trust auth) and dropped afterwards.
Without a reachable server the PostgreSQL variants fail, so CI cannot pass by skipping them;
set SAFETYNET_SKIP_POSTGRES=1 to skip them on a machine that has no server.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import DBAPIError

# A full run fails when a control of the hazard log has no passing test (see the plugin).
pytest_plugins = ["tests.safety_plugin"]

PG_HOST = "127.0.0.1:5432"


def _pg_admin() -> tuple[Engine, str] | None:
    """An AUTOCOMMIT engine on the server's `postgres` database and the user it connected as."""
    for user in ("postgres", "root"):
        engine = create_engine(
            f"postgresql+psycopg://{user}@{PG_HOST}/postgres", isolation_level="AUTOCOMMIT"
        )
        try:
            with engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        except DBAPIError:
            engine.dispose()
            continue
        return engine, user
    return None


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[tuple[Engine, str]]:
    """The PostgreSQL server, or a failure (a skip only when SAFETYNET_SKIP_POSTGRES=1)."""
    found = _pg_admin()
    if found is None:
        message = f"PostgreSQL is not reachable on {PG_HOST} as postgres or root"
        if os.environ.get("SAFETYNET_SKIP_POSTGRES") == "1":
            pytest.skip(message + " (SAFETYNET_SKIP_POSTGRES=1)")
        pytest.fail(message + "; set SAFETYNET_SKIP_POSTGRES=1 to skip these tests")
    yield found
    found[0].dispose()


@contextmanager
def new_pg_database(admin: Engine, user: str) -> Iterator[str]:
    """A new, empty PostgreSQL database (its URL), dropped afterwards."""
    name = f"safetynet_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql+psycopg://{user}@{PG_HOST}/{name}"
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL naming an empty database: a SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
    else:
        with new_pg_database(*request.getfixturevalue("pg_admin")) as url:
            yield url
