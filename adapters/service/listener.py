"""The MLLP listener: frames in, raw messages committed to the inbox, ACKs out.

Inbox first: a message is answered only after the transaction that stored it has committed.
One writer thread (`InboxCommitter`) stores every connection's messages, many per transaction
(group commit): while one commit is in flight the next messages queue up and go together.

Per connection, frames are handled one at a time in arrival order (lock-step senders wait for
each ACK anyway; a pipelining sender gets its ACKs in order). Hostile or broken input never
loses an acknowledged message: garbage between frames is skipped and counted, an oversized
message is read to its end and answered AE with its head kept in quarantine, a connection that
stalls past its idle or read timeout is closed, and past `max_connections` new connections are
closed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import queue
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from adapters.hl7v2.ack import AckError, Header, ack_code, build_ack, read_header, should_send
from adapters.hl7v2.er7 import decode
from adapters.ingest import Hl7Ingest, IngestResult
from adapters.mllp.framing import FrameReader, FrameTimeout, FrameTruncated, encode_frame
from adapters.service.metrics import ServiceMetrics
from adapters.store import SqlStore

log = logging.getLogger("safetynet.mllp")

_OUTCOME = {"AA": "accept", "AE": "error", "AR": "reject"}


@dataclass
class _Job:
    text: str
    origin: str
    received_at: datetime
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[IngestResult]
    oversized: int = 0  # total size when only the head is in `text`


class StoreUnavailable(Exception):
    """The inbox could not be written: the message is not stored and must not be accepted."""


class InboxCommitter:
    """Stores messages from every connection in grouped transactions, in one thread.

    `submit` returns once the message's transaction has committed (or failed: then it raises
    StoreUnavailable and nothing about the message was stored)."""

    def __init__(
        self,
        store: SqlStore,
        ingest: Hl7Ingest,
        *,
        max_message_bytes: int,
        on_writing: Callable[[bool], None] = lambda writing: None,
        max_batch: int = 500,
    ) -> None:
        self._store = store
        self._ingest = ingest
        self._limit = max_message_bytes
        self._on_writing = on_writing
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="inbox-committer", daemon=True)
        self.commits = 0

    def start(self) -> None:
        """Start the writer thread."""
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Whether the writer thread is running (if it died, nothing would be stored)."""
        return self._thread.is_alive()

    def stop(self) -> None:
        """Store what is queued, then stop the writer thread."""
        self._queue.put(None)
        self._thread.join()

    async def submit(self, text: str, origin: str, oversized: int = 0) -> IngestResult:
        """Store one message (or, with `oversized`, the head of one) and decide its answer."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[IngestResult] = loop.create_future()
        self._queue.put(_Job(text, origin, datetime.now(UTC), loop, future, oversized))
        return await future

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < self._max_batch:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                    break
                batch.append(job)
            self._commit(batch)

    def _commit(self, batch: list[_Job]) -> None:
        self._on_writing(True)
        try:
            outcomes: list[IngestResult | BaseException] = list(self._store_all(batch))
        except Exception:
            log.exception("inbox commit failed", extra={"count": len(batch)})
            # Find the one that failed (or learn that the database is down): one at a time.
            outcomes = (
                [self._store_alone(job) for job in batch]
                if len(batch) > 1
                else [StoreUnavailable("the inbox could not be written")]
            )
        finally:
            self._on_writing(False)
        # One wake-up of each event loop per group, not one per message.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Any, Any]]] = {}
        for job, outcome in zip(batch, outcomes, strict=True):
            by_loop.setdefault(job.loop, []).append((job.future, outcome))
        for loop, settled in by_loop.items():
            loop.call_soon_threadsafe(_settle_all, settled)

    def _store_all(self, batch: list[_Job]) -> list[IngestResult]:
        with self._store.begin() as uow:
            results = [self._accept(uow, job) for job in batch]
        self.commits += 1
        return results

    def _store_alone(self, job: _Job) -> IngestResult | BaseException:
        try:
            return self._store_all([job])[0]
        except Exception:
            log.exception("message could not be stored")
            return StoreUnavailable("the message could not be stored")

    def _accept(self, uow: Any, job: _Job) -> IngestResult:
        if job.oversized:
            return self._ingest.accept_oversized(
                uow, job.text, job.oversized, self._limit, job.received_at, job.origin
            )
        return self._ingest.accept(uow, job.text, job.received_at, job.origin)


def _settle_all(
    settled: list[tuple[asyncio.Future[IngestResult], IngestResult | BaseException]],
) -> None:
    for future, outcome in settled:
        if future.done():
            continue  # the connection went away
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


@dataclass
class ListenerSettings:
    """How the MLLP listener behaves; see `safetynet serve --help`."""

    host: str = "0.0.0.0"
    port: int = 2575
    max_message_bytes: int = 16 * 1024 * 1024
    head_keep: int = 64 * 1024
    idle_timeout: float | None = 600.0
    read_timeout: float | None = 60.0
    max_connections: int = 100
    ssl_context: ssl.SSLContext | None = None
    application: str = "SAFETYNET"
    facility: str = ""


@dataclass(eq=False)  # hashed by identity: kept in a set
class _Connection:
    peer: str
    task: asyncio.Task[None] | None = None
    busy: bool = False


@dataclass
class MllpListener:
    """The MLLP server. `start()` binds; `stop()` stops accepting, lets each connection finish
    the message in hand (answering it) and closes them."""

    settings: ListenerSettings
    committer: InboxCommitter
    metrics: ServiceMetrics
    _server: asyncio.Server | None = None
    _connections: set[_Connection] = field(default_factory=set)
    _closing: bool = False
    _ack_ids: Iterator[str] = field(default_factory=lambda: _ack_control_ids())

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        assert self._server is not None and self._server.sockets
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def listening(self) -> bool:
        """Whether new connections are being accepted."""
        return self._server is not None and self._server.is_serving()

    async def start(self) -> None:
        """Bind and start accepting connections."""
        self._server = await asyncio.start_server(
            self._handle,
            self.settings.host,
            self.settings.port,
            ssl=self.settings.ssl_context,
            # A TLS handshake gets the same time as a message, not asyncio's 60 s.
            ssl_handshake_timeout=(
                self.settings.read_timeout if self.settings.ssl_context is not None else None
            ),
            limit=1024 * 1024,
        )
        log.info("MLLP listening", extra={"peer": f"{self.settings.host}:{self.port}"})

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting; answer the messages in hand; close every connection."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        idle = [c.task for c in self._connections if not c.busy and c.task is not None]
        for task in idle:
            task.cancel()
        busy = [c.task for c in self._connections if c.task is not None]
        if busy:
            await asyncio.wait(busy, timeout=grace)
        if self._server is not None:
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername")
        peer = f"{peername[0]}:{peername[1]}" if peername else "?"
        if len(self._connections) >= self.settings.max_connections or self._closing:
            self.metrics.connections_refused.inc()
            log.warning("connection refused: too many connections", extra={"peer": peer})
            writer.close()
            return
        connection = _Connection(peer, asyncio.current_task())
        self._connections.add(connection)
        self.metrics.connections.inc()
        try:
            await self._serve(connection, reader, writer)
        except asyncio.CancelledError:
            pass
        except (ConnectionError, ssl.SSLError) as exc:
            log.info("connection lost", extra={"peer": peer, "reason_code": type(exc).__name__})
        finally:
            self._connections.discard(connection)
            self.metrics.connections.dec()
            writer.close()
            with contextlib.suppress(
                TimeoutError, ConnectionError, ssl.SSLError, asyncio.CancelledError
            ):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _serve(
        self,
        connection: _Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        s = self.settings
        frames = FrameReader(
            reader,
            max_size=s.max_message_bytes,
            head_keep=s.head_keep,
            idle_timeout=s.idle_timeout,
            read_timeout=s.read_timeout,
        )
        while not self._closing:
            try:
                frame = await frames.next_frame()
            except FrameTimeout as exc:
                self._count_garbage(frames.pending_garbage)
                self.metrics.timeouts.labels(exc.kind).inc()
                log.info(
                    "connection timed out", extra={"peer": connection.peer, "reason_code": exc.kind}
                )
                return
            except FrameTruncated as exc:
                self._count_garbage(frames.pending_garbage)
                # Never acknowledged, so the sender still has it: nothing is lost.
                log.warning(
                    "connection closed inside a frame",
                    extra={"peer": connection.peer, "bytes": exc.received},
                )
                return
            if frame is None:
                trailing = getattr(frames, "trailing_garbage", 0)
                if trailing:
                    self.metrics.frames_garbage.inc(trailing)
                return
            connection.busy = True
            try:
                if frame.skipped:
                    self.metrics.frames_garbage.inc(frame.skipped)
                    log.warning(
                        "bytes outside MLLP frames skipped",
                        extra={"peer": connection.peer, "bytes": frame.skipped},
                    )
                if frame.oversized:
                    self.metrics.oversized.inc()
                answer = await self._answer(
                    frame.payload, frame.size if frame.oversized else 0, connection.peer
                )
                if answer:
                    writer.write(encode_frame(answer))
                    try:
                        # A peer that sends but never reads its ACKs must not hold a slot.
                        await asyncio.wait_for(writer.drain(), s.read_timeout)
                    except TimeoutError:
                        self.metrics.timeouts.labels("write").inc()
                        log.info(
                            "connection timed out",
                            extra={"peer": connection.peer, "reason_code": "write"},
                        )
                        return
            finally:
                connection.busy = False

    def _count_garbage(self, skipped: int) -> None:
        """Report bytes skipped before the stream was given up on (a timeout, a truncation)."""
        if skipped:
            self.metrics.frames_garbage.inc(skipped)

    async def _answer(self, payload: bytes, oversized: int, peer: str) -> bytes:
        text = decode(payload)
        header = read_header(text)
        enhanced = header is not None and header.enhanced
        try:
            result = await self.committer.submit(text, peer, oversized)
        except StoreUnavailable as exc:
            # Not stored, so not accepted: a reject asks the sender to try again later.
            code = ack_code("reject", enhanced)
            return self._ack(header, code, AckError(exc.args[0], "", "207"), header_sender(header))
        code = ack_code(_OUTCOME[result.ack_code], enhanced)
        error = None
        if result.ack_code != "AA":
            error = AckError(result.reason, result.location, result.hl7_code or "207")
        sender = result.sender or header_sender(header)
        self.metrics.message(sender, result.message_type or "?", code, datetime.now(UTC))
        return self._ack(header, code, error, sender)

    def _ack(self, header: Header | None, code: str, error: AckError | None, sender: str) -> bytes:
        if not should_send(header, code):
            return b""
        ack = build_ack(
            header,
            code,
            control_id=next(self._ack_ids),
            now=datetime.now(UTC),
            error=error,
            application=self.settings.application,
            facility=self.settings.facility,
        )
        return ack.encode("utf-8")


def _ack_control_ids() -> Iterator[str]:
    """MSH-10 values for ACKs, unique per listener and at most 20 characters (ST 20 up to
    v2.5): the start time and process id, then a counter."""
    prefix = f"A{int(time.time()):x}{os.getpid() % 0x1000:03x}"
    return (f"{prefix}{n:x}" for n in itertools.count(1))


def header_sender(header: Header | None) -> str:
    """The sender as metrics name it ("MSH-3^MSH-4", first components), or "(unreadable)"."""
    if header is None:
        return "(unreadable)"
    return f"{header.sending_application.split('^')[0]}^{header.sending_facility.split('^')[0]}"
