"""FHIR Subscriptions (backport) state per subscription.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None

_ID: Any = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_JSON: Any = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "fhir_subscriptions",
        sa.Column("subscription", sa.Text(), nullable=False),
        sa.Column("reference", sa.Text(), nullable=False),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("last_event", sa.BigInteger(), nullable=False),
        sa.Column("reported_events", sa.BigInteger(), nullable=False),
        sa.Column("missing", _JSON, nullable=False),
        sa.Column("last_type", sa.Text(), nullable=False),
        sa.Column("notifications", sa.BigInteger(), nullable=False),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("subscription", name="pk_fhir_subscriptions"),
    )


def downgrade() -> None:
    op.drop_table("fhir_subscriptions")
