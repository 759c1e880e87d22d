"""The processor worker: takes the inbox in arrival order, fires timers, runs the outbox.

It runs in its own process (`worker_main`, started and restarted by the service), so that a
crash in the rule engine (durable_rules is C and can abort the process) costs a retry and not
the MLLP listener. It works only while it holds the processor lease (`adapters.store.lease`),
so that of several instances on one PostgreSQL database exactly one processes.

Crash accounting without a commit per message: a batch is claimed and processed in one
transaction, so a crash leaves it all unprocessed. A worker begins careful (after every start,
and after a failed step): for as many messages as a batch holds it takes them one at a time and
commits each one's `attempts` before processing it, so the message that kills the process is
found and counted; once it has been started `max_attempts` times it goes to quarantine
("failed") with a human-review item, and the rest go on. Then it returns to whole batches.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from multiprocessing.context import BaseContext
from typing import Any

from adapters.ingest import Hl7Ingest, StoredMessageProcessor
from adapters.outbox.destinations import destination_from_url
from adapters.outbox.dispatcher import Dispatcher
from adapters.store import SqlStore
from adapters.store.lease import Lease, LeaseLost
from adapters.store.operations import PendingMessage, any_pending, count_attempt, pending
from engine.clock import SimulatedClock, WallClock
from engine.errors import ConfigurationError

log = logging.getLogger("safetynet.worker")

PROCESSOR_LEASE = "processor"

# How long one processing transaction may run. SQLite has one writer at a time, and the MLLP
# listener's commits (which the senders' ACKs wait for) queue behind the worker's transaction.
MAX_TRANSACTION_SECONDS = 0.01

# On SQLite the worker gives way to the listener: while the listener has messages to commit,
# the worker ends its transaction after the message in hand and waits (up to MAX_DEFERRAL)
# before starting another. Senders wait for ACKs; processing can catch up. Under a saturating
# burst the worker still gets a transaction every MAX_DEFERRAL (and the processing lag metric
# shows how far behind it is). PostgreSQL has no single writer and needs none of this.
MAX_DEFERRAL = 0.05

# Shared state values (`WorkerShared.state`), read by /readyz in the listener process.
STARTING, STANDBY, ACTIVE = 0, 1, 2
STATE_NAMES = {STARTING: "starting", STANDBY: "standby", ACTIVE: "active"}


@dataclass(frozen=True)
class WorkerSettings:
    """Everything the worker process needs, picklable (it crosses a process boundary)."""

    db_url: str
    rules_dir: str
    holder: str
    lease_ttl: float = 10.0
    batch: int = 200
    max_attempts: int = 3
    poll_interval: float = 0.5
    destinations: tuple[str, ...] = ()
    webhook_secret: str | None = None
    outbox_alert_after: int = 5
    log_level: str = "INFO"
    processing_ids: tuple[str, ...] = ()
    versions: tuple[str, ...] = ()
    unsupported: str = "reject"


class Doorbell:
    """Wakes the worker from the listener process without ever blocking the one who rings.

    A pipe: `ring` writes a byte without blocking (a full pipe already says "wake up"); `wait`
    returns once a byte is there, and empties the pipe. Not a `multiprocessing.Event`: its
    `set()` waits for sleeping waiters to acknowledge, so a worker killed or stopped (SIGSTOP)
    while waiting would leave the listener's commit thread blocked for good.
    """

    def __init__(self, ctx: BaseContext) -> None:
        self._reader, self._writer = ctx.Pipe(duplex=False)
        os.set_blocking(self._writer.fileno(), False)

    def ring(self) -> None:
        """Ask the worker to look at the inbox now (never blocks)."""
        with contextlib.suppress(BlockingIOError, BrokenPipeError):
            os.write(self._writer.fileno(), b"\0")

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for a ring; True if there was one (worker side)."""
        if not self._reader.poll(max(0.0, timeout)):
            return False
        fd = self._reader.fileno()
        os.set_blocking(fd, False)
        with contextlib.suppress(BlockingIOError):
            while os.read(fd, 65536):
                pass
        return True


@dataclass
class WorkerShared:
    """What the worker and the listener process share: a doorbell, a stop flag and counters
    (raw shared memory: no lock a dead process could hold)."""

    doorbell: Doorbell
    stop: Any  # multiprocessing RawValue("b"): 1 asks the worker to stop
    state: Any  # RawValue("i"): STARTING, STANDBY or ACTIVE
    poisoned: Any  # RawValue("i"): messages quarantined after repeated failures
    listener_writing: Any  # RawValue("b"): 1 while the listener has messages to commit

    @classmethod
    def create(cls, ctx: BaseContext) -> WorkerShared:
        """New shared state for a worker started from `ctx`."""
        return cls(
            Doorbell(ctx),
            ctx.RawValue("b", 0),
            ctx.RawValue("i", 0),
            ctx.RawValue("i", 0),
            ctx.RawValue("b", 0),
        )

    def listener_wants_to_write(self, wants: bool) -> None:
        """The listener has messages to commit (True) or has committed them (False, and the
        worker is woken to process them)."""
        self.listener_writing.value = 1 if wants else 0
        if not wants:
            self.doorbell.ring()

    def listener_busy(self) -> bool:
        """Whether the listener is waiting to commit messages."""
        return bool(self.listener_writing.value)


_wall_clock = WallClock().now  # the clock port's wall clock


class Worker:
    """One processor: lease, inbox batches, timers, outbox. Drive it with `run` or `step`."""

    def __init__(
        self,
        store: SqlStore,
        ingest: Hl7Ingest,
        settings: WorkerSettings,
        *,
        now: Callable[[], datetime] = _wall_clock,
        clock: SimulatedClock | None = None,
        dispatcher: Dispatcher | None = None,
        on_state: Callable[[int], None] = lambda state: None,
        on_poison: Callable[[], None] = lambda: None,
        listener_busy: Callable[[], bool] | None = None,
        protocols: Mapping[str, StoredMessageProcessor] | None = None,
    ) -> None:
        self._store = store
        self._ingest = ingest
        # Inbox rows by protocol: HL7 v2 is `ingest`; FHIR resources and Task changes from the
        # HTTP API have their own processors (they share `ingest.processor`).
        self._protocols: dict[str, StoredMessageProcessor] = {"hl7v2": ingest, **(protocols or {})}
        self._settings = settings
        self._now = now
        self._clock = clock or SimulatedClock()
        self._dispatcher = dispatcher
        self._on_state = on_state
        self._on_poison = on_poison
        self._listener_busy = listener_busy
        self.lease = Lease(store, PROCESSOR_LEASE, settings.holder, settings.lease_ttl, now)
        self._outbox_stop: threading.Event | None = None
        self._outbox_thread: threading.Thread | None = None
        self._last_renewal = 0.0
        # Messages to take one at a time, each attempt committed before it is processed: the
        # window in which a previous worker may have died (after every start and failure).
        self._careful = settings.batch
        self._last_done = 0

    # --- one step -------------------------------------------------------------------------

    def step(self) -> int:
        """Hold (or try to take) the lease, process one batch and fire due timers.

        Returns the number of messages and timers handled (0: nothing to do, or standby)."""
        if not self.lease.held:
            if not self.lease.acquire():
                self._become(STANDBY)
                return 0
            self._ingest.processor.forget_due_hint()  # another instance may have scheduled
            self._become(ACTIVE)
        try:
            done, drained = self._process_batch()
            if drained:
                # Processing time catches up with the wall clock, and timers fire on time.
                self._clock.advance(self._now())
                done += self._fire_timers()
            if not done and time.monotonic() - self._last_renewal > self._settings.lease_ttl / 3:
                with self._store.begin() as uow:
                    self.lease.renew(uow)
                self._last_renewal = time.monotonic()
            return done
        except LeaseLost:
            log.warning("processor lease lost", extra={"lease_holder": self._settings.holder})
            self._become(STANDBY)
            return 0

    def _process_batch(self) -> tuple[int, bool]:
        """One batch, claimed and processed in one transaction (one commit); or, while careful
        (after a start or a failure), one message whose attempt is committed first.

        Returns how many messages were handled and whether the inbox is now drained."""
        settings = self._settings
        with self._store.begin(read_only=True) as look:
            if not any_pending(look):
                return 0, True  # idle: no write transaction (on SQLite, no writer lock)
        self._give_way()
        # Fetch about what the time budget lets one transaction process, not a whole batch.
        limit = 1 if self._careful else min(settings.batch, max(16, 2 * self._last_done))
        with self._store.begin() as uow:
            self.lease.renew(uow)
            batch = pending(uow, limit)
            if not batch:
                return 0, True
            first = batch[0]
            if first.attempts >= settings.max_attempts:
                self._poison(uow, first)
                return 1, False
            if not (self._careful or first.attempts):
                done = self._last_done = self._process(uow, batch)
                self._last_renewal = time.monotonic()
                return done, done == len(batch) < limit
            count_attempt(uow, [first.id])  # committed before the attempt
        with self._store.begin() as uow:
            self.lease.renew(uow)
            self._process(uow, [first])
        self._last_renewal = time.monotonic()
        self._careful = max(0, self._careful - 1)
        return 1, False

    def _listener_waiting(self) -> bool:
        return self._listener_busy is not None and self._listener_busy()

    def _give_way(self) -> None:
        until = time.monotonic() + MAX_DEFERRAL
        while self._listener_waiting() and time.monotonic() < until:
            time.sleep(0.0005)

    def _process(self, uow: Any, batch: list[PendingMessage]) -> int:
        """Process messages in order until the batch or the time budget is spent; how many."""
        deadline = time.monotonic() + MAX_TRANSACTION_SECONDS
        done = 0
        for message in batch:
            if done and (time.monotonic() > deadline or self._listener_waiting()):
                break  # the rest stay "received" for the next transaction
            done += 1
            handler = self._protocols.get(message.protocol)
            if handler is None:
                reason = f"no processor for protocol {message.protocol!r}: needs review"
                uow.quarantine(message.id, reason, "AR", "", {}, self._now())
                uow.set_inbox_state(message.id, "quarantined", reason)
                continue
            result = handler.process_stored(uow, message.id, message.raw, message.received_at)
            if result.ack_code != "AA":
                log.warning(
                    "message not processed",
                    extra={"inbox_id": message.id, "reason_code": result.hl7_code},
                )
            for task in result.tasks:
                log.info(
                    "task raised",
                    extra={
                        "inbox_id": message.id,
                        "task_identifier": task.identifier,
                        "rule_id": task.rule_id,
                    },
                )
        return done

    def _poison(self, uow: Any, message: PendingMessage) -> None:
        reason = (
            f"processing was started {message.attempts} times and never finished "
            "(the processor crashed or failed on it): needs review"
        )
        uow.quarantine(message.id, reason, "AE", "", {"attempts": message.attempts}, self._now())
        uow.set_inbox_state(message.id, "failed", reason)
        log.error("message quarantined after repeated failures", extra={"inbox_id": message.id})
        self._on_poison()

    def _fire_timers(self) -> int:
        now = self._clock.now()
        hint = self._ingest.processor.next_due_hint
        if hint is not None and hint > now:
            return 0
        with self._store.begin() as uow:
            self.lease.renew(uow)
            tasks = self._ingest.processor.fire_due(uow, now)
        for task in tasks:
            log.info(
                "task raised by timer",
                extra={"task_identifier": task.identifier, "rule_id": task.rule_id},
            )
        return len(tasks)

    def seconds_to_next_timer(self) -> float | None:
        """How long until a timer may be due (None: none known)."""
        hint = self._ingest.processor.next_due_hint
        if hint is None:
            return None
        return max(0.0, (hint - self._clock.advance(self._now())).total_seconds())

    # --- lifecycle ------------------------------------------------------------------------

    def _become(self, state: int) -> None:
        self._on_state(state)
        if state == ACTIVE:
            log.info(
                "processor active",
                extra={"lease_holder": self._settings.holder, "epoch": self.lease.epoch},
            )
            self._start_outbox()
        else:
            self._stop_outbox()

    def _start_outbox(self) -> None:
        if self._dispatcher is None or self._outbox_thread is not None:
            return
        self._outbox_stop = threading.Event()
        self._outbox_thread = threading.Thread(
            target=self._dispatcher.run, args=(self._outbox_stop,), name="outbox", daemon=True
        )
        self._outbox_thread.start()

    def _stop_outbox(self) -> None:
        if self._outbox_thread is None or self._outbox_stop is None:
            return
        self._outbox_stop.set()
        self._outbox_thread.join()
        self._outbox_thread = self._outbox_stop = None

    def run(
        self,
        wait: Callable[[float], object],
        stopping: Callable[[], bool],
    ) -> None:
        """Work until `stopping()`: process what arrives (`wait(seconds)` returns early when
        told of new messages), fire timers on time, poll for other instances' messages every
        `poll_interval`."""
        try:
            while not stopping():
                try:
                    done = self.step()
                except Exception:
                    # A bug or a database outage: the batch rolled back and its attempts are
                    # counted, so retrying cannot loop for ever on one message.
                    log.exception("processor step failed; retrying")
                    self._careful = self._settings.batch
                    self.lease.epoch = None
                    self._become(STANDBY)
                    time.sleep(self._settings.poll_interval)
                    continue
                if done:
                    continue
                wait_for = wait if self.lease.held else time.sleep  # standby: poll only
                seconds = self._settings.poll_interval
                if self.lease.held:
                    until_timer = self.seconds_to_next_timer()
                    if until_timer is not None:
                        seconds = min(seconds, until_timer)
                if seconds > 0:
                    wait_for(seconds)
        finally:
            self._stop_outbox()
            try:
                self.lease.release()
            except Exception:
                log.exception("could not release the processor lease")


def worker_main(settings: WorkerSettings, shared: WorkerShared) -> None:
    """Entry point of the worker process."""
    from adapters.bootstrap import build_live_parts
    from adapters.governance.approvals import verify_rule_set
    from adapters.service.logs import configure_logging

    configure_logging(settings.log_level)
    parts = build_live_parts(settings)
    try:
        # The rules folder may have been edited since the service recorded (and approval
        # checked) its rule set: a restarted worker must not run an unapproved one.
        verify_rule_set(parts.store, parts.catalogue)
    except ConfigurationError as exc:
        log.error("worker not starting: %s", exc.reason)
        parts.store.close()
        raise SystemExit(2) from exc
    dispatcher = None
    if settings.destinations:
        destinations = [
            destination_from_url(spec, secret=settings.webhook_secret)
            for spec in settings.destinations
        ]
        dispatcher = Dispatcher(
            parts.store, destinations, now=_wall_clock, alert_after=settings.outbox_alert_after
        )

    def on_state(state: int) -> None:
        shared.state.value = state

    def on_poison() -> None:
        shared.poisoned.value += 1  # only this process writes it

    worker = Worker(
        parts.store,
        parts.ingest,
        settings,
        clock=parts.clock,
        dispatcher=dispatcher,
        on_state=on_state,
        on_poison=on_poison,
        listener_busy=shared.listener_busy if parts.store.dialect == "sqlite" else None,
        protocols=parts.protocols,
    )
    log.info("worker started", extra={"worker_pid": os.getpid()})
    parent = os.getppid()
    try:
        # An orphaned worker would hold the lease with no listener feeding it: leave with it.
        worker.run(
            shared.doorbell.wait,
            lambda: bool(shared.stop.value) or os.getppid() != parent,
        )
    finally:
        parts.store.close()
        log.info("worker stopped", extra={"worker_pid": os.getpid()})
