"""Ports: what the engine needs from the outside world, as small protocols.

The engine calls these; adapters implement them (`adapters.store.SqlStore` for the database,
`engine.clock.SimulatedClock` / `engine.clock.WallClock` for time). Records crossing a port are
plain frozen dataclasses holding JSON-able data, so no database or wire type leaks inward.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """A raw message as received, before anything is understood of it."""

    raw: str
    sender: str  # HL7: MSH-3^MSH-4 ; FHIR: the feed's token or source
    control_id: str  # HL7: MSH-10 ; FHIR: resource type/id/version
    content_hash: str  # sha256 hex of the raw text
    received_at: datetime
    protocol: str = "hl7v2"  # "hl7v2" | "fhir"
    message_type: str = ""  # e.g. "ORU^R01"
    origin: str = ""  # where it came from: a file path, a peer address


@dataclass(frozen=True, slots=True)
class InboxEntry:
    """The inbox row for a message. `duplicate`: same sender, control id and content already
    stored (nothing else happens). `control_id_reused`: same sender and control id with
    different content: a new message that must be processed and reported."""

    id: int
    duplicate: bool = False
    control_id_reused: bool = False
    state: str = "received"


@dataclass(frozen=True, slots=True)
class Fact:
    """A small projected fact about one patient: `key` unique within the patient."""

    key: str
    kind: str
    data: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class StoredTask:
    """A recall Task as stored: its FHIR JSON and the columns it is searched by."""

    identifier: str
    patient_key: str
    rule_id: str
    rule_version: str
    status: str
    priority: str
    owner: str
    resource: Mapping[str, Any]
    version: int = 1
    shadow: bool = False


@dataclass(frozen=True, slots=True)
class DueTimer:
    """A moment at which a patient's rules must be evaluated again."""

    id: int
    patient_key: str
    due_at: datetime
    reason: str


class UnitOfWork(Protocol):
    """One database transaction. Everything written through it commits together or not at all.

    Not for long-running work: open it, do one message's (or one batch's) work, leave it.
    """

    # --- inbox and quarantine ---
    def add_to_inbox(self, message: InboundMessage) -> InboxEntry:
        """Store a raw message (or find it again if it is a duplicate)."""
        ...

    def set_inbox_state(self, inbox_id: int, state: str, detail: str = "") -> None:
        """Record what became of a message: processed, unsupported, quarantined, failed."""
        ...

    def quarantine(
        self,
        inbox_id: int | None,
        reason: str,
        ack_code: str,
        location: str = "",
        detail: Mapping[str, Any] | None = None,
        at: datetime | None = None,
    ) -> int:
        """Keep a message for human review with the reason it was not processed."""
        ...

    # --- identity ---
    def patients_for(self, tokens: Sequence[str]) -> dict[str, str]:
        """Map each known identifier token (`system|value`) to its current patient key."""
        ...

    def add_patient_aliases(self, patient_key: str, tokens: Sequence[str]) -> None:
        """Record that these identifier tokens name this patient (existing ones are kept)."""
        ...

    def merge_patients(self, prior_key: str, surviving_key: str) -> None:
        """Move everything known of `prior_key` (aliases, facts, open tasks, timers) to
        `surviving_key`; the prior key becomes an alias of the survivor."""
        ...

    def order_for(self, tokens: Sequence[str]) -> tuple[str, str] | None:
        """Find an order by its placer/filler tokens: (order key, patient key) or None."""
        ...

    def add_order_aliases(self, order_key: str, patient_key: str, tokens: Sequence[str]) -> None:
        """Record that these placer/filler tokens name this order of this patient."""
        ...

    # --- facts ---
    def facts(self, patient_key: str) -> list[Fact]:
        """Every current fact of one patient."""
        ...

    def put_facts(self, patient_key: str, facts: Sequence[Fact]) -> None:
        """Insert or replace facts by key."""
        ...

    # --- tasks ---
    def get_task(self, identifier: str) -> StoredTask | None:
        """The current state of one Task."""
        ...

    def put_task(self, task: StoredTask, at: datetime, reason: str) -> StoredTask:
        """Insert or replace a Task; record the new state in its history. Returns it with its
        version number (1 for a new Task, previous + 1 for a change)."""
        ...

    def tasks(
        self,
        status: str | None = None,
        owner: str | None = None,
        patient_key: str | None = None,
    ) -> list[StoredTask]:
        """Current Tasks, oldest first, optionally filtered."""
        ...

    def task_history(self, identifier: str) -> list[StoredTask]:
        """Every recorded state of one Task, oldest first."""
        ...

    # --- timers ---
    def schedule(self, patient_key: str, due_at: datetime, reason: str) -> None:
        """Ask for the patient to be evaluated again at `due_at` (idempotent)."""
        ...

    def due_timers(self, until: datetime, limit: int = 1000) -> list[DueTimer]:
        """Unfired timers due at or before `until`, earliest first."""
        ...

    def next_due(self) -> datetime | None:
        """When the earliest unfired timer is due, if any."""
        ...

    def mark_fired(self, timer_id: int, at: datetime) -> None:
        """Record that a timer has been acted on."""
        ...

    # --- audit ---
    def audit(
        self,
        at: datetime,
        actor: str,
        action: str,
        subject: str = "",
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        """Append to the audit trail (who did what to which subject). No patient data."""
        ...

    def savepoint(self) -> AbstractContextManager[None]:
        """A nested transaction: work inside it is undone on error, the rest is kept."""
        ...


class Store(Protocol):
    """The record: every message, fact, Task, timer and audit entry."""

    def begin(self) -> AbstractContextManager[UnitOfWork]:
        """Open a unit of work; it commits when the block ends, rolls back on error."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


class Clock(Protocol):
    """Processing time. The live service uses the wall clock; replay a simulated one."""

    def now(self) -> datetime:
        """The current time, timezone-aware."""
        ...
