"""A small, real FHIR R4 server that plays the hospital's side of a backport Subscription.

`http.server.ThreadingHTTPServer` on 127.0.0.1 (a free port) in a daemon thread, as
tests/fhir_server.py. Its FHIR base is `{root_url}/fhir`. It holds resources with their version
history and, per Subscription, the numbered events the hospital's server would have sent, and
it builds the notification Bundles (R4 backport: a `history` Bundle whose first entry is the
SubscriptionStatus `Parameters`) that a test then POSTs to safetynet as the hospital would.

Served (GET only):

* `{base}/{Type}/{id}` and `{base}/{Type}/{id}/_history/{vid}`: read and vread.
* `{base}/Subscription/{id}/$status`: a `searchset` Bundle holding the status `Parameters`
  (type query-status, events-since-subscription-start = events so far).
* `{base}/Subscription/{id}/$events?eventsSinceNumber=&eventsUntilNumber=&content=`: a
  `history` notification Bundle (type query-event) of the events in that range that it still
  holds (`forget()` drops some, as a server that keeps a limited history would), with full
  resources unless `content=id-only`.

Switches, while running: `mode = "down"` (503 + Retry-After to everything), `token` (a bearer
token every request must carry: 401 otherwise), `delay` (seconds before each answer), and
`stop()` / `start()` (the socket closed, then the same port again). Every request path is
recorded (`requests()`), so tests can see what safetynet read.
"""

from __future__ import annotations

import copy
import json
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

FHIR_PATH = "/fhir"
TOPIC = "urn:safetynet:test:topic:radiology-and-discharge"


@dataclass(frozen=True)
class SourceEvent:
    """One triggering event of a Subscription: its number and the resources it concerns,
    as they were at that moment (focus last)."""

    number: int
    focus: dict[str, Any]
    context: tuple[dict[str, Any], ...] = ()
    timestamp: str = "2008-05-01T12:00:00+01:00"


@dataclass
class _Subscription:
    topic: str
    status: str = "active"
    events: list[SourceEvent] = field(default_factory=list)
    forgotten: set[int] = field(default_factory=set)


@dataclass
class _State:
    lock: threading.Lock = field(default_factory=threading.Lock)
    # "Type/id" -> versions, oldest first
    resources: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    subscriptions: dict[str, _Subscription] = field(default_factory=dict)
    mode: str = "up"
    retry_after: str = "1"
    delay: float = 0.0
    token: str = ""
    requests: list[str] = field(default_factory=list)
    base: str = ""


def _outcome(code: str, diagnostics: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}],
    }


def _key(resource: Mapping[str, Any]) -> str:
    return f"{resource['resourceType']}/{resource['id']}"


def _version(resource: Mapping[str, Any]) -> str:
    return str((resource.get("meta") or {}).get("versionId", "1"))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "TinySource/1"
    timeout = 10
    state: _State

    @property
    def base(self) -> str:
        """This server's FHIR base URL."""
        return self.state.base

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests read `requests()` instead."""

    def _send(
        self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        content = json.dumps(body).encode()
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)

    def do_GET(self) -> None:
        """Read, vread, $status and $events."""
        state = self.state
        with state.lock:
            state.requests.append(self.path)
        if state.delay:
            time.sleep(state.delay)
        if state.mode == "down":
            self._send(503, _outcome("transient", "down for maintenance"), {"Retry-After": "1"})
            return
        if state.token and self.headers.get("Authorization") != f"Bearer {state.token}":
            self._send(401, _outcome("login", "a bearer token is required"))
            return
        parts = urlsplit(self.path)
        if not parts.path.startswith(FHIR_PATH + "/"):
            self._send(404, _outcome("not-found", "no such endpoint"))
            return
        steps = parts.path[len(FHIR_PATH) + 1 :].split("/")
        query = {name: values[0] for name, values in parse_qs(parts.query).items()}
        if len(steps) == 3 and steps[0] == "Subscription" and steps[2] == "$status":
            self._status(steps[1])
        elif len(steps) == 3 and steps[0] == "Subscription" and steps[2] == "$events":
            self._events(steps[1], query)
        elif len(steps) == 2:
            self._read(f"{steps[0]}/{steps[1]}", None)
        elif len(steps) == 4 and steps[2] == "_history":
            self._read(f"{steps[0]}/{steps[1]}", steps[3])
        else:
            self._send(404, _outcome("not-found", "no such endpoint"))

    def _read(self, key: str, version: str | None) -> None:
        with self.state.lock:
            versions = self.state.resources.get(key, [])
            found = [v for v in versions if version is None or _version(v) == version]
            resource = copy.deepcopy(found[-1]) if found else None
        if resource is None:
            self._send(404, _outcome("not-found", f"{key} is not known"))
        else:
            self._send(200, resource, {"ETag": f'W/"{_version(resource)}"'})

    def _subscription(self, sub_id: str) -> _Subscription | None:
        found = self.state.subscriptions.get(sub_id)
        if found is None:
            self._send(404, _outcome("not-found", f"Subscription/{sub_id} is not known"))
        return found

    def _status(self, sub_id: str) -> None:
        with self.state.lock:
            sub = self._subscription(sub_id)
            if sub is None:
                return
            status = status_parameters(self.base, sub_id, sub, "query-status", ())
        self._send(
            200,
            {
                "resourceType": "Bundle",
                "type": "searchset",
                "total": 1,
                "entry": [{"resource": status, "search": {"mode": "match"}}],
            },
        )

    def _events(self, sub_id: str, query: Mapping[str, str]) -> None:
        try:
            since = int(query.get("eventsSinceNumber", "1"))
            until = int(query["eventsUntilNumber"]) if "eventsUntilNumber" in query else None
        except ValueError:
            self._send(400, _outcome("invalid", "event numbers are integers"))
            return
        with self.state.lock:
            sub = self._subscription(sub_id)
            if sub is None:
                return
            chosen = [
                event
                for event in sub.events
                if event.number >= since
                and (until is None or event.number <= until)
                and event.number not in sub.forgotten
            ]
            bundle = notification_bundle(
                self.base,
                sub_id,
                sub,
                "query-event",
                chosen,
                full=query.get("content", "full-resource") != "id-only",
            )
        self._send(200, bundle)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet when a client went away first."""
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


def status_parameters(
    base: str,
    sub_id: str,
    sub: _Subscription,
    kind: str,
    events: Iterable[SourceEvent],
    *,
    count: int | None = None,
) -> dict[str, Any]:
    """The R4 backport SubscriptionStatus (a `Parameters` resource) for `events`."""
    parameters: list[dict[str, Any]] = [
        {"name": "subscription", "valueReference": {"reference": f"{base}/Subscription/{sub_id}"}},
        {"name": "topic", "valueCanonical": sub.topic},
        {"name": "status", "valueCode": sub.status},
        {"name": "type", "valueCode": kind},
        {
            "name": "events-since-subscription-start",
            "valueString": str(len(sub.events) if count is None else count),
        },
    ]
    for event in events:
        parts: list[dict[str, Any]] = [
            {"name": "event-number", "valueString": str(event.number)},
            {"name": "timestamp", "valueInstant": event.timestamp},
            {"name": "focus", "valueReference": {"reference": _versioned(base, event.focus)}},
        ]
        parts += [
            {"name": "additional-context", "valueReference": {"reference": _versioned(base, c)}}
            for c in event.context
        ]
        parameters.append({"name": "notification-event", "part": parts})
    return {
        "resourceType": "Parameters",
        "id": str(uuid.uuid4()),
        "meta": {
            "profile": [
                "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/"
                "backport-subscription-status-r4"
            ]
        },
        "parameter": parameters,
    }


def _versioned(base: str, resource: Mapping[str, Any]) -> str:
    return f"{base}/{_key(resource)}/_history/{_version(resource)}"


def notification_bundle(
    base: str,
    sub_id: str,
    sub: _Subscription,
    kind: str,
    events: Iterable[SourceEvent],
    *,
    full: bool,
    count: int | None = None,
) -> dict[str, Any]:
    """A notification Bundle (type history): the status first, then one entry per resource
    of the events (with the resource when `full`, else its fullUrl only: id-only)."""
    chosen = list(events)
    status = status_parameters(base, sub_id, sub, kind, chosen, count=count)
    entries: list[dict[str, Any]] = [
        {
            "fullUrl": f"urn:uuid:{status['id']}",
            "resource": status,
            "request": {"method": "GET", "url": f"{base}/Subscription/{sub_id}/$status"},
            "response": {"status": "200"},
        }
    ]
    for event in chosen:
        for resource in (*event.context, event.focus):
            entry: dict[str, Any] = {
                "fullUrl": _versioned(base, resource),
                "request": {"method": "PUT", "url": _key(resource)},
                "response": {"status": "200"},
            }
            if full:
                entry["resource"] = copy.deepcopy(resource)
            entries.append(entry)
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "meta": {"lastUpdated": "2008-05-01T12:00:00+01:00"},
        "type": "history",
        "timestamp": "2008-05-01T12:00:00+01:00",
        "entry": entries,
    }


class FhirSourceServer:
    """The hospital's FHIR server, its Subscriptions and the notifications it would send."""

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
        self._state.base = self.base_url
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Close the listening socket (clients then see connection refused)."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.shutdown()
        server.server_close()
        thread.join()
        self._server = self._thread = None

    def __enter__(self) -> FhirSourceServer:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- addresses and switches ---
    @property
    def root_url(self) -> str:
        """`http://127.0.0.1:<port>`."""
        return f"http://127.0.0.1:{self._port}"

    @property
    def base_url(self) -> str:
        """The FHIR base: `{root_url}/fhir`."""
        return f"{self.root_url}{FHIR_PATH}"

    @property
    def mode(self) -> str:
        """ "up" or "down" (every request answered 503 with Retry-After)."""
        return self._state.mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in ("up", "down"):
            raise ValueError(mode)
        self._state.mode = mode

    @property
    def token(self) -> str:
        """The bearer token required of clients ("" for none)."""
        return self._state.token

    @token.setter
    def token(self, value: str) -> None:
        self._state.token = value

    @property
    def delay(self) -> float:
        """Seconds every request waits before it is answered."""
        return self._state.delay

    @delay.setter
    def delay(self, seconds: float) -> None:
        self._state.delay = seconds

    def requests(self) -> list[str]:
        """The path (with query) of every request received, in order."""
        with self._state.lock:
            return list(self._state.requests)

    # --- what it holds ---
    def put(self, resource: Mapping[str, Any]) -> dict[str, Any]:
        """Store a version of a resource (its meta.versionId, else the next number); returns
        the stored copy."""
        stored = copy.deepcopy(dict(resource))
        key = _key(stored)
        with self._state.lock:
            versions = self._state.resources.setdefault(key, [])
            meta = dict(stored.get("meta") or {})
            meta.setdefault("versionId", str(len(versions) + 1))
            stored["meta"] = meta
            versions[:] = [v for v in versions if _version(v) != meta["versionId"]]
            versions.append(stored)
        return copy.deepcopy(stored)

    def subscription(self, sub_id: str, topic: str = TOPIC) -> None:
        """Create a Subscription with no events yet."""
        with self._state.lock:
            self._state.subscriptions[sub_id] = _Subscription(topic)

    def emit(
        self, sub_id: str, resource: Mapping[str, Any], context: Iterable[Mapping[str, Any]] = ()
    ) -> SourceEvent:
        """Store `resource` (a new version) and record a triggering event for it; returns the
        event (numbered from 1)."""
        focus = self.put(resource)
        with self._state.lock:
            sub = self._state.subscriptions[sub_id]
            event = SourceEvent(
                len(sub.events) + 1, focus, tuple(copy.deepcopy(dict(c)) for c in context)
            )
            sub.events.append(event)
        return event

    def forget(self, sub_id: str, *numbers: int) -> None:
        """Make events unavailable to `$events` (a server keeping a limited history)."""
        with self._state.lock:
            self._state.subscriptions[sub_id].forgotten.update(numbers)

    # --- notifications as the hospital would send them ---
    def _bundle(
        self,
        sub_id: str,
        kind: str,
        numbers: Iterable[int],
        *,
        full: bool,
        count: int | None = None,
    ) -> dict[str, Any]:
        with self._state.lock:
            sub = self._state.subscriptions[sub_id]
            wanted = set(numbers)
            chosen = [event for event in sub.events if event.number in wanted]
            return notification_bundle(
                self.base_url, sub_id, sub, kind, chosen, full=full, count=count
            )

    def handshake(self, sub_id: str) -> dict[str, Any]:
        """The handshake notification (no events; events-since-subscription-start now)."""
        return self._bundle(sub_id, "handshake", (), full=False)

    def heartbeat(self, sub_id: str) -> dict[str, Any]:
        """A heartbeat notification (no events; the count so far)."""
        return self._bundle(sub_id, "heartbeat", (), full=False)

    def notification(self, sub_id: str, *numbers: int, full: bool = True) -> dict[str, Any]:
        """An event-notification carrying events `numbers`: full-resource (`full`) or id-only.
        events-since-subscription-start is the highest number sent, as a server reports it
        when it sends in order."""
        return self._bundle(
            sub_id, "event-notification", numbers, full=full, count=max(numbers, default=0)
        )
