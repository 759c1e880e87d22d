"""The live service: processing attempts on the inbox, the outbox with its deliveries, leases.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None

_ID: Any = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _ts(name: str, nullable: bool = False) -> sa.Column[Any]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _text(name: str, nullable: bool = False) -> sa.Column[Any]:
    return sa.Column(name, sa.Text(), nullable=nullable)


def upgrade() -> None:
    with op.batch_alter_table("inbox") as batch:
        batch.add_column(sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"))
    op.create_index("ix_inbox_state_id", "inbox", ["state", "id"])

    op.create_table(
        "outbox",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        _text("task_identifier"),
        sa.Column("task_version", sa.Integer(), nullable=False),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_outbox"),
    )
    op.create_index("ix_outbox_task_identifier", "outbox", ["task_identifier"])

    op.create_table(
        "outbox_delivery",
        sa.Column("outbox_id", _ID, nullable=False),
        _text("destination"),
        _text("state"),
        sa.Column("attempts", sa.Integer(), nullable=False),
        _ts("next_attempt_at"),
        _text("last_error"),
        _ts("updated_at"),
        _ts("delivered_at", nullable=True),
        sa.PrimaryKeyConstraint("outbox_id", "destination", name="pk_outbox_delivery"),
        sa.ForeignKeyConstraint(
            ["outbox_id"], ["outbox.id"], name="fk_outbox_delivery_outbox_id_outbox"
        ),
    )
    op.create_index(
        "ix_outbox_delivery_destination_state_next_attempt_at",
        "outbox_delivery",
        ["destination", "state", "next_attempt_at"],
    )

    op.create_table(
        "leases",
        _text("name"),
        _text("holder"),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        _ts("expires_at"),
        _ts("acquired_at"),
        sa.PrimaryKeyConstraint("name", name="pk_leases"),
    )


def downgrade() -> None:
    op.drop_table("leases")
    op.drop_table("outbox_delivery")
    op.drop_table("outbox")
    op.drop_index("ix_inbox_state_id", table_name="inbox")
    with op.batch_alter_table("inbox") as batch:
        batch.drop_column("attempts")
