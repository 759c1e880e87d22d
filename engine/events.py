"""Canonical events: one frozen dataclass per clinical meaning, never per wire format.

Adapters translate HL7 v2 and FHIR messages into these; the engine only ever sees these.
Every event carries the patient as the message described it (identifiers, not yet a key), the
encounter (visit number), `occurred_at` (event time from the message, timezone-aware),
`received_at` (processing time) and a `SourceRef` naming the message it came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

NHS_NUMBER_SYSTEM = "https://fhir.nhs.uk/Id/nhs-number"


@dataclass(frozen=True, slots=True)
class SourceRef:
    """Where an event came from: sender (MSH-3^MSH-4 or FHIR source), message id, and kind."""

    sender: str
    message_id: str
    kind: str  # e.g. "ADT^A03", "ORU^R01"


@dataclass(frozen=True, slots=True)
class PatientIdentifier:
    """One patient identifier with the authority that assigned it.

    `system` is the assigning authority (CX.4) or FHIR system; `type_code` the identifier type
    (table 0203: NH, MR, PI...). `is_nhs_number` is set only after the modulus-11 check passed.
    """

    value: str
    system: str = ""
    type_code: str = ""
    is_nhs_number: bool = False

    @property
    def token(self) -> str:
        """A stable `system|value` string used as an alias key."""
        if self.is_nhs_number:
            return f"{NHS_NUMBER_SYSTEM}|{self.value}"
        return f"{self.system}|{self.value}"


@dataclass(frozen=True, slots=True)
class Clinician:
    """A responsible clinician (XCN): identifier, assigning authority and display name."""

    id: str
    name: str = ""
    authority: str = ""


@dataclass(frozen=True, slots=True)
class Patient:
    """The patient as one message describes them. No names: the engine does not need them."""

    identifiers: tuple[PatientIdentifier, ...]
    birth: datetime | None = None
    sex: str = ""  # administrative sex as sent (M, F, U, O...)

    @property
    def nhs_number(self) -> str | None:
        """The checked NHS number, if the message carried a valid one."""
        for ident in self.identifiers:
            if ident.is_nhs_number:
                return ident.value
        return None


@dataclass(frozen=True, slots=True)
class OrderRef:
    """How messages name an order: placer (ORC-2/OBR-2) and filler (ORC-3/OBR-3) numbers."""

    placer: str = ""
    placer_ns: str = ""
    filler: str = ""
    filler_ns: str = ""

    def tokens(self) -> tuple[str, ...]:
        """Alias keys under which this order can be found (placer first)."""
        out = []
        if self.placer:
            out.append(f"PLAC|{self.placer_ns}|{self.placer}")
        if self.filler:
            out.append(f"FILL|{self.filler_ns}|{self.filler}")
        return tuple(out)


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Base of every canonical event."""

    source: SourceRef
    occurred_at: datetime
    received_at: datetime
    patient: Patient | None = None
    encounter: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Visit:
    """What a visit message says about the visit: class, location, clinicians, disposition."""

    patient_class: str = ""  # PV1-2: E emergency, I inpatient, O outpatient...
    location: str = ""  # PV1-3.1 (point of care)
    attending: Clinician | None = None  # PV1-7
    disposition: str = ""  # PV1-36
    discharged_to: str = ""  # PV1-37


@dataclass(frozen=True, slots=True, kw_only=True)
class PatientRegistered(Event):
    """A04: registered (e.g. arrival in the emergency department)."""

    visit: Visit = field(default_factory=Visit)


@dataclass(frozen=True, slots=True, kw_only=True)
class PatientAdmitted(Event):
    """A01, or A06 (outpatient/ED to inpatient): admitted to the hospital's care."""

    visit: Visit = field(default_factory=Visit)


@dataclass(frozen=True, slots=True, kw_only=True)
class PatientTransferred(Event):
    """A02: moved within the hospital."""

    visit: Visit = field(default_factory=Visit)


@dataclass(frozen=True, slots=True, kw_only=True)
class PatientDischarged(Event):
    """A03: the visit ended. Whether the patient left the hospital's care is decided later."""

    visit: Visit = field(default_factory=Visit)


@dataclass(frozen=True, slots=True, kw_only=True)
class DischargeCancelled(Event):
    """A13: the discharge of this encounter did not happen."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AdmissionCancelled(Event):
    """A11: the admission or registration of this encounter did not happen."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PatientUpdated(Event):
    """A08: demographics or visit details changed (recorded; full behaviour comes later)."""

    visit: Visit = field(default_factory=Visit)
    discharged_at: datetime | None = None  # PV1-45, when the update carries it


@dataclass(frozen=True, slots=True, kw_only=True)
class PatientsMerged(Event):
    """A40: `prior` identifiers (MRG-1) now belong to the surviving `patient`."""

    prior: tuple[PatientIdentifier, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class ImagingOrdered(Event):
    """An imaging order was placed (ORC-1 NW)."""

    order: OrderRef
    procedure_code: str = ""
    procedure_name: str = ""
    section: str = ""  # OBR-24 diagnostic service section
    orderer: Clinician | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class OrderCancelled(Event):
    """An order was cancelled or discontinued (ORC-1 CA, CR, OC, OD, DC, DR; OBR-25 X)."""

    order: OrderRef
    control: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class OrderChanged(Event):
    """An order's details or status changed (ORC-1 XO, SC) without being cancelled."""

    order: OrderRef
    control: str = ""
    order_status: str = ""  # ORC-5


@dataclass(frozen=True, slots=True, kw_only=True)
class ReportIssued(Event):
    """A radiology report for an order: preliminary, final, corrected or withdrawn.

    `flags` are the OBX-8 abnormal flags of the report's observations, as sent.
    """

    order: OrderRef
    status: str  # "preliminary" | "final" | "corrected" | "withdrawn"
    flags: tuple[str, ...] = ()
    performed_at: datetime | None = None  # OBR-7: when the examination was done
    procedure_code: str = ""
    procedure_name: str = ""
    section: str = ""
    orderer: Clinician | None = None
    # The radiologist's alert category: "critical", "urgent", "significant" (significant
    # unexpected, including the national CANCER code) or "" (none); from a configured alert
    # OBX or a DiagnosticReport conclusionCode.
    alert: str = ""
    # Normalised key-finding concepts of the report (e.g. SNOMED CT codes from conclusionCode
    # or coded OBX values); a change between preliminary and final is a discrepancy.
    findings: tuple[str, ...] = ()
    wrong_patient: bool = False  # withdrawn because it belongs to another patient (OBX-11 W)

    @property
    def abnormal(self) -> bool:
        """True when any observation carries an abnormal flag (anything but N or empty)."""
        return any(f not in ("", "N") for f in self.flags)


ALERTS = ("", "significant", "urgent", "critical")
"""Alert categories in rising order of urgency (RCR: significant unexpected, urgent, critical)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SafeguardingFlagRaised(Event):
    """A safeguarding concern was recorded for the patient (FHIR Flag with a safeguarding
    category, a CP-IS alert, or a configured HL7 source). `flag` names it for clearing."""

    flag: str
    category: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class SafeguardingFlagCleared(Event):
    """A safeguarding flag was withdrawn or entered in error."""

    flag: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ClinicalNote(Event):
    """Clinical free text about the patient: a triage note, ED clerking, a midwife's or
    health visitor's note, a radiology request's clinical details. The engine reads it only
    through the site's terminology map (rules/terminology.toml); the text itself is not kept."""

    note: str  # an identifier of the note within its source (document id, order number)
    text: str
    source_kind: str = ""  # what kind of note, in words: "triage note", "request details"


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskStatusChanged(Event):
    """A clinician changed a Task's status: accepted, in-progress, completed (with a note),
    rejected (with a reason). The Task is named by its identifier, or by the rule that raised
    it and its order (the latest such Task)."""

    status: str
    task: str = ""
    rule: str = ""
    order: OrderRef | None = None
    by: str = ""  # who: a clinician id or a user name
    note: str = ""
