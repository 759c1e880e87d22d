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

Cost (measured in bench/bench_fhir.py, 10,000 Tasks): the page itself reads an index in sort
order and the rows of the page; the total is a count over the search indexes, so it is taken
only when needed: not when the first page already holds every match, and not again on the
following pages (the cursor carries the total of the first page; `with_total` recounts).
`search_task_json` serves the page as JSON text: each stored Task's text is handed over
without being decoded and encoded again (the database drops resourceType, id and meta from
it, which the API writes itself), so a page of 50 Tasks costs no JSON work per Task beyond
its small meta element.
"""

from __future__ import annotations

import base64
import binascii
import json
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from sqlalchemy import (
    ColumnElement,
    Select,
    Text,
    and_,
    cast,
    false,
    func,
    literal,
    literal_column,
    or_,
    select,
    true,
    tuple_,
    type_coerce,
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
    "TaskJson",
    "TaskPage",
    "TaskRecord",
    "Term",
    "Viewer",
    "search_task_json",
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

    @property
    def identifier(self) -> str:
        """The Task's identifier."""
        return self.task.identifier


@dataclass(frozen=True, slots=True)
class TaskJson:
    """A stored Task as JSON text, to be served without decoding it. `resource_id`: the
    resource's id element (None when it has none); `meta`: its meta element, decoded (small);
    `rest`: the JSON text of an object holding every other element of the resource (not
    resourceType, id or meta), as the database writes it."""

    identifier: str
    version: int
    created_at: datetime
    updated_at: datetime
    resource_id: str | None
    meta: Mapping[str, Any]
    rest: str


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
    total: int = -1  # the search's total when the first page was served (-1: not known)

    def encode(self) -> str:
        """The cursor as a URL-safe token."""
        data = [
            self.sort,
            int(self.descending),
            self.key.isoformat(),
            self.identifier,
            int(self.before),
            self.total,
        ]
        text = json.dumps(data, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(text).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str) -> Cursor:
        """Read a token made by `encode`; CursorError when it is not one."""
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            sort, descending, key, identifier, before, *rest = json.loads(raw)
            total = rest[0] if rest else -1  # cursors made before the total was carried
            if len(rest) > 1 or not isinstance(total, int) or isinstance(total, bool):
                raise ValueError("not a cursor")
            at = datetime.fromisoformat(key)
            if at.tzinfo is None:
                raise ValueError("naive")
            at = at.astimezone(UTC)
        except (binascii.Error, ValueError, TypeError, OverflowError) as exc:
            raise CursorError("the paging cursor is not valid") from exc
        if not isinstance(sort, str) or sort not in SORTS or not isinstance(identifier, str):
            raise CursorError("the paging cursor is not valid")
        return cls(sort, bool(descending), at, identifier, bool(before), max(-1, total))


R = TypeVar("R", TaskRecord, TaskJson)


@dataclass(frozen=True, slots=True)
class TaskPage(Generic[R]):
    """One page of a search: its Tasks in sort order, how many match in all (-1: not
    counted), and the cursors of the next and previous pages (None when there is none)."""

    records: tuple[R, ...]
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


def _json_columns(dialect: str) -> list[Any]:
    """The columns of a `TaskJson`, the JSON work done by the database: the resource's id,
    its meta element (text) and the text of the rest of it."""
    resource = _tasks.c.resource
    rest: Any
    meta: Any
    resource_id: Any
    if dialect == "postgresql":  # JSONB: its operators; ::text is valid JSON text
        dropped: Any = literal_column("ARRAY['resourceType', 'id', 'meta']::text[]")
        rest = cast(resource.op("-")(dropped), Text())
        meta = cast(resource.op("->")(literal_column("'meta'::text")), Text())
        resource_id = type_coerce(resource.op("->>")(literal_column("'id'::text")), Text())
    else:  # SQLite: the stored text, read by its JSON functions (minified on the way out)
        rest = type_coerce(func.json_remove(resource, "$.resourceType", "$.id", "$.meta"), Text())
        meta = type_coerce(func.json_extract(resource, "$.meta"), Text())
        resource_id = type_coerce(func.json_extract(resource, "$.id"), Text())
    return [
        _tasks.c.identifier,
        _tasks.c.version,
        _tasks.c.created_at,
        _tasks.c.updated_at,
        resource_id,
        meta,
        rest,
    ]


def _task_json(row: Sequence[Any]) -> TaskJson:
    identifier, version, created_at, updated_at, resource_id, meta, rest = row
    try:
        decoded = json.loads(meta) if meta else {}
    except ValueError:  # not an object (never so for a Task the engine wrote)
        decoded = {}
    return TaskJson(
        identifier,
        int(version),
        created_at,
        updated_at,
        resource_id,
        decoded if isinstance(decoded, dict) else {},
        rest or "{}",
    )


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
) -> TaskPage[TaskRecord]:
    """The page of Tasks matching every clause that `viewer` may see, in `sort` order
    (ties by identifier), starting after (or ending before) `cursor`; at most `count`.

    The total: -1 without `with_total`; else counted, unless the first page holds every
    match (its length is the total) or `cursor` carries the first page's total (pass
    `with_total` with a cursor made without one, or drop its total, to count again).

    Raises CursorError when `cursor` belongs to another sort order, ValueError for a
    clause naming a column that cannot be searched."""
    return _search(
        uow, viewer, clauses, _columns(), _record, sort, descending, count, cursor, with_total
    )


def search_task_json(
    uow: SqlUnitOfWork,
    viewer: Viewer,
    clauses: Sequence[Clause],
    *,
    sort: str = "created",
    descending: bool = False,
    count: int = 50,
    cursor: Cursor | None = None,
    with_total: bool = True,
) -> TaskPage[TaskJson]:
    """`search_tasks`, each Task as JSON text (`TaskJson`): for serving a page without
    decoding and encoding every Task again."""
    columns = _json_columns(uow.connection.dialect.name)
    return _search(
        uow, viewer, clauses, columns, _task_json, sort, descending, count, cursor, with_total
    )


def _search(
    uow: SqlUnitOfWork,
    viewer: Viewer,
    clauses: Sequence[Clause],
    columns: Sequence[Any],
    read: Callable[[Sequence[Any]], R],
    sort: str,
    descending: bool,
    count: int,
    cursor: Cursor | None,
    with_total: bool,
) -> TaskPage[R]:
    if sort not in SORTS:
        raise ValueError(f"unknown sort {sort!r}")
    if cursor is not None and (cursor.sort, cursor.descending) != (sort, descending):
        raise CursorError("the paging cursor belongs to another sort order (_sort)")
    where = [visibility(viewer), *(_clause(clause) for clause in clauses)]

    def counted() -> int:
        if not with_total:
            return -1
        if cursor is not None and cursor.total >= 0:
            return cursor.total
        statement = select(func.count()).select_from(_tasks).where(*where)
        return int(uow.connection.execute(statement).scalar_one())

    if count <= 0:
        return TaskPage((), counted(), None, None)
    key = _tasks.c[SORTS[sort]]
    position = tuple_(key, _tasks.c.identifier)
    backwards = cursor is not None and cursor.before
    # Reading backwards (a "previous" page) walks the order in reverse, then flips the rows.
    reverse = descending != backwards
    query: Select[Any] = select(*columns).where(*where)
    if cursor is not None:
        # Bound with the columns' types: UTC times are stored as text on SQLite.
        mark = tuple_(literal(cursor.key, key.type), literal(cursor.identifier, Text()))
        query = query.where(position < mark if reverse else position > mark)
    order = (key.desc(), _tasks.c.identifier.desc()) if reverse else (key, _tasks.c.identifier)
    rows = uow.connection.execute(query.order_by(*order).limit(count + 1)).all()
    more = len(rows) > count
    records = [read(row) for row in rows[:count]]
    if backwards:
        records.reverse()
    # A first page that holds every match needs no count: its length is the total.
    total = len(records) if with_total and cursor is None and not more else counted()
    if not records:
        return TaskPage((), total, None, None)

    def at(record: R, before: bool) -> Cursor:
        value = record.created_at if sort == "created" else record.updated_at
        return Cursor(sort, descending, value, record.identifier, before, total)

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
