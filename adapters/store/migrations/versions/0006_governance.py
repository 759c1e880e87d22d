"""Rule approvals and the rule versions active when.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | None = None
depends_on: str | None = None

# Spelled out here (not imported from schema.py) so this revision never changes meaning.
_ID: Any = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_JSON: Any = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _ts(name: str) -> sa.Column[Any]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=False)


def _text(name: str) -> sa.Column[Any]:
    return sa.Column(name, sa.Text(), nullable=False)


def upgrade() -> None:
    """Rule sets recorded at start, approvals, and each rule of each recorded set."""
    op.create_table(
        "rule_sets",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        _ts("recorded_at"),
        _text("recorded_by"),
        _text("fingerprint"),
        sa.Column("baseline", sa.Boolean(), nullable=False),
        _text("rules_path"),
        sa.PrimaryKeyConstraint("id", name="pk_rule_sets"),
    )
    op.create_table(
        "rule_approvals",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        _text("rule_id"),
        _text("version"),
        sa.Column("parameters", _JSON, nullable=False),
        _ts("approved_at"),
        _text("approved_by"),
        _text("reason"),
        _text("from_status"),
        _text("to_status"),
        sa.PrimaryKeyConstraint("id", name="pk_rule_approvals"),
    )
    op.create_index("ix_rule_approvals_rule_id", "rule_approvals", ["rule_id"])
    op.create_table(
        "rule_activations",
        sa.Column("rule_set_id", _ID, nullable=False),
        _text("rule_id"),
        _text("title"),
        _text("version"),
        _text("status"),
        sa.Column("parameters", _JSON, nullable=False),
        sa.Column("approval_id", _ID, nullable=True),
        sa.PrimaryKeyConstraint("rule_set_id", "rule_id", name="pk_rule_activations"),
        sa.ForeignKeyConstraint(
            ["rule_set_id"], ["rule_sets.id"], name="fk_rule_activations_rule_set_id_rule_sets"
        ),
        sa.ForeignKeyConstraint(
            ["approval_id"],
            ["rule_approvals.id"],
            name="fk_rule_activations_approval_id_rule_approvals",
        ),
        sa.UniqueConstraint("approval_id", name="uq_rule_activations_approval_id"),
    )
    op.create_index("ix_rule_activations_rule_id", "rule_activations", ["rule_id"])


def downgrade() -> None:
    op.drop_table("rule_activations")
    op.drop_table("rule_approvals")
    op.drop_table("rule_sets")
