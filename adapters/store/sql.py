"""`SqlStore`: the engine's `Store` port on SQLAlchemy 2 Core, for SQLite and PostgreSQL.

One `SqlUnitOfWork` is one connection in one transaction. Statements are built once per store
(SQLAlchemy then caches their compiled form; the ON CONFLICT upserts, which it cannot cache, are
compiled once by `_Prepared`), rows are read positionally and nothing is reflected at run time,
because replay calls these methods several times per message at thousands of messages a second.

SQLite runs in WAL mode with `synchronous=FULL`; every writing unit of work starts with
`BEGIN IMMEDIATE`, so concurrent writers queue on the busy timeout instead of failing half-way
with "database is locked" when a read lock cannot be upgraded.

Database errors (SQLAlchemy's `DBAPIError` tree) are not translated: to the caller they all mean
"nothing was committed, do not acknowledge", which is what an exception out of `begin()` says.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    Connection,
    Engine,
    Executable,
    Integer,
    Select,
    Table,
    bindparam,
    create_engine,
    delete,
    event,
    exists,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Dialect, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.pool import ConnectionPoolEntry, StaticPool
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import BindParameter

from adapters.store import schema
from engine.ports import (
    Clock,
    DueTimer,
    Fact,
    InboundMessage,
    InboxEntry,
    StoredTask,
)

__all__ = ["SqlStore", "SqlUnitOfWork", "open_store", "prepare", "task_search_columns"]

MIGRATIONS = Path(__file__).with_name("migrations")

# How long a SQLite writer waits for another writer's transaction before giving up.
DEFAULT_BUSY_TIMEOUT_MS = 30_000

# Arbitrary constant naming the PostgreSQL advisory lock that serialises concurrent migrations
# (two service processes starting together must not both try to create the tables).
_MIGRATION_LOCK_ID = 0x5AFE7E7

# Execution option marking a connection whose transaction must not write.
_READ_ONLY = "safetynet_read_only"

# The alias token under which a merged-away patient key stays findable.
MERGED_KEY_PREFIX = "patient-key|"

_INBOX_COLUMNS = (
    "sender",
    "control_id",
    "content_hash",
    "received_at",
    "protocol",
    "message_type",
    "origin",
    "raw",
    "state",
    "detail",
    "processed_at",
)

_TASK_COLUMNS = (
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
)


# Columns of `tasks` only the Task API searches by, read from the resource by `put_task`.
_TASK_SEARCH_COLUMNS = ("safeguarding", "owner_system", "patient_system", "patient_value")


def task_search_columns(resource: Mapping[str, Any]) -> dict[str, Any]:
    """The search columns of a Task resource (adapters.store.task_search queries them):
    `safeguarding` as `adapters.service.auth.can_see_task` reads it (a meta.tag with code
    "safeguarding"), the owner's identifier system and Task.for's identifier."""
    meta = resource.get("meta")
    tags = meta.get("tag", []) if isinstance(meta, Mapping) else []
    owner = (resource.get("owner") or {}).get("identifier") or {}
    patient = (resource.get("for") or {}).get("identifier") or {}
    return {
        "safeguarding": any(
            isinstance(tag, Mapping) and tag.get("code") == "safeguarding" for tag in tags
        ),
        "owner_system": str(owner.get("system") or ""),
        "patient_system": str(patient.get("system") or ""),
        "patient_value": str(patient.get("value") or ""),
    }


# Identifier look-ups bind this many tokens per statement (a PID-3 rarely holds more).
IN_SLOTS = 4


def _wall_clock() -> datetime:
    return datetime.now(UTC)


def _upsert(dialect: str, table: Table) -> sqlite.Insert | postgresql.Insert:
    """The dialect's INSERT that knows ON CONFLICT; the one place that picks by backend."""
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise ValueError(f"unsupported database dialect {dialect!r}")


class _Prepared:
    """A statement compiled once for one dialect and run on the driver's own cursor.

    SQLAlchemy 2.0 cannot cache its dialect-specific ON CONFLICT constructs (their
    `inherit_cache` is False), so executing one directly compiles it again on every call
    (measured here: put_facts + facts + put_task went from 1.9k to 5.8k patients/s on SQLite
    once compiled once); and even a cached statement costs several times the driver's own
    execution in SQLAlchemy's execute path (replay runs ~7 statements per message). Here only
    the bound values' and result columns' type processing (JSON, UTC times, booleans) runs per
    call. `keys` are the parameters every call supplies.
    """

    __slots__ = ("_defaults", "_order", "_processors", "_results", "sql")

    def __init__(self, statement: Any, dialect: Dialect, keys: Sequence[str]) -> None:
        compiled = statement.compile(dialect=dialect, column_keys=list(keys))
        if not isinstance(compiled, SQLCompiler):
            raise TypeError(f"cannot prepare {statement!r}")
        self.sql = compiled.string
        # Literal values inside the statement (the 1 in `version + 1`) are bound parameters too.
        self._defaults: dict[str, Any] = {}
        self._processors: list[tuple[str, Callable[[Any], Any]]] = []
        for bind, name in compiled.bind_names.items():
            if name not in keys:
                if bind.required:
                    raise ValueError(f"statement needs parameter {name!r} not in {keys}")
                self._defaults[name] = bind.effective_value
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if process is not None:
                self._processors.append((name, process))
        self._order = tuple(compiled.positiontup or ()) if compiled.positional else None
        columns = getattr(statement, "selected_columns", None)
        if columns is None:
            columns = getattr(statement, "_returning", ()) or ()
        self._results: tuple[Callable[[Any], Any] | None, ...] = tuple(
            column.type._cached_result_processor(dialect, None) for column in columns
        )

    def rows(self, cursor: Any) -> list[tuple[Any, ...]]:
        """Every row of an executed cursor, with result types processed."""
        processors = self._results
        if not any(processors):
            return [tuple(row) for row in cursor.fetchall()]
        return [
            tuple(
                value if p is None else p(value) for p, value in zip(processors, row, strict=True)
            )
            for row in cursor.fetchall()
        ]

    def params(self, values: Mapping[str, Any]) -> dict[str, Any] | tuple[Any, ...]:
        """The driver-level parameters for one execution."""
        row = {**self._defaults, **values}
        for name, process in self._processors:
            row[name] = process(row[name])
        return row if self._order is None else tuple(row[name] for name in self._order)


def prepare(statement: Any, dialect: Dialect, *keys: str) -> _Prepared:
    """`statement` compiled once for `dialect`, for an adapter's own hot-path statement (run
    it with `SqlUnitOfWork.run_prepared`); `keys` are the parameters every call supplies.
    Worth it for ON CONFLICT statements, which SQLAlchemy compiles again on every execution."""
    return _Prepared(statement, dialect, keys)


class _Statements:
    """Every statement a unit of work runs, built once per store for its dialect."""

    def __init__(self, dialect: Dialect) -> None:
        upsert = functools.partial(_upsert, dialect.name)

        def prepare(statement: Any, *keys: str) -> _Prepared:
            return _Prepared(statement, dialect, keys)

        p = bindparam
        inbox, quarantine = schema.inbox, schema.quarantine
        patients, aliases, orders = schema.patients, schema.patient_aliases, schema.order_aliases
        facts, tasks, history = schema.facts, schema.tasks, schema.task_history
        due, audit = schema.due, schema.audit

        # --- inbox and quarantine ---
        self.inbox_same_control_id = prepare(
            select(inbox.c.id, inbox.c.content_hash, inbox.c.state).where(
                inbox.c.sender == p("sender"), inbox.c.control_id == p("control_id")
            ),
            "sender",
            "control_id",
        )
        self.inbox_find = select(inbox.c.id, inbox.c.state).where(
            inbox.c.sender == p("sender"),
            inbox.c.control_id == p("control_id"),
            inbox.c.content_hash == p("content_hash"),
        )
        self.inbox_insert = prepare(
            upsert(inbox)
            .on_conflict_do_nothing(
                index_elements=[inbox.c.sender, inbox.c.control_id, inbox.c.content_hash]
            )
            .returning(inbox.c.id),
            *_INBOX_COLUMNS,
        )
        # PostgreSQL: look for earlier copies and insert in one round trip (the listener's
        # per-message cost is round trips there). `prior` reads the snapshot before the insert.
        self.inbox_add_pg = (
            None
            if dialect.name != "postgresql"
            else "WITH prior AS (SELECT id, content_hash, state FROM inbox"
            " WHERE sender = %(sender)s AND control_id = %(control_id)s),"
            f" ins AS ({self.inbox_insert.sql})"
            " SELECT (SELECT id FROM ins),"
            " (SELECT id FROM prior WHERE content_hash = %(content_hash)s),"
            " (SELECT state FROM prior WHERE content_hash = %(content_hash)s),"
            " (SELECT count(*) FROM prior)"
        )
        self.inbox_set_state = prepare(
            update(inbox)
            .where(inbox.c.id == p("p_id"))
            .values(state=p("p_state"), detail=p("p_detail"), processed_at=p("p_at")),
            "p_id",
            "p_state",
            "p_detail",
            "p_at",
        )
        self.quarantine_insert = insert(quarantine).returning(quarantine.c.id)

        # --- identity ---
        self.patient_ensure = prepare(
            upsert(patients).on_conflict_do_nothing(index_elements=[patients.c.key]),
            "key",
            "created_at",
            "record_incomplete",
        )
        slots: list[BindParameter[str]] = [p(f"t{i}") for i in range(IN_SLOTS)]
        self.patients_for = prepare(
            select(aliases.c.token, aliases.c.patient_key).where(aliases.c.token.in_(slots)),
            *(f"t{i}" for i in range(IN_SLOTS)),
        )
        self.alias_add = prepare(
            upsert(aliases).on_conflict_do_nothing(index_elements=[aliases.c.token]),
            "token",
            "patient_key",
        )
        alias_upsert = upsert(aliases)
        self.alias_repoint = prepare(
            alias_upsert.on_conflict_do_update(
                index_elements=[aliases.c.token],
                set_={"patient_key": alias_upsert.excluded.patient_key},
            ),
            "token",
            "patient_key",
        )
        self.order_for = prepare(
            select(orders.c.token, orders.c.order_key, orders.c.patient_key).where(
                orders.c.token.in_(slots)
            ),
            *(f"t{i}" for i in range(IN_SLOTS)),
        )
        self.order_add = prepare(
            upsert(orders).on_conflict_do_nothing(index_elements=[orders.c.token]),
            "token",
            "order_key",
            "patient_key",
        )

        # --- merge: each moves the prior key's rows, keeping the survivor's on a clash ---
        prior: BindParameter[str] = p("p_prior")
        surviving: BindParameter[str] = p("p_surviving")
        self.merge_aliases = (
            update(aliases).where(aliases.c.patient_key == prior).values(patient_key=surviving)
        )
        self.merge_orders = (
            update(orders).where(orders.c.patient_key == prior).values(patient_key=surviving)
        )
        survivor_fact = facts.alias("survivor_fact")
        self.merge_facts_move = (
            update(facts)
            .where(
                facts.c.patient_key == prior,
                ~exists().where(
                    survivor_fact.c.patient_key == surviving, survivor_fact.c.key == facts.c.key
                ),
            )
            .values(patient_key=surviving)
        )
        self.merge_facts_drop = delete(facts).where(facts.c.patient_key == prior)
        self.merge_tasks = (
            update(tasks)
            .where(
                tasks.c.patient_key == prior,
                tasks.c.status.not_in(sorted(schema.TASK_CLOSED_STATUSES)),
            )
            .values(patient_key=surviving)
        )
        survivor_due = due.alias("survivor_due")
        self.merge_due_move = (
            update(due)
            .where(
                due.c.patient_key == prior,
                due.c.fired_at.is_(None),
                ~exists().where(
                    survivor_due.c.patient_key == surviving,
                    survivor_due.c.due_at == due.c.due_at,
                    survivor_due.c.reason == due.c.reason,
                ),
            )
            .values(patient_key=surviving)
        )
        self.merge_due_drop = delete(due).where(
            due.c.patient_key == prior, due.c.fired_at.is_(None)
        )
        prior_patient = patients.alias("prior_patient")
        self.merge_incomplete = (
            update(patients)
            .where(
                patients.c.key == surviving,
                exists().where(prior_patient.c.key == prior, prior_patient.c.record_incomplete),
            )
            .values(record_incomplete=True)
        )

        # --- facts ---
        self.facts = prepare(
            select(facts.c.key, facts.c.kind, facts.c.data)
            .where(facts.c.patient_key == p("patient_key"))
            .order_by(facts.c.key),
            "patient_key",
        )
        fact_upsert = upsert(facts)
        self.facts_put = prepare(
            fact_upsert.on_conflict_do_update(
                index_elements=[facts.c.patient_key, facts.c.key],
                set_={
                    "kind": fact_upsert.excluded.kind,
                    "data": fact_upsert.excluded.data,
                    "updated_at": fact_upsert.excluded.updated_at,
                },
            ),
            "patient_key",
            "key",
            "kind",
            "data",
            "updated_at",
        )

        # --- tasks ---
        self._tasks_table = tasks
        self.task_get = prepare(
            select(*(tasks.c[name] for name in _TASK_COLUMNS)).where(
                tasks.c.identifier == p("identifier")
            ),
            "identifier",
        )
        task_upsert = upsert(tasks)
        changed = (
            "patient_key",
            "rule_id",
            "rule_version",
            "status",
            "priority",
            "owner",
            "shadow",
            "resource",
            "updated_at",
            *_TASK_SEARCH_COLUMNS,
        )
        # One atomic statement: a concurrent writer of the same Task cannot lose a version.
        self.task_put = prepare(
            task_upsert.on_conflict_do_update(
                index_elements=[tasks.c.identifier],
                set_={name: task_upsert.excluded[name] for name in changed}
                | {"version": tasks.c.version + 1},
            ).returning(tasks.c.version),
            "identifier",
            *changed,
            "version",
            "created_at",
        )
        self.history_add = insert(history)
        self.outbox_add = insert(schema.outbox)
        self.history = (
            select(*(history.c[name] for name in _TASK_COLUMNS))
            .where(history.c.identifier == p("identifier"))
            .order_by(history.c.version)
        )
        self._task_queries: dict[tuple[bool, bool, bool], Select[Any]] = {}
        self._task_queries_lock = threading.Lock()

        # --- timers ---
        self.schedule = prepare(
            upsert(due).on_conflict_do_nothing(
                index_elements=[due.c.patient_key, due.c.due_at, due.c.reason]
            ),
            "patient_key",
            "due_at",
            "reason",
            "fired_at",
        )
        self.due_timers = prepare(
            select(due.c.id, due.c.patient_key, due.c.due_at, due.c.reason)
            .where(due.c.fired_at.is_(None), due.c.due_at <= p("until"))
            .order_by(due.c.due_at, due.c.id)
            .limit(p("limit", type_=Integer())),
            "until",
            "limit",
        )
        self.next_due = prepare(select(func.min(due.c.due_at)).where(due.c.fired_at.is_(None)), *())
        self.mark_fired = prepare(
            update(due).where(due.c.id == p("p_id")).values(fired_at=p("p_at")), "p_id", "p_at"
        )

        # --- audit ---
        self.audit = insert(audit)

    def tasks(self, status: bool, owner: bool, patient_key: bool) -> Select[Any]:
        """The Task search for one combination of filters (eight at most, each built once)."""
        shape = (status, owner, patient_key)
        query = self._task_queries.get(shape)
        if query is None:
            t = self._tasks_table
            conditions = [
                t.c[name] == bindparam(name)
                for name, wanted in zip(("status", "owner", "patient_key"), shape, strict=True)
                if wanted
            ]
            query = (
                select(*(t.c[name] for name in _TASK_COLUMNS))
                .where(*conditions)
                .order_by(t.c.created_at, t.c.identifier)
            )
            with self._task_queries_lock:
                self._task_queries[shape] = query
        return query


def _task(row: Sequence[Any]) -> StoredTask:
    identifier, patient_key, rule_id, rule_version, status, priority, owner, resource = row[:8]
    return StoredTask(
        identifier=identifier,
        patient_key=patient_key,
        rule_id=rule_id,
        rule_version=rule_version,
        status=status,
        priority=priority,
        owner=owner,
        resource=resource,
        version=row[8],
        shadow=bool(row[9]),
    )


class SqlUnitOfWork:
    """The `UnitOfWork` port on one connection inside one open transaction.

    Made by `SqlStore.begin()`; do not keep it past the `with` block, and do not share it
    between threads (a connection is not thread-safe).
    """

    def __init__(
        self, connection: Connection, statements: _Statements, now: Callable[[], datetime]
    ) -> None:
        self._conn = connection
        self._sql = statements
        self._now = now
        self._savepoints = 0
        self._raw: Any = None
        # Read-through caches for this transaction only (an identity map): what this unit of
        # work has read or written itself. Dropped when a savepoint rolls back or patients
        # merge, and with the unit of work; the database stays the record.
        self._facts_cache: dict[str, dict[str, Fact]] = {}
        self._alias_cache: dict[str, str] = {}
        self._order_cache: dict[str, tuple[str, str]] = {}
        self._scheduled: set[tuple[str, datetime, str]] = set()

    def _forget(self) -> None:
        self._facts_cache.clear()
        self._alias_cache.clear()
        self._order_cache.clear()
        self._scheduled.clear()

    @property
    def connection(self) -> Connection:
        """The underlying connection, for adapters that need a query the port lacks."""
        return self._conn

    def _run(self, statement: Executable, params: Any = None) -> Any:
        return self._conn.execute(statement, params)

    @property
    def _cursor(self) -> Any:
        # The driver's cursor on this unit of work's connection, inside its transaction.
        if self._raw is None:
            self._raw = self._conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        return self._raw

    def _execute(self, sql: str, params: Any, many: bool = False) -> Any:
        """Run SQL on the driver's cursor; driver errors become SQLAlchemy's DBAPIError tree,
        as they would through SQLAlchemy itself."""
        cursor = self._cursor
        dbapi = self._conn.dialect.loaded_dbapi
        try:
            if many:
                cursor.executemany(sql, params)
            else:
                cursor.execute(sql, params)
        except dbapi.Error as exc:
            raise DBAPIError.instance(
                sql, params, exc, dbapi.Error, dialect=self._conn.dialect
            ) from exc
        return cursor

    def _query(self, statement: _Prepared, values: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        return statement.rows(self._execute(statement.sql, statement.params(values)))

    def _write(self, statement: _Prepared, values: Mapping[str, Any]) -> Any:
        """Run a prepared statement; the first column of its first row, if it returns rows."""
        cursor = self._execute(statement.sql, statement.params(values))
        if cursor.description is None:
            return None
        rows = statement.rows(cursor)
        return rows[0][0] if rows else None

    def run_prepared(
        self, statement: _Prepared, values: Mapping[str, Any]
    ) -> list[tuple[Any, ...]]:
        """Run a statement made by `prepare` in this unit of work; its rows, result types
        processed (none for a statement that returns none)."""
        cursor = self._execute(statement.sql, statement.params(values))
        return [] if cursor.description is None else statement.rows(cursor)

    def _write_many(self, statement: _Prepared, rows: Sequence[Mapping[str, Any]]) -> None:
        self._execute(statement.sql, [statement.params(row) for row in rows], many=True)

    def _in_slots(self, tokens: Sequence[str]) -> Iterator[dict[str, str]]:
        """Parameters for the fixed-size IN lists, padded by repeating a token."""
        for start in range(0, len(tokens), IN_SLOTS):
            chunk = list(tokens[start : start + IN_SLOTS])
            chunk += [chunk[0]] * (IN_SLOTS - len(chunk))
            yield {f"t{i}": token for i, token in enumerate(chunk)}

    # --- inbox and quarantine ---
    def add_to_inbox(self, message: InboundMessage) -> InboxEntry:
        """Store a raw message, or report the stored copy if the same message came before.

        Same sender, control id and content hash: the existing row, `duplicate=True`, nothing
        written. Same sender and control id with other content: a new row, `control_id_reused`.
        """
        key = {"sender": message.sender, "control_id": message.control_id}
        row = {
            **key,
            "content_hash": message.content_hash,
            "received_at": message.received_at,
            "protocol": message.protocol,
            "message_type": message.message_type,
            "origin": message.origin,
            "raw": message.raw,
            "state": "received",
            "detail": "",
            "processed_at": None,
        }
        if self._sql.inbox_add_pg is not None:
            cursor = self._execute(self._sql.inbox_add_pg, self._sql.inbox_insert.params(row))
            new_id, same_id, same_state, earlier_count = cursor.fetchone()
            if same_id is not None:
                return InboxEntry(id=same_id, duplicate=True, state=same_state)
            if new_id is not None:
                return InboxEntry(id=new_id, control_id_reused=earlier_count > 0)
        else:
            earlier = self._query(self._sql.inbox_same_control_id, key)
            for inbox_id, content_hash, state in earlier:
                if content_hash == message.content_hash:
                    return InboxEntry(id=inbox_id, duplicate=True, state=state)
            new_id = self._write(self._sql.inbox_insert, row)
            if new_id is not None:
                return InboxEntry(id=new_id, control_id_reused=bool(earlier), state="received")
        # Another transaction stored the same message between our look and our insert.
        found = self._run(self._sql.inbox_find, {**key, "content_hash": message.content_hash}).one()
        return InboxEntry(id=found[0], duplicate=True, state=found[1])

    def set_inbox_state(self, inbox_id: int, state: str, detail: str = "") -> None:
        """Record what became of a message; `processed_at` is the store's clock now."""
        self._write(
            self._sql.inbox_set_state,
            {"p_id": inbox_id, "p_state": state, "p_detail": detail, "p_at": self._now()},
        )

    def quarantine(
        self,
        inbox_id: int | None,
        reason: str,
        ack_code: str,
        location: str = "",
        detail: Mapping[str, Any] | None = None,
        at: datetime | None = None,
    ) -> int:
        """Keep a message for human review; returns the quarantine item's id."""
        new_id: int = self._run(
            self._sql.quarantine_insert,
            {
                "inbox_id": inbox_id,
                "reason": reason,
                "ack_code": ack_code,
                "location": location,
                "detail": dict(detail or {}),
                "created_at": at if at is not None else self._now(),
                "resolved_at": None,
                "resolution": None,
            },
        ).scalar_one()
        return new_id

    # --- identity ---
    def patients_for(self, tokens: Sequence[str]) -> dict[str, str]:
        """Map each known identifier token to its current patient key; unknown ones are left
        out."""
        if not tokens:
            return {}
        cache = self._alias_cache
        missing = [t for t in set(tokens) if t not in cache]
        if missing:
            for slots in self._in_slots(missing):
                cache.update((t, k) for t, k in self._query(self._sql.patients_for, slots))
        return {t: cache[t] for t in tokens if t in cache}

    def add_patient_aliases(self, patient_key: str, tokens: Sequence[str]) -> None:
        """Record that these tokens name this patient, creating the patient if new.

        A token already naming a patient keeps pointing where it did: moving it is
        `merge_patients`' job, never a side effect of a message that disagrees.
        """
        self._ensure_patient(patient_key)
        unique = [t for t in dict.fromkeys(tokens) if t not in self._alias_cache]
        if unique:
            self._write_many(
                self._sql.alias_add,
                [{"token": token, "patient_key": patient_key} for token in unique],
            )
            # Read back rather than assume: a token another writer stored first keeps its
            # patient, and this unit of work must see that too.
            self.patients_for(unique)

    def _ensure_patient(self, patient_key: str) -> None:
        self._write(
            self._sql.patient_ensure,
            {"key": patient_key, "created_at": self._now(), "record_incomplete": False},
        )

    def merge_patients(self, prior_key: str, surviving_key: str) -> None:
        """Move the prior patient's aliases, orders, facts, open Tasks and unfired timers to the
        survivor; the prior key becomes the alias token `patient-key|<prior>`.

        On a clash the survivor's fact or timer wins; closed Tasks and fired timers stay where
        they were, as history. A prior "record incomplete" mark carries over (fail closed).
        """
        if prior_key == surviving_key:
            return
        self._forget()
        self._ensure_patient(surviving_key)
        keys = {"p_prior": prior_key, "p_surviving": surviving_key}
        for statement in (
            self._sql.merge_aliases,
            self._sql.merge_orders,
            self._sql.merge_facts_move,
            self._sql.merge_facts_drop,
            self._sql.merge_tasks,
            self._sql.merge_due_move,
            self._sql.merge_due_drop,
            self._sql.merge_incomplete,
        ):
            self._run(statement, keys)
        self._write(
            self._sql.alias_repoint,
            {"token": MERGED_KEY_PREFIX + prior_key, "patient_key": surviving_key},
        )

    def order_for(self, tokens: Sequence[str]) -> tuple[str, str] | None:
        """(order key, patient key) for the first of `tokens` that names a known order."""
        if not tokens:
            return None
        found = self._order_cache
        missing = [t for t in set(tokens) if t not in found]
        if missing:
            for slots in self._in_slots(missing):
                for token, order_key, patient_key in self._query(self._sql.order_for, slots):
                    found[token] = (order_key, patient_key)
        for token in tokens:
            if token in found:
                return found[token]
        return None

    def add_order_aliases(self, order_key: str, patient_key: str, tokens: Sequence[str]) -> None:
        """Record that these placer/filler tokens name this order; known tokens are kept."""
        unique = [t for t in dict.fromkeys(tokens) if t not in self._order_cache]
        if unique:
            self._write_many(
                self._sql.order_add,
                [
                    {"token": token, "order_key": order_key, "patient_key": patient_key}
                    for token in unique
                ],
            )

    # --- facts ---
    def facts(self, patient_key: str) -> list[Fact]:
        """Every current fact of one patient, by key."""
        cached = self._facts_cache.get(patient_key)
        if cached is None:
            rows = self._query(self._sql.facts, {"patient_key": patient_key})
            cached = {key: Fact(key=key, kind=kind, data=data) for key, kind, data in rows}
            self._facts_cache[patient_key] = cached
        return [cached[key] for key in sorted(cached)]

    def put_facts(self, patient_key: str, facts: Sequence[Fact]) -> None:
        """Insert or replace facts by key (the last of several with one key wins)."""
        if not facts:
            return
        now = self._now()
        by_key: dict[str, dict[str, Any]] = {
            fact.key: {
                "patient_key": patient_key,
                "key": fact.key,
                "kind": fact.kind,
                "data": dict(fact.data),
                "updated_at": now,
            }
            for fact in facts
        }
        self._write_many(self._sql.facts_put, list(by_key.values()))
        cached = self._facts_cache.get(patient_key)
        if cached is not None:
            for row in by_key.values():
                cached[row["key"]] = Fact(key=row["key"], kind=row["kind"], data=row["data"])

    # --- tasks ---
    def get_task(self, identifier: str) -> StoredTask | None:
        """The current state of one Task, or None."""
        found = self._query(self._sql.task_get, {"identifier": identifier})
        row = found[0] if found else None
        return None if row is None else _task(row)

    def put_task(self, task: StoredTask, at: datetime, reason: str) -> StoredTask:
        """Insert (version 1) or replace (version + 1) a Task and append that state to its
        history; returns the Task with the version stored. `task.version` is ignored."""
        resource = dict(task.resource)
        columns = {
            "identifier": task.identifier,
            "patient_key": task.patient_key,
            "rule_id": task.rule_id,
            "rule_version": task.rule_version,
            "status": task.status,
            "priority": task.priority,
            "owner": task.owner,
            "shadow": task.shadow,
            "resource": resource,
        }
        version: int = self._write(
            self._sql.task_put,
            {
                **columns,
                **task_search_columns(resource),
                "version": 1,
                "created_at": at,
                "updated_at": at,
            },
        )
        self._run(
            self._sql.history_add,
            {**columns, "version": version, "changed_at": at, "reason": reason},
        )
        if not task.shadow:
            # Delivered by the outbox dispatcher; shadow Tasks are recorded, never delivered.
            self._run(
                self._sql.outbox_add,
                # Queued now (the store's clock), whatever the event time of the change.
                {
                    "task_identifier": task.identifier,
                    "task_version": version,
                    "created_at": self._now(),
                },
            )
        return StoredTask(
            identifier=task.identifier,
            patient_key=task.patient_key,
            rule_id=task.rule_id,
            rule_version=task.rule_version,
            status=task.status,
            priority=task.priority,
            owner=task.owner,
            resource=resource,
            version=version,
            shadow=task.shadow,
        )

    def tasks(
        self,
        status: str | None = None,
        owner: str | None = None,
        patient_key: str | None = None,
    ) -> list[StoredTask]:
        """Current Tasks matching every filter given, oldest (created) first."""
        query = self._sql.tasks(status is not None, owner is not None, patient_key is not None)
        params = {
            name: value
            for name, value in (("status", status), ("owner", owner), ("patient_key", patient_key))
            if value is not None
        }
        return [_task(row) for row in self._run(query, params)]

    def task_history(self, identifier: str) -> list[StoredTask]:
        """Every recorded state of one Task, version 1 first."""
        return [_task(row) for row in self._run(self._sql.history, {"identifier": identifier})]

    # --- timers ---
    def schedule(self, patient_key: str, due_at: datetime, reason: str) -> None:
        """Ask for the patient to be evaluated again at `due_at`; asking twice changes nothing."""
        key = (patient_key, due_at, reason)
        if key in self._scheduled:
            return
        self._write(
            self._sql.schedule,
            {"patient_key": patient_key, "due_at": due_at, "reason": reason, "fired_at": None},
        )
        self._scheduled.add(key)

    def due_timers(self, until: datetime, limit: int = 1000) -> list[DueTimer]:
        """Unfired timers due at or before `until`, earliest first (ties by id), at most
        `limit`."""
        rows = self._query(self._sql.due_timers, {"until": until, "limit": limit})
        return [
            DueTimer(id=timer_id, patient_key=patient_key, due_at=due_at, reason=reason)
            for timer_id, patient_key, due_at, reason in rows
        ]

    def next_due(self) -> datetime | None:
        """When the earliest unfired timer is due, or None when none is waiting."""
        due_at: datetime | None = self._write(self._sql.next_due, {})
        return due_at

    def mark_fired(self, timer_id: int, at: datetime) -> None:
        """Record that a timer has been acted on; it is then never returned as due again."""
        self._write(self._sql.mark_fired, {"p_id": timer_id, "p_at": at})

    # --- audit ---
    def audit(
        self,
        at: datetime,
        actor: str,
        action: str,
        subject: str = "",
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        """Append one entry to the audit trail. Never pass patient data in `detail`."""
        self._run(
            self._sql.audit,
            {
                "at": at,
                "actor": actor,
                "action": action,
                "subject": subject,
                "detail": dict(detail or {}),
            },
        )

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """A nested transaction (SAVEPOINT): an exception inside undoes only the work inside
        it and is re-raised; the outer unit of work carries on if the caller catches it."""
        # Plain SAVEPOINT statements: SQLAlchemy's begin_nested() costs several times more per
        # message on the replay path, and nothing else here nests transactions.
        self._savepoints += 1
        name = f"sp{self._savepoints}"
        self._execute(f"SAVEPOINT {name}", ())
        try:
            yield
        except BaseException:
            self._forget()
            self._execute(f"ROLLBACK TO SAVEPOINT {name}", ())
            self._execute(f"RELEASE SAVEPOINT {name}", ())
            raise
        self._execute(f"RELEASE SAVEPOINT {name}", ())


class _WriteLock:
    """One writing transaction at a time on a SQLite file, across threads and processes.

    SQLite allows one writer; a second one waits in its busy handler, which sleeps between
    polls in growing steps (measured here: 79 ms median and 1.2 s p99 waits behind 2 ms
    holds). Writers that take this lock first (every `SqlStore` on the file) wait for each
    other instead: a thread lock within the process, an exclusive `flock` on a file beside the
    database between processes, polled every millisecond or so. Past the busy timeout the wait
    fails as SQLite's would ("database is locked"). One lock per file per process: stores on
    the same file in one process share it.
    """

    _registry: ClassVar[dict[Path, _WriteLock]] = {}
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, path: Path) -> None:
        self._path = path
        self._threads = threading.Lock()
        self._fd: int | None = None
        self._pid = 0
        self._users = 0

    @classmethod
    def open(cls, path: Path) -> _WriteLock:
        """The process's lock for this file (shared by every store on it)."""
        with cls._registry_lock:
            lock = cls._registry.get(path)
            if lock is None or lock._pid not in (0, os.getpid()):
                lock = cls._registry[path] = _WriteLock(path)
            lock._users += 1
            return lock

    def release(self) -> None:
        """One store fewer uses it; the file is closed with the last."""
        with self._registry_lock:
            self._users -= 1
            if self._users > 0:
                return
            self._registry.pop(self._path, None)
            if self._fd is not None and self._pid == os.getpid():
                os.close(self._fd)
            self._fd = None

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # a forked child opens its own
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
            self._pid = os.getpid()
        return self._fd

    @contextmanager
    def held(self, timeout: float) -> Iterator[None]:
        """Hold the lock for the duration of the block; raises DBAPIError ("database is
        locked") when it is not free within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        if not self._threads.acquire(timeout=timeout):
            raise _locked()
        try:
            fd = self._file()
            pause = 0.0002
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise _locked() from None
                    time.sleep(pause)
                    pause = min(pause * 2, 0.002)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            self._threads.release()


def _locked() -> DBAPIError:
    error = sqlite3.OperationalError("database is locked (another writer held it too long)")
    return OperationalError("BEGIN IMMEDIATE", None, error)


class SqlStore:
    """The `Store` port on a SQLAlchemy engine. Make it with `open_store`, which migrates."""

    def __init__(
        self,
        engine: Engine,
        clock: Clock | None = None,
        write_lock: Path | None = None,
        busy_timeout_ms: int = 30_000,
    ) -> None:
        self._engine = engine
        self._now: Callable[[], datetime] = clock.now if clock is not None else _wall_clock
        self._statements = _Statements(engine.dialect)
        self._write_lock = _WriteLock.open(write_lock) if write_lock is not None else None
        self._lock_timeout = busy_timeout_ms / 1000

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (for tooling and tests; the engine layer never sees it)."""
        return self._engine

    @property
    def dialect(self) -> str:
        """`"sqlite"` or `"postgresql"`."""
        return self._engine.dialect.name

    @contextmanager
    def begin(self, *, read_only: bool = False) -> Iterator[SqlUnitOfWork]:
        """One unit of work: one connection, one transaction, committed when the block ends
        and rolled back if it raises.

        `read_only=True` takes no write lock (SQLite: deferred `BEGIN`, so it never waits for a
        writer) and refuses writes on both backends; use it for searches and reports.
        """
        with contextlib.ExitStack() as stack:
            if self._write_lock is not None and not read_only:
                stack.enter_context(self._write_lock.held(self._lock_timeout))
            connection = stack.enter_context(self._engine.connect())
            if read_only:
                connection.execution_options(**{_READ_ONLY: True})
                if self.dialect == "postgresql":
                    connection.execution_options(postgresql_readonly=True)
            with connection.begin():
                yield SqlUnitOfWork(connection, self._statements, self._now)

    def close(self) -> None:
        """Close every pooled connection. The store is unusable afterwards."""
        self._engine.dispose()
        if self._write_lock is not None:
            self._write_lock.release()
            self._write_lock = None


def _engine_url(url: str) -> URL:
    parsed = make_url(url)
    backend, _, driver = parsed.drivername.partition("+")
    if backend in ("postgresql", "postgres") and driver in ("", "psycopg"):
        return parsed.set(drivername="postgresql+psycopg")
    if backend == "sqlite" and driver in ("", "pysqlite"):
        return parsed
    raise ValueError(
        f"unsupported database URL scheme {parsed.drivername!r}: use sqlite:///path.db, "
        "sqlite:// (in memory) or postgresql+psycopg://"
    )


def _sqlite_engine(url: URL, busy_timeout_ms: int) -> Engine:
    in_memory = url.database in (None, "", ":memory:")
    engine = create_engine(
        url,
        # The pool hands a connection to one thread at a time; pysqlite's own check would
        # refuse the second thread that borrows it.
        connect_args={"check_same_thread": False},
        # An in-memory database lives only as long as its one connection: share that one.
        # A file: keep as many connections as the HTTP API's thread pool may use at once
        # (past the pool size each checkin closes one and the next checkout opens, configures
        # and warms a new one: measured, one in eight requests under 8 concurrent searches).
        **({"poolclass": StaticPool} if in_memory else {"pool_size": 20, "max_overflow": 40}),
    )

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        # Leave transactions to us (the documented pysqlite recipe): pysqlite's own implicit
        # BEGIN is deferred and breaks SAVEPOINT.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            if not in_memory:
                cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = FULL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        if connection.get_execution_options().get(_READ_ONLY):
            connection.exec_driver_sql("BEGIN")
            connection.exec_driver_sql("PRAGMA query_only = ON")
            connection.info[_READ_ONLY] = True
        else:
            # Take the write lock now: a deferred transaction that reads and then writes can
            # fail with SQLITE_BUSY at once, whatever the busy timeout.
            connection.exec_driver_sql("BEGIN IMMEDIATE")

    @event.listens_for(engine, "checkin")
    def _reset(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        if dbapi_connection is not None and record.info.pop(_READ_ONLY, False):
            dbapi_connection.execute("PRAGMA query_only = OFF")

    return engine


def _migrate(engine: Engine) -> None:
    config = Config()
    # ConfigParser interpolation would read a "%" in the install path as a placeholder.
    config.set_main_option("script_location", str(MIGRATIONS).replace("%", "%%"))
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:lock)"), {"lock": _MIGRATION_LOCK_ID}
            )
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def open_store(
    url: str,
    *,
    clock: Clock | None = None,
    busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
) -> SqlStore:
    """Connect to `url`, migrate the schema to the latest revision, and return the store.

    `url`: `sqlite:///path.db`, `sqlite://` (in memory: one shared connection, for tests and
    single-threaded tools only), or `postgresql+psycopg://...` (`postgresql://` is taken to
    mean psycopg 3). `clock` stamps the times the port does not pass in (`processed_at`,
    `updated_at` of facts, `created_at` of patients); the wall clock by default, a simulated
    clock for replay. Migrating a database already at the latest revision changes nothing.
    """
    parsed = _engine_url(url)
    write_lock = None
    if parsed.get_backend_name() == "sqlite":
        engine = _sqlite_engine(parsed, busy_timeout_ms)
        if parsed.database not in (None, "", ":memory:"):
            write_lock = Path(f"{parsed.database}.writer-lock").resolve()
    else:
        engine = create_engine(parsed)
    try:
        _migrate(engine)
    except BaseException:
        engine.dispose()
        raise
    return SqlStore(engine, clock=clock, write_lock=write_lock, busy_timeout_ms=busy_timeout_ms)
