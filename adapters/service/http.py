"""The HTTP face of `safetynet serve`: liveness, readiness and Prometheus metrics.

`build_ops_app` returns a plain FastAPI app (title, version, OpenAPI document at
`/openapi.json`) so that other routers, such as the FHIR Task API, can be mounted on the same
app and port. The handlers are synchronous on purpose: FastAPI runs them in its thread pool, so
a readiness check or a metrics scrape that waits on the database never blocks the event loop
the MLLP listener may share.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from adapters import package_version

__all__ = ["Health", "build_ops_app"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Health:
    """The service's answers to "is it alive?" and "may it take traffic?".

    `live`: False only when the process should be restarted (a wedged event loop, a dead
    listener thread); never for a dependency being down, or a restart loop follows.
    `ready`: whether to send it traffic, with a state per component, e.g.
    `(True, {"database": "ok", "mllp": "listening", "processor": "standby"})`. Both are called
    on every probe, from a worker thread: keep them cheap and thread-safe.
    """

    live: Callable[[], bool]
    ready: Callable[[], tuple[bool, dict[str, str]]]


def build_ops_app(health: Health, registry: CollectorRegistry) -> FastAPI:
    """The FastAPI app serving the operations endpoints:

    - `GET /healthz`: 200 `{"status": "ok"}` when `health.live()`, else 503
      `{"status": "unavailable"}`;
    - `GET /readyz`: the detail dict of `health.ready()`, 200 when ready, else 503;
    - `GET /metrics`: the Prometheus text exposition of `registry`.

    A check that raises counts as "no" (503); the exception's type is logged, not its text.
    Nothing is started or connected here: serve the app with uvicorn from the composition root.
    """
    app = FastAPI(
        title="safetynet",
        version=package_version(),
        description="Radiology-to-discharge safety net: operations endpoints.",
    )
    router = APIRouter(tags=["operations"])

    @router.get("/healthz", summary="Liveness: is the process working?")
    def healthz() -> JSONResponse:
        try:
            live = health.live()
        except Exception as exc:
            log.warning("liveness check raised", extra={"reason_code": _kind(exc)})
            live = False
        if live:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable"}, status_code=503)

    @router.get("/readyz", summary="Readiness: may it take traffic?")
    def readyz() -> JSONResponse:
        try:
            ready, detail = health.ready()
        except Exception as exc:
            log.warning("readiness check raised", extra={"reason_code": _kind(exc)})
            ready, detail = False, {"readiness": "check failed"}
        return JSONResponse(dict(detail), status_code=200 if ready else 503)

    @router.get("/metrics", summary="Prometheus metrics (text exposition format)")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(router)
    return app


def _kind(exc: BaseException) -> str:
    kind = type(exc)
    return f"{kind.__module__}.{kind.__qualname__}"
