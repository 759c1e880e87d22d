"""Alembic environment: migrate over the connection `open_store` hands in.

`open_store` puts an open SQLAlchemy `Connection` (already inside a transaction) into
`config.attributes["connection"]`; this file never creates an engine of its own, so migrations
run with exactly the connection settings (pragmas, BEGIN IMMEDIATE) the store uses.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from adapters.store.schema import metadata


def _run() -> None:
    connection = context.config.attributes.get("connection")
    if not isinstance(connection, Connection):
        raise RuntimeError(
            "safetynet migrations run only through adapters.store.open_store "
            "(config.attributes['connection'] must hold an open Connection)"
        )
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


_run()
