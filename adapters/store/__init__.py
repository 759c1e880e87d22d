"""The database adapter: the engine's `Store` port on SQLAlchemy 2 Core.

`open_store(url)` connects (SQLite file or memory, PostgreSQL via psycopg 3), migrates the schema
to the latest revision and returns a `SqlStore`; `store.begin()` yields a `SqlUnitOfWork`.
"""

from adapters.store.sql import SqlStore, SqlUnitOfWork, open_store

__all__ = ["SqlStore", "SqlUnitOfWork", "open_store"]
