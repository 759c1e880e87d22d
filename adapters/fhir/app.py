"""The HTTP API: the operations endpoints and the FHIR R4 server under `/fhir`, on one app.

`build_api_app` is what `safetynet serve` runs with uvicorn (and what the tests run, on a real
port). Every error under it is answered with a FHIR OperationOutcome.
"""

from __future__ import annotations

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from adapters.fhir import capability, inbound_api, subscriptions, task_api
from adapters.fhir.context import FhirApi
from adapters.fhir.formats import FhirFormats
from adapters.fhir.http import install_fhir_errors
from adapters.fhir.openapi import install_openapi
from adapters.service.audit import RequestAudit
from adapters.service.auth import Authenticator
from adapters.service.http import Health, build_ops_app

__all__ = ["build_api_app"]

FHIR_PREFIX = "/fhir"


def build_api_app(
    api: FhirApi,
    authenticator: Authenticator,
    health: Health | None = None,
    registry: CollectorRegistry | None = None,
) -> FastAPI:
    """The service's HTTP app: /healthz, /readyz, /metrics (when `health` is given), the
    FHIR API under /fhir (JSON only: `FhirFormats` refuses other formats with 406/415) and
    /openapi.json (completed for the FHIR routes by `install_openapi`)."""
    if health is not None:
        app = build_ops_app(health, registry or CollectorRegistry())
    else:
        app = FastAPI(title="safetynet")
    app.description = (
        "Radiology-to-discharge safety net: the FHIR R4 API under /fhir (what it supports: "
        "GET /fhir/metadata) and the operations endpoints."
    )
    app.state.fhir = api
    app.state.authenticator = authenticator
    install_fhir_errors(app)
    for module in (capability, inbound_api, subscriptions, task_api):
        app.include_router(module.router, prefix=FHIR_PREFIX)
    # Last: writes of types not taken are kept and answered 404 not-supported.
    app.include_router(inbound_api.fallback, prefix=FHIR_PREFIX)
    app.add_middleware(FhirFormats, prefix=FHIR_PREFIX)
    # Outermost, so that every answer under /fhir is logged and audited (see its module).
    app.add_middleware(RequestAudit, store=api.store, prefix=FHIR_PREFIX)
    install_openapi(app)
    return app
