"""What every FHIR HTTP handler needs, in one object on `app.state.fhir`.

Handlers run in FastAPI's thread pool (they are synchronous: the database calls block) and
get it with `Depends(fhir_api)`. Writes go inbox-first: a handler stores what it was sent in
the inbox (a transaction of its own), then calls `notify()` so the worker, which alone runs
the processor, takes it at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from fastapi import Request

from adapters.fhir.mapping import FhirMapper
from adapters.store import SqlStore
from engine.catalogue import Catalogue

__all__ = ["FhirApi", "fhir_api"]


def _wall() -> datetime:
    return datetime.now(UTC)


@dataclass
class FhirApi:
    """The FHIR API's parts.

    `notify`: wake the worker after an inbox write (serve: the worker's doorbell).
    `source_server`: base URL of the FHIR server whose Subscription notifications arrive
    (id-only notifications are read from it, gaps recovered with `$status`/`$events`), with
    `source_token` as its bearer token (if any) and `source_timeout` seconds per request.
    `task_wait`: seconds a Task status change waits for the worker to apply it before the
    answer is 202 (accepted, still queued) instead of 200 with the changed Task.
    `base_url`: the public base of `/fhir` for links (empty: taken from the request).
    `on_writing`: told True before a group of HTTP writes is committed and False after (serve:
    on SQLite the worker gives way, as it does for the MLLP listener)."""

    store: SqlStore
    catalogue: Catalogue
    mapper: FhirMapper
    notify: Callable[[], None] = lambda: None
    source_server: str = ""
    source_token: str = ""
    source_timeout: float = 10.0
    task_wait: float = 10.0
    base_url: str = ""
    on_writing: Callable[[bool], None] = lambda writing: None
    now: Callable[[], datetime] = field(default=_wall)


def fhir_api(request: Request) -> FhirApi:
    """FastAPI dependency: the API's parts."""
    api: FhirApi = request.app.state.fhir
    return api
