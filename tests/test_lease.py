"""The processor lease and the worker's queue, on SQLite and on the real PostgreSQL."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from adapters.store import SqlStore, open_store
from adapters.store.lease import Lease, LeaseLost
from adapters.store.operations import (
    count_attempt,
    pending,
    quarantine_item,
    quarantine_items,
    retry,
)
from engine.ports import InboundMessage

T0 = datetime(2026, 11, 27, 9, 0, tzinfo=UTC)


class Clock:
    """A wall clock the test moves."""

    def __init__(self) -> None:
        self.at = T0

    def __call__(self) -> datetime:
        return self.at


@pytest.fixture
def store(database_url: str) -> Iterator[SqlStore]:
    opened = open_store(database_url)
    yield opened
    opened.close()


def test_one_holder_at_a_time_and_takeover_after_expiry(store: SqlStore) -> None:
    clock = Clock()
    a = Lease(store, "processor", "a", ttl=10, now=clock)
    b = Lease(store, "processor", "b", ttl=10, now=clock)
    assert a.acquire() and a.epoch == 1
    assert not b.acquire() and not b.held
    clock.at += timedelta(seconds=9)
    with store.begin() as uow:
        a.renew(uow)  # extends to T0 + 19 s
    clock.at += timedelta(seconds=9)
    assert not b.acquire(), "renewed, so not expired"
    clock.at += timedelta(seconds=2)
    assert b.acquire() and b.epoch == 2
    with pytest.raises(LeaseLost), store.begin() as uow:
        a.renew(uow)
    assert not a.held
    assert not a.acquire()


def test_release_hands_over_at_once_and_a_restarted_holder_reclaims(store: SqlStore) -> None:
    clock = Clock()
    a = Lease(store, "processor", "a", ttl=10, now=clock)
    b = Lease(store, "processor", "b", ttl=10, now=clock)
    assert a.acquire()
    a.release()
    assert b.acquire() and b.epoch == 2
    # The same holder name after a restart (a new Lease object) takes back its own lease.
    again = Lease(store, "processor", "b", ttl=10, now=clock)
    assert again.acquire() and again.epoch == 2


@pytest.mark.postgres
def test_takeover_waits_for_the_holders_transaction(pg_admin: object) -> None:
    """Fencing: a processing transaction starts with renew(), whose row lock makes a takeover
    wait until it commits; the old holder then cannot renew."""
    from tests.conftest import new_pg_database

    with new_pg_database(*pg_admin) as url:  # type: ignore[misc]
        store = open_store(url)
        try:
            clock_a, clock_b = Clock(), Clock()
            a = Lease(store, "processor", "a", ttl=10, now=clock_a)
            b = Lease(store, "processor", "b", ttl=10, now=clock_b)
            assert a.acquire()
            clock_b.at = T0 + timedelta(hours=1)  # b's clock says a's lease is long over
            took: list[bool] = []
            with store.begin() as uow:
                a.renew(uow)
                thread = threading.Thread(target=lambda: took.append(b.acquire()))
                thread.start()
                time.sleep(0.5)
                assert not took, "the takeover waits while the holder's transaction is open"
            thread.join(10)
            assert took == [True]
            with pytest.raises(LeaseLost), store.begin() as uow:
                a.renew(uow)
        finally:
            store.close()


def _message(n: int) -> InboundMessage:
    raw = f"MSH|^~\\&|PAS|RX1|SN|RX1|20260101000000||ADT^A04|C{n}|P|2.5"
    return InboundMessage(raw, "PAS^RX1", f"C{n}", f"hash{n}", T0, message_type="ADT^A04")


def test_pending_isolates_a_message_that_was_started_before(store: SqlStore) -> None:
    with store.begin() as uow:
        ids = [uow.add_to_inbox(_message(n)).id for n in range(5)]
    with store.begin() as uow:
        batch = pending(uow, 10)
        assert [m.id for m in batch] == ids
        count_attempt(uow, [ids[2]])
    with store.begin() as uow:
        # Up to the one started before: a batch that cannot include it.
        assert [m.id for m in pending(uow, 10)] == ids[:2]
        uow.set_inbox_state(ids[0], "processed")
        uow.set_inbox_state(ids[1], "processed")
    with store.begin() as uow:
        alone = pending(uow, 10)
        assert [(m.id, m.attempts) for m in alone] == [(ids[2], 1)], "retried alone"


def test_retry_sends_a_quarantined_message_back_and_audits_it(store: SqlStore) -> None:
    with store.begin() as uow:
        entry = uow.add_to_inbox(_message(1))
        item_id = uow.quarantine(entry.id, "result names no known order", "AE", "ORC-2", at=T0)
        uow.set_inbox_state(entry.id, "quarantined", "result names no known order")
    with store.begin(read_only=True) as uow:
        [listed] = quarantine_items(uow)
        assert (listed.id, listed.control_id, listed.inbox_state) == (item_id, "C1", "quarantined")
        shown = quarantine_item(uow, item_id)
        assert shown is not None and shown.raw.startswith("MSH|")
    with store.begin() as uow:
        retry(uow, item_id, T0, "tester")
    with store.begin() as uow:
        assert [m.id for m in pending(uow, 10)] == [entry.id]
        assert quarantine_items(uow) == []
        [resolved] = quarantine_items(uow, include_resolved=True)
        assert resolved.resolution == "retried by tester"
        with pytest.raises(LookupError):
            retry(uow, item_id, T0, "tester")
