"""safetynet's engine: canonical events, patient facts, rules and recall Tasks.

Knows no wire format, database or HTTP library; adapters translate at the edge. Only
`engine.rulecore` imports durable_rules.
"""

from engine.catalogue import Catalogue, Rule, Site, load_catalogue
from engine.clock import SimulatedClock, WallClock
from engine.errors import (
    ConfigurationError,
    EngineError,
    IdentityError,
    LinkError,
    RuleEvaluationError,
)
from engine.events import (
    AdmissionCancelled,
    Clinician,
    DischargeCancelled,
    Event,
    ImagingOrdered,
    OrderCancelled,
    OrderChanged,
    OrderRef,
    Patient,
    PatientAdmitted,
    PatientDischarged,
    PatientIdentifier,
    PatientRegistered,
    PatientsMerged,
    PatientTransferred,
    PatientUpdated,
    ReportIssued,
    SourceRef,
    Visit,
)
from engine.identity import is_valid_nhs_number
from engine.ports import Clock, Fact, InboundMessage, InboxEntry, Store, StoredTask, UnitOfWork
from engine.processor import Applied, Processor, TaskRenderer
from engine.tasks import RecallTask, task_identifier

__all__ = [
    "AdmissionCancelled",
    "Applied",
    "Catalogue",
    "Clinician",
    "Clock",
    "ConfigurationError",
    "DischargeCancelled",
    "EngineError",
    "Event",
    "Fact",
    "IdentityError",
    "ImagingOrdered",
    "InboundMessage",
    "InboxEntry",
    "LinkError",
    "OrderCancelled",
    "OrderChanged",
    "OrderRef",
    "Patient",
    "PatientAdmitted",
    "PatientDischarged",
    "PatientIdentifier",
    "PatientRegistered",
    "PatientTransferred",
    "PatientUpdated",
    "PatientsMerged",
    "Processor",
    "RecallTask",
    "ReportIssued",
    "Rule",
    "RuleEvaluationError",
    "SimulatedClock",
    "Site",
    "SourceRef",
    "Store",
    "StoredTask",
    "TaskRenderer",
    "UnitOfWork",
    "Visit",
    "WallClock",
    "is_valid_nhs_number",
    "load_catalogue",
    "task_identifier",
]
