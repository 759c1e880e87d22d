"""What the FHIR HTTP speed-ups must not change: group commit answers after the commit and keeps
one request's failure to itself, a cached token is still refused soon after revocation, and a
searchset built from the stored JSON text is the Task as served, with a total carried by the
paging cursor. (Speed itself is measured in bench/bench_fhir.py, never asserted here.)"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, select

from adapters.fhir.committer import GroupCommitter
from adapters.fhir.task_api import _Search, _searchset, _served
from adapters.service.auth import Principal, TokenStore
from adapters.store import SqlStore, SqlUnitOfWork, open_store
from adapters.store.schema import audit
from adapters.store.task_search import (
    Cursor,
    CursorError,
    Viewer,
    search_task_json,
    visible_task,
)
from engine.ports import StoredTask
from tests.api_harness import ApiServer

NOW = datetime(2026, 11, 27, 9, 0, tzinfo=UTC)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlStore]:
    opened = open_store(f"sqlite:///{tmp_path / 'speed.db'}")
    yield opened
    opened.close()


def _note(text: str) -> Any:
    """A piece of work that writes one audit row named `text` and returns `text`."""

    def work(uow: SqlUnitOfWork) -> str:
        uow.connection.execute(
            insert(audit).values(at=NOW, actor="test", action=text, subject="", detail={})
        )
        return text

    return work


def _actions(store: SqlStore) -> set[str]:
    with store.begin(read_only=True) as uow:
        return set(uow.connection.execute(select(audit.c.action)).scalars())


# --- group commit ---------------------------------------------------------------------------


def test_group_commit_shares_a_transaction_and_isolates_a_failure(store: SqlStore) -> None:
    rings: list[int] = []
    writing: list[bool] = []
    committer = GroupCommitter(
        store, after_commit=lambda: rings.append(1), on_writing=writing.append
    )
    started, release = threading.Event(), threading.Event()

    def first(uow: SqlUnitOfWork) -> str:
        started.set()
        release.wait(10)  # the others queue meanwhile, and go together next
        return str(_note("first")(uow))

    def broken(uow: SqlUnitOfWork) -> str:
        _note("broken")(uow)
        raise RuntimeError("a bug in one request")

    async def scenario() -> list[Any]:
        head = asyncio.create_task(committer.run(first))
        assert await asyncio.to_thread(started.wait, 10)  # the writer is inside `first`
        rest = [committer.run(_note("a")), committer.run(broken), committer.run(_note("b"))]
        gathered = asyncio.gather(*rest, return_exceptions=True)
        await asyncio.sleep(0)  # each run() has queued its work
        release.set()
        return [await head, *await gathered]

    first_answer, a, failed, b = asyncio.run(scenario())
    assert (first_answer, a, b) == ("first", "a", "b")
    assert isinstance(failed, RuntimeError)
    # The failed request's write was undone alone; the rest committed, in two transactions.
    assert _actions(store) == {"first", "a", "b"}
    assert committer.commits == 2 and len(rings) == 2
    assert writing == [True, False, True, False]  # the worker is told around each group


class _CommitFailsOnce:
    """The real store, whose first transaction fails at commit (the database went away)."""

    def __init__(self, store: SqlStore) -> None:
        self.inner = store
        self.failed = False

    @contextlib.contextmanager
    def begin(self, *, read_only: bool = False) -> Iterator[SqlUnitOfWork]:
        with self.inner.begin(read_only=read_only) as uow:
            yield uow
            if not self.failed:
                self.failed = True
                raise ConnectionError("commit failed")


def test_a_failed_group_commit_is_retried_request_by_request(store: SqlStore) -> None:
    flaky = _CommitFailsOnce(store)
    committer = GroupCommitter(flaky)  # type: ignore[arg-type]
    started, release = threading.Event(), threading.Event()

    def first(uow: SqlUnitOfWork) -> str:
        started.set()
        release.wait(10)
        return str(_note("first")(uow))

    async def scenario() -> list[Any]:
        head = asyncio.create_task(committer.run(first))
        assert await asyncio.to_thread(started.wait, 10)  # the writer is inside `first`
        rest = asyncio.gather(committer.run(_note("a")), committer.run(_note("b")))
        await asyncio.sleep(0)  # each run() has queued its work
        release.set()
        head_result: Any
        try:
            head_result = await head
        except ConnectionError as exc:
            head_result = exc
        return [head_result, *await rest]

    head, a, b = asyncio.run(scenario())
    # The first request was alone in the failed transaction: it is told, nothing stored.
    assert isinstance(head, ConnectionError)
    assert (a, b) == ("a", "b")
    assert _actions(store) == {"a", "b"}


# --- the token cache ------------------------------------------------------------------------


def test_a_revoked_token_is_refused_within_the_cache_time(store: SqlStore) -> None:
    clock = [100.0]
    service = TokenStore(store, cache_seconds=1.0, clock=lambda: clock[0])
    token = service.create("ward-9", ["clinician"], NOW, practitioner="C9009")
    expected = Principal("ward-9", frozenset({"clinician"}), "C9009")
    assert service.lookup(token) == expected
    # Revoked elsewhere (the CLI's process): this process may answer from its cache until
    # the cache time is up, and never after.
    assert TokenStore(store).revoke("ward-9", NOW) is True
    clock[0] += 0.5
    assert service.lookup(token) == expected
    clock[0] += 0.6
    assert service.lookup(token) is None
    # Revoked in this process: refused at once.
    other = service.create("ward-10", ["governance"], NOW)
    assert service.lookup(other) is not None
    assert service.revoke("ward-10", NOW) is True
    assert service.lookup(other) is None
    # An unknown token is never remembered.
    assert service.lookup("sn_not-a-token") is None


# --- searchsets from the stored JSON text ---------------------------------------------------


def _task(n: int, *, meta: dict[str, Any] | None = None, owner: str = "C9001") -> StoredTask:
    identifier = f"t-{n:03d}"
    resource: dict[str, Any] = {"resourceType": "Task", "id": identifier}
    if meta is not None:
        resource["meta"] = meta
    resource.update(
        {
            "status": "requested",
            "intent": "order",
            "description": f'Recall {n}: café, naïve «quotes» "and" \\ backslashes',
            "owner": {"identifier": {"system": "urn:gmc", "value": owner}},
            "for": {"identifier": {"system": "urn:nhs", "value": f"999{n:07d}"}},
        }
    )
    return StoredTask(identifier, f"p{n}", "r1", "1", "requested", "urgent", owner, resource)


def _put(store: SqlStore, tasks: list[StoredTask]) -> None:
    with store.begin() as uow:
        for n, task in enumerate(tasks):
            uow.put_task(task, NOW + timedelta(minutes=n), "test")


def test_searchset_entries_are_the_tasks_as_served(database_url: str) -> None:
    store = open_store(database_url)
    try:
        tags = {"tag": [{"system": "urn:safetynet:tag", "code": "safeguarding"}]}
        _put(
            store,
            [_task(1), _task(2, meta=tags), _task(3, meta={}), _task(4, meta={"source": "x"})],
        )
        viewer = Viewer(all_safeguarding=True)
        with store.begin(read_only=True) as uow:
            page = search_task_json(uow, viewer, [], count=10)
            expected = [visible_task(uow, viewer, f"t-00{n}") for n in (1, 2, 3, 4)]
        bundle = json.loads(_searchset("http://x/fhir", _Search(count=10), page, NOW))
        served = [entry["resource"] for entry in bundle["entry"]]
        wanted = [_served(record) for record in expected if record is not None]
        assert served == wanted
        assert [list(resource) for resource in served] == [list(w) for w in wanted]  # order
        assert bundle["total"] == 4
        assert [e["fullUrl"] for e in bundle["entry"]] == [
            f"http://x/fhir/Task/t-00{n}" for n in (1, 2, 3, 4)
        ]
    finally:
        store.close()


def _next(bundle: dict[str, Any]) -> str:
    return next(link["url"] for link in bundle["link"] if link["relation"] == "next")


def test_the_total_is_carried_by_the_cursor_and_recounted_when_asked(tmp_path: Path) -> None:
    with ApiServer(tmp_path / "api.db", worker=False) as server:
        _put(server.store, [_task(n) for n in range(12)])
        token = server.token("lead", "governance")
        with server.client(token) as http:
            first = http.get("/Task", params={"_count": 5}).json()
            accurate = http.get("/Task", params={"_count": 5, "_total": "accurate"}).json()
            assert first["total"] == accurate["total"] == 12
            _put(server.store, [_task(99)])  # one more Task while the client pages
            # The next page carries the first page's total; _total=accurate counts again.
            assert http.get(_next(first)).json()["total"] == 12
            assert http.get(_next(accurate)).json()["total"] == 13
            assert "total" not in http.get("/Task", params={"_total": "none"}).json()
            whole = http.get("/Task", params={"_count": 50}).json()
            assert whole["total"] == len(whole["entry"]) == 13  # a whole first page


def test_a_cursor_made_before_the_total_was_carried_still_pages() -> None:
    old = Cursor("created", False, NOW, "t-001")
    token = base64.urlsafe_b64encode(
        json.dumps(["created", 0, NOW.isoformat(), "t-001", 0]).encode()
    )
    assert Cursor.decode(token.decode().rstrip("=")) == old and old.total == -1
    with pytest.raises(CursorError):
        Cursor.decode(
            base64.urlsafe_b64encode(
                json.dumps(["created", 0, NOW.isoformat(), "t-001", 0, "x"]).encode()
            ).decode()
        )


@pytest.mark.parametrize(("sort", "descending"), [("created", False), ("updated", True)])
def test_paging_both_ways_with_the_carried_total(
    store: SqlStore, sort: str, descending: bool
) -> None:
    _put(store, [_task(n) for n in range(12)])
    viewer = Viewer()
    order = sorted((f"t-{n:03d}" for n in range(12)), reverse=descending)
    seen: list[str] = []
    with store.begin(read_only=True) as uow:
        page = search_task_json(uow, viewer, [], sort=sort, descending=descending, count=5)
        pages = [page]
        while page.next is not None:
            page = search_task_json(
                uow, viewer, [], sort=sort, descending=descending, count=5, cursor=page.next
            )
            pages.append(page)
        assert [len(p.records) for p in pages] == [5, 5, 2]
        assert all(p.total == 12 for p in pages)
        seen = [t.identifier for p in pages for t in p.records]
        back = pages[-1]
        walked = [t.identifier for t in back.records]
        while back.previous is not None:
            back = search_task_json(
                uow, viewer, [], sort=sort, descending=descending, count=5, cursor=back.previous
            )
            assert back.total == 12
            walked = [t.identifier for t in back.records] + walked
    assert seen == walked == order
