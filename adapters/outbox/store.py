"""The outbox's queries: delivery rows per destination, on a `SqlUnitOfWork`'s connection.

`put_task` writes one `outbox` row per non-shadow Task change, in the transaction that makes the
change. Here each configured destination gets one `outbox_delivery` row per outbox row
(`enqueue`), which stays `pending`, retried with backoff, until it is `delivered`: nothing is
ever dropped. `due` hands out only the oldest pending change of each Task, so one Task's
versions reach a destination in the order they were made.

Every function runs inside the caller's unit of work and commits nothing itself: the dispatcher
keeps each transaction short and never holds one open across an HTTP call.

Only one dispatcher may work on a database at a time (run it where the processor's lease is
held): two would each hand out the same pending change, and a late answer to one could land
after the next version was delivered by the other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from sqlalchemy import Integer, case, exists, func, literal, select, update
from sqlalchemy.dialects import postgresql, sqlite

from adapters.store import SqlUnitOfWork
from adapters.store.schema import outbox, outbox_delivery, task_history

__all__ = [
    "DEFAULT_LOOKBACK",
    "ERROR_LIMIT",
    "Delivery",
    "DestinationStatus",
    "delivered",
    "destinations",
    "due",
    "enqueue",
    "failed",
    "failing",
    "status",
]

PENDING: Final = "pending"
DELIVERED: Final = "delivered"

# `last_error` keeps this many characters: enough for a status line and the server's reason.
ERROR_LIMIT: Final = 500

# How far below a destination's newest queued outbox id `enqueue` looks again for rows it has
# not queued. PostgreSQL hands out ids when a row is inserted but shows the row only when its
# transaction commits, so a long transaction can expose a smaller id after larger ones were
# queued; "newer than the newest queued" alone would skip it for ever.
DEFAULT_LOOKBACK: Final = 10_000


@dataclass(frozen=True, slots=True)
class Delivery:
    """One Task change on its way to one destination.

    `resource` is the Task JSON of that version (its `task_history` row), not the Task's
    current state: a destination receives every version, in order. `attempts` counts the tries
    made before this one."""

    outbox_id: int
    destination: str
    task_identifier: str
    task_version: int
    attempts: int
    resource: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class DestinationStatus:
    """How one destination is keeping up, for the status page and alerts.

    `pending`: changes not yet delivered; `failing`: those among them tried at least once;
    `oldest_pending_at`: when the oldest undelivered change was made (None when none waits);
    `last_error`: the most recent failure among the pending ones ("" when none is failing);
    `not_yet_queued`: changes with no delivery row for this destination yet (the dispatcher
    queues them on its next round; a number that stays up means it is not running)."""

    destination: str
    pending: int
    delivered: int
    failing: int
    oldest_pending_at: datetime | None
    last_error: str
    not_yet_queued: int


def enqueue(
    uow: SqlUnitOfWork,
    destination: str,
    now: datetime,
    *,
    lookback: int | None = DEFAULT_LOOKBACK,
) -> int:
    """Queue a pending delivery to `destination` for every Task change it has not got yet;
    returns how many were queued. Calling it again queues nothing new.

    One `INSERT ... SELECT` of the outbox rows newer than `lookback` ids below the newest this
    destination already has, that have no delivery row for it (the first time: all of them).
    `lookback=None` checks the whole outbox: the dispatcher does that when it starts and now and
    then, so that even a change committed very late is never left behind.
    """
    d = outbox_delivery
    already = exists().where(d.c.outbox_id == outbox.c.id, d.c.destination == destination)
    conditions = [~already]
    if lookback is not None:
        newest = (
            select(func.coalesce(func.max(d.c.outbox_id), 0))
            .where(d.c.destination == destination)
            .scalar_subquery()
        )
        conditions.append(outbox.c.id > newest - literal(lookback, Integer()))
    rows = select(
        outbox.c.id,
        literal(destination),
        literal(PENDING),
        literal(0, Integer()),
        literal(now, d.c.next_attempt_at.type),
        literal(""),
        literal(now, d.c.updated_at.type),
    ).where(*conditions)
    columns = [
        "outbox_id",
        "destination",
        "state",
        "attempts",
        "next_attempt_at",
        "last_error",
        "updated_at",
    ]
    connection = uow.connection
    # ON CONFLICT DO NOTHING: a second dispatcher racing this one must not fail the transaction
    # (the WHERE above keeps SQLite's parser from reading ON CONFLICT as a join constraint).
    insert: Any = postgresql.insert if connection.dialect.name == "postgresql" else sqlite.insert
    statement = insert(d).from_select(columns, rows).on_conflict_do_nothing()
    # SQLAlchemy reads an INSERT's row count from the driver only when asked to.
    result = connection.execute(statement.execution_options(preserve_rowcount=True))
    queued: int = result.rowcount
    return queued


def due(uow: SqlUnitOfWork, destination: str, now: datetime, limit: int = 100) -> list[Delivery]:
    """Pending deliveries to `destination` whose next attempt is due at `now`, oldest change
    first, at most `limit`.

    A change is held back while an earlier change of the same Task is still pending for this
    destination, so at most one change per Task is returned and versions arrive in order. Reads
    only: call `delivered` or `failed` with each outcome.
    """
    d, o, h = outbox_delivery, outbox, task_history
    earlier_d = outbox_delivery.alias("earlier_delivery")
    earlier_o = outbox.alias("earlier_change")
    earlier_pending = exists().where(
        earlier_d.c.destination == destination,
        earlier_d.c.state == PENDING,
        earlier_d.c.outbox_id < d.c.outbox_id,
        earlier_o.c.id == earlier_d.c.outbox_id,
        earlier_o.c.task_identifier == o.c.task_identifier,
    )
    query = (
        select(d.c.outbox_id, o.c.task_identifier, o.c.task_version, d.c.attempts, h.c.resource)
        .select_from(
            d.join(o, o.c.id == d.c.outbox_id).join(
                h, (h.c.identifier == o.c.task_identifier) & (h.c.version == o.c.task_version)
            )
        )
        .where(
            d.c.destination == destination,
            d.c.state == PENDING,
            d.c.next_attempt_at <= now,
            ~earlier_pending,
        )
        .order_by(d.c.outbox_id)
        .limit(limit)
    )
    return [
        Delivery(
            outbox_id=outbox_id,
            destination=destination,
            task_identifier=identifier,
            task_version=version,
            attempts=attempts,
            resource=resource,
        )
        for outbox_id, identifier, version, attempts, resource in uow.connection.execute(query)
    ]


def _this_pending(delivery: Delivery) -> Any:
    d = outbox_delivery
    return (
        (d.c.outbox_id == delivery.outbox_id)
        & (d.c.destination == delivery.destination)
        & (d.c.state == PENDING)
    )


def delivered(uow: SqlUnitOfWork, delivery: Delivery, at: datetime) -> None:
    """Record that the destination accepted this change. A delivery already recorded as
    delivered is left as it was."""
    d = outbox_delivery
    uow.connection.execute(
        update(d)
        .where(_this_pending(delivery))
        .values(state=DELIVERED, attempts=d.c.attempts + 1, delivered_at=at, updated_at=at)
    )


def failed(
    uow: SqlUnitOfWork, delivery: Delivery, at: datetime, error: str, next_attempt_at: datetime
) -> None:
    """Record a failed attempt: one more attempt, the error (its first `ERROR_LIMIT`
    characters) and when to try again. The delivery stays pending: it is never dropped.

    `error` is stored in the database, which is the record; it may quote the server's answer.
    """
    d = outbox_delivery
    uow.connection.execute(
        update(d)
        .where(_this_pending(delivery))
        .values(
            attempts=d.c.attempts + 1,
            last_error=error[:ERROR_LIMIT],
            next_attempt_at=next_attempt_at,
            updated_at=at,
        )
    )


def failing(uow: SqlUnitOfWork, destinations: Sequence[str], min_attempts: int) -> dict[str, int]:
    """Per destination, how many pending deliveries have been tried `min_attempts` times or
    more (every destination named is in the answer, with 0 when none)."""
    d = outbox_delivery
    query = (
        select(d.c.destination, func.count())
        .where(
            d.c.destination.in_(list(destinations)),
            d.c.state == PENDING,
            d.c.attempts >= min_attempts,
        )
        .group_by(d.c.destination)
    )
    counts = dict.fromkeys(destinations, 0)
    for destination, count in uow.connection.execute(query):
        counts[destination] = count
    return counts


def destinations(uow: SqlUnitOfWork) -> list[str]:
    """The names of every destination that has delivery rows, sorted: the ones configured now
    or at some time before (for tools that do not read the service's settings)."""
    d = outbox_delivery
    query = select(d.c.destination).distinct().order_by(d.c.destination)
    return list(uow.connection.execute(query).scalars())


def status(
    uow: SqlUnitOfWork, destinations: Sequence[str], now: datetime
) -> list[DestinationStatus]:
    """How each destination is keeping up, in the order given.

    `now` is the time the report is made at; the numbers are the database's at that moment
    (nothing in them is computed relative to it yet). A few aggregate queries per destination:
    for a status page or a metrics scrape, not for a hot loop."""
    d, o = outbox_delivery, outbox
    connection = uow.connection
    pending = d.c.state == PENDING
    report = []
    for destination in destinations:
        counts = connection.execute(
            select(
                func.coalesce(func.sum(case((pending, 1), else_=0)), 0),
                func.coalesce(func.sum(case((d.c.state == DELIVERED, 1), else_=0)), 0),
                func.coalesce(func.sum(case((pending & (d.c.attempts >= 1), 1), else_=0)), 0),
            ).where(d.c.destination == destination)
        ).one()
        oldest = connection.execute(
            select(func.min(o.c.created_at))
            .select_from(d.join(o, o.c.id == d.c.outbox_id))
            .where(d.c.destination == destination, pending)
        ).scalar_one()
        last_error = connection.execute(
            select(d.c.last_error)
            .where(d.c.destination == destination, pending, d.c.attempts >= 1)
            .order_by(d.c.updated_at.desc(), d.c.outbox_id.desc())
            .limit(1)
        ).scalar_one_or_none()
        not_queued = connection.execute(
            select(func.count())
            .select_from(o)
            .where(~exists().where(d.c.outbox_id == o.c.id, d.c.destination == destination))
        ).scalar_one()
        report.append(
            DestinationStatus(
                destination=destination,
                pending=int(counts[0]),
                delivered=int(counts[1]),
                failing=int(counts[2]),
                oldest_pending_at=oldest,
                last_error=last_error or "",
                not_yet_queued=int(not_queued),
            )
        )
    return report
