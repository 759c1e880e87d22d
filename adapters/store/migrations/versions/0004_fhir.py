"""FHIR inbound resources (ids, versions, identities for references) and the answer each FHIR
inbox row got.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None

_ID: Any = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_JSON: Any = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _text(name: str) -> sa.Column[Any]:
    return sa.Column(name, sa.Text(), nullable=False)


def upgrade() -> None:
    op.create_table(
        "fhir_resources",
        _text("sender"),
        _text("resource_type"),
        _text("resource_id"),
        sa.Column("version", sa.Integer(), nullable=False),
        _text("version_id"),
        _text("content_hash"),
        sa.Column("inbox_id", _ID, nullable=False),
        sa.Column("patient", _JSON, nullable=True),
        _text("visit_number"),
        sa.Column("last_updated", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sender", "resource_type", "resource_id", name="pk_fhir_resources"),
        sa.ForeignKeyConstraint(
            ["inbox_id"], ["inbox.id"], name="fk_fhir_resources_inbox_id_inbox"
        ),
    )
    op.create_table(
        "fhir_inbox",
        sa.Column("inbox_id", _ID, nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        _text("resource_type"),
        _text("resource_id"),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("answer", _JSON, nullable=False),
        sa.Column("refs", _JSON, nullable=False),
        sa.PrimaryKeyConstraint("inbox_id", name="pk_fhir_inbox"),
        sa.ForeignKeyConstraint(["inbox_id"], ["inbox.id"], name="fk_fhir_inbox_inbox_id_inbox"),
    )


def downgrade() -> None:
    op.drop_table("fhir_inbox")
    op.drop_table("fhir_resources")
