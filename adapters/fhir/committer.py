"""Group commit for the FHIR API's writes: many requests' inbox writes in one transaction.

The handlers that store what they were sent (`adapters.fhir.inbound_api`) hand their work to
the app's `GroupCommitter` instead of each opening a transaction of its own. One writer thread
takes every piece of work waiting (up to `max_batch`), runs each in a savepoint of one
transaction, commits once, wakes the worker once, and then settles every request. As with the
MLLP listener's `InboxCommitter`: a request is answered only after the transaction holding its
write has committed; while one commit is in flight the next requests queue and go together, so
concurrent writers share one commit (and, on SQLite, one turn of the single writer's lock)
instead of queueing for their own. Measured in `bench/bench_fhir.py`.

Isolation. Each piece of work runs in its own savepoint: one that raises (a bug, a constraint)
is undone alone and its request gets the exception (a 500 OperationOutcome), while the others
commit. Bad *content* never raises: the ingest keeps it and answers it in its result. If the
shared commit itself fails (the database went away), each piece of work is run again alone in
a transaction of its own, so that only those that fail again fail; their requests get the
exception and nothing of theirs was stored.

The writer thread starts with the first piece of work and ends after `idle_seconds` without
any, so an app that is torn down leaves no thread behind.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from adapters.store import SqlStore, SqlUnitOfWork

__all__ = ["GroupCommitter"]

log = logging.getLogger("safetynet.fhir")

T = TypeVar("T")


@dataclass(eq=False, slots=True)
class _Job:
    work: Callable[[SqlUnitOfWork], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]


@dataclass(frozen=True, slots=True)
class _Outcome:
    result: Any = None
    error: BaseException | None = None


class GroupCommitter:
    """Runs units of work from many requests in shared transactions, on one thread.

    `after_commit`: called once after each commit that stored something (the FHIR API rings
    the worker's doorbell); `on_writing`: told True before a group is written and False
    after (as the MLLP listener tells the worker, which then gives way on SQLite: see
    `adapters.service.worker`); `max_batch`: most pieces of work per transaction (a resource
    costs about a millisecond to judge and store: 50 hold the single writer some 50 ms)."""

    def __init__(
        self,
        store: SqlStore,
        *,
        after_commit: Callable[[], None] = lambda: None,
        on_writing: Callable[[bool], None] = lambda writing: None,
        max_batch: int = 50,
        idle_seconds: float = 10.0,
    ) -> None:
        self.store = store
        self._after_commit = after_commit
        self._on_writing = on_writing
        self._max_batch = max(1, max_batch)
        self._idle = idle_seconds
        self._queue: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.commits = 0  # transactions committed (for the bench and tests)

    async def run(self, work: Callable[[SqlUnitOfWork], T]) -> T:
        """Run `work(uow)` in a transaction shared with other requests' work and return its
        result once that transaction has committed; re-raise what `work` raised (nothing of
        it was stored) or what the commit raised. `work` may run twice (the second time
        alone, if the shared commit failed): it must depend only on the unit of work."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        job = _Job(work, loop, future)
        with self._lock:
            self._queue.put(job)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="fhir-group-commit", daemon=True
                )
                self._thread.start()
        return await future

    def _run(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=self._idle)
            except queue.Empty:
                with self._lock:
                    if self._queue.empty():
                        self._thread = None
                        return
                continue
            batch = [first]
            while len(batch) < self._max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            outcomes: list[_Outcome] = []
            try:
                outcomes = self._commit(batch)
            except BaseException as exc:  # never leave a request waiting for good
                outcomes = [_Outcome(error=exc)] * len(batch)
                raise
            finally:
                self._settle(batch, outcomes)

    def _commit(self, batch: list[_Job]) -> list[_Outcome]:
        self._on_writing(True)
        try:
            outcomes = self._together(batch) if len(batch) > 1 else None
            if outcomes is None:
                outcomes = [self._alone(job) for job in batch]
        finally:
            self._on_writing(False)
        if any(outcome.error is None for outcome in outcomes):
            try:
                self._after_commit()
            except Exception:  # the worker also polls: a missed ring delays, loses nothing
                log.exception("after-commit hook failed")
        return outcomes

    def _together(self, batch: list[_Job]) -> list[_Outcome] | None:
        """Every job in one transaction, each in a savepoint; None if the commit failed."""
        try:
            with self.store.begin() as uow:
                outcomes = [self._attempt(uow, job) for job in batch]
        except Exception as exc:
            kind = type(exc)
            log.warning(
                "group commit failed: each request is tried alone",
                extra={"count": len(batch), "reason_code": f"{kind.__module__}.{kind.__name__}"},
            )
            return None
        self.commits += 1
        return outcomes

    @staticmethod
    def _attempt(uow: SqlUnitOfWork, job: _Job) -> _Outcome:
        try:
            with uow.savepoint():
                return _Outcome(job.work(uow))
        except Exception as exc:
            return _Outcome(error=exc)

    def _alone(self, job: _Job) -> _Outcome:
        try:
            with self.store.begin() as uow:
                result = job.work(uow)
        except Exception as exc:
            return _Outcome(error=exc)
        self.commits += 1
        return _Outcome(result)

    @staticmethod
    def _settle(batch: list[_Job], outcomes: list[_Outcome]) -> None:
        # One wake-up of each event loop per group, not one per request.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], _Outcome]]] = {}
        for job, outcome in zip(batch, outcomes, strict=True):
            by_loop.setdefault(job.loop, []).append((job.future, outcome))
        for loop, settled in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle_all, settled)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                continue


def _settle_all(settled: list[tuple[asyncio.Future[Any], _Outcome]]) -> None:
    for future, outcome in settled:
        if future.done():
            continue  # the request was cancelled
        if outcome.error is not None:
            future.set_exception(outcome.error)
        else:
            future.set_result(outcome.result)
