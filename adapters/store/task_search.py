"""Task search for the FHIR Task API: filters, visibility and keyset paging, all in SQL.

The API (`adapters.fhir.task_api`) turns FHIR search parameters into `Clause`s; this module
turns them, with what the caller may see (`Viewer`), into one query over `tasks`, so that a
page is never short of Tasks a caller may see nor holds one they may not (visibility is
decided before paging, not after). Paging is by keyset (the sort key and the identifier of
the last row), carried in an opaque `Cursor`: a Task changed while someone pages moves
neither a duplicate nor a gap into the default (creation-time) order.

    Term         column op value          one comparison ("status", "eq", "accepted")
    Alternative  Term AND Term ...        e.g. owner system and owner id
    Clause       Alternative OR ...       one search parameter (comma = OR); () matches none
    search       Clause AND Clause ...    repeated parameters AND

Visibility is `adapters.service.auth.can_see_task`, in SQL: safeguarding Tasks only for
their owner, the safeguarding role and admins; every other Task for any reader. Shadow
Tasks (recorded by shadow rules, never delivered) are listed only when asked for, and only
to those who may see shadow work (governance, admin).
"""

from __future__ import annotations

import base64
import binascii
import json
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    ColumnElement,
    Select,
    Text,
    and_,
    false,
    func,
    literal,
    or_,
    select,
    true,
    tuple_,
)

from adapters.store import schema
from engine.ports import StoredTask

if TYPE_CHECKING:
    from adapters.store.sql import SqlUnitOfWork

__all__ = [
    "SORTS",
    "Clause",
    "Cursor",
    "CursorError",
    "TaskPage",
    "TaskRecord",
    "Term",
    "Viewer",
    "search_tasks",
    "visibility",
    "visible_task",
]

_tasks = schema.tasks

# Columns a Term may compare (the search columns of `tasks`).
_SEARCHABLE = frozenset(
    {
        "identifier",
        "owner",
        "owner_system",
        "patient_system",
        "patient_value",
        "status",
        "priority",
        "rule_id",
        "updated_at",
        "shadow",
        "safeguarding",
    }
)
_OPS = {
    "eq": operator.eq,
    "ge": operator.ge,
    "gt": operator.gt,
    "le": operator.le,
    "lt": operator.lt,
}

# Sort orders: name -> column (ties broken by identifier). "created": when the Task was
# raised (never changes: stable pages); "updated": when it last changed.
SORTS = {"created": "created_at", "updated": "updated_at"}

Term = tuple[str, str, Any]
"""(column, op, value): op is eq, ge, gt, le or lt."""
Alternative = tuple[Term, ...]
Clause = tuple[Alternative, ...]


@dataclass(frozen=True, slots=True)
class Viewer:
    """Who is searching, as the store needs it. `all_safeguarding`: may read every
    safeguarding Task (safeguarding role, admin); `practitioner`: the owner id the caller acts
    as (their own safeguarding Tasks); `shadow`: may see shadow Tasks (governance, admin)."""

    all_safeguarding: bool = False
    practitioner: str = ""
    shadow: bool = False


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """A stored Task with the times the API serves (meta.lastUpdated, Last-Modified)."""

    task: StoredTask
    created_at: datetime
    updated_at: datetime


class CursorError(ValueError):
    """A paging cursor that is not one of ours, or belongs to another sort order."""


@dataclass(frozen=True, slots=True)
class Cursor:
    """A position between two rows of one sort order: after (or before) the row whose sort
    key is `key` and identifier `identifier`. Opaque to clients (`encode` / `decode`)."""

    sort: str
    descending: bool
    key: datetime
    identifier: str
    before: bool = False

    def encode(self) -> str:
        """The cursor as a URL-safe token."""
        data = [
            self.sort,
            int(self.descending),
            self.key.isoformat(),
            self.identifier,
            int(self.before),
        ]
        text = json.dumps(data, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(text).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str) -> Cursor:
        """Read a token made by `encode`; CursorError when it is not one."""
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            sort, descending, key, identifier, before = json.loads(raw)
            at = datetime.fromisoformat(key)
            if at.tzinfo is None:
                raise ValueError("naive")
            at = at.astimezone(UTC)
        except (binascii.Error, ValueError, TypeError, OverflowError) as exc:
            raise CursorError("the paging cursor is not valid") from exc
        if not isinstance(sort, str) or sort not in SORTS or not isinstance(identifier, str):
            raise CursorError("the paging cursor is not valid")
        return cls(sort, bool(descending), at, identifier, bool(before))


@dataclass(frozen=True, slots=True)
class TaskPage:
    """One page of a search: its Tasks in sort order, how many match in all, and the cursors
    of the next and previous pages (None when there is none)."""

    records: tuple[TaskRecord, ...]
    total: int
    next: Cursor | None
    previous: Cursor | None


def _term(term: Term) -> ColumnElement[bool]:
    column_name, op, value = term
    if column_name not in _SEARCHABLE or op not in _OPS:
        raise ValueError(f"cannot search tasks by {column_name} {op}")
    condition: ColumnElement[bool] = _OPS[op](_tasks.c[column_name], value)
    return condition


def _clause(clause: Clause) -> ColumnElement[bool]:
    if not clause:
        return false()
    return or_(*(and_(*(_term(term) for term in alt)) if alt else true() for alt in clause))


def visibility(viewer: Viewer) -> ColumnElement[bool]:
    """What `viewer` may read, as a condition (`can_see_task`, plus: shadow work only for
    those who may see it)."""
    conditions: list[ColumnElement[bool]] = []
    if not viewer.all_safeguarding:
        not_safeguarding = _tasks.c.safeguarding == false()
        conditions.append(
            or_(not_safeguarding, _tasks.c.owner == viewer.practitioner)
            if viewer.practitioner
            else not_safeguarding
        )
    if not viewer.shadow:
        conditions.append(_tasks.c.shadow == false())
    return and_(true(), *conditions)


# What a search reads of each row: the StoredTask's fields, then the two times.
_READ = (
    "identifier",
    "patient_key",
    "rule_id",
    "rule_version",
    "status",
    "priority",
    "owner",
    "resource",
    "version",
    "shadow",
    "created_at",
    "updated_at",
)


def _columns() -> list[Any]:
    return [_tasks.c[name] for name in _READ]


def _record(row: Sequence[Any]) -> TaskRecord:
    values = dict(zip(_READ, row, strict=True))
    created_at, updated_at = values.pop("created_at"), values.pop("updated_at")
    values["shadow"] = bool(values["shadow"])
    return TaskRecord(StoredTask(**values), created_at, updated_at)


def visible_task(uow: SqlUnitOfWork, viewer: Viewer, identifier: str) -> TaskRecord | None:
    """One Task if it exists and `viewer` may read it; None otherwise (the caller cannot
    tell the two apart)."""
    row = uow.connection.execute(
        select(*_columns()).where(_tasks.c.identifier == identifier, visibility(viewer))
    ).first()
    return None if row is None else _record(row)


def search_tasks(
    uow: SqlUnitOfWork,
    viewer: Viewer,
    clauses: Sequence[Clause],
    *,
    sort: str = "created",
    descending: bool = False,
    count: int = 50,
    cursor: Cursor | None = None,
    with_total: bool = True,
) -> TaskPage:
    """The page of Tasks matching every clause that `viewer` may see, in `sort` order
    (ties by identifier), starting after (or ending before) `cursor`; at most `count`.

    Raises CursorError when `cursor` belongs to another sort order, ValueError for a
    clause naming a column that cannot be searched."""
    if sort not in SORTS:
        raise ValueError(f"unknown sort {sort!r}")
    if cursor is not None and (cursor.sort, cursor.descending) != (sort, descending):
        raise CursorError("the paging cursor belongs to another sort order (_sort)")
    where = [visibility(viewer), *(_clause(clause) for clause in clauses)]
    total = -1
    if with_total:
        total = int(
            uow.connection.execute(
                select(func.count()).select_from(_tasks).where(*where)
            ).scalar_one()
        )
    if count <= 0:
        return TaskPage((), total, None, None)
    key = _tasks.c[SORTS[sort]]
    position = tuple_(key, _tasks.c.identifier)
    backwards = cursor is not None and cursor.before
    # Reading backwards (a "previous" page) walks the order in reverse, then flips the rows.
    reverse = descending != backwards
    query: Select[Any] = select(*_columns()).where(*where)
    if cursor is not None:
        # Bound with the columns' types: UTC times are stored as text on SQLite.
        mark = tuple_(literal(cursor.key, key.type), literal(cursor.identifier, Text()))
        query = query.where(position < mark if reverse else position > mark)
    order = (key.desc(), _tasks.c.identifier.desc()) if reverse else (key, _tasks.c.identifier)
    rows = uow.connection.execute(query.order_by(*order).limit(count + 1)).all()
    more = len(rows) > count
    records = [_record(row) for row in rows[:count]]
    if backwards:
        records.reverse()
    if not records:
        return TaskPage((), total, None, None)

    def at(record: TaskRecord, before: bool) -> Cursor:
        value = record.created_at if sort == "created" else record.updated_at
        return Cursor(sort, descending, value, record.task.identifier, before)

    # Forwards: a next page when more rows followed; a previous one when we came from one.
    # Backwards: the reverse.
    has_next = more if not backwards else True
    has_previous = (cursor is not None) if not backwards else more
    return TaskPage(
        tuple(records),
        total,
        at(records[-1], False) if has_next else None,
        at(records[0], True) if has_previous else None,
    )
