"""Task search: the columns the FHIR Task API searches by.

`safeguarding` (meta.tag code "safeguarding"), `owner_system` (owner.identifier.system),
`patient_system` and `patient_value` (Task.for.identifier) are read from each stored Task's
resource, so that visibility and search are decided in SQL. Existing rows are backfilled
from their resource. Indexes: the listing in either sort order (creation, last change) with
the filter columns beside the key, and the patient search.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | None = None
depends_on: str | None = None

_ID: Any = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

_TEXT_COLUMNS = ("owner_system", "patient_system", "patient_value")
_SEARCHED = [
    "safeguarding",
    "owner",
    "status",
    "priority",
    "rule_id",
    "patient_value",
    "patient_system",
    "owner_system",
]
# Each holds the columns visibility and the common filters read, in a sort order, so that
# counts and pages scan the index and read the (large) rows of the page only.
_INDEXES = {
    "ix_tasks_search_created": ["shadow", "created_at", "identifier", *_SEARCHED, "updated_at"],
    "ix_tasks_search_updated": ["shadow", "updated_at", "identifier", *_SEARCHED, "created_at"],
    "ix_tasks_patient": ["patient_value", "patient_system", "shadow", "safeguarding", "owner"],
    # A clinician's own worklist (owner=...), the commonest search: owner first.
    "ix_tasks_owner_created": [
        "owner",
        "shadow",
        "created_at",
        "identifier",
        "safeguarding",
        "status",
        "priority",
        "rule_id",
    ],
    "ix_tasks_owner_updated": [
        "owner",
        "shadow",
        "updated_at",
        "identifier",
        "safeguarding",
        "status",
        "priority",
        "rule_id",
    ],
}


def _search_values(resource: Any) -> dict[str, Any]:
    """The new columns of one stored Task (spelled out here, as `put_task` does it, so this
    revision never changes meaning)."""
    if isinstance(resource, str):
        resource = json.loads(resource)
    if not isinstance(resource, Mapping):
        resource = {}
    meta = resource.get("meta")
    tags = meta.get("tag", []) if isinstance(meta, Mapping) else []
    owner = (resource.get("owner") or {}).get("identifier") or {}
    patient = (resource.get("for") or {}).get("identifier") or {}
    return {
        "safeguarding": any(
            isinstance(tag, Mapping) and tag.get("code") == "safeguarding" for tag in tags
        ),
        "owner_system": str(owner.get("system") or ""),
        "patient_system": str(patient.get("system") or ""),
        "patient_value": str(patient.get("value") or ""),
    }


def upgrade() -> None:
    op.add_column(
        "tasks",
        sa.Column("safeguarding", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    for name in _TEXT_COLUMNS:
        op.add_column("tasks", sa.Column(name, sa.Text(), nullable=False, server_default=""))
    for name, columns in _INDEXES.items():
        op.create_index(name, "tasks", columns)

    tasks = sa.table(
        "tasks",
        sa.column("identifier", sa.Text()),
        sa.column("resource", sa.Text()),
        sa.column("safeguarding", sa.Boolean()),
        *(sa.column(name, sa.Text()) for name in _TEXT_COLUMNS),
    )
    connection = op.get_bind()
    # Read as text on SQLite; psycopg hands JSONB back as a dict either way.
    rows = connection.execute(sa.select(tasks.c.identifier, tasks.c.resource)).all()
    for identifier, resource in rows:
        connection.execute(
            sa.update(tasks)
            .where(tasks.c.identifier == identifier)
            .values(**_search_values(resource))
        )


def downgrade() -> None:
    for name in _INDEXES:
        op.drop_index(name, table_name="tasks")
    with op.batch_alter_table("tasks") as batch:
        for name in ("safeguarding", *_TEXT_COLUMNS):
            batch.drop_column(name)
