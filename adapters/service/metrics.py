"""Prometheus metrics for `safetynet serve`, on a registry of their own (never the global one).

Two sources feed one `CollectorRegistry`:

- `ServiceMetrics`: counters and gauges the listener process updates as it works (messages
  received and answered, MLLP framing trouble, worker restarts, poison messages), and per-sender
  feed silence computed at scrape time from the last message seen of each sender.
- `StoreCollector`: gauges read from the database at scrape time (inbox backlog and lag, open
  quarantine items, Tasks by rule and status, outbox backlog and failing deliveries). A database
  that cannot be read gives `safetynet_store_up 0`, never a failed scrape.

No patient data in metrics (DESIGN.md, non-negotiable 6). Label values come only from message
headers that name systems (MSH-3^MSH-4, MSH-9), ACK codes, rule ids, Task statuses and configured
destinations. Because a peer controls what it puts in MSH-3/4/9, `ServiceMetrics.message` checks
each value against the shape it should have and caps how many distinct values a label takes;
anything else is counted as `other` (and an empty one as `unknown`), so a garbled or hostile
header can neither leak text into a label nor grow the series without bound.

The counters live in the process that serves `/metrics`: a worker process reports to it rather
than counting itself (no prometheus multiprocess mode here).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select

from adapters.store import SqlStore
from adapters.store.schema import inbox, outbox_delivery, quarantine, tasks
from engine.clock import WallClock

__all__ = [
    "ACK_CODES",
    "MAX_MESSAGE_TYPES",
    "MAX_SENDERS",
    "OTHER",
    "UNKNOWN",
    "ServiceMetrics",
    "StoreCollector",
    "last_seen_by_sender",
]

log = logging.getLogger(__name__)

ACK_CODES = frozenset({"AA", "AE", "AR", "CA", "CE", "CR"})
"""MSA-1 codes (original mode AA/AE/AR, enhanced mode CA/CE/CR); any other is counted `other`."""

OTHER = "other"
"""Label value for a value of the wrong shape, or one past a label's cap of distinct values."""

UNKNOWN = "unknown"
"""Label value for an empty value (an unreadable header)."""

# MSH-3^MSH-4 as HD components: application and facility names, OIDs, `&` sub-components.
_SENDER_SHAPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._:/&^#@+\-]{0,127}")
# MSH-9 (`ORU^R01`, `ADT^A08^ADT_A01`, `ACK`) or a FHIR resource type (`DiagnosticReport`).
_MESSAGE_TYPE_SHAPE = re.compile(
    r"[A-Z0-9]{3}(?:\^[A-Z0-9]{3}(?:\^[A-Z0-9_]{3,8})?)?|[A-Z][A-Za-z]{2,39}"
)

# A hospital has tens of feeds and message types: past these caps, something is wrong with the
# input, not the hospital.
MAX_SENDERS = 256
"""Distinct senders given their own label value (and feed-silence tracking); later ones: `other`."""
MAX_MESSAGE_TYPES = 128
"""Distinct message types given their own label value; later ones are counted as `other`."""


_wall_clock = WallClock().now  # the clock port's wall clock


def _aware(at: datetime) -> datetime:
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError("a naive datetime cannot be compared with the clock: give an offset")
    return at


class _LabelValues:
    """The label values one label may take: the right shape, and at most `limit` distinct."""

    def __init__(self, shape: re.Pattern[str], limit: int) -> None:
        self._shape = shape
        self._limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        """`value` itself when it may be a label value; otherwise `unknown` or `other`."""
        if value in self._seen:
            return value
        if not value:
            return UNKNOWN
        if not self._shape.fullmatch(value):
            return OTHER
        with self._lock:
            if value not in self._seen:
                if len(self._seen) >= self._limit:
                    return OTHER
                self._seen.add(value)
        return value


class ServiceMetrics:
    """The listener's counters and gauges, and feed silence per sender, on one registry.

    Update the counters from the listener's own code (`metrics.oversized.inc()`); count each
    answered message with `message()`, which also checks its label values (use it rather than
    `received`/`answered` directly). Not for worker processes: their counts must reach the
    process that serves `/metrics`.

    `silence_alarm`: a sender is `safetynet_feed_silent 1` once its last message is
    older than this; 0 disables the alarm (the age is still exported).
    `silence_alarm_by_sender`: the same per sender (MSH-3^MSH-4), overriding the default; 0
    disables it for that sender (a feed that is quiet at night, say).
    `process_metrics`: also export the process's CPU, memory, file descriptors, GC and Python
    version (prometheus_client's standard collectors) on this registry.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        silence_alarm: float = 0.0,
        silence_alarm_by_sender: Mapping[str, float] | None = None,
        now: Callable[[], datetime] | None = None,
        process_metrics: bool = True,
    ) -> None:
        alarms = dict(silence_alarm_by_sender or {})
        if silence_alarm < 0 or any(seconds < 0 for seconds in alarms.values()):
            raise ValueError("a feed silence alarm is a number of seconds, 0 or more")
        self.registry = registry if registry is not None else CollectorRegistry()
        self._silence_default = float(silence_alarm)
        self._silence_by_sender = {sender: float(s) for sender, s in alarms.items()}
        self._now = now if now is not None else _wall_clock
        self._senders = _LabelValues(_SENDER_SHAPE, MAX_SENDERS)
        self._message_types = _LabelValues(_MESSAGE_TYPE_SHAPE, MAX_MESSAGE_TYPES)
        self._last_seen: dict[str, datetime] = {}
        self._lock = threading.Lock()

        r = self.registry
        self.received = Counter(
            "safetynet_messages_received_total",
            "Messages received, by type (MSH-9).",
            ["message_type"],
            registry=r,
        )
        self.answered = Counter(
            "safetynet_messages_answered_total",
            "Messages answered, by type (MSH-9) and ACK code (MSA-1): AA/CA accepted, "
            "AE/AR/CE/CR rejected.",
            ["message_type", "code"],
            registry=r,
        )
        self.frames_garbage = Counter(
            "safetynet_mllp_garbage_bytes_total",
            "Bytes received outside an MLLP frame (0x0B ... 0x1C 0x0D) and discarded.",
            registry=r,
        )
        self.connections = Gauge(
            "safetynet_mllp_connections", "MLLP connections open now.", registry=r
        )
        self.connections_refused = Counter(
            "safetynet_mllp_connections_refused_total",
            "MLLP connections closed at once because the connection limit was reached.",
            registry=r,
        )
        self.oversized = Counter(
            "safetynet_mllp_oversized_frames_total",
            "MLLP frames refused for exceeding the maximum message size.",
            registry=r,
        )
        self.timeouts = Counter(
            "safetynet_mllp_timeouts_total",
            "MLLP connections closed on a timeout, by kind (idle, read, write).",
            ["kind"],
            registry=r,
        )
        self.worker_restarts = Counter(
            "safetynet_worker_restarts_total",
            "Processor worker processes restarted after they died.",
            registry=r,
        )
        self.poison = Counter(
            "safetynet_messages_poisoned_total",
            "Messages quarantined after crashing the processor worker too many times.",
            registry=r,
        )
        r.register(_FeedSilence(self))
        if process_metrics:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)

    def message(self, sender: str, message_type: str, code: str, at: datetime) -> None:
        """Count one answered message: received and answered by type and ACK code, and the
        sender's last message time (for feed silence) moved to `at` if later.

        `sender` is MSH-3^MSH-4 and `message_type` MSH-9 as read; pass "" when the header could
        not be read. `at` must carry an offset.
        """
        message_type = self._message_types(message_type)
        self.received.labels(message_type=message_type).inc()
        self.answered.labels(
            message_type=message_type, code=code if code in ACK_CODES else OTHER
        ).inc()
        self._saw(sender, at)

    def seed_last_seen(self, last: Mapping[str, datetime]) -> None:
        """Set each sender's last message time from the store at start (see
        `last_seen_by_sender`), so a feed that went quiet before a restart still alarms. A
        later time already recorded is kept."""
        for sender, at in last.items():
            self._saw(sender, at)

    def last_seen(self) -> dict[str, datetime]:
        """Each tracked sender's last message time (a copy)."""
        with self._lock:
            return dict(self._last_seen)

    def _saw(self, sender: str, at: datetime) -> None:
        at = _aware(at)
        label = self._senders(sender)
        if label != sender:
            # Unreadable, malformed or past the cap: no feed of its own to watch.
            return
        with self._lock:
            earlier = self._last_seen.get(label)
            if earlier is None or at > earlier:
                self._last_seen[label] = at

    def _silence_alarm(self, sender: str) -> float:
        return self._silence_by_sender.get(sender, self._silence_default)

    def _silence(self) -> list[Metric]:
        """The feed age and silence families, as of now."""
        now = _aware(self._now())
        age = GaugeMetricFamily(
            "safetynet_feed_last_message_age_seconds",
            "Seconds since the last message from each sender (MSH-3^MSH-4).",
            labels=["sender"],
        )
        silent = GaugeMetricFamily(
            "safetynet_feed_silent",
            "1 when a sender has sent nothing for longer than its silence alarm, else 0 "
            "(always 0 when its alarm is disabled).",
            labels=["sender"],
        )
        for sender, at in sorted(self.last_seen().items()):
            seconds = max(0.0, (now - at).total_seconds())
            alarm = self._silence_alarm(sender)
            age.add_metric([sender], seconds)
            silent.add_metric([sender], 1.0 if 0 < alarm < seconds else 0.0)
        return [age, silent]


class _FeedSilence(Collector):
    """Exposes `ServiceMetrics`' per-sender feed silence at scrape time."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        """The feed age and silence families, computed now."""
        return self._metrics._silence()

    def describe(self) -> Iterable[Metric]:
        """The families' names, without samples (for the registry's clash check)."""
        return [
            GaugeMetricFamily("safetynet_feed_last_message_age_seconds", "", labels=["sender"]),
            GaugeMetricFamily("safetynet_feed_silent", "", labels=["sender"]),
        ]


class StoreCollector(Collector):
    """Gauges read from the database at each scrape, in one read-only transaction.

    - `safetynet_inbox_backlog`: messages stored but not yet processed (state `received`);
    - `safetynet_processing_lag_seconds`: age of the oldest of those (0 when there is none);
    - `safetynet_quarantine_open`: quarantine items not yet resolved;
    - `safetynet_tasks_total{rule, status, shadow}`: current Tasks by group;
    - `safetynet_outbox_backlog{destination}`: deliveries still pending;
    - `safetynet_outbox_failing{destination}`: pending deliveries that have failed at least
      `outbox_alert_after` times (the thing to alert on);
    - `safetynet_store_up`: 1 when these could be read, else 0 and nothing else is exported.

    `destinations`: configured destinations, exported with 0 when nothing is pending for them
    (so an alert on them has a series to watch). `statement_timeout_ms` bounds each query on
    PostgreSQL, so a wedged database makes the scrape report the store down rather than hang.
    Register it with `registry.register(StoreCollector(...))`.
    """

    def __init__(
        self,
        store: SqlStore,
        now: Callable[[], datetime],
        outbox_alert_after: int = 5,
        *,
        destinations: Sequence[str] = (),
        statement_timeout_ms: int = 2000,
    ) -> None:
        if outbox_alert_after < 1:
            raise ValueError("outbox_alert_after counts failed attempts: 1 or more")
        self._store = store
        self._now = now
        self._destinations = tuple(destinations)
        self._statement_timeout_ms = int(statement_timeout_ms)
        self._up = True
        # Each query uses an index on state (inbox, outbox_delivery) or reads a small table.
        self._inbox = select(func.count(), func.min(inbox.c.received_at)).where(
            inbox.c.state == "received"
        )
        self._quarantine = select(func.count()).where(quarantine.c.resolved_at.is_(None))
        self._tasks = select(
            tasks.c.rule_id, tasks.c.status, tasks.c.shadow, func.count()
        ).group_by(tasks.c.rule_id, tasks.c.status, tasks.c.shadow)
        d = outbox_delivery
        self._outbox = (
            select(
                d.c.destination,
                func.count(),
                func.sum(case((d.c.attempts >= outbox_alert_after, 1), else_=0)),
            )
            .where(d.c.state == "pending")
            .group_by(d.c.destination)
        )

    def describe(self) -> Iterable[Metric]:
        """The families' names, without samples: registering must not touch the database."""
        return [*self._families(), self._up_family(None)]

    def collect(self) -> Iterable[Metric]:
        """Read the gauges now; a database error gives `safetynet_store_up 0` alone."""
        try:
            families = self._read()
        except Exception as exc:
            if self._up:
                # The type only: a driver's message can quote SQL parameters.
                log.warning("store unreadable at metrics scrape", extra={"reason_code": _kind(exc)})
            self._up = False
            return [self._up_family(0.0)]
        if not self._up:
            log.info("store readable again at metrics scrape")
        self._up = True
        return [*families, self._up_family(1.0)]

    def _read(self) -> list[GaugeMetricFamily]:
        with self._store.begin(read_only=True) as uow:
            connection = uow.connection
            if connection.dialect.name == "postgresql":
                connection.exec_driver_sql(
                    f"SET LOCAL statement_timeout = {self._statement_timeout_ms}"
                )
            backlog, oldest = connection.execute(self._inbox).one()
            open_items = connection.execute(self._quarantine).scalar_one()
            task_groups = connection.execute(self._tasks).all()
            outbox_groups = connection.execute(self._outbox).all()
        now = self._now()
        lag = 0.0 if oldest is None else max(0.0, (now - oldest).total_seconds())

        families = self._families()
        inbox_backlog, lag_family, open_family, tasks_family, backlog_family, failing = families
        inbox_backlog.add_metric([], float(backlog))
        lag_family.add_metric([], lag)
        open_family.add_metric([], float(open_items))
        for rule_id, status, shadow, n in sorted(task_groups, key=_sort_key):
            tasks_family.add_metric([rule_id, status, "true" if shadow else "false"], float(n))
        pending: dict[str, tuple[int, int]] = {name: (0, 0) for name in self._destinations}
        for destination, n, failing_n in outbox_groups:
            pending[destination] = (int(n), int(failing_n or 0))
        for destination, (n, failing_n) in sorted(pending.items()):
            backlog_family.add_metric([destination], float(n))
            failing.add_metric([destination], float(failing_n))
        return families

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        """The database gauges, empty, in a fixed order."""
        return [
            GaugeMetricFamily("safetynet_inbox_backlog", "Messages stored and not yet processed."),
            GaugeMetricFamily(
                "safetynet_processing_lag_seconds",
                "Age of the oldest message not yet processed (0 when none is waiting).",
            ),
            GaugeMetricFamily(
                "safetynet_quarantine_open", "Quarantine items awaiting human review."
            ),
            GaugeMetricFamily(
                "safetynet_tasks_total",
                "Current recall Tasks, by rule, status and shadow mode.",
                labels=["rule", "status", "shadow"],
            ),
            GaugeMetricFamily(
                "safetynet_outbox_backlog",
                "Task deliveries still pending, by destination.",
                labels=["destination"],
            ),
            GaugeMetricFamily(
                "safetynet_outbox_failing",
                "Pending Task deliveries that have failed repeatedly, by destination.",
                labels=["destination"],
            ),
        ]

    @staticmethod
    def _up_family(value: float | None) -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "safetynet_store_up",
            "1 when the database could be read at this scrape, else 0.",
            value=value,
        )


def _sort_key(row: Any) -> tuple[str, str, bool]:
    return (str(row[0]), str(row[1]), bool(row[2]))


def _kind(exc: BaseException) -> str:
    kind = type(exc)
    return f"{kind.__module__}.{kind.__qualname__}"


def last_seen_by_sender(store: SqlStore, since: datetime | None = None) -> dict[str, datetime]:
    """The latest `received_at` of each sender in the inbox, to seed `ServiceMetrics` at start.

    `since` leaves out senders silent since before it (a decommissioned feed should not alarm
    forever). It reads the whole inbox once: call it at start, not per scrape.
    """
    query = select(inbox.c.sender, func.max(inbox.c.received_at)).group_by(inbox.c.sender)
    if since is not None:
        query = query.where(inbox.c.received_at >= _aware(since))
    with store.begin(read_only=True) as uow:
        rows = uow.connection.execute(query).all()
    return {sender: at for sender, at in rows if at is not None}
