"""A tiny, real FHIR Task server and webhook receiver for the outbox tests.

`http.server.ThreadingHTTPServer` on 127.0.0.1 (a free port) in a daemon thread, speaking
HTTP/1.1 with keep-alive like a real server. It implements just what the outbox uses:

The FHIR base is the server's root (`http://127.0.0.1:<port>`, so `PUT /Task?identifier=...`);
`base_url` names the same endpoints under `/fhir`, to exercise clients that join paths.

* `PUT {base}/Task?identifier=system|value`: FHIR R4 conditional update. No Task with that
  identifier: create it with a server-assigned id (201). One: replace it, keeping its id (200).
  Several: 412. A body `id` that differs from the matched Task's id is refused with 400, as R5
  requires and strict R4 servers do, so the tests catch a client that sends its own ids.
* `GET {base}/Task?identifier=...` and `GET {base}/Task`: a searchset Bundle.
* `POST /hook`: a webhook receiver that records every body and its headers (204).

Failure modes, switchable while running: `mode = "down"` (503 with Retry-After, default 0),
`mode = "reject"` (400 with an OperationOutcome), `delay` (seconds to sleep before answering),
and `stop()` / `start()` (the socket closed, open connections cut, then the same port again).

Use it as a context manager; it records requests per Task identifier so tests can check that
no Task was ever created twice and that every change arrived.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

FHIR_PATH = "/fhir"
HOOK_PATH = "/hook"
TASK_PATHS = ("/Task", f"{FHIR_PATH}/Task")


@dataclass(frozen=True)
class HookCall:
    """One POST the webhook endpoint received."""

    headers: dict[str, str]
    body: bytes

    @property
    def payload(self) -> dict[str, Any]:
        """The body as JSON."""
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


@dataclass
class _State:
    lock: threading.Lock = field(default_factory=threading.Lock)
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    next_id: int = 1
    mode: str = "up"
    retry_after: str = "0"
    delay: float = 0.0
    puts: Counter[str] = field(default_factory=Counter)
    put_bodies: list[dict[str, Any]] = field(default_factory=list)
    put_headers: list[dict[str, str]] = field(default_factory=list)
    hooks: list[HookCall] = field(default_factory=list)
    connections: set[socket.socket] = field(default_factory=set)


def _matches(resource: dict[str, Any], system: str | None, value: str) -> bool:
    for identifier in resource.get("identifier") or ():
        if identifier.get("value") == value and (
            system is None or identifier.get("system") == system
        ):
            return True
    return False


def _outcome(code: str, diagnostics: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}],
    }


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "TinyFhir/1"
    # A connection idle this long is closed (keeps stray handler threads from piling up).
    timeout = 10
    state: _State

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in two writes: without this, Nagle's algorithm holds the body
        # until the client's delayed ACK (40 ms a request).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.state.lock:
            self.state.connections.add(self.connection)

    def finish(self) -> None:
        with self.state.lock:
            self.state.connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests read the recorded requests instead."""

    # --- answering ---
    def _send(
        self, status: int, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None
    ) -> None:
        content = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if body is not None:
            self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length)

    def _failing(self) -> bool:
        """Answer for the failure modes; True when the request was answered."""
        state = self.state
        if state.delay:
            time.sleep(state.delay)
        if state.mode == "down":
            self._send(
                503,
                _outcome("transient", "server is down for maintenance"),
                {"Retry-After": state.retry_after},
            )
            return True
        if state.mode == "reject":
            self._send(400, _outcome("invalid", "Task.owner: unknown practitioner"))
            return True
        return False

    def _identifier(self, query: str) -> tuple[str | None, str] | None:
        values = parse_qs(query).get("identifier")
        if not values:
            return None
        system, bar, value = values[0].rpartition("|")
        return (system if bar else None), value

    # --- methods ---
    def do_PUT(self) -> None:
        """Conditional update of a Task."""
        body = self._read_body()
        parts = urlsplit(self.path)
        found = self._identifier(parts.query)
        if found is not None:
            with self.state.lock:
                self.state.puts[found[1]] += 1
        if self._failing():
            return
        if parts.path not in TASK_PATHS or found is None:
            self._send(400, _outcome("not-supported", "only PUT Task?identifier=... is served"))
            return
        if self.headers.get("Content-Type", "").split(";")[0] != "application/fhir+json":
            self._send(415, _outcome("invalid", "Content-Type must be application/fhir+json"))
            return
        resource = json.loads(body)
        if resource.get("resourceType") != "Task":
            self._send(400, _outcome("invalid", "not a Task"))
            return
        system, value = found
        with self.state.lock:
            self.state.put_bodies.append(resource)
            self.state.put_headers.append({k.lower(): v for k, v in self.headers.items()})
            matches = [
                task_id
                for task_id, task in self.state.tasks.items()
                if _matches(task, system, value)
            ]
            if len(matches) > 1:
                status, answer = 412, _outcome("multiple-matches", f"{len(matches)} Tasks match")
            elif matches and resource.get("id") not in (None, matches[0]):
                status, answer = 400, _outcome("invalid", "resource id does not match the Task")
            else:
                if matches:
                    task_id, status = matches[0], 200
                    version = int(self.state.tasks[task_id]["meta"]["versionId"]) + 1
                else:
                    task_id, status, version = str(self.state.next_id), 201, 1
                    self.state.next_id += 1
                stored = dict(resource, id=task_id, meta={"versionId": str(version)})
                self.state.tasks[task_id] = stored
                answer = stored
        self._send(status, answer, {"Location": f"/Task/{answer.get('id', '')}"})

    def do_GET(self) -> None:
        """Search Tasks (all, or by identifier)."""
        if self._failing():
            return
        parts = urlsplit(self.path)
        if parts.path not in TASK_PATHS:
            self._send(404, _outcome("not-found", "no such endpoint"))
            return
        found = self._identifier(parts.query)
        with self.state.lock:
            tasks = [
                task
                for task in self.state.tasks.values()
                if found is None or _matches(task, *found)
            ]
        self._send(
            200,
            {
                "resourceType": "Bundle",
                "type": "searchset",
                "total": len(tasks),
                "entry": [{"resource": task} for task in tasks],
            },
        )

    def do_POST(self) -> None:
        """The webhook endpoint."""
        body = self._read_body()
        if self._failing():
            return
        if urlsplit(self.path).path != HOOK_PATH:
            self._send(404, _outcome("not-found", "no such endpoint"))
            return
        with self.state.lock:
            self.state.hooks.append(HookCall({k.lower(): v for k, v in self.headers.items()}, body))
        self._send(204)


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet when a client went away first (a test's timeout, or `stop()`)."""
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


class FhirTestServer:
    """The server, its switches and what it received. See the module docstring."""

    def __init__(self) -> None:
        self._state = _State()
        self._port = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ---
    def start(self) -> None:
        """Listen (on the port used before, after a `stop`) and serve in a daemon thread."""
        if self._server is not None:
            return
        handler = type("Handler", (_Handler,), {"state": self._state})
        server = _Server(("127.0.0.1", self._port), handler)
        self._port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Close the listening socket and cut every open connection (clients see resets)."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.shutdown()
        server.server_close()
        thread.join()
        with self._state.lock:
            connections = list(self._state.connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        self._server = self._thread = None

    def __enter__(self) -> FhirTestServer:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- switches ---
    @property
    def mode(self) -> str:
        """ "up", "down" (503 + Retry-After) or "reject" (400)."""
        return self._state.mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in ("up", "down", "reject"):
            raise ValueError(mode)
        self._state.mode = mode

    @property
    def retry_after(self) -> str:
        """The Retry-After header value sent while down."""
        return self._state.retry_after

    @retry_after.setter
    def retry_after(self, value: str) -> None:
        self._state.retry_after = value

    @property
    def delay(self) -> float:
        """Seconds every request waits before it is answered."""
        return self._state.delay

    @delay.setter
    def delay(self, seconds: float) -> None:
        self._state.delay = seconds

    # --- addresses ---
    @property
    def port(self) -> int:
        """The port (kept across stop/start)."""
        return self._port

    @property
    def root_url(self) -> str:
        """`http://127.0.0.1:<port>`: also a FHIR base (Task at `/Task`)."""
        return f"http://127.0.0.1:{self._port}"

    @property
    def base_url(self) -> str:
        """A FHIR base URL with a path (Task lives at `{base_url}/Task`)."""
        return f"{self.root_url}{FHIR_PATH}"

    @property
    def hook_url(self) -> str:
        """The webhook URL."""
        return f"http://127.0.0.1:{self._port}{HOOK_PATH}"

    # --- what it holds and received ---
    def add_task(self, resource: dict[str, Any]) -> str:
        """Store a Task directly (as another client would have); returns its id."""
        with self._state.lock:
            task_id = str(self._state.next_id)
            self._state.next_id += 1
            self._state.tasks[task_id] = dict(resource, id=task_id, meta={"versionId": "1"})
        return task_id

    def tasks(self) -> list[dict[str, Any]]:
        """Every Task the server holds."""
        with self._state.lock:
            return [dict(task) for task in self._state.tasks.values()]

    def tasks_by_identifier(self, system: str) -> dict[str, list[dict[str, Any]]]:
        """The Tasks the server holds, grouped by their identifier value in `system`."""
        grouped: dict[str, list[dict[str, Any]]] = {}
        for task in self.tasks():
            for identifier in task.get("identifier") or ():
                if identifier.get("system") == system:
                    grouped.setdefault(identifier["value"], []).append(task)
        return grouped

    def put_counts(self) -> Counter[str]:
        """PUT requests received per identifier value (answered or not)."""
        with self._state.lock:
            return Counter(self._state.puts)

    def put_bodies(self) -> list[dict[str, Any]]:
        """The Task bodies of the PUTs that reached the update logic, in arrival order."""
        with self._state.lock:
            return list(self._state.put_bodies)

    def put_headers(self) -> list[dict[str, str]]:
        """The headers of those PUTs (names lower-cased)."""
        with self._state.lock:
            return list(self._state.put_headers)

    def hook_calls(self) -> list[HookCall]:
        """Every webhook POST accepted, in arrival order."""
        with self._state.lock:
            return list(self._state.hooks)

    def task_identifiers(self) -> list[str]:
        """The identifier values of every Task held (a value twice: a Task created twice)."""
        return [
            identifier["value"]
            for task in self.tasks()
            for identifier in task.get("identifier") or ()
            if "value" in identifier
        ]

    def webhooks(self) -> list[dict[str, Any]]:
        """The JSON bodies of every webhook POST accepted, in arrival order."""
        return [call.payload for call in self.hook_calls()]

    def hook_versions(self) -> Iterator[tuple[str, int]]:
        """(task identifier, version) of each webhook POST accepted, in arrival order."""
        for call in self.hook_calls():
            payload = call.payload
            yield payload["task_identifier"], payload["task_version"]
