"""`safetynet serve`: the live service in one process tree.

The main process runs the MLLP listener and its inbox committer (asyncio plus one writer
thread) and the HTTP listener (uvicorn, in a thread of its own): the FHIR R4 API under `/fhir`
(inbound resources stored inbox-first, the worker woken by its doorbell; the Task API), health,
metrics and the OpenAPI document. The
processor, the timer scheduler and the outbox dispatcher run in a worker process
(`adapters.service.worker`) that this process starts, watches and restarts when it dies.

SIGTERM (or SIGINT): stop accepting connections, answer the messages in hand, let the worker
finish its batch and release its lease, stop the HTTP listener, exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import signal
import ssl
import threading
import time

import uvicorn
from sqlalchemy import text

from adapters.bootstrap import build_live_parts
from adapters.fhir.app import build_api_app
from adapters.fhir.context import FhirApi
from adapters.fhir.mapping import FhirMapper, FhirMappingSettings
from adapters.governance.approvals import record_rule_set
from adapters.service.auth import Authenticator, TokenStore
from adapters.service.config import ServeSettings, jwt_settings
from adapters.service.http import Health
from adapters.service.listener import InboxCommitter, ListenerSettings, MllpListener
from adapters.service.logs import configure_logging, uvicorn_log_config
from adapters.service.metrics import ServiceMetrics, StoreCollector, last_seen_by_sender
from adapters.service.worker import STATE_NAMES, WorkerSettings, WorkerShared, worker_main
from adapters.store import SqlStore
from engine.clock import WallClock

log = logging.getLogger("safetynet.serve")


_now = WallClock().now  # the clock port's wall clock


def ssl_context(settings: ServeSettings) -> ssl.SSLContext | None:
    """The MLLP listener's TLS context, or None for plain TCP."""
    if not settings.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    if settings.tls_client_ca:
        context.load_verify_locations(settings.tls_client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def worker_settings(settings: ServeSettings) -> WorkerSettings:
    """What the worker process is told."""
    return WorkerSettings(
        db_url=settings.db,
        rules_dir=settings.rules,
        holder=settings.instance,
        lease_ttl=settings.lease_ttl,
        batch=settings.batch,
        max_attempts=settings.max_attempts,
        poll_interval=settings.poll_interval,
        destinations=settings.outbox,
        webhook_secret=settings.webhook_secret,
        outbox_alert_after=settings.outbox_alert_after,
        log_level=settings.log_level,
        processing_ids=settings.processing_ids,
        versions=settings.versions,
        unsupported=settings.unsupported,
    )


class WorkerSupervisor:
    """Starts the worker process, restarts it when it dies, stops it on request."""

    def __init__(self, settings: WorkerSettings, metrics: ServiceMetrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._ctx = multiprocessing.get_context("spawn")
        self.shared = WorkerShared.create(self._ctx)
        self._process: multiprocessing.process.BaseProcess | None = None
        self._stopping = False
        self._poison_seen = 0

    @property
    def alive(self) -> bool:
        """Whether the worker process is running."""
        return self._process is not None and self._process.is_alive()

    @property
    def state(self) -> str:
        """active, standby, starting or down."""
        return STATE_NAMES.get(self.shared.state.value, "?") if self.alive else "down"

    def _spawn(self) -> None:
        self.shared.state.value = 0
        self._process = self._ctx.Process(
            target=worker_main, args=(self._settings, self.shared), name="safetynet-worker"
        )
        self._process.start()
        log.info("worker process started", extra={"worker_pid": self._process.pid})

    async def run(self) -> None:
        """Keep a worker running until `stop`."""
        self._spawn()
        failures, started = 0, time.monotonic()
        while not self._stopping:
            await asyncio.sleep(0.2)
            self._sync_metrics()
            if self._stopping or self.alive:
                if time.monotonic() - started > 60:
                    failures = 0
                continue
            code = self._process.exitcode if self._process else None
            self._metrics.worker_restarts.inc()
            failures += 1
            delay = min(30.0, 0.5 * 2 ** (failures - 1))
            log.error(
                "worker process died; restarting",
                extra={"reason_code": str(code), "duration_ms": int(delay * 1000)},
            )
            await asyncio.sleep(delay)
            if not self._stopping:
                self._spawn()
                started = time.monotonic()

    def _sync_metrics(self) -> None:
        poisoned = self.shared.poisoned.value
        if poisoned > self._poison_seen:
            self._metrics.poison.inc(poisoned - self._poison_seen)
            self._poison_seen = poisoned

    async def stop(self, grace: float = 30.0) -> None:
        """Ask the worker to finish its batch and stop; terminate it past `grace`."""
        self._stopping = True
        self.shared.stop.value = 1
        self.shared.doorbell.ring()
        process = self._process
        if process is None:
            return
        await asyncio.to_thread(process.join, grace)
        if process.is_alive():
            log.error("worker did not stop in time; terminating")
            process.terminate()
            await asyncio.to_thread(process.join, 5)


def _database_ok(store: SqlStore) -> bool:
    try:
        with store.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        return True
    except Exception:
        return False


class Service:
    """The running service; `run()` until SIGTERM or SIGINT."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        for_worker = worker_settings(settings)
        self.parts = build_live_parts(for_worker)
        # Refuses (ConfigurationError: exit 2) a change to an active rule nobody approved.
        record_rule_set(
            self.parts.store, self.parts.catalogue, _now(), f"serve {settings.instance}"
        )
        self.metrics = ServiceMetrics(silence_alarm=settings.feed_silence_alarm)
        self.metrics.registry.register(
            StoreCollector(self.parts.store, _now, settings.outbox_alert_after)
        )
        self.metrics.seed_last_seen(last_seen_by_sender(self.parts.store))
        self.supervisor = WorkerSupervisor(for_worker, self.metrics)
        self.committer = InboxCommitter(
            self.parts.store,
            self.parts.ingest,
            max_message_bytes=settings.max_message_bytes,
            on_writing=self.supervisor.shared.listener_wants_to_write,
        )
        self.listener = MllpListener(
            ListenerSettings(
                host=settings.mllp_host,
                port=settings.mllp_port,
                max_message_bytes=settings.max_message_bytes,
                idle_timeout=settings.idle_timeout,
                read_timeout=settings.read_timeout,
                max_connections=settings.max_connections,
                ssl_context=ssl_context(settings),
            ),
            self.committer,
            self.metrics,
        )
        health = Health(live=lambda: self.committer.alive, ready=self._ready)
        self.http = uvicorn.Server(
            uvicorn.Config(
                build_api_app(self.fhir_api(), self.authenticator(), health, self.metrics.registry),
                host=settings.http_host,
                port=settings.http_port,
                log_config=uvicorn_log_config(),
                lifespan="off",
            )
        )

    def fhir_api(self) -> FhirApi:
        """The FHIR API's parts: this process's store, the catalogue, and the worker's
        doorbell, rung after every inbox write so the worker takes it at once."""
        catalogue = self.parts.catalogue
        return FhirApi(
            store=self.parts.store,
            catalogue=catalogue,
            mapper=FhirMapper(FhirMappingSettings.for_site(catalogue.site)),
            notify=self.supervisor.shared.doorbell.ring,
            source_server=self.settings.fhir_source or "",
            source_token=self.settings.fhir_source_token or "",
            source_timeout=self.settings.fhir_source_timeout,
            task_wait=self.settings.task_wait,
            base_url=(self.settings.public_base_url or "").rstrip("/"),
            # The worker gives way to HTTP writes as to the MLLP listener's (one shared flag:
            # whichever writer clears it first only ends the courtesy early).
            on_writing=self.supervisor.shared.listener_wants_to_write,
        )

    def authenticator(self) -> Authenticator:
        """Who may call the API: bearer tokens from the database, and JWTs validated
        against the JWKS when `--jwks-url` is set."""
        return Authenticator(TokenStore(self.parts.store), jwt_settings(self.settings))

    def _ready(self) -> tuple[bool, dict[str, str]]:
        database = _database_ok(self.parts.store)
        detail = {
            "database": "ok" if database else "unreachable",
            "mllp": "listening" if self.listener.listening else "closed",
            "processor": self.supervisor.state,
        }
        ok = database and self.listener.listening and self.supervisor.alive
        return ok, detail

    async def run(self) -> None:
        """Start everything, wait for a stop signal, stop everything in order."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        log.info("starting", extra={"lease_holder": self.settings.instance})
        self.committer.start()
        await self.listener.start()
        http_thread = threading.Thread(target=self.http.run, name="http", daemon=True)
        http_thread.start()
        supervisor = asyncio.create_task(self.supervisor.run())
        await stop.wait()
        log.info("stopping: no new connections; finishing messages in hand")
        await self.listener.stop()
        self.committer.stop()
        await self.supervisor.stop()
        await supervisor
        self.http.should_exit = True
        await asyncio.to_thread(http_thread.join, 10)
        self.parts.store.close()
        log.info("stopped")


def serve(settings: ServeSettings) -> int:
    """Run the service until stopped; the process exit status."""
    configure_logging(settings.log_level)
    service = Service(settings)
    asyncio.run(service.run())
    return 0
