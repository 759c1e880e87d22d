"""The outbox: store queries on both backends, the destinations against a real HTTP server, and
the dispatcher delivering every Task change through outages, in order, never twice as a Task.

Real parts throughout: SQLite and PostgreSQL through `database_url`, `tests.fhir_server` over
sockets. Backoff runs on a clock the tests move, so retries cost no wall time.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
from sqlalchemy import Engine, delete, select, text

from adapters.fhir.task import TASK_SYSTEM
from adapters.outbox import (
    Backoff,
    Delivery,
    DeliveryError,
    DestinationStatus,
    Dispatcher,
    FhirTaskDestination,
    WebhookDestination,
    delivered,
    destination_from_url,
    due,
    enqueue,
    failed,
    failing,
    status,
)
from adapters.outbox.store import ERROR_LIMIT, destinations
from adapters.store import SqlStore, open_store
from adapters.store.schema import outbox, outbox_delivery
from engine.clock import SimulatedClock
from engine.ports import StoredTask
from tests.conftest import new_pg_database
from tests.fhir_server import FhirTestServer

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
# Stands in for patient data: it is in every Task and must never reach a log line.
PATIENT_MARKER = "Zebedee Testpatient"
SECRET = "webhook-secret"


# --- helpers and fixtures ---------------------------------------------------------------------


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, start: datetime = T0) -> None:
        self.at = start

    def __call__(self) -> datetime:
        return self.at

    def advance(self, seconds: float) -> datetime:
        self.at += timedelta(seconds=seconds)
        return self.at


class Tasks:
    """Writes Task changes through the store as the processor would, counting versions."""

    def __init__(self, store: SqlStore, store_clock: SimulatedClock | None = None) -> None:
        self.store = store
        self.store_clock = store_clock  # the store's clock: when a change is queued
        self.versions: Counter[str] = Counter()
        self.changes = 0

    def change(self, identifier: str, *, shadow: bool = False) -> StoredTask:
        version = self.versions[identifier] + 1
        self.changes += 1
        at = T0 + timedelta(minutes=self.changes)
        task_status = "requested" if version == 1 else "in-progress"
        resource: dict[str, Any] = {
            "resourceType": "Task",
            "id": identifier,
            "identifier": [{"system": TASK_SYSTEM, "value": identifier}],
            "status": task_status,
            "intent": "order",
            "description": f"Recall {PATIENT_MARKER}: skeletal survey not reported.",
            "lastModified": at.isoformat(),
            "note": [{"text": f"version {version}"}],
        }
        if self.store_clock is not None:
            self.store_clock.advance(at)
        with self.store.begin() as uow:
            stored = uow.put_task(
                StoredTask(
                    identifier=identifier,
                    patient_key="P1",
                    rule_id="imaging-pending-at-discharge",
                    rule_version="1.0.0",
                    status=task_status,
                    priority="urgent",
                    owner="Practitioner/C1",
                    resource=resource,
                    shadow=shadow,
                ),
                at,
                "test",
            )
        assert stored.version == version
        self.versions[identifier] = version
        return stored


def tasks_stored(identifier: str) -> StoredTask:
    """A first version of a Task, to write inside a transaction the test holds open."""
    return StoredTask(
        identifier=identifier,
        patient_key="P2",
        rule_id="imaging-pending-at-discharge",
        rule_version="1.0.0",
        status="requested",
        priority="urgent",
        owner="Practitioner/C1",
        resource={
            "resourceType": "Task",
            "identifier": [{"system": TASK_SYSTEM, "value": identifier}],
            "status": "requested",
            "intent": "order",
        },
    )


@pytest.fixture
def store_clock() -> SimulatedClock:
    """The store's clock (it stamps when a change was queued)."""
    return SimulatedClock(T0)


@pytest.fixture
def store(database_url: str, store_clock: SimulatedClock) -> Iterator[SqlStore]:
    """A migrated, empty store on each backend."""
    opened = open_store(database_url, clock=store_clock)
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def tasks(store: SqlStore, store_clock: SimulatedClock) -> Tasks:
    """Task changes written through the store."""
    return Tasks(store, store_clock)


@pytest.fixture
def server() -> Iterator[FhirTestServer]:
    """The tiny FHIR server and webhook receiver, running."""
    with FhirTestServer() as running:
        yield running


@pytest.fixture
def clock() -> Clock:
    """The dispatcher's clock."""
    return Clock()


def delivery(task: str = "task-1", version: int = 1, **resource: Any) -> Delivery:
    """A delivery built by hand, for the destination tests (`resource` overrides fields)."""
    body: dict[str, Any] = {
        "resourceType": "Task",
        "id": task,
        "identifier": [{"system": TASK_SYSTEM, "value": task}],
        "status": "requested",
        "intent": "order",
        "note": [{"text": f"version {version}"}],
    }
    body.update(resource)
    return Delivery(
        outbox_id=version,
        destination="test",
        task_identifier=task,
        task_version=version,
        attempts=0,
        resource=body,
    )


def rows(store: SqlStore, destination: str) -> list[dict[str, Any]]:
    """The destination's delivery rows with their change, oldest first."""
    query = (
        select(outbox_delivery, outbox.c.task_identifier, outbox.c.task_version)
        .join(outbox, outbox.c.id == outbox_delivery.c.outbox_id)
        .where(outbox_delivery.c.destination == destination)
        .order_by(outbox_delivery.c.outbox_id)
    )
    with store.begin(read_only=True) as uow:
        return [dict(row._mapping) for row in uow.connection.execute(query)]


def keys(deliveries: list[Delivery]) -> list[tuple[str, int]]:
    return [(d.task_identifier, d.task_version) for d in deliveries]


def statuses(store: SqlStore, *names: str) -> dict[str, DestinationStatus]:
    with store.begin(read_only=True) as uow:
        return {s.destination: s for s in status(uow, names, T0)}


def rounds_until(
    dispatcher: Dispatcher, clock: Clock, done: Callable[[], bool], step: float = 30.0
) -> int:
    """Run rounds, moving the clock past any backoff, until `done()`; returns the rounds."""
    for count in range(1, 201):
        dispatcher.run_once()
        if done():
            return count
        clock.advance(step)
    raise AssertionError("the outbox did not drain in 200 rounds")


# --- store: enqueue, due, delivered, failed, status (both backends) ----------------------------


def test_enqueue_is_idempotent_and_queues_only_new_changes(store: SqlStore, tasks: Tasks) -> None:
    tasks.change("a")
    tasks.change("b")
    tasks.change("a")
    with store.begin() as uow:
        assert enqueue(uow, "fhir", T0) == 3
    with store.begin() as uow:
        assert enqueue(uow, "fhir", T0) == 0
    tasks.change("c")
    with store.begin() as uow:
        assert enqueue(uow, "fhir", T0) == 1
        assert enqueue(uow, "fhir", T0) == 0
        # Another destination starts from the first change.
        assert enqueue(uow, "hook", T0) == 4
    queued = rows(store, "fhir")
    assert [(r["task_identifier"], r["task_version"]) for r in queued] == [
        ("a", 1),
        ("b", 1),
        ("a", 2),
        ("c", 1),
    ]
    assert {(r["state"], r["attempts"], r["last_error"]) for r in queued} == {("pending", 0, "")}


def test_enqueue_finds_a_change_that_became_visible_after_later_ones(
    store: SqlStore, tasks: Tasks
) -> None:
    for name in "abc":
        tasks.change(name)
    with store.begin() as uow:
        assert enqueue(uow, "fhir", T0) == 3
    first = rows(store, "fhir")[0]["outbox_id"]

    def unqueue_first() -> None:
        # As if the first change's transaction had committed after the others were queued.
        with store.begin() as uow:
            uow.connection.execute(
                delete(outbox_delivery).where(outbox_delivery.c.outbox_id == first)
            )

    unqueue_first()
    assert statuses(store, "fhir")["fhir"].not_yet_queued == 1
    with store.begin() as uow:
        # "Newer than the newest queued" alone would leave it behind for ever ...
        assert enqueue(uow, "fhir", T0, lookback=0) == 0
        # ... the default lookback finds it.
        assert enqueue(uow, "fhir", T0) == 1
    unqueue_first()
    with store.begin() as uow:
        assert enqueue(uow, "fhir", T0, lookback=None) == 1
    assert statuses(store, "fhir")["fhir"].not_yet_queued == 0


@pytest.mark.postgres
def test_a_change_committed_after_a_later_one_is_still_queued_on_postgresql(
    pg_admin: tuple[Engine, str],
) -> None:
    with new_pg_database(*pg_admin) as url:
        store = open_store(url)
        tasks = Tasks(store)
        try:
            with ExitStack() as slow:
                # A transaction takes outbox id 1 and is still open ...
                uow = slow.enter_context(store.begin())
                uow.put_task(tasks_stored("early"), T0, "test")
                # ... while another takes id 2, commits, and is queued.
                tasks.change("late")
                with store.begin() as queueing:
                    assert enqueue(queueing, "fhir", T0) == 1
                    assert keys(due(queueing, "fhir", T0)) == [("late", 1)]
            # Now id 1 commits, below the newest queued id.
            with store.begin() as queueing:
                assert enqueue(queueing, "fhir", T0) == 1
                assert sorted(keys(due(queueing, "fhir", T0))) == [("early", 1), ("late", 1)]
        finally:
            store.close()


def test_shadow_changes_are_never_queued(store: SqlStore, tasks: Tasks) -> None:
    tasks.change("shadowed", shadow=True)
    tasks.change("shadowed", shadow=True)
    with store.begin() as uow:
        assert enqueue(uow, "fhir", T0) == 0
    assert statuses(store, "fhir")["fhir"].not_yet_queued == 0


def test_due_hands_out_the_oldest_change_of_each_task_when_its_attempt_is_due(
    store: SqlStore, tasks: Tasks
) -> None:
    tasks.change("a")
    tasks.change("b")
    tasks.change("a")
    tasks.change("a")
    with store.begin() as uow:
        enqueue(uow, "fhir", T0)
        first = due(uow, "fhir", T0)
    assert keys(first) == [("a", 1), ("b", 1)]
    a1 = first[0]
    assert a1.destination == "fhir" and a1.attempts == 0
    # The resource is that version's Task JSON, from the history.
    assert a1.resource["note"] == [{"text": "version 1"}]
    retry_at = T0 + timedelta(seconds=10)
    with store.begin() as uow:
        failed(uow, a1, T0, "HTTP 503 Service Unavailable", retry_at)
        # a is waiting for its retry, and its later versions wait behind it.
        assert keys(due(uow, "fhir", T0)) == [("b", 1)]
        assert keys(due(uow, "fhir", retry_at - timedelta(microseconds=1))) == [("b", 1)]
        again = due(uow, "fhir", retry_at)
        assert keys(again) == [("a", 1), ("b", 1)]
        assert again[0].attempts == 1
        delivered(uow, again[0], retry_at)
        after = due(uow, "fhir", retry_at)
        # Oldest change first: b's first version was made before a's second.
        assert keys(after) == [("b", 1), ("a", 2)]
        assert after[1].resource["note"] == [{"text": "version 2"}]
        assert keys(due(uow, "fhir", retry_at, limit=1)) == [("b", 1)]
        # Another destination has its own queue.
        assert due(uow, "hook", retry_at) == []


def test_failed_counts_attempts_keeps_the_error_short_and_delivered_is_final(
    store: SqlStore, tasks: Tasks
) -> None:
    tasks.change("a")
    with store.begin() as uow:
        enqueue(uow, "fhir", T0)
        [a1] = due(uow, "fhir", T0)
        failed(uow, a1, T0, "first", T0 + timedelta(seconds=1))
        failed(uow, a1, T0 + timedelta(seconds=1), "x" * 900, T0 + timedelta(seconds=3))
    [row] = rows(store, "fhir")
    assert row["state"] == "pending"
    assert row["attempts"] == 2
    assert row["last_error"] == "x" * ERROR_LIMIT
    assert row["next_attempt_at"] == T0 + timedelta(seconds=3)
    assert row["updated_at"] == T0 + timedelta(seconds=1)
    assert row["delivered_at"] is None
    done_at = T0 + timedelta(seconds=3)
    with store.begin() as uow:
        delivered(uow, a1, done_at)
        # A late second outcome for the same delivery changes nothing.
        delivered(uow, a1, done_at + timedelta(seconds=5))
        failed(uow, a1, done_at, "late", done_at)
        assert due(uow, "fhir", done_at + timedelta(days=1)) == []
    [row] = rows(store, "fhir")
    assert (row["state"], row["attempts"], row["delivered_at"]) == ("delivered", 3, done_at)


def test_status_and_failing_numbers(store: SqlStore, tasks: Tasks) -> None:
    for name in "abc":
        tasks.change(name)
    with store.begin() as uow:
        enqueue(uow, "fhir", T0)
        a1, b1, c1 = due(uow, "fhir", T0)
        delivered(uow, a1, T0)
        failed(uow, b1, T0, "HTTP 500 Internal Server Error: boom", T0 + timedelta(minutes=1))
        failed(uow, c1, T0, "HTTP 502 Bad Gateway", T0 + timedelta(minutes=1))
        failed(uow, c1, T0 + timedelta(minutes=1), "connection failed", T0 + timedelta(minutes=2))
    report = statuses(store, "fhir", "hook")
    assert report["fhir"] == DestinationStatus(
        destination="fhir",
        pending=2,
        delivered=1,
        failing=2,
        # b's change was made at T0 + 2 minutes (the Tasks helper's clock).
        oldest_pending_at=T0 + timedelta(minutes=2),
        last_error="connection failed",
        not_yet_queued=0,
    )
    assert report["hook"] == DestinationStatus(
        destination="hook",
        pending=0,
        delivered=0,
        failing=0,
        oldest_pending_at=None,
        last_error="",
        not_yet_queued=3,
    )
    with store.begin(read_only=True) as uow:
        assert destinations(uow) == ["fhir"]  # "hook" has no delivery rows yet
        assert failing(uow, ["fhir", "hook"], 1) == {"fhir": 2, "hook": 0}
        assert failing(uow, ["fhir", "hook"], 2) == {"fhir": 1, "hook": 0}


# --- destinations against the real server -----------------------------------------------------


def test_fhir_conditional_update_creates_once_then_updates_without_sending_an_id(
    server: FhirTestServer,
) -> None:
    destination = FhirTaskDestination(
        "fhir", server.base_url + "/", headers={"Authorization": "Bearer t"}
    )
    try:
        destination.deliver(delivery("t-1", 1))
        destination.deliver(delivery("t-1", 2))
        destination.deliver(delivery("t-1", 2))  # sent again after a crash: harmless
        destination.deliver(delivery("t-2", 1, identifier=[]))
        destination.deliver(delivery("t-2", 2, identifier=[]))
    finally:
        destination.close()
    held = server.tasks_by_identifier(TASK_SYSTEM)
    assert sorted(held) == ["t-1", "t-2"]
    assert all(len(found) == 1 for found in held.values())
    [t1] = held["t-1"]
    # The server assigned the id; ours went nowhere.
    assert t1["id"] != "t-1"
    assert t1["note"] == [{"text": "version 2"}]
    assert t1["meta"]["versionId"] == "3"
    assert server.put_counts() == Counter({"t-1": 3, "t-2": 2})
    assert all("id" not in body for body in server.put_bodies())
    headers = server.put_headers()
    assert {h["content-type"] for h in headers} == {"application/fhir+json"}
    assert {h["authorization"] for h in headers} == {"Bearer t"}


def test_fhir_412_when_several_tasks_on_the_server_share_the_identifier(
    server: FhirTestServer,
) -> None:
    for _ in range(2):
        server.add_task(dict(delivery("dup").resource))
    destination = FhirTaskDestination("fhir", server.base_url)
    try:
        with pytest.raises(DeliveryError) as raised:
            destination.deliver(delivery("dup"))
    finally:
        destination.close()
    assert raised.value.status_code == 412
    assert raised.value.retry_after is None
    assert "more than one Task" in raised.value.reason
    assert "2 Tasks match" in raised.value.reason
    assert len(server.tasks()) == 2


@pytest.mark.parametrize("kind", ["fhir", "webhook"])
def test_failures_become_delivery_errors_that_say_why(server: FhirTestServer, kind: str) -> None:
    url = server.base_url if kind == "fhir" else server.hook_url
    destination = (
        FhirTaskDestination("d", url, timeout=0.3)
        if kind == "fhir"
        else WebhookDestination("d", url, timeout=0.3)
    )

    def error() -> DeliveryError:
        with pytest.raises(DeliveryError) as raised:
            destination.deliver(delivery())
        return raised.value

    try:
        server.mode = "reject"
        rejected = error()
        assert rejected.status_code == 400 and rejected.retry_after is None
        assert "HTTP 400 Bad Request" in rejected.reason
        assert "unknown practitioner" in rejected.reason

        server.mode = "down"
        down = error()
        assert (down.status_code, down.retry_after) == (503, 0.0)
        server.retry_after = "120"
        assert error().retry_after == 120.0
        server.retry_after = format_datetime(datetime.now(UTC) + timedelta(seconds=60), True)
        later = error().retry_after
        assert later is not None and 50 <= later <= 61
        server.retry_after = "soon"
        assert error().retry_after is None

        server.mode = "up"
        server.delay = 1.0
        slow = error()
        assert slow.status_code is None and "no answer in time" in slow.reason
        server.delay = 0.0

        server.stop()
        stopped = error()
        assert stopped.status_code is None and "connection failed" in stopped.reason
        server.start()
        destination.deliver(delivery())
    finally:
        destination.close()


def test_webhook_posts_the_change_signed_with_an_idempotency_key(server: FhirTestServer) -> None:
    signed = WebhookDestination("hook", server.hook_url, secret=SECRET)
    plain = WebhookDestination("plain", server.hook_url)
    try:
        signed.deliver(delivery("t-9", 4))
        plain.deliver(delivery("t-9", 5))
    finally:
        signed.close()
        plain.close()
    first, second = server.hook_calls()
    assert first.payload == {
        "event": "task.changed",
        "task_identifier": "t-9",
        "task_version": 4,
        "task": dict(delivery("t-9", 4).resource),
    }
    assert first.headers["idempotency-key"] == "t-9:4"
    assert first.headers["content-type"] == "application/json"
    expected = hmac.new(SECRET.encode(), first.body, hashlib.sha256).hexdigest()
    assert first.headers["x-safetynet-signature"] == f"sha256={expected}"
    assert second.headers["idempotency-key"] == "t-9:5"
    assert "x-safetynet-signature" not in second.headers


@pytest.mark.parametrize(
    ("spec", "kind", "name"),
    [
        ("fhir=https://fhir.example.org/R4", FhirTaskDestination, "fhir"),
        ("webhook=http://hooks.example.org/safetynet", WebhookDestination, "webhook"),
        ("ris-push:fhir=https://fhir.example.org/R4?tenant=a", FhirTaskDestination, "ris-push"),
        (" ward.board:webhook=https://h.example/x ", WebhookDestination, "ward.board"),
    ],
)
def test_destination_from_url(spec: str, kind: type, name: str) -> None:
    made = destination_from_url(spec)
    try:
        assert isinstance(made, kind)
        assert made.name == name
    finally:
        made.close()


@pytest.mark.parametrize(
    ("spec", "complaint"),
    [
        ("", "KIND=URL"),
        ("https://fhir.example.org", "KIND=URL"),
        ("fhir=", "KIND=URL"),
        ("smtp=https://x.example", "unknown destination kind 'smtp'"),
        ("bad name:fhir=https://x.example", "destination name 'bad name'"),
        ("fhir=ftp://x.example/fhir", "http:// or https://"),
        ("fhir=not a url", "http:// or https://"),
        ("webhook=https://", "http:// or https://"),
    ],
)
def test_destination_from_url_refuses_with_a_clear_message(spec: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=re.escape(complaint)):
        destination_from_url(spec)


def test_destination_from_url_signs_webhooks_with_the_secret(server: FhirTestServer) -> None:
    hook = destination_from_url(f"webhook={server.hook_url}", secret=SECRET)
    # The FHIR base may be the root too; the secret is of no use to it.
    fhir = destination_from_url(f"fhir={server.root_url}", secret=SECRET)
    try:
        hook.deliver(delivery())
        fhir.deliver(delivery())
    finally:
        hook.close()
        fhir.close()
    [call] = server.hook_calls()
    digest = hmac.new(SECRET.encode(), call.body, hashlib.sha256).hexdigest()
    assert call.headers["x-safetynet-signature"] == f"sha256={digest}"
    assert server.webhooks() == [call.payload]
    assert server.task_identifiers() == ["task-1"]


# --- backoff ----------------------------------------------------------------------------------


def test_backoff_grows_and_caps() -> None:
    rng = random.Random(1)
    exact = Backoff(first=1, factor=2, ceiling=30, jitter=0)
    assert [exact.delay(n, rng) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    assert exact.delay(100_000, rng) == 30  # no overflow after a very long outage
    jittered = Backoff(first=1, factor=2, ceiling=30, jitter=0.1)
    for n in range(1, 12):
        base = min(30, 2 ** (n - 1))
        assert 0.9 * base <= jittered.delay(n, rng) <= base
    spread = {round(jittered.delay(3, rng), 6) for _ in range(20)}
    assert len(spread) > 1
    for bad in (
        {"first": 0},
        {"first": 10, "ceiling": 5},
        {"factor": 0.5},
        {"jitter": 1.0},
        {"ceiling": float("inf")},
    ):
        with pytest.raises(ValueError):
            Backoff(**bad)


# --- the dispatcher ---------------------------------------------------------------------------


def test_dispatcher_delivers_every_change_through_an_outage(
    store: SqlStore, tasks: Tasks, server: FhirTestServer, clock: Clock
) -> None:
    dispatcher = Dispatcher(
        store,
        [
            FhirTaskDestination("fhir", server.base_url, timeout=2),
            WebhookDestination("hook", server.hook_url, secret=SECRET, timeout=2),
        ],
        now=clock,
        backoff=Backoff(first=1, factor=2, ceiling=20),
        rng=random.Random(7),
    )
    # 20 Tasks, 50 changes: five Tasks changed five times, five three times, ten once,
    # made round by round so that one Task's versions are interleaved with others'.
    wanted = {f"t{i:02}": 5 if i < 5 else 3 if i < 10 else 1 for i in range(20)}
    plan = [name for v in range(1, 6) for name, n in wanted.items() if n >= v]
    assert len(plan) == 50
    try:
        for name in plan[:20]:
            tasks.change(name)
        assert dispatcher.run_once() == 40  # every Task's first version, to both
        for name in plan[20:28]:
            tasks.change(name)
        dispatcher.run_once()

        server.mode = "down"
        for name in plan[28:36]:
            tasks.change(name)
        for _ in range(3):
            assert dispatcher.run_once() == 0
            clock.advance(5)

        server.stop()
        for name in plan[36:]:
            tasks.change(name)
        for _ in range(3):
            assert dispatcher.run_once() == 0
            clock.advance(5)
        during = statuses(store, "fhir", "hook")
        assert during["fhir"].failing > 0 and during["fhir"].last_error

        server.start()
        server.mode = "up"

        def drained() -> bool:
            report = statuses(store, "fhir", "hook").values()
            return all(s.pending == 0 and s.not_yet_queued == 0 for s in report)

        rounds_until(dispatcher, clock, drained)
    finally:
        dispatcher.close()

    for report in statuses(store, "fhir", "hook").values():
        assert (report.delivered, report.pending, report.failing) == (50, 0, 0)
    assert dispatcher.failing() == {"fhir": 0, "hook": 0}

    # The FHIR server holds exactly one Task per identifier, each at its latest version.
    held = server.tasks_by_identifier(TASK_SYSTEM)
    assert sorted(held) == sorted(wanted)
    assert len(server.tasks()) == 20
    for name, found in held.items():
        assert len(found) == 1, f"{name} was created twice"
        assert found[0]["note"] == [{"text": f"version {wanted[name]}"}]
        assert server.put_counts()[name] >= wanted[name]

    # The webhook saw every version of every Task, in order per Task.
    seen: dict[str, list[int]] = {}
    for name, version in server.hook_versions():
        seen.setdefault(name, []).append(version)
    for name, count in wanted.items():
        assert seen[name] == sorted(seen[name]), f"{name} out of order: {seen[name]}"
        assert set(seen[name]) == set(range(1, count + 1))
    for call in server.hook_calls():
        digest = hmac.new(SECRET.encode(), call.body, hashlib.sha256).hexdigest()
        assert call.headers["x-safetynet-signature"] == f"sha256={digest}"


def test_dispatcher_retries_on_a_growing_capped_schedule(
    store: SqlStore, tasks: Tasks, server: FhirTestServer, clock: Clock
) -> None:
    dispatcher = Dispatcher(
        store,
        [FhirTaskDestination("fhir", server.base_url)],
        now=clock,
        backoff=Backoff(first=1, factor=2, ceiling=8, jitter=0),
    )
    server.mode = "down"
    tasks.change("a")
    waits = []
    try:
        for _ in range(6):
            assert dispatcher.run_once() == 0
            [row] = rows(store, "fhir")
            wait = (row["next_attempt_at"] - clock()).total_seconds()
            waits.append(wait)
            # Not due yet: no request is made.
            clock.advance(wait / 2)
            before = server.put_counts()["a"]
            dispatcher.run_once()
            assert server.put_counts()["a"] == before
            clock.advance(wait / 2)
        assert waits == [1, 2, 4, 8, 8, 8]
        assert rows(store, "fhir")[0]["attempts"] == 6

        # A server asking for longer than our ceiling gets the ceiling.
        server.retry_after = "30"
        dispatcher.run_once()
        assert (rows(store, "fhir")[0]["next_attempt_at"] - clock()).total_seconds() == 8
    finally:
        dispatcher.close()
    slow = Dispatcher(
        store,
        [FhirTaskDestination("fhir", server.base_url)],
        now=clock,
        backoff=Backoff(jitter=0),
    )
    try:
        # Attempt 8 would wait 128 s; the server asks for 200 and is obeyed.
        server.retry_after = "200"
        clock.advance(8)
        slow.run_once()
        assert (rows(store, "fhir")[0]["next_attempt_at"] - clock()).total_seconds() == 200
    finally:
        slow.close()


def test_an_unavailable_destination_is_probed_one_change_at_a_time(
    store: SqlStore, tasks: Tasks, server: FhirTestServer, clock: Clock
) -> None:
    dispatcher = Dispatcher(
        store,
        [
            FhirTaskDestination("fhir", server.base_url),
            WebhookDestination("hook", server.hook_url),
        ],
        now=clock,
        backoff=Backoff(first=10, jitter=0),
    )
    for name in "abc":
        tasks.change(name)
    server.mode = "down"
    try:
        assert dispatcher.run_once() == 0
        # One request per destination, not one per pending change.
        assert sum(server.put_counts().values()) == 1
        assert [r["attempts"] for r in rows(store, "fhir")] == [1, 0, 0]
        clock.advance(5)
        dispatcher.run_once()  # paused until the failed change's retry
        assert sum(server.put_counts().values()) == 1
        tasks.change("d")
        dispatcher.run_once()
        # Paused, but still queueing: the status tells "down" from "not running".
        assert statuses(store, "fhir")["fhir"].not_yet_queued == 0
        server.mode = "up"
        clock.advance(5)
        assert dispatcher.run_once() == 8  # a, b, c and d, to both
    finally:
        dispatcher.close()
    assert server.put_counts() == Counter({"a": 2, "b": 1, "c": 1, "d": 1})


def test_a_refused_change_stays_pending_and_is_reported_after_alert_after_attempts(
    store: SqlStore, tasks: Tasks, server: FhirTestServer, clock: Clock
) -> None:
    dispatcher = Dispatcher(
        store,
        [FhirTaskDestination("fhir", server.base_url)],
        now=clock,
        backoff=Backoff(first=1, ceiling=4, jitter=0),
        alert_after=3,
    )
    server.mode = "reject"
    tasks.change("a")
    tasks.change("a")
    try:
        for _ in range(3):
            assert dispatcher.failing() == {"fhir": 0}
            assert dispatcher.run_once() == 0
            clock.advance(10)
        assert dispatcher.failing() == {"fhir": 1}
        [report] = dispatcher.status()
        assert (report.pending, report.failing, report.delivered) == (2, 1, 0)
        assert "HTTP 400" in report.last_error and "unknown practitioner" in report.last_error
        assert [r["attempts"] for r in rows(store, "fhir")] == [3, 0]
        assert server.tasks() == []

        server.mode = "up"
        rounds_until(dispatcher, clock, lambda: dispatcher.status()[0].pending == 0)
        assert dispatcher.failing() == {"fhir": 0}
    finally:
        dispatcher.close()
    [task] = server.tasks()
    assert task["note"] == [{"text": "version 2"}]


def test_shadow_tasks_are_never_delivered(
    store: SqlStore, tasks: Tasks, server: FhirTestServer, clock: Clock
) -> None:
    dispatcher = Dispatcher(
        store,
        [
            FhirTaskDestination("fhir", server.base_url),
            WebhookDestination("hook", server.hook_url),
        ],
        now=clock,
    )
    tasks.change("shadowed", shadow=True)
    tasks.change("live")
    tasks.change("shadowed", shadow=True)
    try:
        assert dispatcher.run_once() == 2
        assert dispatcher.run_once() == 0
    finally:
        dispatcher.close()
    assert list(server.tasks_by_identifier(TASK_SYSTEM)) == ["live"]
    assert list(server.hook_versions()) == [("live", 1)]
    assert "shadowed" not in server.put_counts()
    for report in statuses(store, "fhir", "hook").values():
        assert (report.delivered, report.pending, report.not_yet_queued) == (1, 0, 0)


class Exploding:
    """A destination with a bug: it raises something other than DeliveryError."""

    name = "exploding"

    def deliver(self, delivery: Delivery) -> None:
        raise RuntimeError(f"cannot render {delivery.resource['description']}")

    def close(self) -> None:
        pass


def test_run_survives_destination_and_database_failures_and_logs_no_patient_data(
    store: SqlStore,
    tasks: Tasks,
    server: FhirTestServer,
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="safetynet.outbox")
    dispatcher = Dispatcher(
        store, [Exploding(), FhirTaskDestination("fhir", server.base_url)], now=clock
    )
    tasks.change("a")
    stop = threading.Event()
    runner = threading.Thread(target=dispatcher.run, args=(stop, 0.01), daemon=True)
    runner.start()
    try:
        deadline = time.monotonic() + 5
        while not server.tasks() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(server.tasks()) == 1
        report = {s.destination: s for s in dispatcher.status()}
        assert report["exploding"].failing == 1
        assert "unexpected RuntimeError" in report["exploding"].last_error

        # The database goes wrong under the running dispatcher: it logs and keeps going.
        with store.engine.begin() as connection:
            connection.execute(text("DROP TABLE outbox_delivery"))
        tasks.change("a")
        deadline = time.monotonic() + 5
        # Each destination's next round fails to queue (in whatever order the drop lands).
        while (
            "outbox queue failed: destination=exploding" not in caplog.text
            and time.monotonic() < deadline
        ):
            time.sleep(0.01)
        assert runner.is_alive()
    finally:
        stop.set()
        runner.join(timeout=5)
        dispatcher.close()
    assert not runner.is_alive()
    assert "outbox deliver failed: destination=exploding task=a version=1" in caplog.text
    assert "error=RuntimeError" in caplog.text
    assert "outbox queue failed: destination=exploding" in caplog.text
    assert "dispatcher stopped" in caplog.text
    assert PATIENT_MARKER not in caplog.text
    assert dispatcher.run_once() == 0  # a round on a broken database returns, never raises


def test_dispatcher_refuses_two_destinations_with_one_name(clock: Clock) -> None:
    store = open_store("sqlite://")
    one = WebhookDestination("hook", "http://127.0.0.1:9/a")
    two = WebhookDestination("hook", "http://127.0.0.1:9/b")
    try:
        with pytest.raises(ValueError, match="hook repeated"):
            Dispatcher(store, [one, two], now=clock)
        with pytest.raises(ValueError, match="at least 1"):
            Dispatcher(store, [one], now=clock, batch=0)
    finally:
        one.close()
        two.close()
        store.close()
