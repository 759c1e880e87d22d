"""The database schema: every table on one `MetaData`, shared by SQLite and PostgreSQL.

This module describes the schema as the code expects it *now*; the database is brought to it by
the versioned migrations in `adapters.store.migrations` (never by `metadata.create_all`). A test
compares the two, so a column added here without a migration fails CI.

Times are stored in UTC through `UTCDateTime`, because SQLite keeps no offset: whatever goes in
is converted to UTC, and what comes out is a timezone-aware UTC datetime on both backends.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB

__all__ = [
    "TASK_CLOSED_STATUSES",
    "UTCDateTime",
    "api_tokens",
    "audit",
    "due",
    "facts",
    "inbox",
    "leases",
    "metadata",
    "order_aliases",
    "outbox",
    "outbox_delivery",
    "patient_aliases",
    "patients",
    "quarantine",
    "task_history",
    "tasks",
]


class UTCDateTime(TypeDecorator[datetime]):
    """A `DateTime(timezone=True)` that refuses naive values and always reads back aware UTC.

    Naive datetimes are rejected rather than guessed at: every stored time must carry its offset
    (the design's "Time" section), and a silent local-time guess would shift timers by hours.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Convert to UTC before storing (SQLite would otherwise drop the offset unconverted)."""
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value.isoformat()} cannot be stored: give an offset")
        value = value.astimezone(UTC)
        # SQLite stores the text without an offset; stripping it keeps comparisons textual UTC.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Return an aware UTC datetime whatever the backend's session time zone is."""
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


# JSON text on SQLite, JSONB on PostgreSQL (indexable, and duplicates keys are folded on write).
JSONDoc: Any = JSON().with_variant(JSONB(), "postgresql")

# A surrogate key that is BIGINT (identity) on PostgreSQL; SQLite's rowid alias must be INTEGER.
BigId: Any = BigInteger().with_variant(Integer(), "sqlite")

# Task states after which a Task is closed: a merge leaves them with the patient key they had.
TASK_CLOSED_STATUSES = frozenset(
    {"completed", "cancelled", "rejected", "entered-in-error", "failed"}
)

# Free text is TEXT everywhere: a VARCHAR(n) limit would reject on PostgreSQL what SQLite keeps.
# Constraint names are fixed so future migrations can refer to them on both backends.
metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

inbox = Table(
    "inbox",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("sender", Text(), nullable=False),
    Column("control_id", Text(), nullable=False),
    Column("content_hash", Text(), nullable=False),
    Column("received_at", UTCDateTime(), nullable=False),
    Column("protocol", Text(), nullable=False),
    Column("message_type", Text(), nullable=False),
    Column("origin", Text(), nullable=False),
    Column("raw", Text(), nullable=False),
    Column("state", Text(), nullable=False),
    Column("detail", Text(), nullable=False),
    Column("processed_at", UTCDateTime(), nullable=True),
    # How many times a processor has started on this message; past a limit it is quarantined.
    Column("attempts", Integer(), nullable=False, server_default="0"),
    UniqueConstraint("sender", "control_id", "content_hash"),
    Index(None, "state"),
    Index(None, "state", "id"),
)

quarantine = Table(
    "quarantine",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("inbox_id", BigId, ForeignKey("inbox.id"), nullable=True),
    Column("reason", Text(), nullable=False),
    Column("ack_code", Text(), nullable=False),
    Column("location", Text(), nullable=False),
    Column("detail", JSONDoc, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("resolved_at", UTCDateTime(), nullable=True),
    Column("resolution", Text(), nullable=True),
    Index(None, "inbox_id"),
)

patients = Table(
    "patients",
    metadata,
    Column("key", Text(), primary_key=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("record_incomplete", Boolean(), nullable=False),
)

patient_aliases = Table(
    "patient_aliases",
    metadata,
    Column("token", Text(), primary_key=True),
    Column("patient_key", Text(), nullable=False),
    Index(None, "patient_key"),
)

order_aliases = Table(
    "order_aliases",
    metadata,
    Column("token", Text(), primary_key=True),
    Column("order_key", Text(), nullable=False),
    Column("patient_key", Text(), nullable=False),
    Index(None, "patient_key"),
)

facts = Table(
    "facts",
    metadata,
    Column("patient_key", Text(), primary_key=True),
    Column("key", Text(), primary_key=True),
    Column("kind", Text(), nullable=False),
    Column("data", JSONDoc, nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
)

tasks = Table(
    "tasks",
    metadata,
    Column("identifier", Text(), primary_key=True),
    Column("patient_key", Text(), nullable=False),
    Column("rule_id", Text(), nullable=False),
    Column("rule_version", Text(), nullable=False),
    Column("status", Text(), nullable=False),
    Column("priority", Text(), nullable=False),
    Column("owner", Text(), nullable=False),
    Column("shadow", Boolean(), nullable=False),
    Column("resource", JSONDoc, nullable=False),
    Column("version", Integer(), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    Index(None, "status"),
    Index(None, "owner"),
    Index(None, "patient_key"),
    Index(None, "rule_id"),
    Index(None, "created_at", "identifier"),
)

# Each row is a whole past state, search columns included, so history survives a merge or an
# owner change without joining the current row.
task_history = Table(
    "task_history",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("identifier", Text(), nullable=False),
    Column("version", Integer(), nullable=False),
    Column("patient_key", Text(), nullable=False),
    Column("rule_id", Text(), nullable=False),
    Column("rule_version", Text(), nullable=False),
    Column("status", Text(), nullable=False),
    Column("priority", Text(), nullable=False),
    Column("owner", Text(), nullable=False),
    Column("shadow", Boolean(), nullable=False),
    Column("resource", JSONDoc, nullable=False),
    Column("changed_at", UTCDateTime(), nullable=False),
    Column("reason", Text(), nullable=False),
    UniqueConstraint("identifier", "version"),
)

due = Table(
    "due",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("patient_key", Text(), nullable=False),
    Column("due_at", UTCDateTime(), nullable=False),
    Column("reason", Text(), nullable=False),
    Column("fired_at", UTCDateTime(), nullable=True),
    UniqueConstraint("patient_key", "due_at", "reason"),
    Index(None, "fired_at", "due_at"),
)

audit = Table(
    "audit",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("at", UTCDateTime(), nullable=False),
    Column("actor", Text(), nullable=False),
    Column("action", Text(), nullable=False),
    Column("subject", Text(), nullable=False),
    Column("detail", JSONDoc, nullable=False),
    Index(None, "subject"),
)

# One row per Task change to deliver (written with the change, in the same transaction; shadow
# Tasks are never written here). The resource delivered is that version's `task_history` row.
outbox = Table(
    "outbox",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("task_identifier", Text(), nullable=False),
    Column("task_version", Integer(), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Index(None, "task_identifier"),
)

# Delivery of one outbox row to one configured destination. `state`: pending | delivered.
# A delivery is never dropped: it stays pending, retried with backoff, until it succeeds.
outbox_delivery = Table(
    "outbox_delivery",
    metadata,
    Column("outbox_id", BigId, ForeignKey("outbox.id"), primary_key=True),
    Column("destination", Text(), primary_key=True),
    Column("state", Text(), nullable=False),
    Column("attempts", Integer(), nullable=False),
    Column("next_attempt_at", UTCDateTime(), nullable=False),
    Column("last_error", Text(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    Column("delivered_at", UTCDateTime(), nullable=True),
    Index(None, "destination", "state", "next_attempt_at"),
)

# Leases: which instance is the active processor. `epoch` grows with every change of holder,
# so a holder that lost its lease cannot write (its renewal names the old epoch).
leases = Table(
    "leases",
    metadata,
    Column("name", Text(), primary_key=True),
    Column("holder", Text(), nullable=False),
    Column("epoch", BigInteger(), nullable=False),
    Column("expires_at", UTCDateTime(), nullable=False),
    Column("acquired_at", UTCDateTime(), nullable=False),
)

# --- issue 4: authentication -------------------------------------------------------------
# Bearer tokens for the HTTP API. Only the SHA-256 of a token is kept (tokens are 256-bit
# random strings, so a fast hash is enough: there is nothing to brute-force). `roles`: a
# comma-separated list; `practitioner`: the Task owner a clinician token acts as.
api_tokens = Table(
    "api_tokens",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("name", Text(), nullable=False, unique=True),
    Column("token_hash", Text(), nullable=False, unique=True),
    Column("roles", Text(), nullable=False),
    Column("practitioner", Text(), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("revoked_at", UTCDateTime(), nullable=True),
)

# --- issue 4: FHIR inbound (0004_fhir) ------------------------------------------------------

# --- issue 4: FHIR subscriptions (0005_subscriptions) ---------------------------------------

# --- issue 6: governance (0006_governance) --------------------------------------------------
