"""The operations surface of `safetynet serve`: probes and metrics over real HTTP, the gauges
read from each database backend, feed silence, and logs that cannot carry patient data.

The HTTP tests run uvicorn in a thread on a free local port and talk to it with httpx, so the
app, the exposition format and the logging configuration are checked as the service uses them.
"""

from __future__ import annotations

import io
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, insert, select, update
from sqlalchemy.engine import make_url

from adapters.service.http import Health, build_ops_app
from adapters.service.logs import AccessLogFilter, configure_logging, uvicorn_log_config
from adapters.service.metrics import (
    MAX_MESSAGE_TYPES,
    MAX_SENDERS,
    OTHER,
    UNKNOWN,
    ServiceMetrics,
    StoreCollector,
    last_seen_by_sender,
)
from adapters.store import SqlStore, open_store
from adapters.store.schema import outbox, outbox_delivery, quarantine
from engine.ports import InboundMessage, StoredTask

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SENDER = "RIS^ROYALDERBY"
NHS_NUMBER = "9434765919"


# --- helpers ----------------------------------------------------------------------------------


@contextmanager
def serving(app: FastAPI, log_config: dict[str, Any] | None = None) -> Iterator[httpx.Client]:
    """`app` served by uvicorn on a free 127.0.0.1 port in a thread; an httpx client on it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_config=log_config,
        lifespan="off",
        http="h11",
        ws="none",
        loop="asyncio",
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 5
        while not server.started:
            assert thread.is_alive(), "uvicorn stopped before it started"
            assert time.monotonic() < deadline, "uvicorn did not start within 5 s"
            time.sleep(0.01)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(5)
        sock.close()
    assert not thread.is_alive()


def scrape(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a text exposition, by (sample name, labels)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def labels(**values: str) -> frozenset[tuple[str, str]]:
    """A sample's labels, as `scrape` keys them."""
    return frozenset(values.items())


def inbound(control_id: str, received_at: datetime, sender: str = SENDER) -> InboundMessage:
    """An inbound ORU^R01 whose raw text is only a header (content does not matter here)."""
    raw = f"MSH|^~\\&|RIS|ROYALDERBY|SAFETYNET|H|20260301||ORU^R01|{control_id}|P|2.5\r"
    return InboundMessage(
        raw=raw,
        sender=sender,
        control_id=control_id,
        content_hash=f"hash:{control_id}",
        received_at=received_at,
        message_type="ORU^R01",
        origin="test",
    )


def task(identifier: str, rule_id: str, status: str, shadow: bool) -> StoredTask:
    """A stored recall Task with the columns the gauges group by."""
    return StoredTask(
        identifier=identifier,
        patient_key=f"P-{identifier}",
        rule_id=rule_id,
        rule_version="1.0.0",
        status=status,
        priority="urgent",
        owner="Practitioner/C1",
        resource={"resourceType": "Task", "status": status},
        shadow=shadow,
    )


def collected(*collectors: Any) -> CollectorRegistry:
    """A fresh registry holding these collectors."""
    registry = CollectorRegistry()
    for collector in collectors:
        registry.register(collector)
    return registry


@pytest.fixture
def store(database_url: str) -> Iterator[SqlStore]:
    """A migrated, empty store on each backend."""
    opened = open_store(database_url)
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put the root and uvicorn loggers back as they were after a test reconfigures them."""
    names = ["", "uvicorn", "uvicorn.error", "uvicorn.access"]
    saved = {}
    for name in names:
        logger = logging.getLogger(name)
        saved[name] = (list(logger.handlers), logger.level, logger.propagate, logger.disabled)
    yield
    for name, (handlers, level, propagate, disabled) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate
        logger.disabled = disabled


# --- HTTP: probes and metrics -----------------------------------------------------------------


def test_probes_and_metrics_over_real_http() -> None:
    state = {"live": True, "ready": True}
    detail = {"database": "ok", "mllp": "listening", "processor": "active"}

    def ready() -> tuple[bool, dict[str, str]]:
        if state["ready"]:
            return True, detail
        return False, {**detail, "processor": "down"}

    metrics = ServiceMetrics(now=lambda: NOW)
    metrics.message(SENDER, "ORU^R01", "AA", NOW - timedelta(seconds=30))
    metrics.message(SENDER, "ORU^R01", "AA", NOW - timedelta(seconds=20))
    metrics.message(SENDER, "ORU^R01", "AE", NOW - timedelta(seconds=10))
    metrics.message("PAS^ROYALDERBY", "ADT^A03", "CA", NOW - timedelta(seconds=5))
    metrics.connections.inc(2)
    metrics.timeouts.labels(kind="idle").inc()
    metrics.frames_garbage.inc(17)
    metrics.poison.inc()
    app = build_ops_app(Health(live=lambda: state["live"], ready=ready), metrics.registry)

    with serving(app) as client:
        response = client.get("/healthz")
        assert (response.status_code, response.json()) == (200, {"status": "ok"})
        response = client.get("/readyz")
        assert (response.status_code, response.json()) == (200, detail)

        state["ready"] = False
        response = client.get("/readyz")
        assert response.status_code == 503
        assert response.json() == {**detail, "processor": "down"}
        state["live"] = False
        response = client.get("/healthz")
        assert (response.status_code, response.json()) == (503, {"status": "unavailable"})

        response = client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain; version=")
        samples = scrape(response.text)

        openapi = client.get("/openapi.json").json()
        assert openapi["info"]["title"] == "safetynet"
        assert {"/healthz", "/readyz", "/metrics"} <= set(openapi["paths"])

    received = "safetynet_messages_received_total"
    answered = "safetynet_messages_answered_total"
    assert samples[received, labels(message_type="ORU^R01")] == 3
    assert samples[received, labels(message_type="ADT^A03")] == 1
    assert samples[answered, labels(message_type="ORU^R01", code="AA")] == 2
    assert samples[answered, labels(message_type="ORU^R01", code="AE")] == 1
    assert samples[answered, labels(message_type="ADT^A03", code="CA")] == 1
    assert samples["safetynet_mllp_connections", labels()] == 2
    assert samples["safetynet_mllp_timeouts_total", labels(kind="idle")] == 1
    assert samples["safetynet_mllp_garbage_bytes_total", labels()] == 17
    assert samples["safetynet_messages_poisoned_total", labels()] == 1
    assert samples["safetynet_worker_restarts_total", labels()] == 0
    age = "safetynet_feed_last_message_age_seconds"
    assert samples[age, labels(sender=SENDER)] == 10
    assert samples[age, labels(sender="PAS^ROYALDERBY")] == 5
    # The standard process collectors are on the service's own registry.
    assert ("process_cpu_seconds_total", labels()) in samples


def test_a_probe_that_raises_answers_503() -> None:
    def broken() -> Any:
        raise RuntimeError(f"patient {NHS_NUMBER} broke it")

    app = build_ops_app(Health(live=broken, ready=broken), CollectorRegistry())
    with serving(app) as client:
        assert client.get("/healthz").status_code == 503
        response = client.get("/readyz")
        assert (response.status_code, response.json()) == (503, {"readiness": "check failed"})


def test_access_log_is_json_without_the_query_string(restore_logging: None) -> None:
    buffer = io.StringIO()
    app = build_ops_app(Health(live=lambda: True, ready=lambda: (True, {})), CollectorRegistry())
    with serving(app, log_config=uvicorn_log_config(stream=buffer)) as client:
        assert client.get("/healthz", params={"patient": NHS_NUMBER}).status_code == 200

    lines = [json.loads(line) for line in buffer.getvalue().splitlines()]
    access = [line for line in lines if line["logger"] == "uvicorn.access"]
    assert len(access) == 1
    entry = access[0]
    assert entry["message"] == "GET /healthz 200"
    assert (entry["method"], entry["path"], entry["status_code"]) == ("GET", "/healthz", 200)
    assert entry["peer"].startswith("127.0.0.1:")
    assert entry["level"] == "INFO"
    assert entry["time"].endswith("Z")
    assert NHS_NUMBER not in buffer.getvalue()
    # uvicorn's own lines (startup, shutdown) are JSON too.
    assert any(line["logger"] == "uvicorn.error" for line in lines)


def test_access_lines_for_fhir_paths_are_dropped_their_ids_may_name_patients() -> None:
    def access(path: str) -> logging.LogRecord:
        return logging.LogRecord(
            "uvicorn.access",
            logging.INFO,
            __file__,
            1,
            '%s - "%s %s HTTP/%s" %d',
            ("127.0.0.1:5", "PUT", path, "1.1", 200),
            None,
        )

    keep = AccessLogFilter()
    assert not keep.filter(access(f"/fhir/Patient/{NHS_NUMBER}"))
    assert not keep.filter(access("/fhir?x=1"))
    healthz = access("/healthz?patient=1")
    assert keep.filter(healthz) and healthz.getMessage() == "PUT /healthz 200"


# --- the database gauges ----------------------------------------------------------------------


def test_store_collector_reads_each_gauge(store: SqlStore) -> None:
    with store.begin() as uow:
        done = uow.add_to_inbox(inbound("M1", NOW - timedelta(minutes=10)))
        uow.add_to_inbox(inbound("M2", NOW - timedelta(seconds=300)))
        uow.add_to_inbox(inbound("M3", NOW - timedelta(seconds=100)))
        bad = uow.add_to_inbox(inbound("M4", NOW - timedelta(seconds=700)))
        uow.set_inbox_state(done.id, "processed")
        uow.set_inbox_state(bad.id, "quarantined", "unreadable PID")
        uow.quarantine(bad.id, "unreadable PID", "AE", "PID-3", at=NOW)
        resolved = uow.quarantine(None, "unsupported", "AR", "MSH-9", at=NOW)
        uow.connection.execute(
            update(quarantine)
            .where(quarantine.c.id == resolved)
            .values(resolved_at=NOW, resolution="dismissed")
        )

        uow.put_task(task("T1", "infant-survey", "requested", shadow=False), NOW, "raised")
        uow.put_task(task("T2", "infant-survey", "requested", shadow=False), NOW, "raised")
        uow.put_task(task("T3", "infant-survey", "completed", shadow=False), NOW, "raised")
        uow.put_task(task("T4", "final-report-after-discharge", "requested", True), NOW, "raised")

        outbox_ids = uow.connection.execute(select(outbox.c.id).order_by(outbox.c.id)).scalars()
        first, second, third = list(outbox_ids)
        pending = {"next_attempt_at": NOW, "last_error": "", "updated_at": NOW}
        rows = [
            (first, "ehr", "pending", 0),
            (second, "ehr", "pending", 5),
            (third, "ehr", "delivered", 9),
            (first, "pager", "pending", 7),
            (third, "pager", "delivered", 1),
        ]
        uow.connection.execute(
            insert(outbox_delivery),
            [
                {"outbox_id": o, "destination": d, "state": s, "attempts": a, **pending}
                for o, d, s, a in rows
            ],
        )

    collector = StoreCollector(store, now=lambda: NOW, destinations=["ehr", "pager", "audit"])
    registry = collected(collector)
    value = registry.get_sample_value

    assert value("safetynet_store_up") == 1
    assert value("safetynet_inbox_backlog") == 2
    assert value("safetynet_processing_lag_seconds") == 300
    assert value("safetynet_quarantine_open") == 1
    tasks_total = "safetynet_tasks_total"
    survey = "infant-survey"
    assert value(tasks_total, {"rule": survey, "status": "requested", "shadow": "false"}) == 2
    assert value(tasks_total, {"rule": survey, "status": "completed", "shadow": "false"}) == 1
    final = {"rule": "final-report-after-discharge", "status": "requested", "shadow": "true"}
    assert value(tasks_total, final) == 1
    assert value(tasks_total, {"rule": survey, "status": "requested", "shadow": "true"}) is None
    assert value("safetynet_outbox_backlog", {"destination": "ehr"}) == 2
    assert value("safetynet_outbox_backlog", {"destination": "pager"}) == 1
    assert value("safetynet_outbox_backlog", {"destination": "audit"}) == 0
    assert value("safetynet_outbox_failing", {"destination": "ehr"}) == 1
    assert value("safetynet_outbox_failing", {"destination": "pager"}) == 1
    assert value("safetynet_outbox_failing", {"destination": "audit"}) == 0

    # The alert threshold is the collector's: at 8 attempts nothing is failing yet.
    patient = collected(StoreCollector(store, now=lambda: NOW, outbox_alert_after=8))
    assert patient.get_sample_value("safetynet_outbox_failing", {"destination": "pager"}) == 0


def test_store_collector_on_an_empty_store_reports_no_lag(store: SqlStore) -> None:
    registry = collected(StoreCollector(store, now=lambda: NOW))
    assert registry.get_sample_value("safetynet_store_up") == 1
    assert registry.get_sample_value("safetynet_inbox_backlog") == 0
    assert registry.get_sample_value("safetynet_processing_lag_seconds") == 0
    assert registry.get_sample_value("safetynet_quarantine_open") == 0


def _unreachable(database_url: str) -> SqlStore:
    """A store on the same backend whose database cannot be opened."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        broken = url.set(database="/nonexistent-directory/store.db")
    else:
        broken = url.set(database="safetynet_no_such_database")
    return SqlStore(create_engine(broken))


def test_metrics_stay_up_when_the_store_is_down(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    down = _unreachable(database_url)
    metrics = ServiceMetrics(process_metrics=False)
    metrics.registry.register(StoreCollector(down, now=lambda: NOW))
    app = build_ops_app(Health(live=lambda: True, ready=lambda: (True, {})), metrics.registry)

    with (
        caplog.at_level(logging.WARNING, logger="adapters.service.metrics"),
        serving(app) as client,
    ):
        first = client.get("/metrics")
        second = client.get("/metrics")
    down.close()

    assert (first.status_code, second.status_code) == (200, 200)
    samples = scrape(second.text)
    assert samples["safetynet_store_up", labels()] == 0
    assert ("safetynet_inbox_backlog", labels()) not in samples
    # The service's own counters are still there.
    assert ("safetynet_worker_restarts_total", labels()) in samples
    # One warning when the store goes down, naming the error's type, not its text.
    warnings = [r for r in caplog.records if r.name == "adapters.service.metrics"]
    assert len(warnings) == 1
    assert "OperationalError" in warnings[0].__dict__["reason_code"]


def test_a_closed_store_recovers_on_the_next_scrape(store: SqlStore) -> None:
    registry = collected(StoreCollector(store, now=lambda: NOW))
    store.close()
    # A disposed engine opens new connections: the store is read again, not stuck "down".
    assert registry.get_sample_value("safetynet_store_up") == 1


# --- feed silence -----------------------------------------------------------------------------


def test_feed_silence_from_seeded_last_seen() -> None:
    clock = {"now": NOW}
    metrics = ServiceMetrics(silence_alarm=300, now=lambda: clock["now"], process_metrics=False)
    metrics.seed_last_seen({SENDER: NOW - timedelta(minutes=10)})
    value = metrics.registry.get_sample_value
    sender = {"sender": SENDER}
    assert value("safetynet_feed_last_message_age_seconds", sender) == 600
    assert value("safetynet_feed_silent", sender) == 1

    metrics.message(SENDER, "ORU^R01", "AA", NOW)
    assert value("safetynet_feed_last_message_age_seconds", sender) == 0
    assert value("safetynet_feed_silent", sender) == 0

    # An older seed does not move the last message back.
    metrics.seed_last_seen({SENDER: NOW - timedelta(hours=1)})
    assert value("safetynet_feed_silent", sender) == 0
    clock["now"] = NOW + timedelta(seconds=301)
    assert value("safetynet_feed_silent", sender) == 1


def test_feed_silence_alarm_per_sender_and_disabled() -> None:
    metrics = ServiceMetrics(
        silence_alarm=300,
        silence_alarm_by_sender={"PAS^ROYALDERBY": 3600, "LAB^ROYALDERBY": 0},
        now=lambda: NOW,
        process_metrics=False,
    )
    ten_minutes_ago = NOW - timedelta(minutes=10)
    metrics.seed_last_seen(
        {SENDER: ten_minutes_ago, "PAS^ROYALDERBY": ten_minutes_ago, "LAB^ROYALDERBY": NOW}
    )
    metrics.seed_last_seen({"LAB^ROYALDERBY": NOW - timedelta(days=3)})
    silent = "safetynet_feed_silent"
    value = metrics.registry.get_sample_value
    assert value(silent, {"sender": SENDER}) == 1
    assert value(silent, {"sender": "PAS^ROYALDERBY"}) == 0
    assert value(silent, {"sender": "LAB^ROYALDERBY"}) == 0

    never = ServiceMetrics(now=lambda: NOW, process_metrics=False)
    never.seed_last_seen({SENDER: NOW - timedelta(days=1)})
    assert never.registry.get_sample_value(silent, {"sender": SENDER}) == 0
    assert (
        never.registry.get_sample_value(
            "safetynet_feed_last_message_age_seconds", {"sender": SENDER}
        )
        == 86400
    )


def test_last_seen_by_sender_seeds_from_the_inbox(store: SqlStore) -> None:
    with store.begin() as uow:
        uow.add_to_inbox(inbound("M1", NOW - timedelta(hours=2)))
        uow.add_to_inbox(inbound("M2", NOW - timedelta(minutes=10)))
        uow.add_to_inbox(inbound("M3", NOW - timedelta(days=40), sender="OLDRIS^ROYALDERBY"))
    assert last_seen_by_sender(store) == {
        SENDER: NOW - timedelta(minutes=10),
        "OLDRIS^ROYALDERBY": NOW - timedelta(days=40),
    }
    recent = last_seen_by_sender(store, since=NOW - timedelta(days=30))
    assert recent == {SENDER: NOW - timedelta(minutes=10)}

    metrics = ServiceMetrics(silence_alarm=300, now=lambda: NOW, process_metrics=False)
    metrics.seed_last_seen(recent)
    assert metrics.registry.get_sample_value("safetynet_feed_silent", {"sender": SENDER}) == 1


# --- label values -----------------------------------------------------------------------------


def test_label_values_are_checked_and_capped() -> None:
    metrics = ServiceMetrics(now=lambda: NOW, process_metrics=False)
    value = metrics.registry.get_sample_value
    received = "safetynet_messages_received_total"

    metrics.message("", "", "AR", NOW)
    metrics.message("(unreadable)", "PID|1||9434765919^^^NHS", "AA", NOW)
    metrics.message(SENDER, "ORU^R01", "XX", NOW)
    assert value(received, {"message_type": UNKNOWN}) == 1
    assert value(received, {"message_type": OTHER}) == 1
    assert value("safetynet_messages_answered_total", {"message_type": "ORU^R01", "code": OTHER})
    # Only the well-formed sender has a feed to watch.
    assert metrics.last_seen() == {SENDER: NOW}

    # A peer cycling through senders and types cannot grow the series without bound.
    for n in range(300):
        metrics.message(f"RIS{n}^H", f"Z{n % 200:02X}^Z01", "AA", NOW)
    assert len(metrics.last_seen()) == MAX_SENDERS
    types = {
        sample.labels["message_type"]
        for family in metrics.registry.collect()
        if family.name == "safetynet_messages_received"
        for sample in family.samples
        if sample.name.endswith("_total")
    }
    assert len(types) == MAX_MESSAGE_TYPES + 2  # and `unknown` and `other`
    assert {UNKNOWN, OTHER, "ORU^R01"} <= types


def test_service_metrics_use_their_own_registry() -> None:
    first = ServiceMetrics(process_metrics=False)
    second = ServiceMetrics(process_metrics=False)
    first.message(SENDER, "ORU^R01", "AA", NOW)
    assert (
        second.registry.get_sample_value(
            "safetynet_messages_received_total", {"message_type": "ORU^R01"}
        )
        is None
    )
    assert REGISTRY.get_sample_value("safetynet_worker_restarts_total") is None
    with pytest.raises(ValueError, match="naive"):
        first.message(SENDER, "ORU^R01", "AA", datetime(2026, 3, 1, 12, 0))


# --- logs -------------------------------------------------------------------------------------


def _json_lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def test_log_extras_outside_the_allow_list_are_dropped(restore_logging: None) -> None:
    buffer = io.StringIO()
    configure_logging("INFO", stream=buffer)
    configure_logging("INFO", stream=buffer)  # idempotent: still one handler, one line each
    logger = logging.getLogger("safetynet.test")

    logger.info("message stored", extra={"inbox_id": 5, "surname": "Smith"})
    logger.debug("not at this level", extra={"inbox_id": 6})
    logger.warning({"inbox_id": 7, "nhs_number": NHS_NUMBER})

    lines = _json_lines(buffer)
    assert len(lines) == 2
    first = lines[0]
    assert first["message"] == "message stored"
    assert first["inbox_id"] == 5
    assert (first["level"], first["logger"]) == ("INFO", "safetynet.test")
    assert datetime.fromisoformat(first["time"]).utcoffset() == timedelta(0)
    assert lines[1]["inbox_id"] == 7
    assert "Smith" not in buffer.getvalue()
    assert "surname" not in first
    assert NHS_NUMBER not in buffer.getvalue()


def test_logged_exceptions_keep_their_type_and_frames_not_their_text(
    restore_logging: None,
) -> None:
    buffer = io.StringIO()
    configure_logging("DEBUG", stream=buffer)
    logger = logging.getLogger("safetynet.test")

    def parse() -> None:
        try:
            raise KeyError(f"PID|1||{NHS_NUMBER}^^^NHS^NH||SMITH^JOHN")
        except KeyError as exc:
            raise ValueError("segment PID unreadable: SMITH^JOHN") from exc

    try:
        parse()
    except ValueError:
        logger.exception("could not read message", extra={"inbox_id": 9})

    (line,) = _json_lines(buffer)
    assert line["inbox_id"] == 9
    assert "builtins.KeyError (message withheld)" in line["exc_info"]
    assert "builtins.ValueError (message withheld)" in line["exc_info"]
    assert "in parse" in line["exc_info"]
    assert "SMITH" not in buffer.getvalue()
    assert NHS_NUMBER not in buffer.getvalue()


def test_configure_logging_refuses_an_unknown_level(restore_logging: None) -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("CHATTY", stream=io.StringIO())
