"""Versioned schema migrations (alembic), run programmatically by `adapters.store.open_store`.

Shipped inside the package so an installed service migrates its own database; no alembic.ini
is needed. A new revision is a new file in `versions/` (copy the latest, set `revision` and
`down_revision`; `script.py.mako` is the template alembic's own `revision` command would use).
Each revision spells out its DDL rather than importing `schema.py`, so an old revision keeps
meaning what it meant when it shipped; `tests/test_store_contract.py` checks that the migrated
database matches `schema.py`.
"""
