"""The outbox: every Task change delivered to every configured destination, never dropped.

`put_task` writes an `outbox` row with each non-shadow Task change, in the same transaction;
the `Dispatcher` queues a delivery per destination, sends it (FHIR conditional update or
webhook), retries failures with backoff, and keeps one Task's changes in order. `status` and
`Dispatcher.failing()` show how each destination is keeping up.
"""

from adapters.outbox.destinations import (
    DeliveryError,
    Destination,
    FhirTaskDestination,
    WebhookDestination,
    destination_from_url,
)
from adapters.outbox.dispatcher import Backoff, Dispatcher
from adapters.outbox.store import (
    Delivery,
    DestinationStatus,
    delivered,
    due,
    enqueue,
    failed,
    failing,
    status,
)

__all__ = [
    "Backoff",
    "Delivery",
    "DeliveryError",
    "Destination",
    "DestinationStatus",
    "Dispatcher",
    "FhirTaskDestination",
    "WebhookDestination",
    "delivered",
    "destination_from_url",
    "due",
    "enqueue",
    "failed",
    "failing",
    "status",
]
