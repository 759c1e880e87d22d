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
    false,
)
from sqlalchemy.dialects.postgresql import JSONB

__all__ = [
    "TASK_CLOSED_STATUSES",
    "UTCDateTime",
    "api_tokens",
    "audit",
    "due",
    "facts",
    "fhir_inbox",
    "fhir_resources",
    "fhir_subscriptions",
    "inbox",
    "leases",
    "metadata",
    "order_aliases",
    "outbox",
    "outbox_delivery",
    "patient_aliases",
    "patients",
    "quarantine",
    "rule_activations",
    "rule_approvals",
    "rule_sets",
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

# Every column the Task search filters on, which its indexes carry beside their sort key
# (0007): any search is then an index-only scan in page order, whatever the planner knows.
_SEARCHED = (
    "safeguarding",
    "owner",
    "status",
    "priority",
    "rule_id",
    "patient_value",
    "patient_system",
    "owner_system",
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
    # Issue 4, Task search (0007_task_search): read from the stored resource by `put_task`, so
    # that visibility and the FHIR search parameters are decided in SQL, before paging.
    # `safeguarding`: meta.tag code "safeguarding"; `owner_system`: owner.identifier.system;
    # `patient_system`/`patient_value`: Task.for.identifier ("" when the Task names nobody).
    Column("safeguarding", Boolean(), nullable=False, server_default=false()),
    Column("owner_system", Text(), nullable=False, server_default=""),
    Column("patient_system", Text(), nullable=False, server_default=""),
    Column("patient_value", Text(), nullable=False, server_default=""),
    Index(None, "status"),
    Index(None, "owner"),
    Index(None, "patient_key"),
    Index(None, "rule_id"),
    Index(None, "created_at", "identifier"),
    # Search indexes (0007): each holds every column visibility and the filters read, in a
    # sort order, so that counts and pages scan the index, not the large rows; the table is
    # read only for the rows of the page.
    Index(
        "ix_tasks_search_created", "shadow", "created_at", "identifier", *_SEARCHED, "updated_at"
    ),
    Index(
        "ix_tasks_search_updated", "shadow", "updated_at", "identifier", *_SEARCHED, "created_at"
    ),
    Index("ix_tasks_patient", "patient_value", "patient_system", "shadow", "safeguarding", "owner"),
    # A clinician's own worklist (owner=...), the commonest search: owner first.
    Index(
        "ix_tasks_owner_created",
        "owner",
        "shadow",
        "created_at",
        "identifier",
        "safeguarding",
        "status",
        "priority",
        "rule_id",
    ),
    Index(
        "ix_tasks_owner_updated",
        "owner",
        "shadow",
        "updated_at",
        "identifier",
        "safeguarding",
        "status",
        "priority",
        "rule_id",
    ),
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
# The FHIR resources received, by sender (ids are the sending server's): the current version
# and what a literal reference to it resolves to (a Patient's identity as the engine's Patient
# JSON, an Encounter's visit number). `version` counts the versions stored here (1, 2...);
# `version_id` is the sender's meta.versionId. Read by adapters.fhir.inbound.
fhir_resources = Table(
    "fhir_resources",
    metadata,
    Column("sender", Text(), primary_key=True),
    Column("resource_type", Text(), primary_key=True),
    Column("resource_id", Text(), primary_key=True),
    Column("version", Integer(), nullable=False),
    Column("version_id", Text(), nullable=False),
    Column("content_hash", Text(), nullable=False),
    Column("inbox_id", BigId, ForeignKey("inbox.id"), nullable=False),
    Column("patient", JSONDoc, nullable=True),
    Column("visit_number", Text(), nullable=False),
    Column("last_updated", UTCDateTime(), nullable=False),
)

# One row per FHIR inbox row: the answer it got (so that a redelivery is answered the same)
# and, for a resource accepted for processing, the literal references it was resolved with
# (so that the worker maps it exactly as it was judged when accepted).
fhir_inbox = Table(
    "fhir_inbox",
    metadata,
    Column("inbox_id", BigId, ForeignKey("inbox.id"), primary_key=True),
    Column("status", Integer(), nullable=False),
    Column("resource_type", Text(), nullable=False),
    Column("resource_id", Text(), nullable=False),
    Column("version", Integer(), nullable=False),
    Column("answer", JSONDoc, nullable=False),
    Column("refs", JSONDoc, nullable=False),
)

# --- issue 4: FHIR subscriptions (0005_subscriptions) ---------------------------------------
# One row per backport Subscription whose notifications arrive (adapters/fhir/subscriptions.py).
# `subscription`: "Subscription/<id>" on the source server; `last_event`: the highest event
# number applied (every number up to it was applied, recovered, or is listed in `missing`:
# numbers the source could no longer give back); `reported_events`: the sender's last
# events-since-subscription-start. `revision` grows with every change: a writer that read an
# older one lost a race and plans again (optimistic, so no lock is held over HTTP calls).
fhir_subscriptions = Table(
    "fhir_subscriptions",
    metadata,
    Column("subscription", Text(), primary_key=True),
    Column("reference", Text(), nullable=False),
    Column("topic", Text(), nullable=False),
    Column("status", Text(), nullable=False),
    Column("last_event", BigInteger(), nullable=False),
    Column("reported_events", BigInteger(), nullable=False),
    Column("missing", JSONDoc, nullable=False),
    Column("last_type", Text(), nullable=False),
    Column("notifications", BigInteger(), nullable=False),
    Column("revision", BigInteger(), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
)

# --- issue 6: governance (0006_governance) --------------------------------------------------
# The rule sets the service started with: a row only when the set differs from the one
# before (`fingerprint`: SHA-256 of every rule's id, version, status and parameters). The
# first row of a database is the `baseline`, taken as found (adapters/governance/approvals.py).
rule_sets = Table(
    "rule_sets",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("recorded_at", UTCDateTime(), nullable=False),
    Column("recorded_by", Text(), nullable=False),
    Column("fingerprint", Text(), nullable=False),
    Column("baseline", Boolean(), nullable=False),
    Column("rules_path", Text(), nullable=False),
)

# A signed-off switch of one rule to active, for exactly one version and its parameters (a
# JSON list of [name, value] pairs, in rule.toml order). `from_status`: the rule's status in
# the last recorded set when the approval was given ("new" if it was never recorded).
rule_approvals = Table(
    "rule_approvals",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("rule_id", Text(), nullable=False),
    Column("version", Text(), nullable=False),
    Column("parameters", JSONDoc, nullable=False),
    Column("approved_at", UTCDateTime(), nullable=False),
    Column("approved_by", Text(), nullable=False),
    Column("reason", Text(), nullable=False),
    Column("from_status", Text(), nullable=False),
    Column("to_status", Text(), nullable=False),
    Index(None, "rule_id"),
)

# Every rule of a recorded set, as it was then. `approval_id`: the approval this change used;
# unique, because one approval authorises one change.
rule_activations = Table(
    "rule_activations",
    metadata,
    Column("rule_set_id", BigId, ForeignKey("rule_sets.id"), primary_key=True),
    Column("rule_id", Text(), primary_key=True),
    Column("title", Text(), nullable=False),
    Column("version", Text(), nullable=False),
    Column("status", Text(), nullable=False),
    Column("parameters", JSONDoc, nullable=False),
    Column("approval_id", BigId, ForeignKey("rule_approvals.id"), nullable=True, unique=True),
    Index(None, "rule_id"),
)
