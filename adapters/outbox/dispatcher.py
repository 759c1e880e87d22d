"""The dispatcher: moves Task changes from the outbox to every destination, for ever.

One round (`run_once`), per destination: queue the changes it has not got (`enqueue`), take
the due ones (`due`: at most one per Task, the oldest), send each, and record each outcome in
its own short transaction. No database transaction is open while an HTTP request is; a change
sent but not recorded (the process died, the database went away) is sent again later, which
the destinations' idempotent requests make harmless.

A failure (any `DeliveryError`, a 4xx included, or an unexpected exception from a destination)
keeps the change pending and schedules the next attempt with `Backoff`, or later if the server
said so with Retry-After. When the server is unavailable rather than refusing one change (no
answer, 429, 502, 503, 504), the rest of that destination's round is skipped and the
destination waits for the failed change's retry time: an outage is probed on the backoff
schedule, one request at a time, and one slow destination holds up the others for at most one
request per round. `run` loops until told to stop and survives every exception from a
destination or the database: it logs it (`safetynet.outbox`: identifiers, destination, HTTP
status and exception class only, never the Task or the server's text) and carries on.

Run one dispatcher per database (see `adapters.outbox.store`).
"""

from __future__ import annotations

import logging
import math
import random
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.exc import DBAPIError

from adapters.outbox import store as outbox_store
from adapters.outbox.destinations import DeliveryError, Destination
from adapters.outbox.store import Delivery, DestinationStatus
from adapters.store import SqlStore

__all__ = ["Backoff", "Dispatcher"]

LOG = logging.getLogger("safetynet.outbox")

# How often (seconds of the dispatcher's clock) `enqueue` checks the whole outbox rather than
# the recent part; the first round always does.
FULL_SWEEP_EVERY = 300.0

# Answers that say the server cannot take anything now (no answer at all counts too), as
# opposed to refusing one change: the destination is paused until the failed change's retry.
UNAVAILABLE = frozenset({429, 502, 503, 504})


@dataclass(frozen=True)
class Backoff:
    """How long to wait before retrying a failed delivery: `first` seconds after the first
    failure, `factor` times longer after each further one, never more than `ceiling`, less a
    random part of up to `jitter` (a fraction) so that retries after an outage spread out."""

    first: float = 1.0
    factor: float = 2.0
    ceiling: float = 300.0
    jitter: float = 0.1

    def __post_init__(self) -> None:
        if not (0 < self.first <= self.ceiling and math.isfinite(self.ceiling)):
            raise ValueError("backoff needs 0 < first <= ceiling (finite)")
        if not self.factor >= 1:
            raise ValueError("backoff factor must be at least 1")
        if not 0 <= self.jitter < 1:
            raise ValueError("backoff jitter must be a fraction in [0, 1)")

    def delay(self, attempts: int, rng: random.Random) -> float:
        """Seconds to wait after `attempts` failed attempts (1 after the first failure)."""
        try:
            base = self.first * self.factor ** (max(1, attempts) - 1)
        except OverflowError:
            base = self.ceiling
        # Jitter only shortens the wait, so the ceiling is a true bound.
        return min(self.ceiling, base) * (1.0 - self.jitter * rng.random())


def _exception_name(exc: BaseException) -> str:
    """The class of an exception (and of the driver's, for a database error): never its text,
    which can quote SQL parameters or a server's answer."""
    name = type(exc).__name__
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        name += f"/{type(exc.orig).__name__}"
    return name


class Dispatcher:
    """Delivers every Task change in the outbox to every destination, in order per Task.

    `now` is the clock (the wall clock in the service, a controllable one in tests); `batch`
    is how many due changes per destination one round takes; `alert_after` is the number of
    attempts after which `failing()` counts a delivery. `rng` drives the backoff's jitter.
    Destination names must be unique: each keys its own delivery rows.
    """

    def __init__(
        self,
        store: SqlStore,
        destinations: Sequence[Destination],
        *,
        now: Callable[[], datetime],
        backoff: Backoff = Backoff(),
        batch: int = 100,
        alert_after: int = 5,
        rng: random.Random | None = None,
    ) -> None:
        names = [destination.name for destination in destinations]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"destination names must be unique: {', '.join(repeated)} repeated")
        if batch < 1 or alert_after < 1:
            raise ValueError("batch and alert_after must be at least 1")
        self._store = store
        self._destinations = tuple(destinations)
        self._now = now
        self._backoff = backoff
        self._batch = batch
        self._alert_after = alert_after
        self._rng = rng if rng is not None else random.Random()
        self._last_sweep: dict[str, datetime] = {}
        # Destinations found unavailable, and until when (pacing only: the rows are the record).
        self._paused_until: dict[str, datetime] = {}

    @property
    def destinations(self) -> tuple[Destination, ...]:
        """The destinations, in the order each round serves them."""
        return self._destinations

    def run_once(self) -> int:
        """One round over every destination; returns how many deliveries completed.

        Never raises for a failing destination or database: the failure is recorded (or, if
        the database itself fails, logged) and the round moves on."""
        return sum(self._serve(destination) for destination in self._destinations)

    def run(self, stop: threading.Event, idle_wait: float = 0.5) -> None:
        """Run rounds until `stop` is set, waiting `idle_wait` seconds after a round that
        delivered nothing. Survives every exception (logged); for a thread of the service."""
        LOG.info("outbox dispatcher started for %s", ", ".join(self.names))
        while not stop.is_set():
            try:
                completed = self.run_once()
            except Exception as exc:
                self._log_exception("round", "*", exc)
                completed = 0
            if completed == 0:
                stop.wait(idle_wait)
        LOG.info("outbox dispatcher stopped")

    @property
    def names(self) -> list[str]:
        """The destinations' names."""
        return [destination.name for destination in self._destinations]

    def failing(self) -> dict[str, int]:
        """Per destination, the pending deliveries tried `alert_after` times or more (for an
        alert metric: above 0 means a change is not reaching clinicians' systems). Raises if
        the database cannot be read."""
        with self._store.begin(read_only=True) as uow:
            return outbox_store.failing(uow, self.names, self._alert_after)

    def status(self) -> list[DestinationStatus]:
        """Each destination's numbers (see `DestinationStatus`). Raises if the database cannot
        be read."""
        with self._store.begin(read_only=True) as uow:
            return outbox_store.status(uow, self.names, self._now())

    def close(self) -> None:
        """Close every destination's connections."""
        for destination in self._destinations:
            destination.close()

    # --- one destination's round ---
    def _serve(self, destination: Destination) -> int:
        name = destination.name
        paused_until = self._paused_until.get(name)
        paused = paused_until is not None and self._now() < paused_until
        try:
            batch = self._take(name, deliver=not paused)
        except Exception as exc:
            self._log_exception("queue", name, exc)
            return 0
        completed = 0
        for delivery in batch:
            unavailable = False
            try:
                destination.deliver(delivery)
            except DeliveryError as exc:
                retry_at = self._failed(delivery, exc.reason, exc.status_code, exc.retry_after)
                unavailable = exc.status_code is None or exc.status_code in UNAVAILABLE
            except Exception as exc:
                self._log_exception("deliver", name, exc, delivery)
                reason = f"unexpected {type(exc).__name__} in the destination: {exc}"
                retry_at = self._failed(delivery, reason, None, None)
            else:
                retry_at = None
                if self._delivered(delivery):
                    completed += 1
                    self._paused_until.pop(name, None)
                    continue
            if retry_at is None:
                # The database is failing: the rest of the batch would fare no better.
                break
            if unavailable:
                # The server is down, overloaded or unreachable, not refusing this change: wait
                # for this delivery's retry before sending it anything else, so an outage is
                # probed on the backoff schedule instead of by every pending change in turn.
                self._paused_until[name] = retry_at
                break
        return completed

    def _take(self, name: str, *, deliver: bool) -> list[Delivery]:
        """Queue what is new for `name` and (when `deliver`) take its due changes."""
        now = self._now()
        last = self._last_sweep.get(name)
        full = last is None or not 0 <= (now - last).total_seconds() < FULL_SWEEP_EVERY
        lookback = None if full else outbox_store.DEFAULT_LOOKBACK
        with self._store.begin() as uow:
            queued = outbox_store.enqueue(uow, name, now, lookback=lookback)
            batch = outbox_store.due(uow, name, now, self._batch) if deliver else []
        if full:
            self._last_sweep[name] = now
        if queued:
            LOG.debug("outbox queued %d change(s) for %s", queued, name)
        return batch

    def _delivered(self, delivery: Delivery) -> bool:
        try:
            with self._store.begin() as uow:
                outbox_store.delivered(uow, delivery, self._now())
        except Exception as exc:
            self._log_exception("record delivery", delivery.destination, exc, delivery)
            return False
        LOG.debug(
            "outbox delivered task=%s version=%d to %s (outbox_id=%d, attempt %d)",
            delivery.task_identifier,
            delivery.task_version,
            delivery.destination,
            delivery.outbox_id,
            delivery.attempts + 1,
        )
        return True

    def _failed(
        self,
        delivery: Delivery,
        reason: str,
        status_code: int | None,
        retry_after: float | None,
    ) -> datetime | None:
        """Record a failed attempt; returns when it will be retried (None if the database
        could not record it)."""
        attempts = delivery.attempts + 1
        wait = self._backoff.delay(attempts, self._rng)
        if retry_after is not None:
            # Wait at least as long as the server asked, but no longer than our ceiling: a
            # bogus Retry-After must not park a clinical Task for days.
            wait = min(self._backoff.ceiling, max(wait, retry_after))
        at = self._now()
        retry_at = at + timedelta(seconds=wait)
        try:
            with self._store.begin() as uow:
                outbox_store.failed(uow, delivery, at, reason, retry_at)
        except Exception as exc:
            self._log_exception("record failure", delivery.destination, exc, delivery)
            return None
        LOG.warning(
            "outbox delivery failed: task=%s version=%d destination=%s outbox_id=%d "
            "attempts=%d status=%s retry_in=%.1fs",
            delivery.task_identifier,
            delivery.task_version,
            delivery.destination,
            delivery.outbox_id,
            attempts,
            status_code if status_code is not None else "none",
            wait,
        )
        return retry_at

    def _log_exception(
        self, step: str, destination: str, exc: Exception, delivery: Delivery | None = None
    ) -> None:
        where = (
            f" task={delivery.task_identifier} version={delivery.task_version}"
            f" outbox_id={delivery.outbox_id}"
            if delivery is not None
            else ""
        )
        # The stack without the exception's text (see `_exception_name`).
        stack = "".join(traceback.format_tb(exc.__traceback__))
        LOG.error(
            "outbox %s failed: destination=%s%s error=%s\n%s",
            step,
            destination,
            where,
            _exception_name(exc),
            stack,
        )
