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
    TaskStateError,
)
from engine.events import (
    AdmissionCancelled,
    ClinicalNote,
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
    SafeguardingFlagCleared,
    SafeguardingFlagRaised,
    SourceRef,
    TaskStatusChanged,
    Visit,
)
from engine.identity import is_valid_nhs_number
from engine.ports import Clock, Fact, InboundMessage, InboxEntry, Store, StoredTask, UnitOfWork
from engine.processor import Applied, Processor, StatusUpdate, TaskRenderer, TaskRestatus
from engine.tasks import RecallTask, TaskChange, task_identifier

__all__ = [
    "AdmissionCancelled",
    "Applied",
    "Catalogue",
    "ClinicalNote",
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
    "SafeguardingFlagCleared",
    "SafeguardingFlagRaised",
    "SimulatedClock",
    "Site",
    "SourceRef",
    "StatusUpdate",
    "Store",
    "StoredTask",
    "TaskChange",
    "TaskRenderer",
    "TaskRestatus",
    "TaskStateError",
    "TaskStatusChanged",
    "UnitOfWork",
    "Visit",
    "WallClock",
    "is_valid_nhs_number",
    "load_catalogue",
    "task_identifier",
]
