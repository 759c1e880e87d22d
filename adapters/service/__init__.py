"""The operations surface of `safetynet serve`: health and readiness probes, Prometheus metrics
and structured JSON logs.

- `adapters.service.http`: `build_ops_app(health, registry)`, the FastAPI app serving
  `/healthz`, `/readyz` and `/metrics` (other routers, such as the FHIR API, mount on it).
- `adapters.service.metrics`: `ServiceMetrics` (what the listener counts as it works, and feed
  silence per sender), `StoreCollector` (gauges read from the database at scrape time) and
  `last_seen_by_sender` (to seed feed silence at start).
- `adapters.service.logs`: `configure_logging` and `uvicorn_log_config`, JSON lines whose extra
  fields pass an allow-list, so a careless `extra=` cannot put patient data in the logs.

Nothing here happens at import: the composition root builds and wires these.
"""
