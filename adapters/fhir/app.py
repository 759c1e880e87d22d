"""The HTTP API: the operations endpoints and the FHIR R4 server under `/fhir`, on one app.

`build_api_app` is what `safetynet serve` runs with uvicorn (and what the tests run, on a real
port). Every error under it is answered with a FHIR OperationOutcome.
"""

from __future__ import annotations

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from adapters.fhir import capability, inbound_api, subscriptions, task_api
from adapters.fhir.context import FhirApi
from adapters.fhir.http import install_fhir_errors
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
    """The service's HTTP app: /healthz, /readyz, /metrics (when `health` is given) and the
    FHIR API under /fhir."""
    if health is not None:
        app = build_ops_app(health, registry or CollectorRegistry())
    else:
        app = FastAPI(title="safetynet")
    app.state.fhir = api
    app.state.authenticator = authenticator
    install_fhir_errors(app)
    for module in (capability, inbound_api, subscriptions, task_api):
        app.include_router(module.router, prefix=FHIR_PREFIX)
    return app
