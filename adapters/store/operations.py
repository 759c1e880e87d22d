"""What the live service and its operators need of the store beyond the engine's port.

The processor worker's queue (`pending`, `count_attempt`), and the quarantine that people
review (`quarantine_items`, `quarantine_item`, `retry`). Plain SQLAlchemy Core on a unit of
work's connection: none of this is on the per-message hot path of replay.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update

from adapters.store import schema
from adapters.store.sql import SqlUnitOfWork

__all__ = [
    "PendingMessage",
    "QuarantineItem",
    "any_pending",
    "count_attempt",
    "pending",
    "quarantine_item",
    "quarantine_items",
    "retry",
]

_inbox, _quarantine = schema.inbox, schema.quarantine


@dataclass(frozen=True, slots=True)
class PendingMessage:
    """A stored message that the processor has not yet finished."""

    id: int
    raw: str
    received_at: datetime
    attempts: int
    protocol: str = "hl7v2"


@dataclass(frozen=True, slots=True)
class QuarantineItem:
    """A message kept for human review, with why. `raw` only when asked for one item."""

    id: int
    inbox_id: int | None
    reason: str
    ack_code: str
    location: str
    created_at: datetime
    resolved_at: datetime | None
    resolution: str | None
    sender: str
    control_id: str
    message_type: str
    inbox_state: str
    raw: str = ""


def pending(uow: SqlUnitOfWork, limit: int) -> list[PendingMessage]:
    """Messages waiting for the processor, in arrival order (inbox id), at most `limit`.

    A message that a processor has already started (attempts > 0) and not finished may have
    crashed it: it is returned alone, so that it cannot take a batch down with it again."""
    rows = uow.connection.execute(
        select(
            _inbox.c.id,
            _inbox.c.raw,
            _inbox.c.received_at,
            _inbox.c.attempts,
            _inbox.c.protocol,
        )
        .where(_inbox.c.state == "received")
        .order_by(_inbox.c.id)
        .limit(limit)
    ).all()
    batch: list[PendingMessage] = []
    for row in rows:
        message = PendingMessage(*row)
        if message.attempts:
            return batch or [message]
        batch.append(message)
    return batch


def any_pending(uow: SqlUnitOfWork) -> bool:
    """Whether any message waits for the processor (cheap; fine in a read-only unit of work)."""
    found = uow.connection.execute(
        select(_inbox.c.id).where(_inbox.c.state == "received").limit(1)
    ).first()
    return found is not None


def count_attempt(uow: SqlUnitOfWork, ids: Sequence[int]) -> None:
    """Record that a processor is starting on these messages (commit before starting)."""
    if ids:
        uow.connection.execute(
            update(_inbox).where(_inbox.c.id.in_(list(ids))).values(attempts=_inbox.c.attempts + 1)
        )


def _items_query() -> Any:
    return select(
        _quarantine.c.id,
        _quarantine.c.inbox_id,
        _quarantine.c.reason,
        _quarantine.c.ack_code,
        _quarantine.c.location,
        _quarantine.c.created_at,
        _quarantine.c.resolved_at,
        _quarantine.c.resolution,
        func.coalesce(_inbox.c.sender, ""),
        func.coalesce(_inbox.c.control_id, ""),
        func.coalesce(_inbox.c.message_type, ""),
        func.coalesce(_inbox.c.state, ""),
    ).select_from(_quarantine.outerjoin(_inbox, _inbox.c.id == _quarantine.c.inbox_id))


def quarantine_items(
    uow: SqlUnitOfWork, *, include_resolved: bool = False, limit: int = 1000
) -> list[QuarantineItem]:
    """Quarantine items, oldest first; open ones only unless `include_resolved`."""
    query = _items_query().order_by(_quarantine.c.id).limit(limit)
    if not include_resolved:
        query = query.where(_quarantine.c.resolved_at.is_(None))
    return [QuarantineItem(*row) for row in uow.connection.execute(query)]


def quarantine_item(uow: SqlUnitOfWork, item_id: int) -> QuarantineItem | None:
    """One quarantine item with its raw message, or None."""
    row = uow.connection.execute(
        _items_query().add_columns(_inbox.c.raw).where(_quarantine.c.id == item_id)
    ).one_or_none()
    if row is None:
        return None
    return replace(QuarantineItem(*row[:-1]), raw=row[-1] or "")


def retry(uow: SqlUnitOfWork, item_id: int, at: datetime, actor: str) -> QuarantineItem:
    """Send a quarantined message back to the processor: the item is resolved ("retried"), the
    message returns to the inbox queue with its attempts reset, and the audit trail says who.

    Raises LookupError when there is no such open item or it has no stored message."""
    item = quarantine_item(uow, item_id)
    if item is None or item.resolved_at is not None:
        raise LookupError(f"quarantine item {item_id} does not exist or is already resolved")
    if item.inbox_id is None:
        raise LookupError(f"quarantine item {item_id} has no stored message to retry")
    uow.connection.execute(
        update(_quarantine)
        .where(_quarantine.c.id == item_id)
        .values(resolved_at=at, resolution=f"retried by {actor}")
    )
    uow.connection.execute(
        update(_inbox)
        .where(_inbox.c.id == item.inbox_id)
        .values(state="received", attempts=0, detail=f"retry of quarantine item {item_id}")
    )
    uow.audit(at, actor, "quarantine.retried", str(item_id), {"inbox_id": item.inbox_id})
    return item
