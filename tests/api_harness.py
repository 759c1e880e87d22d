"""The HTTP API for tests, with real parts: uvicorn on a free port, a real store, and a worker
thread running the processor over the inbox exactly as `safetynet serve`'s worker does.

    with ApiServer(tmp_path / "api.db") as server:
        token = server.token("dr-who", "clinician", practitioner="C9001")
        with server.client(token) as http:
            http.get("/Task")
        server.drain()          # wait until the worker has processed everything stored

For the whole service as a process (MLLP too), use tests/service_harness.ServeProcess.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from adapters.bootstrap import build_live_parts, default_rules_dir
from adapters.fhir.app import build_api_app
from adapters.fhir.context import FhirApi
from adapters.fhir.mapping import FhirMapper, FhirMappingSettings
from adapters.service.auth import Authenticator, TokenStore
from adapters.service.worker import Worker, WorkerSettings
from adapters.store.operations import any_pending
from tests.service_harness import free_port


class ApiServer:
    """The API on a real port over `db` (a path: SQLite; or a database URL)."""

    def __init__(
        self,
        db: Path | str,
        rules_dir: Path | None = None,
        *,
        source_server: str = "",
        task_wait: float = 10.0,
        worker: bool = True,
    ) -> None:
        url = db if isinstance(db, str) else f"sqlite:///{db}"
        self.settings = WorkerSettings(
            db_url=url,
            rules_dir=str(rules_dir or default_rules_dir()),
            holder="api-harness",
            lease_ttl=5.0,
            poll_interval=0.05,
        )
        self.port = free_port()
        self._source_server = source_server
        self._task_wait = task_wait
        self._with_worker = worker
        self._bell = threading.Event()
        self._stopping = False
        self._threads: list[threading.Thread] = []

    @property
    def base(self) -> str:
        """The FHIR base URL: http://127.0.0.1:<port>/fhir."""
        return f"http://127.0.0.1:{self.port}/fhir"

    @property
    def root(self) -> str:
        """The server root (operations endpoints, /openapi.json)."""
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ApiServer:
        self.parts = build_live_parts(self.settings)
        self.store = self.parts.store
        self.catalogue = self.parts.catalogue
        self.api = FhirApi(
            store=self.store,
            catalogue=self.catalogue,
            mapper=FhirMapper(FhirMappingSettings.for_site(self.catalogue.site)),
            notify=self._bell.set,
            source_server=self._source_server,
            task_wait=self._task_wait,
        )
        self.tokens = TokenStore(self.store)
        self.app = build_api_app(self.api, Authenticator(self.tokens))
        self.server = uvicorn.Server(
            uvicorn.Config(
                self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"
            )
        )
        self._start(self.server.run, "api-http")
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the API server did not start")
            time.sleep(0.01)
        if self._with_worker:
            self.worker = Worker(
                self.store,
                self.parts.ingest,
                self.settings,
                clock=self.parts.clock,
                protocols=self.parts.protocols,
            )
            self._start(self._work, "api-worker")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping = True
        self._bell.set()
        self.server.should_exit = True
        for thread in self._threads:
            thread.join(10)
        self.store.close()

    def _start(self, target: Any, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _wait(self, seconds: float) -> None:
        self._bell.wait(seconds)
        self._bell.clear()

    def _work(self) -> None:
        self.worker.run(self._wait, lambda: self._stopping)

    def token(self, name: str, *roles: str, practitioner: str = "") -> str:
        """A new bearer token with `roles`."""
        return self.tokens.create(name, roles, datetime.now(UTC), practitioner=practitioner)

    @contextmanager
    def client(self, token: str | None = None) -> Iterator[httpx.Client]:
        """An httpx client on the FHIR base, sending `token` as its bearer token."""
        headers = {"Accept": "application/fhir+json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        with httpx.Client(base_url=self.base, headers=headers, timeout=30) as http:
            yield http

    def drain(self, timeout: float = 30.0) -> None:
        """Wait until the worker has processed every stored message (and fired due timers)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.store.begin(read_only=True) as look:
                if not any_pending(look):
                    time.sleep(0.05)  # the last batch's commit and its timers
                    with self.store.begin(read_only=True) as again:
                        if not any_pending(again):
                            return
            self._bell.set()
            time.sleep(0.02)
        raise TimeoutError("the worker did not drain the inbox")
