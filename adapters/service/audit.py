"""The request audit: who asked the FHIR API for what, and what they were answered.

`RequestAudit` is ASGI middleware (`build_api_app` installs it). For every request under
`/fhir` it logs one structured line (logger `safetynet.http`, message "request"):

    {"message": "request", "method": "PUT", "path": "/fhir/Task/{id}", "status_code": 200,
     "principal": "dr-who", "duration_ms": 3.2, ...}

`path` is the **route template**, never the concrete path or the query string: a FHIR URL
can carry a patient identifier anywhere (`/fhir/Patient/9434765919`,
`/fhir/Task?patient=...`). A request that matched no route logs `(no route)`. `principal` is
the authenticated caller's subject (token name or JWT `sub`) or `anonymous`.

Every write (POST, PUT, PATCH, DELETE) and every refusal (401, 403), whatever the method, also
gets a row in the `audit` table: `actor` the principal, `action` `api.write` or `api.refused`,
`subject` the route template, `detail` {method, route, status, duration_ms, and for a refusal
the authenticator's reason code such as `jwt_expired` or `role`}. No patient data: the
detail holds only those fields. Reads are not written to the database, so a search costs one
log line. The row is written after the response has been sent, so it adds nothing to the
caller's wait, and with group commit (one thread commits every row waiting in one
transaction), so concurrent writes do not each add a commit; a failure to write it is logged
(by exception type) and does not change the answer already given.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from datetime import UTC, datetime
from typing import Any

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapters.store import SqlStore

__all__ = ["ANONYMOUS", "NO_ROUTE", "WRITE_METHODS", "RequestAudit", "route_template"]

log = logging.getLogger("safetynet.http")

ANONYMOUS = "anonymous"
NO_ROUTE = "(no route)"
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
REFUSALS = frozenset({401, 403})

_PARAM = re.compile(r"\{([^}:]+)(?::[^}]*)?\}")


def route_template(scope: Scope, prefix: str = "") -> str:
    """The template of the route that answered (`/fhir/Task/{id}`), or `(no route)`.

    FastAPI keeps an included router's routes without the prefix it was included under, so the
    template is `prefix` followed by the route's own template, checked by rendering that
    template with the matched path parameters: the concrete path must be exactly the route's
    rendering, or `prefix` and the rendering. Anything that does not check out is `(no route)`:
    a concrete path is never returned."""
    route = scope.get("route")
    template = getattr(route, "path", None)
    if not isinstance(template, str):
        return NO_ROUTE
    template = _PARAM.sub(lambda m: "{" + m.group(1) + "}", template)
    params: Mapping[str, Any] = scope.get("path_params") or {}
    rendered = _PARAM.sub(lambda m: str(params.get(m.group(1), m.group(0))), template)
    path = str(scope.get("path", ""))
    if not path.endswith(rendered):
        return NO_ROUTE
    head = path[: len(path) - len(rendered)]
    return head + template if head in ("", prefix) else NO_ROUTE


def _wall() -> datetime:
    return datetime.now(UTC)


class RequestAudit:
    """ASGI middleware: one log line per request under `prefix`, and an `audit` row in
    `store` for each write and each refusal (see the module). Other paths (/healthz,
    /metrics) pass untouched."""

    def __init__(
        self,
        app: ASGIApp,
        store: SqlStore,
        prefix: str = "/fhir",
        now: Callable[[], datetime] = _wall,
    ) -> None:
        self.app = app
        self.store = store
        self.prefix = prefix.rstrip("/")
        self.now = now
        self._writer = _AuditWriter(store)

    def _covers(self, path: str) -> bool:
        return path == self.prefix or path.startswith(self.prefix + "/")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on, note its answer, then log (and maybe record) it."""
        if scope["type"] != "http" or not self._covers(str(scope.get("path", ""))):
            await self.app(scope, receive, send)
            return
        at = self.now()
        started = time.perf_counter()
        state: dict[str, Any] = scope.setdefault("state", {})
        status = 500  # what the caller gets if the app raises before answering

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            duration_ms = round((time.perf_counter() - started) * 1000, 2)
            method = str(scope.get("method", ""))
            route = route_template(scope, self.prefix)
            caller = state.get("principal")
            actor = str(getattr(caller, "subject", "") or ANONYMOUS)
            log.info(
                "request",
                extra={
                    "method": method,
                    "path": route,
                    "status_code": status,
                    "principal": actor,
                    "duration_ms": duration_ms,
                },
            )
            refused = status in REFUSALS
            if refused or method in WRITE_METHODS:
                detail: dict[str, Any] = {
                    "method": method,
                    "route": route,
                    "status": status,
                    "duration_ms": duration_ms,
                }
                reason = state.get("auth_refusal")
                if refused and isinstance(reason, str):
                    detail["reason"] = reason
                action = "api.refused" if refused else "api.write"
                # Shielded: a caller who hung up still leaves its trace.
                with anyio.CancelScope(shield=True):
                    await self._writer.write((at, actor, action, route, detail))


_Row = tuple[datetime, str, str, str, dict[str, Any]]


class _AuditWriter:
    """Writes audit rows with group commit: one thread takes every row waiting (up to
    `BATCH`) and commits them in one transaction, so concurrent writes share a commit instead
    of queueing for the database's write lock one by one. Each request waits (without holding
    a thread) until its row is committed, so a graceful shutdown, which lets requests finish,
    loses none. The thread starts with the first row."""

    BATCH = 500

    def __init__(self, store: SqlStore) -> None:
        self._store = store
        self._queue: queue.SimpleQueue[tuple[_Row, Future[None]]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    async def write(self, row: _Row) -> None:
        """Commit `row`; a failure is logged (by exception type), never raised."""
        done: Future[None] = Future()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="request-audit", daemon=True)
                self._thread.start()
        self._queue.put((row, done))
        try:
            await asyncio.wrap_future(done)
        except Exception as exc:  # the answer is sent; the log says the row is missing
            kind = type(exc)
            log.error(
                "request audit row not written",
                extra={"reason_code": f"{kind.__module__}.{kind.__qualname__}", "kind": row[2]},
            )

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            with contextlib.suppress(queue.Empty):
                while len(batch) < self.BATCH:
                    batch.append(self._queue.get_nowait())
            try:
                with self._store.begin() as uow:
                    for (at, actor, action, route, detail), _ in batch:
                        uow.audit(at, actor, action, route, detail)
            except Exception as exc:
                for _, done in batch:
                    done.set_exception(exc)
            else:
                for _, done in batch:
                    done.set_result(None)
