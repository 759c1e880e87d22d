"""FHIR R4 JSON -> canonical events: the FHIR counterpart of adapters.hl7v2.mapping.

One resource at a time, parsed with fhir.resources' R4B models (DESIGN.md "FHIR R4"). The
models check structure and data types but not value sets (a DiagnosticReport with status
"bogus" validates), so the codes the engine relies on are checked here. Supported:

  * Patient: demographics -> PatientUpdated (no encounter); `link` of type replaced-by or
    replaces -> PatientsMerged (the surviving patient, the prior identifiers). Links of type
    refer and seealso are not merges.
  * Encounter: arrived, triaged, in-progress, onleave -> PatientAdmitted (inpatient class IMP,
    ACUTE, NONAC) or PatientRegistered, plus DischargeCancelled when `statusHistory` says the
    encounter was finished before (see `FhirMapper._encounter`); finished, or `period.end`
    valued -> PatientDischarged at `period.end`; cancelled, entered-in-error ->
    AdmissionCancelled; planned -> PatientUpdated (a pre-admission is not an admission);
    unknown -> nothing.
  * ServiceRequest, imaging orders only (by category or by the site's [imaging] codes and
    words; intent order or one of its kinds: a proposal or plan is not an order): draft,
    active -> ImagingOrdered (and a ClinicalNote of its reasonCode and note texts, as HL7
    OBR-13); on-hold -> OrderChanged (HD); completed -> OrderChanged (CM); revoked,
    entered-in-error -> OrderCancelled.
  * DiagnosticReport, linked to its order by `basedOn`: registered -> nothing; partial,
    preliminary -> preliminary; final -> final; amended, corrected, appended -> corrected;
    entered-in-error -> withdrawn; cancelled -> OrderCancelled (as HL7 OBR-25 X, which the
    HL7 v2-to-FHIR mapping sends as `cancelled`).
  * ImagingStudy: available -> OrderChanged (SC, CM) at `started`: the examination was done.
  * Flag with a safeguarding category or code: active -> SafeguardingFlagRaised; inactive,
    entered-in-error -> SafeguardingFlagCleared.

Anything else raises `FhirMappingError`, carrying a FHIRPath-like location
("DiagnosticReport.status") and an OperationOutcome issue type: "invalid" (not FHIR R4 JSON,
the model refused it), "required" (an element the engine needs is missing or names nothing
it can use), "code-invalid" (a code outside its value set), "not-supported" (a resource the
engine does not handle). Error texts name elements and the codes allowed, never a value sent
(a broken sender may put patient data anywhere).

References: a patient is named by a logical reference (`subject.identifier`), a contained
Patient ("#p"), or a literal reference ("Patient/123", a bundle's "urn:uuid:...") that the
caller resolved and passes in `patients`; `bundle_references` builds that for a Bundle.
Encounter references resolve the same way to visit numbers (`encounters`), else to the
reference's identifier, else to the referenced id. An Encounter, a Flag and a Patient link
must name their patient; an order, a report or a study that does not is linked through its
order numbers, as an HL7 v2 result without PID.

Times: dates (no time, no offset) are read in the site's time zone; every time is given in
the site's zone. A time the resource does not carry falls back on meta.lastUpdated, then on
`received_at`, except a discharge's: without period.end (or a finished statusHistory entry,
or meta.lastUpdated) the Encounter is refused. Site codes come from settings.toml `[fhir]`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, tzinfo
from typing import TYPE_CHECKING, Any, NamedTuple

from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from adapters.errors import AdapterError
from adapters.fhir.task import authority_of
from engine.errors import ConfigurationError
from engine.events import (
    ALERTS,
    NHS_NUMBER_SYSTEM,
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
    PatientUpdated,
    ReportIssued,
    SafeguardingFlagCleared,
    SafeguardingFlagRaised,
    SourceRef,
    Visit,
)
from engine.identity import is_valid_nhs_number

if TYPE_CHECKING:
    from engine.catalogue import Site
    from engine.facts import SiteFacts

# Value sets (R4 4.0.1) of the codes the engine relies on.
ENCOUNTER_STATUSES = frozenset(
    {
        "planned",
        "arrived",
        "triaged",
        "in-progress",
        "onleave",
        "finished",
        "cancelled",
        "entered-in-error",
        "unknown",
    }
)
ENCOUNTER_ACTIVE = frozenset({"arrived", "triaged", "in-progress", "onleave"})
ENCOUNTER_VOID = frozenset({"cancelled", "entered-in-error"})
REQUEST_STATUSES = frozenset(
    {"draft", "active", "on-hold", "revoked", "completed", "entered-in-error", "unknown"}
)
REQUEST_INTENTS = frozenset(
    {
        "proposal",
        "plan",
        "directive",
        "order",
        "original-order",
        "reflex-order",
        "filler-order",
        "instance-order",
        "option",
    }
)
ORDER_INTENTS = frozenset(
    {"order", "original-order", "reflex-order", "filler-order", "instance-order"}
)
REPORT_STATUSES: Mapping[str, str] = {
    "registered": "",
    "partial": "preliminary",
    "preliminary": "preliminary",
    "final": "final",
    "amended": "corrected",
    "corrected": "corrected",
    "appended": "corrected",
    "cancelled": "cancelled",
    "entered-in-error": "withdrawn",
    "unknown": "",
}
STUDY_STATUSES = frozenset({"registered", "available", "cancelled", "entered-in-error", "unknown"})
FLAG_STATUSES = frozenset({"active", "inactive", "entered-in-error"})
GENDERS: Mapping[str, str] = {"male": "M", "female": "F", "other": "O", "unknown": "U"}
LINK_TYPES = frozenset({"replaced-by", "replaces", "refer", "seealso"})
# Encounter.class (v3 ActCode) -> HL7 v2 patient class (table 0004); any other code is "U".
ENCOUNTER_CLASSES: Mapping[str, str] = {
    "EMER": "E",
    "IMP": "I",
    "ACUTE": "I",
    "NONAC": "I",
    "AMB": "O",
    "OBSENC": "O",
    "SS": "O",
    "HH": "O",
    "VR": "O",
    "FLD": "O",
    "PRENC": "P",
}
INPATIENT = "I"
CLINICIAN_TYPES = ("Practitioner", "PractitionerRole")

V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"  # identifier types
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"  # diagnostic service sections
SNOMED = "http://snomed.info/sct"
BIRTH_TIME = "http://hl7.org/fhir/StructureDefinition/patient-birthTime"
RESOURCE_NAMESPACE = "FHIR"  # an order named by a resource id, from a sender with no meta.source
REQUEST_DETAILS = "request details"  # ClinicalNote.source_kind, as for HL7 OBR-13
SUPPORTED = (
    "Patient",
    "Encounter",
    "ServiceRequest",
    "DiagnosticReport",
    "ImagingStudy",
    "Flag",
)

# Defaults of settings.toml [fhir] (the file documents each key).
DEFAULT_IMAGING_CATEGORIES = (
    "http://snomed.info/sct|363679005",  # Imaging (procedure)
    "http://loinc.org|LP29684-5",  # Radiology
    "http://snomed.info/sct|394914008",  # Radiology (specialty), as in the R4 examples
)
DEFAULT_IMAGING_SECTION = "RAD"
DEFAULT_SAFEGUARDING_CATEGORIES = ("safeguarding", "child-protection", "CPIS")
DEFAULT_ALERT_CODES: Mapping[str, str] = {
    "urn:safetynet:alert|critical": "critical",
    "urn:safetynet:alert|urgent": "urgent",
    "urn:safetynet:alert|significant": "significant",
    "urn:safetynet:alert|cancer": "significant",
}
FHIR_KEYS = frozenset(
    {
        "imaging_categories",
        "imaging_section",
        "placer_systems",
        "filler_systems",
        "safeguarding_flag_categories",
        "safeguarding_flag_codes",
        "alert_codes",
    }
)

Code = tuple[str, str]
"""A configured code: (system, CODE upper-case); system "" matches any system."""


class FhirMappingError(AdapterError):
    """A FHIR resource that cannot be mapped to canonical events.

    `location` is a FHIRPath-like expression ("DiagnosticReport.status"); `code` the
    OperationOutcome issue type: invalid, required, code-invalid, not-supported. As the other
    adapter errors it carries an HL7-style `ack_code`: AR for not-supported, AE otherwise."""

    def __init__(self, reason: str, location: str = "", code: str = "invalid") -> None:
        super().__init__(reason, location)
        self.code = code
        self.ack_code = "AR" if code == "not-supported" else "AE"

    def outcome(self) -> dict[str, Any]:
        """The error as a FHIR R4 OperationOutcome."""
        issue: dict[str, Any] = {"severity": "error", "code": self.code, "diagnostics": self.reason}
        if self.location:
            issue["expression"] = [self.location]
        return {"resourceType": "OperationOutcome", "issue": [issue]}


def _code_entry(entry: str) -> Code:
    system, bar, code = entry.strip().rpartition("|")
    return (system if bar else "", code.strip().upper())


def _code_list(fhir: Mapping[str, Any], key: str, default: Iterable[str]) -> frozenset[Code]:
    value = fhir.get(key)
    if value is None:
        return frozenset(_code_entry(e) for e in default)
    if not isinstance(value, list) or not all(
        isinstance(v, str) and _code_entry(v)[1] for v in value
    ):
        raise ConfigurationError(
            f'settings.toml [fhir] {key} must be a list of codes ("system|code" or "code")'
        )
    return frozenset(_code_entry(v) for v in value)


def _systems(fhir: Mapping[str, Any], key: str) -> frozenset[str]:
    value = fhir.get(key)
    if value is None:
        return frozenset()
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigurationError(
            f"settings.toml [fhir] {key} must be a list of identifier systems (strings)"
        )
    return frozenset(v.strip() for v in value)


@dataclass(frozen=True, slots=True)
class FhirMappingSettings:
    """What FHIR mapping needs from the site: its time zone, what counts as imaging, which
    identifier systems are placer or filler numbers, what a safeguarding Flag is and which
    report codes state an alert. Build it from the site with `for_site`."""

    timezone: tzinfo
    imaging_categories: frozenset[Code] = frozenset(
        _code_entry(e) for e in DEFAULT_IMAGING_CATEGORIES
    )
    imaging_section: str = DEFAULT_IMAGING_SECTION
    site_facts: SiteFacts | None = None  # [imaging] procedure codes and name words
    placer_systems: frozenset[str] = frozenset()
    filler_systems: frozenset[str] = frozenset()
    safeguarding_flag_categories: frozenset[Code] = frozenset(
        _code_entry(e) for e in DEFAULT_SAFEGUARDING_CATEGORIES
    )
    safeguarding_flag_codes: frozenset[Code] = frozenset()
    alert_codes: Mapping[Code, str] = field(
        default_factory=lambda: {_code_entry(k): v for k, v in DEFAULT_ALERT_CODES.items()}
    )

    @classmethod
    def for_site(cls, site: Site) -> FhirMappingSettings:
        """The settings of a loaded site: `[fhir]`, the time zone and `[imaging]`."""
        settings = cls.from_settings(site.timezone, site.fhir, site.facts)
        sections = site.facts.imaging_sections
        if sections and settings.imaging_section not in sections:
            raise ConfigurationError(
                f"settings.toml [fhir] imaging_section {settings.imaging_section!r} must be one "
                f"of [imaging] sections ({', '.join(sorted(sections))})"
            )
        return settings

    @classmethod
    def from_settings(
        cls, tz: tzinfo, fhir: Mapping[str, Any], site_facts: SiteFacts | None = None
    ) -> FhirMappingSettings:
        """Settings from the site's time zone and the `[fhir]` table of settings.toml (each
        key optional; a list or table given replaces its default). Raises
        ConfigurationError for an unknown key or a value of the wrong shape."""
        if not isinstance(fhir, Mapping):
            raise ConfigurationError("settings.toml [fhir] must be a table")
        unknown = sorted(set(fhir) - FHIR_KEYS)
        if unknown:
            raise ConfigurationError(
                f"settings.toml [fhir]: unknown key(s) {', '.join(unknown)} "
                f"(known: {', '.join(sorted(FHIR_KEYS))})"
            )
        section = fhir.get("imaging_section", DEFAULT_IMAGING_SECTION)
        if not isinstance(section, str) or not section.strip():
            raise ConfigurationError(
                "settings.toml [fhir] imaging_section must be a section code (a string)"
            )
        alerts = fhir.get("alert_codes")
        if alerts is None:
            alerts = DEFAULT_ALERT_CODES
        if not isinstance(alerts, Mapping) or not all(
            isinstance(v, str) and _code_entry(str(k))[1] for k, v in alerts.items()
        ):
            raise ConfigurationError(
                "settings.toml [fhir.alert_codes] must map each code to an alert category"
            )
        wrong = sorted(v for v in alerts.values() if v not in ALERTS[1:])
        if wrong:
            raise ConfigurationError(
                f"settings.toml [fhir.alert_codes]: an alert category must be one of "
                f"{', '.join(ALERTS[1:])}, not {', '.join(map(repr, wrong))}"
            )
        return cls(
            timezone=tz,
            imaging_categories=_code_list(fhir, "imaging_categories", DEFAULT_IMAGING_CATEGORIES),
            imaging_section=section.strip().upper(),
            site_facts=site_facts,
            placer_systems=_systems(fhir, "placer_systems"),
            filler_systems=_systems(fhir, "filler_systems"),
            safeguarding_flag_categories=_code_list(
                fhir, "safeguarding_flag_categories", DEFAULT_SAFEGUARDING_CATEGORIES
            ),
            safeguarding_flag_codes=_code_list(fhir, "safeguarding_flag_codes", ()),
            alert_codes={_code_entry(str(k)): v for k, v in alerts.items()},
        )


# --- reading helpers ---------------------------------------------------------------------


def parse_json(raw: bytes | str) -> Mapping[str, Any]:
    """A request body as a JSON object. FHIR XML is not supported ("not-supported"); anything
    else that is not a JSON object is "invalid"."""
    text = raw.decode("utf-8-sig", errors="replace") if isinstance(raw, bytes) else raw
    if text.lstrip().startswith("<"):
        raise FhirMappingError("FHIR XML is not supported: send FHIR JSON", "", "not-supported")
    try:
        value = json.loads(text)
    except ValueError as exc:
        at = f" at character {exc.pos}" if isinstance(exc, json.JSONDecodeError) else ""
        raise FhirMappingError(f"not JSON (a syntax error{at})", "") from exc
    except RecursionError as exc:
        raise FhirMappingError(f"JSON nested more than {MAX_DEPTH} levels deep", "") from exc
    if not isinstance(value, dict):
        raise FhirMappingError("a FHIR resource is a JSON object", "")
    if _too_deep(value):
        raise FhirMappingError(f"JSON nested more than {MAX_DEPTH} levels deep", "")
    return value


MAX_DEPTH = 64  # FHIR resources, Bundles included, nest far less; deeper is an attack


def _too_deep(value: Any) -> bool:
    """Whether `value` nests objects and arrays more than MAX_DEPTH deep (no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values() if isinstance(v, dict | list))
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item if isinstance(v, dict | list))
    return False


def _codings(concepts: Any) -> list[Any]:
    """Every Coding of a CodeableConcept, a list of them, or a Coding."""
    if concepts is None:
        return []
    if not isinstance(concepts, list):
        concepts = [concepts]
    out: list[Any] = []
    for concept in concepts:
        if hasattr(concept, "coding"):
            out.extend(concept.coding or [])
        elif getattr(concept, "code", None) is not None:
            out.append(concept)
    return out


def _matches(coding: Any, codes: frozenset[Code] | Mapping[Code, str]) -> Code | None:
    code = (coding.code or "").strip().upper()
    if not code:
        return None
    for key in ((coding.system or "", code), ("", code)):
        if key in codes:
            return key
    return None


def _type_code(concept: Any) -> str:
    """The identifier type (table 0203) of an Identifier.type, upper-case."""
    for coding in _codings(concept):
        if coding.system in (None, V2_0203) and coding.code:
            return str(coding.code).strip().upper()
    return ""


def _path(resource_type: str, loc: Sequence[Any]) -> str:
    """A pydantic error location as FHIRPath: ('identifier', 0, 'value') ->
    'Patient.identifier[0].value' (model names mapped back: class_fhir -> class,
    birthDate__ext -> _birthDate; validator steps such as 'root' left out)."""
    out = resource_type
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        name = str(part)
        if name == "root" or not name.replace("__", "_").isidentifier():
            continue
        if name.endswith("__ext"):
            name = "_" + name[: -len("__ext")]
        elif name.endswith("_fhir"):
            name = name[: -len("_fhir")]
        out += f".{name}"
    return out


def _plain_id(reference: str, resource_type: str) -> str:
    """The id of a literal reference to `resource_type` ("Type/id", a full URL ending so, or
    either with "/_history/n"), or ""."""
    parts = reference.partition("/_history/")[0].split("/")
    if len(parts) >= 2 and parts[-2] == resource_type and parts[-1]:
        return parts[-1]
    return ""


def _ref_type(ref: Any) -> str:
    """The resource type a Reference names: its `type`, else the type in a literal reference
    ("Location/1", a full URL), else "" (unknown: a logical or contained reference)."""
    if ref.type:
        return str(ref.type).rsplit("/", 1)[-1]
    parts = (ref.reference or "").partition("/_history/")[0].split("/")
    return parts[-2] if len(parts) >= 2 and parts[-2][:1].isupper() else ""


def _lookup(reference: str, known: Mapping[str, Any]) -> Any:
    if reference in known:
        return known[reference]
    head, sep, _ = reference.partition("/_history/")
    return known.get(head) if sep else None


def _contained(resource: Any, reference: str | None, resource_type: str) -> Any:
    if not reference or not reference.startswith("#"):
        return None
    for item in resource.contained or []:
        if item.id == reference[1:] and item.get_resource_type() == resource_type:
            return item
    return None


def _display(concept: Any) -> str:
    """What a CodeableConcept or Reference says in words: its text, else a coding's display."""
    if concept is None:
        return ""
    text = getattr(concept, "text", None) or getattr(concept, "display", None)
    if text:
        return str(text)
    for coding in _codings(concept):
        if coding.display:
            return str(coding.display)
    return ""


def _place(ref: Any) -> str:
    """A location as the engine names it: its identifier, else its name, else its id."""
    if ref is None:
        return ""
    if ref.identifier is not None and ref.identifier.value:
        return str(ref.identifier.value)
    if ref.display:
        return str(ref.display)
    reference = ref.reference or ""
    return reference.rsplit("/", 1)[-1] if "/" in reference else ""


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")


def _control_character_at(resource: Mapping[str, Any], kind: str) -> str:
    """The FHIRPath of the first string (or key) holding a control character, or ""."""
    stack: list[tuple[Any, str]] = [(resource, kind)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            if _CONTROL.search(item):
                return where
        elif isinstance(item, Mapping):
            for key, value in item.items():
                name = str(key)
                if _CONTROL.search(name):
                    return where
                # A key that is no element name is not echoed (it may hold anything).
                shown = name if name.lstrip("_").isidentifier() and len(name) <= 64 else "?"
                stack.append((value, f"{where}.{shown}"))
        elif isinstance(item, list):
            stack.extend((value, f"{where}[{n}]") for n, value in enumerate(item))
    return ""


def validate_resource(resource: Mapping[str, Any], kind: str) -> Any:
    """`resource` validated with the R4B model of `kind` (any resource type, e.g. a message's
    MessageHeader). Raises FhirMappingError "invalid" naming the first error's location; its
    text is the validator's message, never the input (the input may be patient data). The
    models let control characters through; FHIR strings may not hold them (nor may the
    database: PostgreSQL refuses NUL), so they are refused here."""
    where = _control_character_at(resource, kind)
    if where:
        raise FhirMappingError(
            "a string holds a control character (FHIR strings may hold only tab, CR and LF)",
            where,
        )
    try:
        return get_fhir_model_class(kind).model_validate(dict(resource))
    except ValidationError as exc:
        errors = exc.errors()
        where = _path(kind, errors[0]["loc"]) if errors else kind
        message = str(errors[0]["msg"]) if errors else "invalid"
        message = " ".join(message.split())[:160]
        raise FhirMappingError(f"not a valid FHIR R4 {kind}: {message}", where) from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise FhirMappingError(f"not a valid FHIR R4 {kind}", kind) from exc


class BundleReferences(NamedTuple):
    """What the entries of one Bundle name: patients and encounters by the references other
    entries may use (fullUrl, and "Type/id")."""

    patients: dict[str, Patient]
    encounters: dict[str, str]


def bundle_entries(bundle: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """(fullUrl, resource) of each entry that carries a resource, in Bundle order (entries
    without one, e.g. a transaction's DELETE or GET, are left out). Each resource is validated
    when it is mapped, not here. Raises FhirMappingError when `bundle` is not a Bundle."""
    if not isinstance(bundle, Mapping) or bundle.get("resourceType") != "Bundle":
        raise FhirMappingError("not a Bundle", "Bundle", "invalid")
    entries = bundle.get("entry", [])
    if not isinstance(entries, list):
        raise FhirMappingError("Bundle.entry must be a list", "Bundle.entry", "invalid")
    out: list[tuple[str, Mapping[str, Any]]] = []
    for n, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise FhirMappingError("a Bundle entry must be an object", f"Bundle.entry[{n}]")
        resource = entry.get("resource")
        if resource is None:
            continue
        full_url = entry.get("fullUrl", "")
        if not isinstance(resource, Mapping) or not isinstance(full_url, str):
            raise FhirMappingError(
                "a Bundle entry's resource must be an object and its fullUrl a string",
                f"Bundle.entry[{n}]",
            )
        out.append((full_url, resource))
    return out


def bundle_references(bundle: Mapping[str, Any], mapper: FhirMapper) -> BundleReferences:
    """The Patients and Encounters of a Bundle, under each reference other entries may use:
    the entry's fullUrl, and "Patient/<id>" / "Encounter/<id>" for a resource with an id. Pass
    them to `FhirMapper.events` for each entry. An entry that cannot be mapped is left out
    (mapping it on its own raises the error)."""
    patients: dict[str, Patient] = {}
    encounters: dict[str, str] = {}
    for full_url, resource in bundle_entries(bundle):
        kind = resource.get("resourceType")
        if kind not in ("Patient", "Encounter"):
            continue
        keys = [full_url] if full_url else []
        if isinstance(resource.get("id"), str):
            keys.append(f"{kind}/{resource['id']}")
        try:
            if kind == "Patient":
                patient = mapper.patient(resource)
                if patient.identifiers:
                    patients.update(dict.fromkeys(keys, patient))
            else:
                encounters.update(dict.fromkeys(keys, mapper.visit_number(resource)))
        except FhirMappingError:
            continue
    return BundleReferences(patients, encounters)


# --- the mapper -------------------------------------------------------------------------


class Mapped(NamedTuple):
    """One resource read (`FhirMapper.read`): its events, and what a literal reference to it
    resolves to: a Patient's identity (`patient`, None for other types), an Encounter's visit
    number (`visit_number`, "" for other types); `last_updated` its meta.lastUpdated."""

    events: list[Event]
    patient: Patient | None
    visit_number: str
    last_updated: datetime | None


@dataclass(frozen=True, slots=True)
class _Context:
    """One mapping call: the resource, its source and the caller's resolved references."""

    resource: Any
    kind: str
    source: SourceRef
    received_at: datetime
    patients: Mapping[str, Patient]
    encounters: Mapping[str, str]


class FhirMapper:
    """Turns one FHIR R4 resource (JSON) into canonical events."""

    def __init__(self, settings: FhirMappingSettings) -> None:
        self.settings = settings

    def events(
        self,
        resource: Mapping[str, Any],
        received_at: datetime,
        *,
        patients: Mapping[str, Patient] | None = None,
        encounters: Mapping[str, str] | None = None,
        sender: str = "",
    ) -> list[Event]:
        """The resource's events (possibly none: e.g. a report still registered).

        `patients` and `encounters` resolve literal references ("Patient/123") the caller
        knows; `sender` names the client (default: meta.source, else "FHIR"). Raises
        FhirMappingError for anything that cannot be mapped."""
        return self.read(
            resource, received_at, patients=patients, encounters=encounters, sender=sender
        ).events

    def read(
        self,
        resource: Mapping[str, Any],
        received_at: datetime,
        *,
        patients: Mapping[str, Patient] | None = None,
        encounters: Mapping[str, str] | None = None,
        sender: str = "",
    ) -> Mapped:
        """`events`, and what other resources' references to this one resolve to (a
        Patient's identity, an Encounter's visit number) and its meta.lastUpdated, from one
        validation of the resource (the inbound side keeps them; see adapters.fhir.inbound)."""
        model = self.parse(resource)
        kind = model.get_resource_type()
        status = getattr(model, "status", None)
        ident = f"{kind}/{model.id}" if model.id else ""
        if ident and model.meta is not None and model.meta.versionId:
            ident += f"/_history/{model.meta.versionId}"
        context = _Context(
            resource=model,
            kind=kind,
            source=SourceRef(
                sender=sender or _source_of(model) or RESOURCE_NAMESPACE,
                message_id=ident,
                kind=f"{kind} {status}" if isinstance(status, str) else kind,
            ),
            received_at=received_at,
            patients=patients or {},
            encounters=encounters or {},
        )
        handler = {
            "Patient": self._patient_events,
            "Encounter": self._encounter,
            "ServiceRequest": self._service_request,
            "DiagnosticReport": self._report,
            "ImagingStudy": self._study,
            "Flag": self._flag,
        }[kind]
        events = handler(context)
        patient = self._patient_of(model, "Patient") if kind == "Patient" else None
        visit = ""
        if kind == "Encounter":
            try:
                visit = self._visit_number(model)
            except FhirMappingError:
                visit = ""  # an "unknown" Encounter with nothing to name it: never referenced
        return Mapped(events, patient, visit, self._updated(context))

    def parse(self, resource: Mapping[str, Any]) -> Any:
        """The resource validated with its R4B model. Raises FhirMappingError: "invalid" for
        what is not a FHIR resource or fails validation (naming the first error's location),
        "not-supported" for a resource type the engine does not map."""
        if not isinstance(resource, Mapping):
            raise FhirMappingError("a FHIR resource is a JSON object", "")
        kind = resource.get("resourceType")
        if not isinstance(kind, str) or not kind:
            raise FhirMappingError("the resource has no resourceType", "resourceType", "required")
        if kind not in SUPPORTED:
            try:
                get_fhir_model_class(kind)
            except (KeyError, ValueError) as exc:
                raise FhirMappingError(
                    "resourceType is not a FHIR resource type", "resourceType"
                ) from exc
            hint = " (send its entries one by one)" if kind == "Bundle" else ""
            raise FhirMappingError(
                f"resource type {kind} is not supported{hint}", kind, "not-supported"
            )
        return validate_resource(resource, kind)

    def patient(self, resource: Mapping[str, Any]) -> Patient:
        """A Patient resource as the engine's Patient (identifiers, birth, sex)."""
        model = self.parse(resource)
        if model.get_resource_type() != "Patient":
            raise FhirMappingError("not a Patient", "resourceType")
        return self._patient_of(model, "Patient")

    def visit_number(self, resource: Mapping[str, Any]) -> str:
        """An Encounter resource's visit number (see `_visit_number`)."""
        model = self.parse(resource)
        if model.get_resource_type() != "Encounter":
            raise FhirMappingError("not an Encounter", "resourceType")
        return self._visit_number(model)

    # --- common reading --------------------------------------------------------------

    def _time(self, value: Any, where: str) -> datetime | None:
        """A FHIR date, dateTime or instant as an aware datetime in the site's zone; a date
        (or year, or year-month) is its first moment, local time."""
        tz = self.settings.timezone
        if value is None:
            return None
        if isinstance(value, datetime):
            return value.astimezone(tz) if value.tzinfo else value.replace(tzinfo=tz)
        if isinstance(value, date):
            return datetime(value.year, value.month, value.day, tzinfo=tz)
        parts = str(value).split("-")
        try:
            return datetime(int(parts[0]), int(parts[1]) if len(parts) > 1 else 1, 1, tzinfo=tz)
        except ValueError as exc:
            raise FhirMappingError(f"{where} is not a FHIR date/time", where) from exc

    def _updated(self, context: _Context) -> datetime | None:
        meta = context.resource.meta
        return self._time(meta.lastUpdated if meta is not None else None, "meta.lastUpdated")

    def _status(self, context: _Context, allowed: Iterable[str]) -> str:
        where = f"{context.kind}.status"
        status = context.resource.status
        if not status:
            raise FhirMappingError(f"{where} is missing", where, "required")
        if status not in allowed:
            raise FhirMappingError(_not_one_of(where, allowed), where, "code-invalid")
        return str(status)

    def _identifiers(self, identifiers: Any) -> tuple[PatientIdentifier, ...]:
        """Patient identifiers: an NHS number (system https://fhir.nhs.uk/Id/nhs-number) only
        after the modulus-11 check, as HL7 does; a urn:safetynet:authority:<X> system becomes
        the authority X (`authority_of`), so that HL7 and FHIR identifiers give the same alias
        tokens."""
        out = []
        for ident in identifiers or []:
            value = (ident.value or "").strip()
            if not value:
                continue
            system = (ident.system or "").strip()
            type_code = _type_code(ident.type)
            if system == NHS_NUMBER_SYSTEM:
                compact = value.replace(" ", "")
                if is_valid_nhs_number(compact):
                    out.append(
                        PatientIdentifier(compact, "NHS", type_code or "NH", is_nhs_number=True)
                    )
                else:
                    # Kept as a local identifier, never trusted (as HL7 does).
                    out.append(PatientIdentifier(value, "NHS-unverified", type_code))
                continue
            out.append(PatientIdentifier(value, authority_of(system), type_code))
        return tuple(out)

    def _patient_of(self, model: Any, where: str) -> Patient:
        gender = model.gender
        if gender is not None and gender not in GENDERS:
            raise FhirMappingError(
                _not_one_of(f"{where}.gender", GENDERS),
                f"{where}.gender",
                "code-invalid",
            )
        birth = self._time(model.birthDate, f"{where}.birthDate")
        # The birthTime extension keeps a neonate's hour, when it agrees with the date.
        for ext in getattr(model.birthDate__ext, "extension", None) or []:
            if ext.url == BIRTH_TIME and ext.valueDateTime is not None:
                at = self._time(ext.valueDateTime, f"{where}.birthDate")
                if birth is not None and at is not None and at.date() == birth.date():
                    birth = at
        return Patient(
            identifiers=self._identifiers(model.identifier),
            birth=birth,
            sex=GENDERS.get(gender or "", ""),
        )

    def _subject(self, context: _Context, ref: Any, where: str, required: bool) -> Patient | None:
        """The patient a reference names: a contained Patient, a Patient the caller resolved,
        or the reference's identifier. None (or, if `required`, an error) otherwise."""
        found: Patient | None = None
        if ref is not None and _ref_type(ref) in ("", "Patient"):
            reference = ref.reference or ""
            contained = _contained(context.resource, reference, "Patient")
            if contained is not None:
                found = self._patient_of(contained, f"{where}.resolve()")
            elif reference:
                found = _lookup(reference, context.patients)
            if (found is None or not found.identifiers) and ref.identifier is not None:
                found = Patient(identifiers=self._identifiers([ref.identifier]))
        if found is not None and found.identifiers:
            return found
        if required:
            raise FhirMappingError(
                f"{where} names no patient identifier (a logical reference with an identifier, "
                "a contained Patient, or a reference the caller resolved)",
                where,
                "required",
            )
        return None

    def _encounter_of(self, context: _Context, ref: Any) -> str:
        """A visit number from an Encounter reference: the caller's resolution, else the
        reference's identifier, else the referenced id (a site whose Encounters carry visit
        numbers must reference them by identifier or resolve them)."""
        if ref is None:
            return ""
        reference = ref.reference or ""
        known = _lookup(reference, context.encounters) if reference else None
        if known:
            return str(known)
        if ref.identifier is not None and ref.identifier.value:
            return str(ref.identifier.value)
        contained = _contained(context.resource, reference, "Encounter")
        if contained is not None:
            return self._visit_number(contained)
        return _plain_id(reference, "Encounter")

    def _clinician(self, context: _Context, ref: Any) -> Clinician | None:
        """A Practitioner (or PractitionerRole) reference: its identifier (system ->
        authority, e.g. the GMC number system -> "GMC") and display; a contained
        Practitioner's identifier and name. A bare server id is not a clinician id: such a
        reference gives at most a name, so that ownership falls back as the engine decides."""
        if ref is None or _ref_type(ref) not in ("", *CLINICIAN_TYPES):
            return None  # an Organization, a Device, the patient...
        ident = ref.identifier
        if ident is not None and ident.system == NHS_NUMBER_SYSTEM:
            return None  # a patient's number is never a clinician's
        name = str(ref.display or "")
        target = _contained(context.resource, ref.reference, "Practitioner")
        if target is not None:
            if ident is None:
                ident = next((i for i in target.identifier or [] if i.value), None)
            if not name and target.name:
                human = target.name[0]
                parts = [*(human.prefix or []), *(human.given or []), human.family or ""]
                name = human.text or " ".join(p for p in parts if p)
        if ident is not None and ident.value:
            return Clinician(str(ident.value), name, authority_of(ident.system))
        return Clinician("", name, "") if name else None

    def _common(self, context: _Context, patient: Patient | None, encounter: str) -> dict[str, Any]:
        return {
            "source": context.source,
            "received_at": context.received_at,
            "patient": patient,
            "encounter": encounter,
        }

    # --- Patient ---------------------------------------------------------------------

    def _patient_events(self, context: _Context) -> list[Event]:
        """Demographics (PatientUpdated), or one PatientsMerged per replaced-by / replaces
        link: replaced-by means this record is superseded by the linked one (its identifiers
        are the prior ones); replaces means this record survives the linked one."""
        model = context.resource
        patient = self._patient_of(model, "Patient")
        if not patient.identifiers:
            raise FhirMappingError(
                "a Patient needs an identifier", "Patient.identifier", "required"
            )
        at = self._updated(context) or context.received_at
        common = {**self._common(context, patient, ""), "occurred_at": at}
        events: list[Event] = []
        for n, link in enumerate(model.link or []):
            where = f"Patient.link[{n}]"
            if link.type not in LINK_TYPES:
                raise FhirMappingError(
                    _not_one_of(f"{where}.type", LINK_TYPES),
                    f"{where}.type",
                    "code-invalid",
                )
            if link.type not in ("replaced-by", "replaces"):
                continue
            other = self._subject(context, link.other, f"{where}.other", required=True)
            assert other is not None
            if link.type == "replaced-by":
                events.append(
                    PatientsMerged(**{**common, "patient": other}, prior=patient.identifiers)
                )
            else:
                events.append(PatientsMerged(**common, prior=other.identifiers))
        return events or [PatientUpdated(**common)]

    # --- Encounter -------------------------------------------------------------------

    def _visit_number(self, model: Any) -> str:
        """The identifier typed VN, else the first identifier, else the resource id."""
        idents = [i for i in model.identifier or [] if i.value]
        for ident in idents:
            if _type_code(ident.type) == "VN":
                return str(ident.value)
        if idents:
            return str(idents[0].value)
        if model.id:
            return str(model.id)
        raise FhirMappingError(
            "an Encounter needs an identifier (visit number) or an id",
            "Encounter.identifier",
            "required",
        )

    def _visit(self, context: _Context) -> Visit:
        model = context.resource
        code = (model.class_fhir.code or "").strip().upper() if model.class_fhir else ""
        locations = list(model.location or [])
        # Where the patient is now: the last active location, else the last one not planned.
        current = [loc for loc in locations if loc.status == "active"] or [
            loc for loc in locations if loc.status not in ("planned", "reserved")
        ]
        attending = None
        for participant in model.participant or []:
            if any(c.code == "ATND" for c in _codings(participant.type)):
                attending = self._clinician(context, participant.individual)
                if attending is not None:
                    break
        stay = model.hospitalization
        disposition = ""
        if stay is not None and stay.dischargeDisposition is not None:
            codes = [c.code for c in _codings(stay.dischargeDisposition) if c.code]
            disposition = codes[0] if codes else (stay.dischargeDisposition.text or "")
        return Visit(
            patient_class=ENCOUNTER_CLASSES.get(code, "U") if code else "",
            location=_place(current[-1].location) if current else "",
            attending=attending,
            disposition=disposition,
            discharged_to=_place(stay.destination) if stay is not None else "",
        )

    def _encounter(self, context: _Context) -> list[Event]:
        """The Encounter as the visit event its status means.

        Discharge cancelled: FHIR has no event for it, and a stateless mapper cannot see that
        an in-progress Encounter was finished in an earlier version. So DischargeCancelled is
        emitted (after the registration or admission) only when the resource says so itself:
        its status is active (arrived, triaged, in-progress, onleave), `period.end` is empty,
        and `statusHistory` holds a `finished` entry. Its time is the start of the history
        entry after the last `finished` one, else that entry's end, else meta.lastUpdated."""
        model = context.resource
        status = self._status(context, ENCOUNTER_STATUSES)
        if status == "unknown":
            return []
        patient = self._subject(context, model.subject, "Encounter.subject", required=True)
        common = self._common(context, patient, self._visit_number(model))
        updated = self._updated(context)
        if status in ENCOUNTER_VOID:
            return [AdmissionCancelled(**common, occurred_at=updated or context.received_at)]
        visit = self._visit(context)
        period = model.period
        start = self._time(period.start if period else None, "Encounter.period.start")
        end = self._time(period.end if period else None, "Encounter.period.end")
        history = list(model.statusHistory or [])
        if status == "finished" or (status in ENCOUNTER_ACTIVE and end is not None):
            finished = [h for h in history if h.status == "finished"]
            at = end or (
                self._time(finished[-1].period.start, "Encounter.statusHistory.period.start")
                if finished
                else None
            )
            at = at or updated
            if at is None:
                raise FhirMappingError(
                    "a finished Encounter needs period.end (the discharge time)",
                    "Encounter.period.end",
                    "required",
                )
            return [PatientDischarged(**common, occurred_at=at, visit=visit)]
        if status == "planned":
            at = updated or start or context.received_at
            return [PatientUpdated(**common, occurred_at=at, visit=visit)]
        admitted = visit.patient_class == INPATIENT
        at = start
        if admitted:
            # Admitted from another class (ED): the admission is when the class became IMP.
            for item in model.classHistory or []:
                since = self._time(item.period.start, "Encounter.classHistory.period.start")
                code = (item.class_fhir.code or "").upper()
                if since is not None and ENCOUNTER_CLASSES.get(code) == INPATIENT:
                    at = since
        at = at or updated or context.received_at
        events: list[Event] = [
            (PatientAdmitted if admitted else PatientRegistered)(
                **common, occurred_at=at, visit=visit
            )
        ]
        finished_at = [n for n, h in enumerate(history) if h.status == "finished"]
        if finished_at:
            last = finished_at[-1]
            after = history[last + 1] if last + 1 < len(history) else None
            reopened = self._time(
                after.period.start if after is not None else history[last].period.end,
                "Encounter.statusHistory.period",
            )
            events.append(
                DischargeCancelled(**common, occurred_at=reopened or updated or context.received_at)
            )
        return events

    # --- orders ----------------------------------------------------------------------

    def _order_from(self, identifiers: Iterable[Any], untyped_placer: bool = False) -> OrderRef:
        """Placer and filler numbers from identifiers: typed PLAC, FILL (or ACSN, the
        accession number), else in the configured placer / filler systems; with
        `untyped_placer`, an identifier neither typed nor configured is the placer number
        (a logical reference to a ServiceRequest names it by its placer number)."""
        placer: tuple[str, str] | None = None
        filler: tuple[str, str] | None = None
        rest = []
        for ident in identifiers:
            if ident is None or not ident.value:
                continue
            pair = (str(ident.value), authority_of(ident.system))
            kind = _type_code(ident.type)
            if kind == "PLAC" and placer is None:
                placer = pair
            elif kind in ("FILL", "ACSN") and filler is None:
                filler = pair
            elif not kind:
                rest.append((ident, pair))
        for ident, pair in rest:
            if placer is None and ident.system in self.settings.placer_systems:
                placer = pair
            elif filler is None and ident.system in self.settings.filler_systems:
                filler = pair
            elif placer is None and untyped_placer:
                placer = pair
        return OrderRef(*(placer or ("", "")), *(filler or ("", "")))

    def _based_on(self, context: _Context, where: str) -> list[OrderRef]:
        """The orders a report or study is for: per basedOn ServiceRequest, its identifier, a
        contained ServiceRequest's identifiers, else "ServiceRequest/<id>" as the placer
        number <id> in the sender's namespace. With one order (or none), the resource's own
        PLAC / FILL / ACSN identifiers complete it."""
        model = context.resource
        refs: list[OrderRef] = []
        for ref in model.basedOn or []:
            if _ref_type(ref) not in ("", "ServiceRequest"):
                continue  # a CarePlan, an Appointment...
            reference = ref.reference or ""
            contained = _contained(model, reference, "ServiceRequest")
            if ref.identifier is not None:
                order = self._order_from([ref.identifier], untyped_placer=True)
            elif contained is not None:
                order = self._order_from(contained.identifier or [])
            elif _plain_id(reference, "ServiceRequest"):
                order = OrderRef(
                    _plain_id(reference, "ServiceRequest"),
                    _source_of(model) or RESOURCE_NAMESPACE,
                )
            else:
                continue
            if order.tokens() and order not in refs:
                refs.append(order)
        if len(refs) <= 1:
            own = self._order_from(model.identifier or [])
            first = refs[0] if refs else OrderRef()
            merged = OrderRef(
                first.placer or own.placer,
                first.placer_ns if first.placer else own.placer_ns,
                first.filler or own.filler,
                first.filler_ns if first.filler else own.filler_ns,
            )
            refs = [merged] if merged.tokens() else []
        if not refs:
            raise FhirMappingError(
                f"{context.kind} names no order: basedOn a ServiceRequest (identifier or "
                "reference), or a placer/filler identifier",
                where,
                "required",
            )
        return refs

    def _procedure(self, concept: Any, categories: Any) -> dict[str, Any]:
        """Procedure code and name from a CodeableConcept (a coding's code and display, else
        its text), and the section: a v2-0074 category code, unless the category is an
        imaging one and that code is not an imaging section of the site; then (or with no
        v2-0074 code) the configured imaging section for an imaging category."""
        codings = _codings(concept)
        code = next((str(c.code) for c in codings if c.code), "")
        name = next((str(c.display) for c in codings if c.display), "") or str(
            getattr(concept, "text", "") or ""
        )
        category = _codings(categories)
        section = next(
            (str(c.code).upper() for c in category if c.system == V2_0074 and c.code), ""
        )
        if any(_matches(c, self.settings.imaging_categories) for c in category):
            facts = self.settings.site_facts
            if not section or (facts is not None and not facts.is_imaging(section, "", "")):
                section = self.settings.imaging_section
        return {"procedure_code": code, "procedure_name": name, "section": section}

    def _is_imaging(self, concept: Any, procedure: Mapping[str, Any]) -> bool:
        """Imaging by category (the configured section), or as the site's [imaging] settings
        say for the section and any of the codes and names of `concept`."""
        section = procedure["section"]
        if section == self.settings.imaging_section:
            return True
        facts = self.settings.site_facts
        if facts is None:
            return False
        names = [(str(c.code or ""), str(c.display or "")) for c in _codings(concept)]
        names.append(("", str(getattr(concept, "text", "") or "")))
        return any(facts.is_imaging(section, code, name) for code, name in names)

    def _service_request(self, context: _Context) -> list[Event]:
        model = context.resource
        status = self._status(context, REQUEST_STATUSES)
        intent = model.intent
        if intent not in REQUEST_INTENTS:
            raise FhirMappingError(
                _not_one_of("ServiceRequest.intent", REQUEST_INTENTS),
                "ServiceRequest.intent",
                "code-invalid",
            )
        if intent not in ORDER_INTENTS:
            raise FhirMappingError(
                f"a ServiceRequest with intent {intent} is not an order",
                "ServiceRequest.intent",
                "not-supported",
            )
        procedure = self._procedure(model.code, model.category)
        if not self._is_imaging(model.code, procedure):
            raise FhirMappingError(
                "not an imaging request (category and code are not imaging)",
                "ServiceRequest.category",
                "not-supported",
            )
        if status == "unknown":
            return []
        # Imaging by code or name only: the engine is told so by the section, as HL7 OBR-24.
        procedure["section"] = procedure["section"] or self.settings.imaging_section
        order = self._order_from(model.identifier or [])
        if not order.tokens():
            if not model.id:
                raise FhirMappingError(
                    "an order needs a placer or filler identifier, or an id",
                    "ServiceRequest.identifier",
                    "required",
                )
            order = OrderRef(str(model.id), _source_of(model) or RESOURCE_NAMESPACE)
        patient = self._subject(context, model.subject, "ServiceRequest.subject", required=False)
        common = self._common(context, patient, self._encounter_of(context, model.encounter))
        updated = self._updated(context)
        if status in ("draft", "active"):
            at = self._time(model.authoredOn, "ServiceRequest.authoredOn") or updated
            at = at or context.received_at
            events: list[Event] = [
                ImagingOrdered(
                    **common,
                    occurred_at=at,
                    order=order,
                    orderer=self._clinician(context, model.requester),
                    **procedure,
                )
            ]
            texts = [_display(r) for r in model.reasonCode or []]
            texts += [str(n.text) for n in model.note or [] if n.text]
            text = "\n".join(t for t in texts if t.strip())
            if text:
                if patient is None:
                    raise FhirMappingError(
                        "an order with clinical details (reasonCode, note) needs a patient "
                        "identifier",
                        "ServiceRequest.subject",
                        "required",
                    )
                events.append(
                    ClinicalNote(
                        **common,
                        occurred_at=at,
                        note=order.placer or order.filler,
                        text=text,
                        source_kind=REQUEST_DETAILS,
                    )
                )
            return events
        at = updated or context.received_at
        if status == "on-hold":
            return [
                OrderChanged(**common, occurred_at=at, order=order, control="HD", order_status="HD")
            ]
        if status == "completed":
            return [
                OrderChanged(**common, occurred_at=at, order=order, control="SC", order_status="CM")
            ]
        return [OrderCancelled(**common, occurred_at=at, order=order, control=status)]

    # --- results ---------------------------------------------------------------------

    def _report(self, context: _Context) -> list[Event]:
        """A DiagnosticReport: time `issued` (when this version was released), else
        effective[x], else meta.lastUpdated; `effective` is when the examination was done.
        Flags are the interpretation codes of the contained Observations it lists as
        results (v3 ObservationInterpretation: N, A, AA, H, HH, L, LL...); key findings the
        conclusionCode concepts ("SCT|<code>" for SNOMED CT, else "<system>|<code>", one per
        concept, SNOMED CT preferred); the alert the highest category of the conclusionCode
        codes listed in [fhir.alert_codes] (AA, HH and LL flags count as critical anyway).
        `wrong_patient` stays False: entered-in-error does not say why (HL7 OBX-11 W does)."""
        model = context.resource
        status = self._status(context, REPORT_STATUSES)
        meaning = REPORT_STATUSES[status]
        if not meaning:
            return []
        orders = self._based_on(context, "DiagnosticReport.basedOn")
        patient = self._subject(context, model.subject, "DiagnosticReport.subject", required=False)
        common = self._common(context, patient, self._encounter_of(context, model.encounter))
        effective = self._time(model.effectiveDateTime, "DiagnosticReport.effectiveDateTime")
        if effective is None and model.effectivePeriod is not None:
            effective = self._time(
                model.effectivePeriod.start or model.effectivePeriod.end,
                "DiagnosticReport.effectivePeriod",
            )
        at = self._time(model.issued, "DiagnosticReport.issued") or effective
        at = at or self._updated(context) or context.received_at
        if meaning == "cancelled":
            return [
                OrderCancelled(**common, occurred_at=at, order=order, control="cancelled")
                for order in orders
            ]
        content = self._report_content(model)
        procedure = self._procedure(model.code, model.category)
        return [
            ReportIssued(
                **common,
                occurred_at=at,
                order=order,
                status=meaning,
                performed_at=effective,
                **procedure,
                **content,
            )
            for order in orders
        ]

    def _report_content(self, model: Any) -> dict[str, Any]:
        flags: list[str] = []
        for ref in model.result or []:
            observation = _contained(model, ref.reference, "Observation")
            if observation is None:
                continue
            for coding in _codings(observation.interpretation):
                if coding.code:
                    flags.append(str(coding.code))
        rank = 0
        found: dict[str, None] = {}
        alert_codes = self.settings.alert_codes
        for concept in model.conclusionCode or []:
            codings = [c for c in concept.coding or [] if c.code]
            keys = [k for c in codings if (k := _matches(c, alert_codes)) is not None]
            if keys:
                rank = max(rank, *(ALERTS.index(alert_codes[k]) for k in keys))
                continue
            chosen = next((c for c in codings if c.system == SNOMED), None)
            chosen = chosen or (codings[0] if codings else None)
            if chosen is not None:
                system = "SCT" if chosen.system == SNOMED else str(chosen.system or "")
                found[f"{system}|{chosen.code}" if system else str(chosen.code)] = None
        return {"flags": tuple(flags), "alert": ALERTS[rank], "findings": tuple(found)}

    def _study(self, context: _Context) -> list[Event]:
        """An ImagingStudy `available`: the examination was done (OrderChanged SC, CM) at
        `started`, else meta.lastUpdated. Other statuses say nothing the engine uses."""
        model = context.resource
        status = self._status(context, STUDY_STATUSES)
        if status != "available":
            return []
        orders = self._based_on(context, "ImagingStudy.basedOn")
        patient = self._subject(context, model.subject, "ImagingStudy.subject", required=False)
        common = self._common(context, patient, self._encounter_of(context, model.encounter))
        at = self._time(model.started, "ImagingStudy.started") or self._updated(context)
        at = at or context.received_at
        return [
            OrderChanged(**common, occurred_at=at, order=order, control="SC", order_status="CM")
            for order in orders
        ]

    # --- safeguarding ----------------------------------------------------------------

    def _flag(self, context: _Context) -> list[Event]:
        """A Flag whose category (or code) is a configured safeguarding code. It is named by
        its first identifier, else "Flag/<id>", so that a later version can clear it; its
        category is the matched coding's display, else its code. Raised at period.start,
        cleared at period.end, else meta.lastUpdated."""
        model = context.resource
        status = self._status(context, FLAG_STATUSES)
        settings = self.settings
        matched = next(
            (
                c
                for c in _codings(model.category)
                if _matches(c, settings.safeguarding_flag_categories)
            ),
            None,
        ) or next(
            (c for c in _codings(model.code) if _matches(c, settings.safeguarding_flag_codes)),
            None,
        )
        if matched is None:
            raise FhirMappingError(
                "not a safeguarding Flag (no safeguarding category or code)",
                "Flag.category",
                "not-supported",
            )
        ident = next((i for i in model.identifier or [] if i.value), None)
        if ident is not None:
            name = f"{ident.system}|{ident.value}" if ident.system else str(ident.value)
        elif model.id:
            name = f"Flag/{model.id}"
        else:
            raise FhirMappingError(
                "a safeguarding Flag needs an identifier or an id, to be cleared later",
                "Flag.identifier",
                "required",
            )
        patient = self._subject(context, model.subject, "Flag.subject", required=True)
        common = self._common(context, patient, self._encounter_of(context, model.encounter))
        period = model.period
        updated = self._updated(context)
        if status == "active":
            at = self._time(period.start if period else None, "Flag.period.start") or updated
            return [
                SafeguardingFlagRaised(
                    **common,
                    occurred_at=at or context.received_at,
                    flag=name,
                    category=str(matched.display or matched.code),
                )
            ]
        at = self._time(period.end if period else None, "Flag.period.end") or updated
        return [SafeguardingFlagCleared(**common, occurred_at=at or context.received_at, flag=name)]


def _not_one_of(where: str, allowed: Iterable[str]) -> str:
    """The reason for a code outside its value set. The code sent is not repeated: a broken
    sender may have put anything there, patient data included."""
    return f"{where} is not one of {', '.join(sorted(allowed))}"


def _source_of(model: Any) -> str:
    """meta.source without its fragment: the sending system."""
    meta = model.meta
    if meta is None or not meta.source:
        return ""
    return str(meta.source).split("#", 1)[0]
