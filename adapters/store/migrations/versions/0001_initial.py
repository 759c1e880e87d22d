"""Initial schema: inbox, quarantine, identity, facts, tasks with history, timers, audit.

Revision ID: 0001
Revises:
Create Date: 2026-11-01
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

# Spelled out here (not imported from schema.py) so this revision never changes meaning.
_ID: Any = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_JSON: Any = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _ts(name: str, nullable: bool = False) -> sa.Column[Any]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _text(name: str, nullable: bool = False) -> sa.Column[Any]:
    return sa.Column(name, sa.Text(), nullable=nullable)


def _task_columns() -> list[sa.Column[Any]]:
    # The searchable columns a Task row and each of its history rows both carry.
    return [
        _text("patient_key"),
        _text("rule_id"),
        _text("rule_version"),
        _text("status"),
        _text("priority"),
        _text("owner"),
        sa.Column("shadow", sa.Boolean(), nullable=False),
        sa.Column("resource", _JSON, nullable=False),
    ]


def upgrade() -> None:
    """Create every table of the first release."""
    op.create_table(
        "inbox",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        _text("sender"),
        _text("control_id"),
        _text("content_hash"),
        _ts("received_at"),
        _text("protocol"),
        _text("message_type"),
        _text("origin"),
        _text("raw"),
        _text("state"),
        _text("detail"),
        _ts("processed_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_inbox"),
        sa.UniqueConstraint(
            "sender", "control_id", "content_hash", name="uq_inbox_sender_control_id_content_hash"
        ),
    )
    op.create_index("ix_inbox_state", "inbox", ["state"])

    op.create_table(
        "quarantine",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("inbox_id", _ID, nullable=True),
        _text("reason"),
        _text("ack_code"),
        _text("location"),
        sa.Column("detail", _JSON, nullable=False),
        _ts("created_at"),
        _ts("resolved_at", nullable=True),
        _text("resolution", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_quarantine"),
        sa.ForeignKeyConstraint(["inbox_id"], ["inbox.id"], name="fk_quarantine_inbox_id_inbox"),
    )
    op.create_index("ix_quarantine_inbox_id", "quarantine", ["inbox_id"])

    op.create_table(
        "patients",
        _text("key"),
        _ts("created_at"),
        sa.Column("record_incomplete", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_patients"),
    )

    op.create_table(
        "patient_aliases",
        _text("token"),
        _text("patient_key"),
        sa.PrimaryKeyConstraint("token", name="pk_patient_aliases"),
    )
    op.create_index("ix_patient_aliases_patient_key", "patient_aliases", ["patient_key"])

    op.create_table(
        "order_aliases",
        _text("token"),
        _text("order_key"),
        _text("patient_key"),
        sa.PrimaryKeyConstraint("token", name="pk_order_aliases"),
    )
    op.create_index("ix_order_aliases_patient_key", "order_aliases", ["patient_key"])

    op.create_table(
        "facts",
        _text("patient_key"),
        _text("key"),
        _text("kind"),
        sa.Column("data", _JSON, nullable=False),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("patient_key", "key", name="pk_facts"),
    )

    op.create_table(
        "tasks",
        _text("identifier"),
        *_task_columns(),
        sa.Column("version", sa.Integer(), nullable=False),
        _ts("created_at"),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("identifier", name="pk_tasks"),
    )
    for columns in (["status"], ["owner"], ["patient_key"], ["rule_id"]):
        op.create_index(f"ix_tasks_{columns[0]}", "tasks", columns)
    op.create_index("ix_tasks_created_at_identifier", "tasks", ["created_at", "identifier"])

    op.create_table(
        "task_history",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        _text("identifier"),
        sa.Column("version", sa.Integer(), nullable=False),
        *_task_columns(),
        _ts("changed_at"),
        _text("reason"),
        sa.PrimaryKeyConstraint("id", name="pk_task_history"),
        sa.UniqueConstraint("identifier", "version", name="uq_task_history_identifier_version"),
    )

    op.create_table(
        "due",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        _text("patient_key"),
        _ts("due_at"),
        _text("reason"),
        _ts("fired_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_due"),
        sa.UniqueConstraint(
            "patient_key", "due_at", "reason", name="uq_due_patient_key_due_at_reason"
        ),
    )
    op.create_index("ix_due_fired_at_due_at", "due", ["fired_at", "due_at"])

    op.create_table(
        "audit",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        _ts("at"),
        _text("actor"),
        _text("action"),
        _text("subject"),
        sa.Column("detail", _JSON, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit"),
    )
    op.create_index("ix_audit_subject", "audit", ["subject"])


def downgrade() -> None:
    """Drop every table (loses all data: for development databases only)."""
    for table in (
        "audit",
        "due",
        "task_history",
        "tasks",
        "facts",
        "order_aliases",
        "patient_aliases",
        "patients",
        "quarantine",
        "inbox",
    ):
        op.drop_table(table)
