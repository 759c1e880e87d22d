"""The composition root: the one place where settings are read and the parts are wired.

Nothing here runs at import; `build_app` is called by the CLI (and later the service).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from adapters.fhir.inbound import PROTOCOL as FHIR_PROTOCOL
from adapters.fhir.inbound import FhirIngest
from adapters.fhir.mapping import FhirMapper, FhirMappingSettings
from adapters.fhir.task import task_resource, task_restatus
from adapters.fhir.task_change import TASK_PROTOCOL, TaskChangeProcessor
from adapters.hl7v2.mapping import Mapper, MappingSettings
from adapters.ingest import Hl7Ingest, IngestPolicy, StoredMessageProcessor
from adapters.store import SqlStore, open_store
from engine.catalogue import Catalogue, load_catalogue
from engine.clock import SimulatedClock
from engine.events import Event
from engine.processor import Processor

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def default_rules_dir() -> Path:
    """`$SAFETYNET_RULES`, else the `rules/` folder beside the installed source tree."""
    env = os.environ.get("SAFETYNET_RULES")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1] / "rules"


@dataclass
class App:
    """The wired parts of one run."""

    store: SqlStore
    catalogue: Catalogue
    processor: Processor
    ingest: Hl7Ingest
    clock: SimulatedClock

    def close(self) -> None:
        """Release the database."""
        self.store.close()


def build_replay_app(db_url: str, rules_dir: Path) -> App:
    """Parts for replay: event time drives a simulated clock, so timers fire as they would
    have live. Raises ConfigurationError for a bad rules folder."""
    catalogue = load_catalogue(rules_dir)
    clock = SimulatedClock()
    store = open_store(db_url, clock=clock)
    processor = Processor(catalogue, task_resource, task_restatus)
    mapper = Mapper(MappingSettings.for_site(catalogue.site))

    def now_for(events: Sequence[Event]) -> datetime:
        for event in events:
            clock.advance(event.occurred_at)
        # Before the first event, nothing is due: never let the wall clock fire old timers.
        return clock.now() if clock.started else EPOCH

    return App(store, catalogue, processor, Hl7Ingest(processor, mapper, now_for), clock)


@dataclass
class LiveParts:
    """Parts for the live service.

    `clock` is processing time: it follows the messages' event time while the processor
    catches up (so a backlog is judged as replay would judge it, timers firing between the
    messages they fall between) and is moved to the wall clock whenever the inbox is drained
    (so timers fire on time). It never runs backwards nor ahead of the wall clock."""

    store: SqlStore
    catalogue: Catalogue
    ingest: Hl7Ingest
    clock: SimulatedClock
    # Inbox processors of the other protocols ("fhir", "task"), by inbox `protocol`.
    protocols: dict[str, StoredMessageProcessor] = field(default_factory=dict)


class LiveSettings(Protocol):
    """What `build_live_parts` reads (the serve and worker settings both provide it)."""

    @property
    def db_url(self) -> str: ...
    @property
    def rules_dir(self) -> str: ...
    @property
    def processing_ids(self) -> tuple[str, ...]: ...
    @property
    def versions(self) -> tuple[str, ...]: ...
    @property
    def unsupported(self) -> str: ...


def build_live_parts(settings: LiveSettings) -> LiveParts:
    """Parts for `safetynet serve` (listener and worker processes alike). Raises
    ConfigurationError for a bad rules folder, ValueError for a bad database URL."""
    catalogue = load_catalogue(Path(settings.rules_dir))
    store = open_store(settings.db_url)
    processor = Processor(catalogue, task_resource, task_restatus)
    mapper = Mapper(MappingSettings.for_site(catalogue.site))
    policy = IngestPolicy(settings.processing_ids, settings.versions, settings.unsupported)
    clock = SimulatedClock()

    def now_for(events: Sequence[Event]) -> datetime:
        wall = datetime.now(UTC)
        for event in events:
            clock.advance(min(event.occurred_at, wall))
        return clock.now() if clock.started else wall

    parts = LiveParts(store, catalogue, Hl7Ingest(processor, mapper, now_for, policy), clock)
    # Task status changes from the HTTP API (issue 4): the same processor and processing time.
    parts.protocols[TASK_PROTOCOL] = TaskChangeProcessor(processor, now_for)
    # FHIR resources from the HTTP API and Subscriptions (issue 4): applied as HL7 v2's are.
    fhir_mapper = FhirMapper(FhirMappingSettings.for_site(catalogue.site))
    parts.protocols[FHIR_PROTOCOL] = FhirIngest(fhir_mapper, parts.ingest)
    return parts
