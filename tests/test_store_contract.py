"""Contract tests for the `Store` port, run against SQLite (a file) and PostgreSQL alike.

Each PostgreSQL test gets a fresh database on 127.0.0.1:5432 (trust auth), dropped afterwards.
Without a reachable server the PostgreSQL variants fail, so CI cannot pass by skipping them;
set SAFETYNET_SKIP_POSTGRES=1 to skip them on a machine that has no server.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError, StatementError

from adapters.store import SqlStore, open_store
from adapters.store.schema import metadata
from adapters.store.sql import MIGRATIONS
from engine.clock import SimulatedClock
from engine.ports import Fact, InboundMessage, Store, StoredTask, UnitOfWork
from tests.conftest import new_pg_database

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def clock() -> SimulatedClock:
    """The store's processing clock, set to a known instant."""
    return SimulatedClock(T0)


@pytest.fixture
def store(database_url: str, clock: SimulatedClock) -> Iterator[SqlStore]:
    """A migrated, empty store on each backend."""
    opened = open_store(database_url, clock=clock)
    try:
        yield opened
    finally:
        opened.close()


def message(control_id: str = "MSG1", raw: str = "MSH|^~\\&|RIS|H1\r", **kw: Any) -> InboundMessage:
    """An inbound message whose hash is its raw text (good enough to tell contents apart)."""
    fields: dict[str, Any] = {
        "raw": raw,
        "sender": "RIS^H1",
        "control_id": control_id,
        "content_hash": f"hash:{raw}",
        "received_at": T0,
        "message_type": "ORU^R01",
        "origin": "mllp:test",
    }
    fields.update(kw)
    return InboundMessage(**fields)


def task(identifier: str = "task-1", **kw: Any) -> StoredTask:
    """A recall Task with plausible columns."""
    fields: dict[str, Any] = {
        "identifier": identifier,
        "patient_key": "P1",
        "rule_id": "infant-discharge-pending-survey",
        "rule_version": "1.0.0",
        "status": "requested",
        "priority": "urgent",
        "owner": "Practitioner/C1",
        "resource": {"resourceType": "Task", "status": kw.get("status", "requested")},
    }
    fields.update(kw)
    return StoredTask(**fields)


def scalar(store: SqlStore, sql: str, **params: Any) -> Any:
    """One value read straight from the database, outside the port."""
    with store.engine.connect() as connection:
        return connection.execute(text(sql), params).scalar()


# --- migrations and connection settings ------------------------------------------------------


def test_migrations_reach_head_and_rerun_is_harmless(database_url: str) -> None:
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None
    first = open_store(database_url)
    with first.begin() as uow:
        uow.add_to_inbox(message())
    first.close()

    second = open_store(database_url)  # already at head: nothing to do, nothing lost
    try:
        assert scalar(second, "SELECT version_num FROM alembic_version") == head
        assert scalar(second, "SELECT count(*) FROM alembic_version") == 1
        assert scalar(second, "SELECT count(*) FROM inbox") == 1
    finally:
        second.close()


def test_migrated_database_matches_schema_module(store: SqlStore) -> None:
    with store.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, metadata) == []


def _alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def test_sqlite_connection_settings(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'p.db'}", busy_timeout_ms=1234)
    try:
        with store.engine.connect() as connection:
            pragma = {
                name: connection.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
            }
        assert pragma == {
            "journal_mode": "wal",
            "synchronous": 2,  # FULL
            "foreign_keys": 1,
            "busy_timeout": 1234,
        }
    finally:
        store.close()


def test_in_memory_sqlite_keeps_data_across_units_of_work() -> None:
    store = open_store("sqlite://")
    try:
        with store.begin() as uow:
            uow.add_patient_aliases("P1", ["nhs|1"])
        with store.begin() as uow:
            assert uow.patients_for(["nhs|1"]) == {"nhs|1": "P1"}
    finally:
        store.close()


@pytest.mark.parametrize(
    "url", ["mysql://root@localhost/x", "postgresql+psycopg2://u@h/d", "sqlite+aiosqlite://"]
)
def test_unsupported_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match="unsupported database URL"):
        open_store(url)


@pytest.mark.postgres
def test_plain_postgresql_url_means_psycopg(pg_admin: tuple[Engine, str]) -> None:
    with new_pg_database(*pg_admin) as url:
        store = open_store(url.replace("postgresql+psycopg://", "postgresql://"))
        try:
            assert store.engine.url.drivername == "postgresql+psycopg"
            with store.begin() as uow:
                uow.audit(T0, "test", "opened")
        finally:
            store.close()


def test_sql_store_implements_the_ports(store: SqlStore) -> None:
    port: Store = store  # checked by mypy: SqlStore and SqlUnitOfWork satisfy the protocols
    with port.begin() as uow:
        unit: UnitOfWork = uow
        assert unit.patients_for(["none"]) == {}


# --- inbox and quarantine --------------------------------------------------------------------


def test_inbox_same_message_twice_is_a_duplicate(store: SqlStore) -> None:
    with store.begin() as uow:
        first = uow.add_to_inbox(message())
        assert not first.duplicate and not first.control_id_reused
        assert first.state == "received"
    with store.begin() as uow:
        again = uow.add_to_inbox(message())
    assert again.duplicate and again.id == first.id
    assert scalar(store, "SELECT count(*) FROM inbox") == 1


def test_inbox_duplicate_reports_the_stored_state(store: SqlStore) -> None:
    with store.begin() as uow:
        entry = uow.add_to_inbox(message())
        uow.set_inbox_state(entry.id, "processed")
        again = uow.add_to_inbox(message())
    assert again.duplicate and again.state == "processed"


def test_inbox_reused_control_id_with_new_content_is_a_new_message(store: SqlStore) -> None:
    with store.begin() as uow:
        first = uow.add_to_inbox(message(raw="A"))
        second = uow.add_to_inbox(message(raw="B"))
        other_sender = uow.add_to_inbox(message(raw="B", sender="PAS^H1"))
    assert second.id != first.id and not second.duplicate and second.control_id_reused
    assert not other_sender.control_id_reused and not other_sender.duplicate
    assert scalar(store, "SELECT count(*) FROM inbox") == 3


def test_inbox_row_keeps_the_message(store: SqlStore) -> None:
    raw = "MSH|^~\\&|RIS|H1|||20260301||ORU^R01|MSG1|P|2.5\rPID|||123^^^H1^MR\r"
    received = datetime(2026, 3, 1, 10, 30, tzinfo=timezone(timedelta(hours=1)))
    with store.begin() as uow:
        entry = uow.add_to_inbox(message(raw=raw, received_at=received, protocol="hl7v2"))
    with store.engine.connect() as connection:
        row = connection.execute(
            text(
                "SELECT raw, sender, control_id, protocol, message_type, origin, state "
                "FROM inbox WHERE id = :id"
            ),
            {"id": entry.id},
        ).one()
    assert tuple(row) == (raw, "RIS^H1", "MSG1", "hl7v2", "ORU^R01", "mllp:test", "received")


def test_set_inbox_state_records_outcome_and_time(store: SqlStore, clock: SimulatedClock) -> None:
    clock.advance(T0 + timedelta(minutes=5))
    with store.begin() as uow:
        entry = uow.add_to_inbox(message())
        uow.set_inbox_state(entry.id, "quarantined", "PID-3 empty")
    with store.engine.connect() as connection:
        state, detail = connection.execute(
            text("SELECT state, detail FROM inbox WHERE id = :id"), {"id": entry.id}
        ).one()
    assert (state, detail) == ("quarantined", "PID-3 empty")
    with store.begin() as uow:
        processed_at = (
            uow.connection.execute(
                metadata.tables["inbox"].select().where(metadata.tables["inbox"].c.id == entry.id)
            )
            .one()
            .processed_at
        )
    assert processed_at == T0 + timedelta(minutes=5)
    assert processed_at.tzinfo is not None


def test_quarantine_returns_its_id_and_keeps_the_reason(store: SqlStore) -> None:
    table = metadata.tables["quarantine"]
    with store.begin() as uow:
        entry = uow.add_to_inbox(message())
        first = uow.quarantine(entry.id, "no patient identifier", "AE", "PID-3", {"n": 1}, at=T0)
        second = uow.quarantine(None, "unreadable header", "AR")
        rows = {row.id: row for row in uow.connection.execute(table.select())}
    assert first != second
    assert rows[first].inbox_id == entry.id
    assert (rows[first].reason, rows[first].ack_code, rows[first].location) == (
        "no patient identifier",
        "AE",
        "PID-3",
    )
    assert rows[first].detail == {"n": 1} and rows[first].created_at == T0
    assert rows[first].resolved_at is None
    assert rows[second].inbox_id is None and rows[second].detail == {}
    assert rows[second].created_at == T0  # the store's clock


def test_quarantine_must_name_a_stored_message(store: SqlStore) -> None:
    with pytest.raises(DBAPIError), store.begin() as uow:
        uow.quarantine(987654, "ghost", "AE")


# --- identity ----------------------------------------------------------------------------------


def test_patients_for_returns_only_known_tokens(store: SqlStore) -> None:
    with store.begin() as uow:
        assert uow.patients_for([]) == {}
        uow.add_patient_aliases("P1", ["nhs|9434765919", "mrn|H1|123"])
        uow.add_patient_aliases("P2", ["mrn|H1|456"])
        found = uow.patients_for(["nhs|9434765919", "mrn|H1|456", "mrn|H1|999"])
    assert found == {"nhs|9434765919": "P1", "mrn|H1|456": "P2"}


def test_add_patient_aliases_never_repoints_and_creates_the_patient(store: SqlStore) -> None:
    with store.begin() as uow:
        uow.add_patient_aliases("P1", ["mrn|H1|123"])
        uow.add_patient_aliases("P2", ["mrn|H1|123", "mrn|H2|777", "mrn|H2|777"])
        found = uow.patients_for(["mrn|H1|123", "mrn|H2|777"])
        uow.add_patient_aliases("P3", [])
    assert found == {"mrn|H1|123": "P1", "mrn|H2|777": "P2"}
    assert scalar(store, "SELECT count(*) FROM patients") == 3
    incomplete = scalar(store, "SELECT record_incomplete FROM patients WHERE key = 'P3'")
    assert not incomplete


def test_merge_moves_everything_open_to_the_survivor(store: SqlStore) -> None:
    due_at = T0 + timedelta(hours=24)
    with store.begin() as uow:
        uow.add_patient_aliases("OLD", ["mrn|H1|1", "mrn|H1|2"])
        uow.add_patient_aliases("NEW", ["nhs|9434765919"])
        uow.put_facts("OLD", [Fact("dob", "patient", {"v": "old"}), Fact("adm", "visit", {})])
        uow.put_facts("NEW", [Fact("dob", "patient", {"v": "new"})])
        uow.put_task(task("open", patient_key="OLD"), T0, "raised")
        uow.put_task(task("done", patient_key="OLD", status="completed"), T0, "raised")
        uow.put_task(task("off", patient_key="OLD", status="cancelled"), T0, "raised")
        uow.schedule("OLD", due_at, "settle")  # duplicate of the survivor's: dropped
        uow.schedule("NEW", due_at, "settle")
        uow.schedule("OLD", due_at, "report-deadline")  # moves
        uow.schedule("OLD", T0, "fired-one")
        fired = uow.due_timers(T0)
        assert [t.reason for t in fired] == ["fired-one"]
        uow.mark_fired(fired[0].id, T0)
        uow.add_order_aliases("ORD1", "OLD", ["placer|RIS|A1"])

        uow.merge_patients("OLD", "NEW")

        assert uow.patients_for(["mrn|H1|1", "mrn|H1|2", "nhs|9434765919", "patient-key|OLD"]) == {
            "mrn|H1|1": "NEW",
            "mrn|H1|2": "NEW",
            "nhs|9434765919": "NEW",
            "patient-key|OLD": "NEW",
        }
        assert {f.key: dict(f.data) for f in uow.facts("NEW")} == {"dob": {"v": "new"}, "adm": {}}
        assert uow.facts("OLD") == []
        by_id = {t.identifier: t.patient_key for t in uow.tasks()}
        assert by_id == {"open": "NEW", "done": "OLD", "off": "OLD"}
        pending = uow.due_timers(due_at)
        assert sorted((t.patient_key, t.reason) for t in pending) == [
            ("NEW", "report-deadline"),
            ("NEW", "settle"),
        ]
        assert uow.order_for(["placer|RIS|A1"]) == ("ORD1", "NEW")
    assert scalar(store, "SELECT count(*) FROM due WHERE patient_key = 'OLD'") == 1  # the fired


def test_merge_chains_and_carries_record_incomplete(store: SqlStore) -> None:
    with store.begin() as uow:
        uow.add_patient_aliases("A", ["mrn|1"])
        uow.add_patient_aliases("B", ["mrn|2"])
        uow.connection.execute(text("UPDATE patients SET record_incomplete = TRUE WHERE key = 'A'"))
        uow.merge_patients("A", "B")
        uow.merge_patients("B", "C")  # C was never seen before
        uow.merge_patients("C", "C")  # no-op
        found = uow.patients_for(["mrn|1", "mrn|2", "patient-key|A", "patient-key|B"])
    assert set(found.values()) == {"C"} and len(found) == 4
    assert scalar(store, "SELECT record_incomplete FROM patients WHERE key = 'C'")


def test_orders(store: SqlStore) -> None:
    with store.begin() as uow:
        assert uow.order_for([]) is None
        assert uow.order_for(["placer|RIS|X"]) is None
        uow.add_order_aliases("ORD1", "P1", ["placer|RIS|A1", "filler|PACS|F1"])
        uow.add_order_aliases("ORD2", "P2", ["filler|PACS|F1", "placer|RIS|B2"])  # F1 kept
        assert uow.order_for(["filler|PACS|F1"]) == ("ORD1", "P1")
        assert uow.order_for(["nope", "placer|RIS|B2", "placer|RIS|A1"]) == ("ORD2", "P2")
        assert uow.order_for(["placer|RIS|A1", "placer|RIS|B2"]) == ("ORD1", "P1")


# --- facts -------------------------------------------------------------------------------------


def test_facts_round_trip_and_upsert_by_key(store: SqlStore) -> None:
    data = {
        "s": "text ü",
        "i": 7,
        "f": 2.5,
        "t": True,
        "n": None,
        "l": [1, "two", None, {"x": False}],
        "d": {"nested": [0.1]},
    }
    with store.begin() as uow:
        assert uow.facts("P1") == []
        uow.put_facts("P1", [Fact("a", "kind-a", data), Fact("b", "kind-b", {})])
        uow.put_facts("P2", [Fact("a", "other", {"v": 1})])
    with store.begin() as uow:
        assert uow.facts("P1") == [Fact("a", "kind-a", data), Fact("b", "kind-b", {})]
        uow.put_facts("P1", [Fact("a", "kind-a2", {"v": 2}), Fact("c", "k", {"v": 3})])
        uow.put_facts("P1", [])
    with store.begin() as uow:
        assert [(f.key, f.kind, f.data) for f in uow.facts("P1")] == [
            ("a", "kind-a2", {"v": 2}),
            ("b", "kind-b", {}),
            ("c", "k", {"v": 3}),
        ]
        assert uow.facts("P2") == [Fact("a", "other", {"v": 1})]


def test_put_facts_last_of_one_key_wins(store: SqlStore) -> None:
    with store.begin() as uow:
        uow.put_facts("P1", [Fact("a", "k", {"v": 1}), Fact("a", "k", {"v": 2})])
        assert uow.facts("P1") == [Fact("a", "k", {"v": 2})]


# --- tasks -------------------------------------------------------------------------------------


def test_put_task_inserts_then_versions_with_history(store: SqlStore) -> None:
    with store.begin() as uow:
        assert uow.get_task("task-1") is None
        stored = uow.put_task(task(version=99), T0, "raised")
        assert stored.version == 1
        assert uow.get_task("task-1") == stored
    later = T0 + timedelta(hours=1)
    accepted = task(status="accepted", owner="Pool/radiology", shadow=True)
    with store.begin() as uow:
        updated = uow.put_task(accepted, later, "accepted by clinician")
        assert updated.version == 2 and updated.status == "accepted" and updated.shadow
        assert uow.get_task("task-1") == updated
        history = uow.task_history("task-1")
    assert [(h.version, h.status, h.owner, h.shadow) for h in history] == [
        (1, "requested", "Practitioner/C1", False),
        (2, "accepted", "Pool/radiology", True),
    ]
    assert history[0].resource == {"resourceType": "Task", "status": "requested"}
    with store.engine.connect() as connection:
        rows = connection.execute(
            text("SELECT version, reason FROM task_history ORDER BY version")
        ).all()
    assert [tuple(r) for r in rows] == [(1, "raised"), (2, "accepted by clinician")]


def test_put_task_same_state_again_still_records_history(store: SqlStore) -> None:
    with store.begin() as uow:
        uow.put_task(task(), T0, "raised")
        assert uow.put_task(task(), T0, "re-evaluated").version == 2
        assert len(uow.task_history("task-1")) == 2
        assert uow.task_history("unknown") == []


def test_tasks_filter_and_order(store: SqlStore) -> None:
    with store.begin() as uow:
        uow.put_task(task("t-b", owner="A"), T0, "r")
        uow.put_task(task("t-a", owner="B", patient_key="P2"), T0, "r")  # same time: by id
        uow.put_task(task("t-0", status="completed", owner="A"), T0 + timedelta(1), "r")
        uow.put_task(task("t-c", owner="A"), T0 - timedelta(1), "r")
        # An update changes no created_at: t-c stays first.
        uow.put_task(task("t-c", owner="A", priority="stat"), T0 + timedelta(2), "r")

        def ids(**filters: str) -> list[str]:
            return [t.identifier for t in uow.tasks(**filters)]

        assert ids() == ["t-c", "t-a", "t-b", "t-0"]
        assert ids(status="requested") == ["t-c", "t-a", "t-b"]
        assert ids(owner="A") == ["t-c", "t-b", "t-0"]
        assert ids(patient_key="P2") == ["t-a"]
        assert ids(status="requested", owner="A", patient_key="P1") == ["t-c", "t-b"]
        assert ids(status="cancelled") == []


# --- timers ------------------------------------------------------------------------------------


def test_timers(store: SqlStore) -> None:
    with store.begin() as uow:
        assert uow.next_due() is None
        assert uow.due_timers(T0) == []
        uow.schedule("P1", T0 + timedelta(hours=2), "b")
        uow.schedule("P1", T0 + timedelta(hours=2), "b")  # idempotent
        uow.schedule("P2", T0 + timedelta(hours=1), "a")
        uow.schedule("P3", T0 + timedelta(hours=2), "c")
        uow.schedule("P4", T0 + timedelta(hours=9), "late")
    with store.begin() as uow:
        assert uow.next_due() == T0 + timedelta(hours=1)
        due = uow.due_timers(T0 + timedelta(hours=2))
        assert [(t.patient_key, t.reason) for t in due] == [("P2", "a"), ("P1", "b"), ("P3", "c")]
        assert due[1].id < due[2].id  # ties by id
        assert all(t.due_at.tzinfo is not None for t in due)
        assert len(uow.due_timers(T0 + timedelta(hours=2), limit=2)) == 2
        uow.mark_fired(due[0].id, T0 + timedelta(hours=1))
        assert uow.next_due() == T0 + timedelta(hours=2)
        assert [t.reason for t in uow.due_timers(T0 + timedelta(days=1))] == ["b", "c", "late"]
        uow.schedule("P2", T0 + timedelta(hours=1), "a")  # already fired: still one row
    assert scalar(store, "SELECT count(*) FROM due") == 4


def test_times_come_back_as_utc_whatever_offset_went_in(store: SqlStore) -> None:
    london_summer = timezone(timedelta(hours=1))
    due_at = datetime(2026, 7, 1, 10, 0, tzinfo=london_summer)
    with store.begin() as uow:
        uow.schedule("P1", due_at, "r")
        # 10:00+01:00 is 09:00 UTC, so it is due by 09:30 UTC.
        assert uow.due_timers(datetime(2026, 7, 1, 9, 30, tzinfo=UTC))[0].due_at == due_at
        got = uow.next_due()
    assert got == due_at and got is not None
    assert got.utcoffset() == timedelta(0) and got.hour == 9


def test_naive_times_are_refused(store: SqlStore) -> None:
    naive = datetime(2026, 1, 1, 9, 0)  # on purpose
    with pytest.raises((ValueError, StatementError), match="naive datetime"), store.begin() as uow:
        uow.schedule("P1", naive, "r")
    with pytest.raises((ValueError, StatementError), match="naive datetime"), store.begin() as uow:
        uow.due_timers(naive)
    with store.begin() as uow:
        assert uow.next_due() is None


# --- audit -------------------------------------------------------------------------------------


def test_audit_appends(store: SqlStore) -> None:
    with store.begin() as uow:
        uow.audit(T0, "rule:infant-discharge@1.0.0", "task.raised", "task-1", {"version": 1})
        uow.audit(T0, "clinician:C1", "task.accepted", "task-1")
        uow.audit(T0, "system", "started")
    table = metadata.tables["audit"]
    with store.begin() as uow:
        rows = uow.connection.execute(table.select().order_by(table.c.id)).all()
    assert [(r.actor, r.action, r.subject, r.detail) for r in rows] == [
        ("rule:infant-discharge@1.0.0", "task.raised", "task-1", {"version": 1}),
        ("clinician:C1", "task.accepted", "task-1", {}),
        ("system", "started", "", {}),
    ]
    assert rows[0].at == T0


# --- transactions ------------------------------------------------------------------------------


def test_savepoint_undoes_only_its_own_work(store: SqlStore) -> None:
    with store.begin() as uow:
        uow.add_patient_aliases("P1", ["mrn|1"])
        with pytest.raises(RuntimeError, match="boom"), uow.savepoint():
            uow.add_patient_aliases("P2", ["mrn|2"])
            raise RuntimeError("boom")
        with uow.savepoint():
            uow.add_patient_aliases("P3", ["mrn|3"])
        uow.add_patient_aliases("P4", ["mrn|4"])
    with store.begin() as uow:
        assert uow.patients_for(["mrn|1", "mrn|2", "mrn|3", "mrn|4"]) == {
            "mrn|1": "P1",
            "mrn|3": "P3",
            "mrn|4": "P4",
        }


def test_savepoint_recovers_from_a_database_error(store: SqlStore) -> None:
    with store.begin() as uow:
        uow.add_patient_aliases("P1", ["mrn|1"])
        with pytest.raises(DBAPIError), uow.savepoint():
            uow.quarantine(424242, "no such inbox row", "AE")  # foreign key violation
        uow.add_patient_aliases("P2", ["mrn|2"])  # the transaction is still usable
    with store.begin() as uow:
        assert len(uow.patients_for(["mrn|1", "mrn|2"])) == 2


def test_begin_commits_or_rolls_back_as_a_whole(store: SqlStore) -> None:
    with pytest.raises(KeyError), store.begin() as uow:
        uow.add_to_inbox(message())
        uow.add_patient_aliases("P1", ["mrn|1"])
        raise KeyError("fail after writing")
    with store.begin() as uow:
        assert uow.patients_for(["mrn|1"]) == {}
        assert not uow.add_to_inbox(message()).duplicate


def test_uncommitted_work_is_invisible_to_another_store(store: SqlStore, database_url: str) -> None:
    other = open_store(database_url)
    try:
        with store.begin() as uow:
            uow.add_patient_aliases("P1", ["mrn|1"])
            with other.begin(read_only=True) as reader:
                assert reader.patients_for(["mrn|1"]) == {}
        with other.begin(read_only=True) as reader:
            assert reader.patients_for(["mrn|1"]) == {"mrn|1": "P1"}
    finally:
        other.close()


def test_concurrent_writers_wait_for_each_other(store: SqlStore, database_url: str) -> None:
    other = open_store(database_url)
    started, finished = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def second_writer() -> None:
        try:
            started.set()
            with other.begin() as uow:
                uow.add_patient_aliases("P2", ["mrn|2"])
                uow.put_task(task("shared"), T0, "from second")
        except BaseException as error:  # reported to the main thread below
            errors.append(error)
        finally:
            finished.set()

    try:
        with store.begin() as uow:
            uow.add_patient_aliases("P1", ["mrn|1"])
            uow.put_task(task("shared"), T0, "from first")
            thread = threading.Thread(target=second_writer)
            thread.start()
            started.wait(5)
            time.sleep(0.3)  # the second writer is now waiting on our transaction
            assert not finished.is_set()
        thread.join(10)
        assert errors == []
        with store.begin() as uow:
            assert uow.patients_for(["mrn|1", "mrn|2"]) == {"mrn|1": "P1", "mrn|2": "P2"}
            assert [h.version for h in uow.task_history("shared")] == [1, 2]
    finally:
        other.close()


def test_read_only_unit_of_work_refuses_writes(store: SqlStore) -> None:
    with pytest.raises(DBAPIError), store.begin(read_only=True) as uow:
        uow.add_patient_aliases("P1", ["mrn|1"])
    # The pooled connection is writable again afterwards.
    with store.begin() as uow:
        uow.add_patient_aliases("P1", ["mrn|1"])
    with store.begin(read_only=True) as uow:
        assert uow.patients_for(["mrn|1"]) == {"mrn|1": "P1"}


def test_concurrent_redelivery_stores_the_message_once(store: SqlStore, database_url: str) -> None:
    other = open_store(database_url)
    seen: dict[str, Any] = {}

    def redeliver() -> None:
        with other.begin() as uow:
            seen["entry"] = uow.add_to_inbox(message())

    try:
        with store.begin() as uow:
            first = uow.add_to_inbox(message())
            thread = threading.Thread(target=redeliver)
            thread.start()
            time.sleep(0.3)  # the redelivery is now blocked behind our uncommitted row
        thread.join(10)
        assert seen["entry"].duplicate and seen["entry"].id == first.id
        assert scalar(store, "SELECT count(*) FROM inbox") == 1
    finally:
        other.close()


def test_sqlite_writer_gives_up_after_the_busy_timeout(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'busy.db'}"
    holder, waiter = open_store(url), open_store(url, busy_timeout_ms=100)
    try:
        with holder.begin() as uow:
            uow.audit(T0, "test", "holding the write lock")
            started = time.monotonic()
            with pytest.raises(DBAPIError, match="locked"), waiter.begin() as blocked:
                blocked.audit(T0, "test", "never written")
            assert time.monotonic() - started < 5
    finally:
        holder.close()
        waiter.close()
