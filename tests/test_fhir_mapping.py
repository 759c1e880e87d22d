"""FHIR R4 -> canonical events (adapters.fhir.mapping): per resource type, the codes checked,
errors without patient data, the corpus outcomes pinned, and the Derby-like scenario sent as
FHIR resources giving the same Tasks as its HL7 v2 version.

Resources here are synthetic (NHS number 999 000 0018 is from the synthetic 999 range); the
corpus is read in place, never copied."""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from adapters.bootstrap import build_replay_app
from adapters.fhir.mapping import (
    SUPPORTED,
    FhirMapper,
    FhirMappingError,
    FhirMappingSettings,
    bundle_entries,
    bundle_references,
    parse_json,
)
from adapters.fhir.task import task_resource, task_restatus
from adapters.hl7v2.er7 import read_message
from adapters.hl7v2.mapping import Mapper, MappingSettings
from adapters.store import open_store
from engine.catalogue import load_catalogue
from engine.clock import SimulatedClock
from engine.errors import ConfigurationError
from engine.events import (
    AdmissionCancelled,
    ClinicalNote,
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
)
from engine.ports import StoredTask
from engine.processor import Processor

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "rules"
DERBY_FHIR = ROOT / "tests" / "fixtures" / "fhir" / "derby"
DERBY_HL7 = ROOT / "tests" / "fixtures" / "hl7v2" / "derby"
CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "fhir"
TZ = ZoneInfo("Europe/London")
NOW = datetime(2026, 1, 1, tzinfo=UTC)
NHS = "https://fhir.nhs.uk/Id/nhs-number"
GMC = "https://fhir.hl7.org.uk/Id/gmc-number"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
CATALOGUE = load_catalogue(RULES)
MAPPER = FhirMapper(FhirMappingSettings.for_site(CATALOGUE.site))
# Patient data of the synthetic patient: none of it may appear in an error.
PATIENT_DATA = ("9990000018", "RX1000123", "Testbaby", "Alex", "2008-03-13")


def typed(code: str, value: str, system: str = "") -> dict[str, Any]:
    ident: dict[str, Any] = {"type": {"coding": [{"system": V2_0203, "code": code}]}}
    if system:
        ident["system"] = system
    return {**ident, "value": value}


PATIENT: dict[str, Any] = {
    "resourceType": "Patient",
    "id": "p1",
    "meta": {"lastUpdated": "2008-05-01T11:30:00+01:00"},
    "identifier": [
        {"system": NHS, "value": "9990000018"},
        typed("MR", "RX1000123", "urn:safetynet:authority:RX1"),
    ],
    "name": [{"family": "Testbaby", "given": ["Alex"]}],
    "gender": "male",
    "birthDate": "2008-03-13",
}
SUBJECT = {"identifier": {"system": NHS, "value": "9990000018"}}
ENCOUNTER: dict[str, Any] = {
    "resourceType": "Encounter",
    "id": "e1",
    "identifier": [typed("VN", "V1")],
    "status": "in-progress",
    "class": {"code": "EMER"},
    "subject": SUBJECT,
    "period": {"start": "2008-05-01T11:30:00+01:00"},
    "participant": [
        {
            "type": [{"coding": [{"code": "ATND"}]}],
            "individual": {"identifier": {"system": GMC, "value": "C1"}, "display": "Dr Ann Doc"},
        }
    ],
    "location": [{"location": {"identifier": {"value": "PAEDED"}}, "status": "active"}],
}
IMAGING = {"coding": [{"system": "http://snomed.info/sct", "code": "363679005"}]}
REQUEST: dict[str, Any] = {
    "resourceType": "ServiceRequest",
    "id": "sr1",
    "identifier": [
        typed("PLAC", "ORD-1", "urn:safetynet:authority:RIS"),
        typed("FILL", "ACC-1", "urn:safetynet:authority:PACS"),
    ],
    "status": "active",
    "intent": "order",
    "category": [IMAGING],
    "code": {"coding": [{"code": "XSK", "display": "XR skeletal survey"}]},
    "subject": SUBJECT,
    "encounter": {"identifier": {"value": "V1"}},
    "authoredOn": "2008-05-01T12:10:00+01:00",
    "requester": {"identifier": {"system": GMC, "value": "C2"}, "display": "Dr Sam Ord"},
}
REPORT: dict[str, Any] = {
    "resourceType": "DiagnosticReport",
    "id": "dr1",
    "basedOn": [{"identifier": typed("PLAC", "ORD-1", "urn:safetynet:authority:RIS")}],
    "status": "final",
    "code": {"coding": [{"code": "XSK", "display": "XR skeletal survey"}]},
    "subject": SUBJECT,
    "effectiveDateTime": "2008-05-01T12:45:00+01:00",
    "issued": "2008-05-01T16:00:00+01:00",
}
FLAG: dict[str, Any] = {
    "resourceType": "Flag",
    "id": "f1",
    "status": "active",
    "category": [{"coding": [{"system": "urn:example:flags", "code": "safeguarding"}]}],
    "code": {"text": "Child protection plan"},
    "subject": SUBJECT,
    "period": {"start": "2008-04-01"},
}


def with_(base: Mapping[str, Any], **changes: Any) -> dict[str, Any]:
    """A deep copy of `base` with top-level elements replaced (None removes one)."""
    out = copy.deepcopy(dict(base))
    for key, value in changes.items():
        key = key.rstrip("_")  # class_ -> class
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def events(resource: Mapping[str, Any], **kwargs: Any) -> list[Any]:
    return MAPPER.events(resource, NOW, **kwargs)


def refused(resource: Mapping[str, Any], **kwargs: Any) -> FhirMappingError:
    with pytest.raises(FhirMappingError) as info:
        events(resource, **kwargs)
    return info.value


def local(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    """A local time at the site (Europe/London, daylight saving included)."""
    return datetime(year, month, day, hour, minute, tzinfo=TZ)


# --- settings -------------------------------------------------------------------------


def test_settings_come_from_settings_toml_and_default_to_the_documented_values() -> None:
    site = FhirMappingSettings.for_site(CATALOGUE.site)
    default = FhirMappingSettings(TZ)
    assert site.imaging_categories == default.imaging_categories
    assert ("http://snomed.info/sct", "363679005") in site.imaging_categories
    assert ("http://loinc.org", "LP29684-5") in site.imaging_categories
    assert site.safeguarding_flag_categories == default.safeguarding_flag_categories
    assert dict(site.alert_codes) == dict(default.alert_codes)
    assert site.imaging_section == "RAD" and site.site_facts is CATALOGUE.site.facts
    assert FhirMappingSettings.from_settings(TZ, {}).placer_systems == frozenset()


@pytest.mark.parametrize(
    ("fhir", "message"),
    [
        ({"imaging_category": []}, r"settings.toml \[fhir\]: unknown key\(s\) imaging_category"),
        ({"imaging_categories": "363679005"}, r"\[fhir\] imaging_categories must be a list"),
        ({"placer_systems": [1]}, r"\[fhir\] placer_systems must be a list of identifier"),
        ({"safeguarding_flag_codes": [""]}, r"\[fhir\] safeguarding_flag_codes must be a list"),
        ({"imaging_section": 3}, r"\[fhir\] imaging_section must be a section code"),
        ({"alert_codes": ["critical"]}, r"\[fhir.alert_codes\] must map each code"),
        ({"alert_codes": {"X|Y": "panic"}}, r"\[fhir.alert_codes\]: an alert category must"),
    ],
)
def test_wrong_settings_name_settings_toml_and_the_key(fhir: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        FhirMappingSettings.from_settings(TZ, fhir)


def test_the_imaging_section_must_be_an_imaging_section_of_the_site() -> None:
    site = dataclasses.replace(CATALOGUE.site, fhir={"imaging_section": "LAB"})
    with pytest.raises(ConfigurationError, match=r"imaging_section 'LAB' must be one of"):
        FhirMappingSettings.for_site(site)


# --- Patient --------------------------------------------------------------------------


def test_patient_demographics_and_identifiers_match_the_hl7_ones() -> None:
    (ev,) = events(PATIENT)
    assert isinstance(ev, PatientUpdated) and ev.encounter == ""
    assert ev.occurred_at == local(2008, 5, 1, 11, 30)  # meta.lastUpdated
    nhs, mrn = ev.patient.identifiers
    assert nhs == PatientIdentifier("9990000018", "NHS", "NH", is_nhs_number=True)
    assert mrn == PatientIdentifier("RX1000123", "RX1", "MR")
    # The same alias tokens as PID-3 9990000018^^^NHS^NH~RX1000123^^^RX1^MR.
    hl7 = Mapper(MappingSettings.for_site(CATALOGUE.site))
    (adt,) = hl7.events(
        read_message(DERBY_HL7.joinpath("04_adt_a03_discharge_home.hl7").read_text()), NOW
    )
    assert [i.token for i in ev.patient.identifiers] == [i.token for i in adt.patient.identifiers]
    assert ev.patient.birth == local(2008, 3, 13) and ev.patient.sex == "M"
    assert ev.source == SourceRef("FHIR", "Patient/p1", "Patient")


def test_an_nhs_number_failing_modulus_11_is_kept_but_not_trusted() -> None:
    (ev,) = events(with_(PATIENT, identifier=[{"system": NHS, "value": "999 000 0017"}]))
    (ident,) = ev.patient.identifiers
    assert not ident.is_nhs_number and ident.system == "NHS-unverified"
    (ev,) = events(with_(PATIENT, identifier=[{"system": NHS, "value": "999 000 0018"}]))
    assert ev.patient.nhs_number == "9990000018"
    (ev,) = events(with_(PATIENT, identifier=[{"system": "urn:oid:1.2.3", "value": "42"}]))
    assert ev.patient.identifiers[0].token == "urn:oid:1.2.3|42"


@pytest.mark.parametrize(("gender", "sex"), [("male", "M"), ("female", "F"), ("other", "O")])
def test_gender_becomes_administrative_sex(gender: str, sex: str) -> None:
    assert events(with_(PATIENT, gender=gender))[0].patient.sex == sex
    assert events(with_(PATIENT, gender="unknown"))[0].patient.sex == "U"
    assert events(with_(PATIENT, gender=None))[0].patient.sex == ""


def test_a_birth_time_extension_keeps_the_hour_of_birth_when_it_agrees_with_the_date() -> None:
    ext = {
        "extension": [
            {
                "url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime",
                "valueDateTime": "2008-03-13T04:30:00Z",
            }
        ]
    }
    assert events(with_(PATIENT, _birthDate=ext))[0].patient.birth == local(2008, 3, 13, 4, 30)
    ext["extension"][0]["valueDateTime"] = "2008-09-03T04:30:00Z"  # disagrees: ignored
    assert events(with_(PATIENT, _birthDate=ext))[0].patient.birth == local(2008, 3, 13)


def test_patient_links_replaced_by_and_replaces_are_merges() -> None:
    survivor = {"identifier": typed("MR", "RX1000999", "urn:safetynet:authority:RX1")}
    (ev,) = events(with_(PATIENT, link=[{"other": survivor, "type": "replaced-by"}]))
    assert isinstance(ev, PatientsMerged)
    assert [i.token for i in ev.patient.identifiers] == ["RX1|RX1000999"]
    assert ev.prior[0].is_nhs_number and ev.prior[1].token == "RX1|RX1000123"
    (ev,) = events(with_(PATIENT, link=[{"other": survivor, "type": "replaces"}]))
    assert isinstance(ev, PatientsMerged) and ev.patient.nhs_number == "9990000018"
    assert [i.token for i in ev.prior] == ["RX1|RX1000999"]
    # A literal reference the caller resolved.
    other = Patient((PatientIdentifier("RX1000998", "RX1", "MR"),))
    (ev,) = events(
        with_(PATIENT, link=[{"other": {"reference": "Patient/old"}, "type": "replaces"}]),
        patients={"Patient/old": other},
    )
    assert ev.prior == other.identifiers
    # seealso and refer are not merges.
    (ev,) = events(with_(PATIENT, link=[{"other": survivor, "type": "seealso"}]))
    assert isinstance(ev, PatientUpdated)


def test_patient_errors() -> None:
    bad = refused(with_(PATIENT, link=[{"other": {"reference": "Patient/x"}, "type": "replaces"}]))
    assert (bad.code, bad.location) == ("required", "Patient.link[0].other")
    bad = refused(with_(PATIENT, link=[{"other": {"reference": "Patient/x"}, "type": "merged"}]))
    assert (bad.code, bad.location) == ("code-invalid", "Patient.link[0].type")
    bad = refused(with_(PATIENT, gender="boy"))
    assert (bad.code, bad.location) == ("code-invalid", "Patient.gender")
    bad = refused(with_(PATIENT, identifier=None))
    assert (bad.code, bad.location) == ("required", "Patient.identifier")


# --- Encounter ------------------------------------------------------------------------


def test_an_active_encounter_is_a_registration_with_its_visit() -> None:
    (ev,) = events(ENCOUNTER)
    assert isinstance(ev, PatientRegistered)
    assert ev.encounter == "V1" and ev.occurred_at == local(2008, 5, 1, 11, 30)
    assert ev.patient.nhs_number == "9990000018"
    assert (ev.visit.patient_class, ev.visit.location) == ("E", "PAEDED")
    assert ev.visit.attending is not None
    assert (ev.visit.attending.id, ev.visit.attending.authority) == ("C1", "GMC")
    assert ev.visit.attending.name == "Dr Ann Doc"
    for status in ("arrived", "triaged", "onleave"):
        assert isinstance(events(with_(ENCOUNTER, status=status))[0], PatientRegistered)


def test_an_inpatient_encounter_is_an_admission_from_when_its_class_became_inpatient() -> None:
    (ev,) = events(with_(ENCOUNTER, class_={"code": "IMP"}))
    assert isinstance(ev, PatientAdmitted) and ev.visit.patient_class == "I"
    history = [
        {"class": {"code": "EMER"}, "period": {"start": "2008-05-01T11:30:00+01:00"}},
        {"class": {"code": "IMP"}, "period": {"start": "2008-05-01T15:00:00+01:00"}},
    ]
    (ev,) = events(with_(ENCOUNTER, class_={"code": "IMP"}, classHistory=history))
    assert ev.occurred_at == local(2008, 5, 1, 15, 0)
    assert events(with_(ENCOUNTER, class_={"code": "AMB"}))[0].visit.patient_class == "O"
    assert events(with_(ENCOUNTER, class_={"code": "XYZ"}))[0].visit.patient_class == "U"


def test_a_finished_encounter_is_a_discharge_at_period_end() -> None:
    finished = with_(
        ENCOUNTER,
        status="finished",
        period={"start": "2008-05-01T11:30:00+01:00", "end": "2008-05-01T13:00:00Z"},
        hospitalization={
            "dischargeDisposition": {"coding": [{"code": "home"}]},
            "destination": {"display": "Home address"},
        },
    )
    (ev,) = events(finished)
    assert isinstance(ev, PatientDischarged)
    assert ev.occurred_at == local(2008, 5, 1, 14, 0)  # 13:00 UTC, in the site's zone
    assert str(ev.occurred_at.tzinfo) == "Europe/London"
    assert (ev.visit.disposition, ev.visit.discharged_to) == ("home", "Home address")
    # period.end valued on an active encounter: discharged too (v2-to-FHIR: PV1-45 -> end).
    (ev,) = events(with_(finished, status="in-progress"))
    assert isinstance(ev, PatientDischarged)
    # No period.end: when the status history says it finished, else meta.lastUpdated.
    no_end = with_(finished, period={"start": "2008-05-01T11:30:00+01:00"})
    bad = refused(no_end)
    assert (bad.code, bad.location) == ("required", "Encounter.period.end")
    updated = with_(no_end, meta={"lastUpdated": "2008-05-01T14:05:00+01:00"})
    assert events(updated)[0].occurred_at == local(2008, 5, 1, 14, 5)


def test_discharge_cancelled_only_when_the_status_history_shows_it_was_finished() -> None:
    history = [
        {"status": "in-progress", "period": {"start": "2008-05-01T11:30:00+01:00"}},
        {"status": "finished", "period": {"start": "2008-05-01T14:00:00+01:00"}},
        {"status": "in-progress", "period": {"start": "2008-05-01T14:20:00+01:00"}},
    ]
    registered, cancelled = events(with_(ENCOUNTER, statusHistory=history))
    assert isinstance(registered, PatientRegistered)
    assert isinstance(cancelled, DischargeCancelled) and cancelled.encounter == "V1"
    assert cancelled.occurred_at == local(2008, 5, 1, 14, 20)
    # Without that history, in-progress says nothing about a discharge.
    assert [type(e) for e in events(ENCOUNTER)] == [PatientRegistered]
    (ev,) = events(with_(ENCOUNTER, statusHistory=history[:1]))
    assert isinstance(ev, PatientRegistered)


def test_cancelled_planned_and_unknown_encounters() -> None:
    for status in ("cancelled", "entered-in-error"):
        (ev,) = events(with_(ENCOUNTER, status=status))
        assert isinstance(ev, AdmissionCancelled) and ev.encounter == "V1"
    # A pre-admission is not an admission: recorded, no admission fact.
    (ev,) = events(with_(ENCOUNTER, status="planned", class_={"code": "IMP"}))
    assert isinstance(ev, PatientUpdated)
    assert events(with_(ENCOUNTER, status="unknown")) == []
    bad = refused(with_(ENCOUNTER, status="done"))
    assert (bad.code, bad.location) == ("code-invalid", "Encounter.status")


def test_the_visit_number_is_the_vn_identifier_else_the_first_else_the_id() -> None:
    idents = [{"value": "X9"}, typed("VN", "V7")]
    assert events(with_(ENCOUNTER, identifier=idents))[0].encounter == "V7"
    assert events(with_(ENCOUNTER, identifier=idents[:1]))[0].encounter == "X9"
    assert events(with_(ENCOUNTER, identifier=None))[0].encounter == "e1"


def test_the_encounter_subject_must_resolve_to_patient_identifiers() -> None:
    literal = with_(ENCOUNTER, subject={"reference": "Patient/p1"})
    bad = refused(literal)
    assert (bad.code, bad.location) == ("required", "Encounter.subject")
    resolved = events(literal, patients={"Patient/p1": MAPPER.patient(PATIENT)})[0]
    assert resolved.patient.nhs_number == "9990000018" and resolved.patient.sex == "M"
    versioned = with_(ENCOUNTER, subject={"reference": "Patient/p1/_history/3"})
    assert events(versioned, patients={"Patient/p1": MAPPER.patient(PATIENT)})[0].patient
    contained = with_(
        ENCOUNTER,
        contained=[{**with_(PATIENT, meta=None), "id": "pat"}],
        subject={"reference": "#pat"},
    )
    assert events(contained)[0].patient.birth == local(2008, 3, 13)
    bad = refused(with_(ENCOUNTER, subject={"reference": "Group/g1"}))
    assert bad.code == "required"


# --- ServiceRequest -------------------------------------------------------------------


def test_an_active_imaging_request_is_an_order_with_its_clinical_details() -> None:
    ordered, note = events(
        with_(REQUEST, reasonCode=[{"text": "Possible NAI"}], note=[{"text": "Call Dr Ord"}])
    )
    assert isinstance(ordered, ImagingOrdered)
    assert ordered.order == OrderRef("ORD-1", "RIS", "ACC-1", "PACS")
    assert ordered.order.tokens() == ("PLAC|RIS|ORD-1", "FILL|PACS|ACC-1")  # as HL7's
    assert (ordered.procedure_code, ordered.procedure_name) == ("XSK", "XR skeletal survey")
    assert ordered.section == "RAD" and ordered.encounter == "V1"
    assert ordered.orderer is not None and (ordered.orderer.id, ordered.orderer.authority) == (
        "C2",
        "GMC",
    )
    assert ordered.occurred_at == local(2008, 5, 1, 12, 10)
    assert isinstance(note, ClinicalNote) and note.note == "ORD-1"
    assert note.text == "Possible NAI\nCall Dr Ord" and note.source_kind == "request details"
    (draft,) = events(with_(REQUEST, status="draft"))
    assert isinstance(draft, ImagingOrdered)


def test_request_status_changes() -> None:
    when = {"lastUpdated": "2008-05-01T13:00:00+01:00"}
    for status in ("revoked", "entered-in-error"):
        (ev,) = events(with_(REQUEST, status=status, meta=when))
        assert isinstance(ev, OrderCancelled) and ev.control == status
        assert ev.occurred_at == local(2008, 5, 1, 13, 0)  # not authoredOn
    (ev,) = events(with_(REQUEST, status="completed", meta=when))
    assert isinstance(ev, OrderChanged) and (ev.control, ev.order_status) == ("SC", "CM")
    (ev,) = events(with_(REQUEST, status="on-hold", meta=when))
    assert isinstance(ev, OrderChanged) and ev.order_status == "HD"
    assert events(with_(REQUEST, status="unknown")) == []
    bad = refused(with_(REQUEST, status="bogus"))
    assert (bad.code, bad.location) == ("code-invalid", "ServiceRequest.status")
    bad = refused(with_(REQUEST, intent="bogus"))
    assert (bad.code, bad.location) == ("code-invalid", "ServiceRequest.intent")
    bad = refused(with_(REQUEST, intent="plan"))
    assert (bad.code, bad.location) == ("not-supported", "ServiceRequest.intent")


def test_only_imaging_requests_are_mapped() -> None:
    lab = {"coding": [{"system": "http://snomed.info/sct", "code": "108252007"}]}
    blood = {"coding": [{"code": "FBC", "display": "Full blood count"}]}
    bad = refused(with_(REQUEST, category=[lab], code=blood))
    assert (bad.code, bad.location) == ("not-supported", "ServiceRequest.category")
    assert "not an imaging request" in bad.reason
    # Imaging by the site's [imaging] name words (settings.toml), or a v2-0074 section.
    (ev,) = events(with_(REQUEST, category=None))
    assert isinstance(ev, ImagingOrdered) and ev.section == "RAD"
    section = {
        "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "CT"}]
    }
    (ev,) = events(with_(REQUEST, category=[section], code=blood))
    assert ev.section == "CT"
    (ev,) = events(with_(REQUEST, category=[{"coding": [{"code": "LP29684-5"}]}]), sender="RIS")
    assert ev.source.sender == "RIS" and ev.source.message_id == "ServiceRequest/sr1"


def test_order_numbers_from_types_then_configured_systems_then_the_resource_id() -> None:
    plain = [{"system": "urn:ris", "value": "ORD-2"}, {"system": "urn:pacs", "value": "ACC-2"}]
    settings = FhirMappingSettings.from_settings(
        TZ, {"placer_systems": ["urn:ris"], "filler_systems": ["urn:pacs"]}
    )
    (ev,) = FhirMapper(settings).events(with_(REQUEST, identifier=plain), NOW)
    assert ev.order == OrderRef("ORD-2", "urn:ris", "ACC-2", "urn:pacs")
    (ev,) = events(with_(REQUEST, identifier=plain))  # unconfigured, untyped: the id
    assert ev.order == OrderRef("sr1", "FHIR")
    (ev,) = events(with_(REQUEST, identifier=None, meta={"source": "https://ris.example#r9"}))
    assert ev.order == OrderRef("sr1", "https://ris.example")
    (ev,) = events(with_(REQUEST, identifier=[typed("ACSN", "A-3")]))
    assert ev.order == OrderRef(filler="A-3")
    bad = refused(with_(REQUEST, identifier=None, id=None))
    assert (bad.code, bad.location) == ("required", "ServiceRequest.identifier")


def test_clinical_details_need_a_patient_an_order_alone_does_not() -> None:
    (ev,) = events(with_(REQUEST, subject={"reference": "Patient/p1"}))
    assert isinstance(ev, ImagingOrdered) and ev.patient is None  # linked by its order
    bad = refused(with_(REQUEST, subject={"reference": "Patient/p1"}, note=[{"text": "NAI?"}]))
    assert (bad.code, bad.location) == ("required", "ServiceRequest.subject")


def test_references_to_other_kinds_of_resource_are_not_people_or_orders() -> None:
    nhs = {"system": NHS, "value": "9990000018"}
    # A requester that is the patient or an organisation is no orderer: never a Task owner.
    for requester in ({"type": "Patient", "identifier": nhs}, {"identifier": nhs}):
        (ev,) = events(with_(REQUEST, requester=requester))
        assert ev.orderer is None
    (ev,) = events(with_(REQUEST, requester={"reference": "Organization/o1", "display": "RX1"}))
    assert ev.orderer is None
    (ev,) = events(with_(REQUEST, requester={"reference": "Practitioner/abc", "display": "Dr X"}))
    assert ev.orderer is not None and (ev.orderer.id, ev.orderer.name) == ("", "Dr X")
    contained = {
        "resourceType": "Practitioner",
        "id": "doc",
        "identifier": [{"system": "urn:safetynet:authority:LOCAL", "value": "D9"}],
        "name": [{"prefix": ["Dr"], "given": ["Kim"], "family": "Reed"}],
    }
    (ev,) = events(with_(REQUEST, contained=[contained], requester={"reference": "#doc"}))
    assert ev.orderer is not None
    assert (ev.orderer.id, ev.orderer.name, ev.orderer.authority) == ("D9", "Dr Kim Reed", "LOCAL")
    # A subject that is a Location is no patient, whatever identifier it carries.
    located = {"type": "Location", "identifier": {"value": "PAEDED"}}
    assert refused(with_(ENCOUNTER, subject=located)).code == "required"
    # basedOn a CarePlan is no order; a full URL to a ServiceRequest is one.
    care_plan = {"reference": "CarePlan/cp1", "identifier": {"value": "CP-1"}}
    bad = refused(with_(REPORT, basedOn=[care_plan]))
    assert (bad.code, bad.location) == ("required", "DiagnosticReport.basedOn")
    full = [care_plan, {"reference": "https://ris.example/fhir/ServiceRequest/sr9/_history/2"}]
    assert events(with_(REPORT, basedOn=full))[0].order == OrderRef("sr9", "FHIR")
    (ev,) = events(with_(REQUEST, encounter={"reference": "https://pas.example/Encounter/e5"}))
    assert ev.encounter == "e5"
    (ev,) = events(
        with_(REQUEST, encounter={"reference": "Encounter/e5"}), encounters={"Encounter/e5": "V5"}
    )
    assert ev.encounter == "V5"


# --- DiagnosticReport -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ("partial", "preliminary"),
        ("preliminary", "preliminary"),
        ("final", "final"),
        ("amended", "corrected"),
        ("corrected", "corrected"),
        ("appended", "corrected"),
        ("entered-in-error", "withdrawn"),
    ],
)
def test_report_status(status: str, expected: str) -> None:
    (ev,) = events(with_(REPORT, status=status))
    assert isinstance(ev, ReportIssued) and ev.status == expected
    assert not ev.wrong_patient  # entered-in-error does not say why
    assert ev.order == OrderRef("ORD-1", "RIS")
    assert ev.occurred_at == local(2008, 5, 1, 16, 0)  # issued
    assert ev.performed_at == local(2008, 5, 1, 12, 45)  # effective


def test_report_registered_cancelled_and_bogus() -> None:
    assert events(with_(REPORT, status="registered")) == []
    assert events(with_(REPORT, status="unknown")) == []
    # As HL7 OBR-25 X (which v2-to-FHIR sends as cancelled): the order was cancelled.
    (ev,) = events(with_(REPORT, status="cancelled"))
    assert isinstance(ev, OrderCancelled) and ev.order.placer == "ORD-1"
    bad = refused(with_(REPORT, status="bogus"))
    assert (bad.code, bad.location) == ("code-invalid", "DiagnosticReport.status")
    assert bad.reason.startswith("DiagnosticReport.status is not one of amended, appended,")
    assert "bogus" not in bad.reason


def test_a_report_finds_its_order_by_based_on() -> None:
    (ev,) = events(with_(REPORT, basedOn=[{"reference": "ServiceRequest/sr1"}]))
    assert ev.order == OrderRef("sr1", "FHIR")  # as a request named by its id
    request = {**with_(REQUEST, subject={"reference": "Patient/p1"}), "id": "req"}
    (ev,) = events(with_(REPORT, contained=[request], basedOn=[{"reference": "#req"}]))
    assert ev.order == OrderRef("ORD-1", "RIS", "ACC-1", "PACS")
    # The report's own FILL identifier completes a single order.
    own = [typed("FILL", "ACC-1", "urn:safetynet:authority:PACS")]
    (ev,) = events(with_(REPORT, identifier=own))
    assert ev.order == OrderRef("ORD-1", "RIS", "ACC-1", "PACS")
    (ev,) = events(with_(REPORT, identifier=own, basedOn=None))
    assert ev.order == OrderRef(filler="ACC-1", filler_ns="PACS")
    # Two orders: one report event each.
    two = [{"identifier": {"value": "ORD-1"}}, {"identifier": {"value": "ORD-2"}}]
    assert [e.order.placer for e in events(with_(REPORT, basedOn=two))] == ["ORD-1", "ORD-2"]
    bad = refused(with_(REPORT, basedOn=None))
    assert (bad.code, bad.location) == ("required", "DiagnosticReport.basedOn")


def test_a_report_without_a_resolvable_patient_links_through_its_order() -> None:
    (ev,) = events(with_(REPORT, subject={"reference": "Patient/unknown"}))
    assert ev.patient is None and ev.order.tokens() == ("PLAC|RIS|ORD-1",)


def test_report_flags_findings_and_alert() -> None:
    observation = {
        "resourceType": "Observation",
        "id": "o1",
        "status": "final",
        "code": {"text": "flag"},
        "interpretation": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                        "code": "A",
                    }
                ]
            }
        ],
    }
    conclusion = [
        {
            "coding": [
                {"system": "http://example.org/local", "code": "FRX"},
                {"system": "http://snomed.info/sct", "code": "125605004"},
            ]
        },
        {"coding": [{"system": "http://example.org/local", "code": "RIB"}]},
        {"coding": [{"system": "urn:safetynet:alert", "code": "URGENT"}]},
        {"coding": [{"system": "urn:safetynet:alert", "code": "significant"}]},
    ]
    (ev,) = events(
        with_(
            REPORT,
            contained=[observation],
            result=[{"reference": "#o1"}, {"reference": "Observation/elsewhere"}],
            conclusionCode=conclusion,
        )
    )
    assert ev.flags == ("A",) and ev.abnormal
    assert ev.findings == ("SCT|125605004", "http://example.org/local|RIB")
    assert ev.alert == "urgent"
    settings = FhirMappingSettings.from_settings(TZ, {"alert_codes": {"FRX": "critical"}})
    (ev,) = FhirMapper(settings).events(with_(REPORT, conclusionCode=conclusion[:1]), NOW)
    assert ev.alert == "critical" and ev.findings == ()


def test_report_time_falls_back_on_effective_then_last_updated() -> None:
    (ev,) = events(with_(REPORT, issued=None))
    assert ev.occurred_at == local(2008, 5, 1, 12, 45)
    (ev,) = events(
        with_(
            REPORT,
            issued=None,
            effectiveDateTime=None,
            meta={"lastUpdated": "2008-05-01T17:00:00+01:00"},
        )
    )
    assert ev.occurred_at == local(2008, 5, 1, 17, 0) and ev.performed_at is None


# --- ImagingStudy ---------------------------------------------------------------------


def test_an_available_imaging_study_says_the_examination_was_done() -> None:
    study = {
        "resourceType": "ImagingStudy",
        "id": "is1",
        "identifier": [typed("ACSN", "ACC-1", "urn:safetynet:authority:PACS")],
        "basedOn": [{"identifier": typed("PLAC", "ORD-1", "urn:safetynet:authority:RIS")}],
        "status": "available",
        "subject": SUBJECT,
        "started": "2008-05-01T12:45:00+01:00",
    }
    (ev,) = events(study)
    assert isinstance(ev, OrderChanged)
    assert (ev.control, ev.order_status) == ("SC", "CM")
    assert ev.order == OrderRef("ORD-1", "RIS", "ACC-1", "PACS")
    assert ev.occurred_at == local(2008, 5, 1, 12, 45)
    for status in ("registered", "cancelled", "entered-in-error", "unknown"):
        assert events(with_(study, status=status)) == []
    bad = refused(with_(study, status="done"))
    assert (bad.code, bad.location) == ("code-invalid", "ImagingStudy.status")
    bad = refused(with_(study, basedOn=None, identifier=None))
    assert (bad.code, bad.location) == ("required", "ImagingStudy.basedOn")


# --- Flag -----------------------------------------------------------------------------


def test_a_safeguarding_flag_is_raised_and_cleared() -> None:
    (raised,) = events(FLAG)
    assert isinstance(raised, SafeguardingFlagRaised)
    assert (raised.flag, raised.category) == ("Flag/f1", "safeguarding")
    assert raised.occurred_at == local(2008, 4, 1) and raised.patient.nhs_number == "9990000018"
    for status in ("inactive", "entered-in-error"):
        cleared = with_(FLAG, status=status, period={"start": "2008-04-01", "end": "2008-06-01"})
        (ev,) = events(cleared)
        assert isinstance(ev, SafeguardingFlagCleared) and ev.flag == "Flag/f1"
        assert ev.occurred_at == local(2008, 6, 1)
    named = with_(FLAG, identifier=[{"system": "urn:epr:alerts", "value": "A-77"}])
    assert events(named)[0].flag == "urn:epr:alerts|A-77"
    display = [{"coding": [{"code": "CPIS", "display": "Child protection plan"}]}]
    assert events(with_(FLAG, category=display))[0].category == "Child protection plan"
    by_code = FhirMappingSettings.from_settings(TZ, {"safeguarding_flag_codes": ["urn:x|RTC"]})
    rtc = with_(FLAG, category=None, code={"coding": [{"system": "urn:x", "code": "RTC"}]})
    assert isinstance(FhirMapper(by_code).events(rtc, NOW)[0], SafeguardingFlagRaised)


def test_other_flags_are_not_supported_and_a_flag_needs_its_patient() -> None:
    other = [
        {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/flag-category", "code": "safety"}
            ]
        }
    ]
    bad = refused(with_(FLAG, category=other))
    assert (bad.code, bad.location) == ("not-supported", "Flag.category")
    bad = refused(with_(FLAG, subject={"reference": "Patient/p1"}))
    assert (bad.code, bad.location) == ("required", "Flag.subject")
    bad = refused(with_(FLAG, status="resolved"))
    assert (bad.code, bad.location) == ("code-invalid", "Flag.status")


# --- errors ---------------------------------------------------------------------------


def test_structure_errors_are_invalid_with_the_first_errors_location() -> None:
    bad = refused(with_(ENCOUNTER, class_=[{"code": "EMER"}]))
    assert (bad.code, bad.location) == ("invalid", "Encounter.class")
    bad = refused(with_(PATIENT, identifier=[{"system": NHS, "value": 9990000018}]))
    assert (bad.code, bad.location) == ("invalid", "Patient.identifier[0].value")
    bad = refused(with_(REPORT, code=None))
    assert (bad.code, bad.location) == ("invalid", "DiagnosticReport.code")
    bad = refused(with_(REPORT, issued="yesterday"))
    assert (bad.code, bad.location) == ("invalid", "DiagnosticReport.issued")
    bad = refused({"resourceType": "Patient", "nickname": "Al"})
    assert (bad.code, bad.location) == ("invalid", "Patient.nickname")
    assert bad.ack_code == "AE"


def test_resource_types_and_bodies_that_are_not_supported() -> None:
    bad = refused({"resourceType": "Task", "status": "requested", "intent": "order"})
    assert (bad.code, bad.reason, bad.ack_code) == (
        "not-supported",
        "resource type Task is not supported",
        "AR",
    )
    assert refused({"resourceType": "Bundle", "type": "batch"}).code == "not-supported"
    bad = refused({"resourceType": "Pateint"})
    assert (bad.code, bad.location) == ("invalid", "resourceType")
    assert refused({"id": "x"}).code == "required"
    with pytest.raises(FhirMappingError, match="FHIR XML is not supported") as info:
        parse_json(b'<?xml version="1.0"?><Patient xmlns="http://hl7.org/fhir"/>')
    assert info.value.code == "not-supported"
    with pytest.raises(FhirMappingError, match=r"^not JSON \(a syntax error at character 1\)$"):
        parse_json(b"{")
    for body in (b"{", b"[1, 2]", "\ufeff"):
        with pytest.raises(FhirMappingError) as info:
            parse_json(body)
        assert info.value.code == "invalid"
    assert parse_json('\ufeff{"resourceType": "Patient"}'.encode()) == {"resourceType": "Patient"}


def test_an_error_becomes_an_operation_outcome() -> None:
    outcome = refused(with_(REPORT, status="bogus")).outcome()
    assert outcome == {
        "resourceType": "OperationOutcome",
        "issue": [
            {
                "severity": "error",
                "code": "code-invalid",
                "diagnostics": "DiagnosticReport.status is not one of amended, appended, "
                "cancelled, corrected, entered-in-error, final, partial, preliminary, "
                "registered, unknown",
                "expression": ["DiagnosticReport.status"],
            }
        ],
    }


BAD_WITH_PATIENT_DATA: list[Callable[[], dict[str, Any]]] = [
    lambda: with_(PATIENT, birthDate="13/03/2008 Alex Testbaby"),
    lambda: with_(PATIENT, gender="Testbaby"),
    lambda: with_(PATIENT, identifier=[{"system": NHS, "value": 9990000018}]),
    lambda: with_(PATIENT, identifier=[{"system": NHS, "value": "RX1000123", "period": "2008"}]),
    lambda: with_(PATIENT, link=[{"other": {"display": "Alex Testbaby"}, "type": "replaces"}]),
    lambda: with_(ENCOUNTER, subject={"display": "Alex Testbaby 9990000018"}),
    lambda: with_(ENCOUNTER, status="Alex Testbaby"),
    lambda: with_(
        ENCOUNTER,
        contained=[{**with_(PATIENT, gender="x"), "id": "c"}],
        subject={"reference": "#c"},
    ),
    lambda: with_(REPORT, basedOn=None, subject={"display": "Testbaby, Alex"}),
    lambda: with_(FLAG, subject={"display": "Alex Testbaby", "reference": "Patient/9990000018"}),
    lambda: {**PATIENT, "resourceType": "Testbaby"},
    lambda: {**PATIENT, "nameOfBaby": "Alex Testbaby"},
]


@pytest.mark.parametrize("make", BAD_WITH_PATIENT_DATA)
def test_errors_carry_no_patient_data(make: Callable[[], dict[str, Any]]) -> None:
    error = refused(make())
    text = json.dumps(error.outcome()) + str(error) + error.location
    assert error.reason and not [d for d in PATIENT_DATA if d in text], text


# --- Bundles --------------------------------------------------------------------------


def derby_resources() -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(DERBY_FHIR.glob("*.json"))]


def derby_bundle() -> dict[str, Any]:
    """The Derby resources as one transaction Bundle, in their order."""
    entries = []
    for resource in derby_resources():
        kind, ident = resource["resourceType"], resource["id"]
        entries.append(
            {
                "fullUrl": f"https://fhir.rx1.example.org/{kind}/{ident}",
                "resource": resource,
                "request": {"method": "PUT", "url": f"{kind}/{ident}"},
            }
        )
    entries.append({"request": {"method": "GET", "url": "Patient?identifier=x"}})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def test_bundle_entries_and_references() -> None:
    bundle = derby_bundle()
    entries = bundle_entries(bundle)
    assert len(entries) == 6 and entries[0][0].endswith("/Patient/derby-baby")
    refs = bundle_references(bundle, MAPPER)
    baby = refs.patients["Patient/derby-baby"]
    assert refs.patients["https://fhir.rx1.example.org/Patient/derby-baby"] == baby
    assert baby.nhs_number == "9990000018"
    assert refs.encounters["Encounter/derby-visit"] == "V0001"
    with pytest.raises(FhirMappingError, match="not a Bundle"):
        bundle_entries(PATIENT)
    with pytest.raises(FhirMappingError) as info:
        bundle_entries({"resourceType": "Bundle", "entry": [{"resource": "x"}]})
    assert info.value.location == "Bundle.entry[0]"


def test_a_bundle_is_mapped_entry_by_entry_in_order() -> None:
    bundle = derby_bundle()
    refs = bundle_references(bundle, MAPPER)
    mapped = [
        e
        for _, resource in bundle_entries(bundle)
        for e in MAPPER.events(resource, NOW, patients=refs.patients, encounters=refs.encounters)
    ]
    assert [type(e).__name__ for e in mapped] == [
        "PatientUpdated",
        "PatientRegistered",
        "ImagingOrdered",
        "ClinicalNote",
        "ReportIssued",
        "PatientDischarged",
        "ReportIssued",
    ]
    assert mapped == derby_fhir_events()
    # Without the bundle's references, the Encounter cannot name its patient.
    with pytest.raises(FhirMappingError, match=r"Encounter\.subject names no patient"):
        MAPPER.events(derby_resources()[1], NOW)


# --- the Derby-like scenario: FHIR and HL7 v2 give the same Tasks ------------------------


def derby_fhir_events() -> list[Event]:
    """The Derby resources mapped as the HTTP layer will: the Patient first, then each
    resource with its literal patient reference resolved."""
    resources = derby_resources()
    patients = {"Patient/derby-baby": MAPPER.patient(resources[0])}
    return [e for r in resources for e in MAPPER.events(r, NOW, patients=patients)]


def derby_hl7_events() -> list[Event]:
    mapper = Mapper(MappingSettings.for_site(CATALOGUE.site))
    return [
        e
        for p in sorted(DERBY_HL7.glob("*.hl7"))
        for e in mapper.events(read_message(p.read_text()), NOW)
    ]


def test_the_derby_resources_give_the_hl7_events() -> None:
    """Event for event, what the rules read is the same; the differences are the wire's:
    the disposition code system, a report's section (from its category) and orderer (a
    DiagnosticReport has no requester)."""
    fhir = [e for e in derby_fhir_events() if not isinstance(e, PatientUpdated)]
    hl7 = derby_hl7_events()
    assert [type(e) for e in fhir] == [type(e) for e in hl7]

    def comparable(event: Event) -> Event:
        event = dataclasses.replace(event, source=SourceRef("", "", ""))
        if isinstance(event, PatientDischarged):
            event = dataclasses.replace(
                event, visit=dataclasses.replace(event.visit, disposition="")
            )
        if isinstance(event, ReportIssued):
            event = dataclasses.replace(event, section="", orderer=None)
        return event

    assert [comparable(e) for e in fhir] == [comparable(e) for e in hl7]


def run_fhir(events_in_order: list[Event]) -> list[StoredTask]:
    """Apply canonical events as `safetynet replay` does (adapters.cases.run_case)."""
    clock = SimulatedClock()
    store = open_store("sqlite://", clock=clock)
    processor = Processor(CATALOGUE, task_resource, task_restatus)
    try:
        with store.begin() as uow:
            for event in events_in_order:
                now = clock.advance(event.occurred_at)
                processor.fire_due(uow, now)
                processor.apply(uow, [event], now)
            processor.fire_due(uow, clock.now())
            return uow.tasks()
    finally:
        store.close()


def run_hl7() -> list[StoredTask]:
    app = build_replay_app("sqlite://", RULES)
    try:
        with app.store.begin() as uow:
            for path in sorted(DERBY_HL7.glob("*.hl7")):
                assert app.ingest.ingest(uow, path.read_text(), NOW).ack_code == "AA"
            app.processor.fire_due(uow, app.clock.now())
            return uow.tasks()
    finally:
        app.close()


def test_the_derby_scenario_as_fhir_gives_the_same_tasks_as_hl7() -> None:
    fhir, hl7 = run_fhir(derby_fhir_events()), run_hl7()

    def summary(tasks: list[StoredTask]) -> set[tuple[str, str, str, str, str]]:
        return {(t.identifier, t.rule_id, t.priority, t.owner, t.status) for t in tasks}

    assert summary(fhir) == summary(hl7)
    assert {t.rule_id for t in fhir} == {
        "imaging-pending-at-discharge",
        "report-final-after-discharge",
        "discrepancy-after-discharge",
    }
    # The Tasks say the same: subject, owner, order, text.
    by_id = {t.identifier: t for t in hl7}
    for task in fhir:
        mine, theirs = task.resource, by_id[task.identifier].resource
        for key in ("for", "owner", "encounter", "contained", "description", "priority"):
            assert mine.get(key) == theirs.get(key), key


# --- the corpus -----------------------------------------------------------------------

# Per file: for a resource, "events: <canonical events>" or "<issue code>: <reason>"; for a
# Bundle, one line per entry of a supported type, then how many entries of other types were
# refused as not supported.
NOT_AN_ORDER = (
    "required: {} names no order: basedOn a ServiceRequest (identifier or reference), or a "
    "placer/filler identifier"
)
NO_SUBJECT = (
    "required: Encounter.subject names no patient identifier (a logical reference with an "
    "identifier, a contained Patient, or a reference the caller resolved)"
)
NO_IDENTIFIER = "required: a Patient needs an identifier"
NOT_SAFEGUARDING = "not-supported: not a safeguarding Flag (no safeguarding category or code)"
NOT_IMAGING = "not-supported: not an imaging request (category and code are not imaging)"
XML = "not-supported: FHIR XML is not supported: send FHIR JSON"
EXPECTED = {
    "hl7-fhir-r4-spec/bundle-transaction.json": [
        f"Patient: {NO_IDENTIFIER}",
        "Patient: events: PatientUpdated",
        f"Patient: {NO_IDENTIFIER}",
        "Patient: events: PatientUpdated",
        f"Patient: {NO_IDENTIFIER}",
        "other types: 1 not supported",
    ],
    "hl7-fhir-r4-spec/diagnosticreport-example-dxa.json": [NOT_AN_ORDER.format("DiagnosticReport")],
    "hl7-fhir-r4-spec/diagnosticreport-example-f201-brainct.json": [
        NOT_AN_ORDER.format("DiagnosticReport")
    ],
    "hl7-fhir-r4-spec/diagnosticreport-example-ultrasound.json": [
        NOT_AN_ORDER.format("DiagnosticReport")
    ],
    # Literal "Patient/example" subjects: the caller resolves them (see below).
    "hl7-fhir-r4-spec/encounter-example-emerg.json": [NO_SUBJECT],
    "hl7-fhir-r4-spec/encounter-example-f001-heart.json": [NO_SUBJECT],
    "hl7-fhir-r4-spec/encounter-example.json": [NO_SUBJECT],
    "hl7-fhir-r4-spec/flag-example-encounter.json": [NOT_SAFEGUARDING],
    "hl7-fhir-r4-spec/flag-example.json": [NOT_SAFEGUARDING],
    "hl7-fhir-r4-spec/imagingstudy-example.json": [NOT_AN_ORDER.format("ImagingStudy")],
    "hl7-fhir-r4-spec/message-request-link.json": [
        "Patient: events: PatientUpdated",
        "Patient: events: PatientUpdated",
        "other types: 1 not supported",
    ],
    # link type seealso: not a merge
    "hl7-fhir-r4-spec/patient-example-a.json": ["events: PatientUpdated"],
    "hl7-fhir-r4-spec/patient-example-newborn.json": [NO_IDENTIFIER],
    "hl7-fhir-r4-spec/patient-example.json": ["events: PatientUpdated"],
    "hl7-fhir-r4-spec/servicerequest-example-di.json": [NOT_IMAGING],  # LOINC Chest CT
    "hl7-fhir-r4-spec/servicerequest-example.json": [NOT_IMAGING],  # "Diagnostic procedure"
    "hl7-fhir-r4-spec/subscription-example.json": [
        "not-supported: resource type Subscription is not supported"
    ],
    "hl7-fhir-r4-spec/task-example1.json": ["not-supported: resource type Task is not supported"],
    "hl7-fhir-r4-spec/task-example6.json": ["not-supported: resource type Task is not supported"],
    "microsoft-fhir-converter/ms_expected_adt_a11_01_batch_bundle.json": [
        "Patient: events: PatientUpdated",
        "Encounter: events: AdmissionCancelled",
        "other types: 70 not supported",
    ],
    "nhs-bars/bars_validation_request_message_bundle.json": [
        "ServiceRequest: not-supported: a ServiceRequest with intent plan is not an order",
        "Encounter: events: PatientRegistered",
        "Patient: events: PatientUpdated",
        f"Flag: {NOT_SAFEGUARDING}",
        "other types: 15 not supported",
    ],
    # SubscriptionStatus (R4B, not R4) and an entry without a resource
    "subscription-backport-ig-draft/notification_id_only_history_bundle.json": [
        "other types: 1 not supported"
    ],
    "uk-core/UKCore-DiagnosticReport-CTChestScan-Example.xml": [XML],
    "uk-core/UKCore-ImagingStudy-CTChestScan-Example.xml": [XML],
    "uk-core/UKCore-ServiceRequest-CTChestScan-Example.xml": [XML],
    "us-core/uscore_diagnosticreport_chest_xray_report.json": [
        NOT_AN_ORDER.format("DiagnosticReport")
    ],
    "us-core/uscore_patient_infant.json": ["events: PatientUpdated"],
    # imaging (SNOMED 363679005), but its reasonCode text needs the unresolved patient
    "us-core/uscore_servicerequest_chest_xray.json": [
        "required: an order with clinical details (reasonCode, note) needs a patient identifier"
    ],
}
FILES = sorted(p for p in CORPUS.rglob("*") if p.is_file()) if CORPUS.is_dir() else []
corpus = pytest.mark.skipif(
    not CORPUS.is_dir(), reason=f"corpus not found at {CORPUS} (CI has it beside the repo)"
)


def outcome(resource: Mapping[str, Any], **kwargs: Any) -> str:
    try:
        mapped = MAPPER.events(resource, NOW, **kwargs)
    except FhirMappingError as exc:
        assert exc.code in ("invalid", "required", "code-invalid", "not-supported")
        return f"{exc.code}: {exc.reason}"
    return "events: " + (" ".join(type(e).__name__ for e in mapped) or "(none)")


def corpus_resource(name: str) -> dict[str, Any]:
    return json.loads((CORPUS / name).read_text())


@pytest.mark.corpus
@corpus
def test_every_corpus_file_has_a_pinned_outcome() -> None:
    assert sorted(str(p.relative_to(CORPUS)) for p in FILES) == sorted(EXPECTED)


@pytest.mark.corpus
@corpus
@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(CORPUS)))
def test_corpus_file_maps_or_is_refused_with_a_reason(path: Path) -> None:
    try:
        resource = parse_json(path.read_bytes())
    except FhirMappingError as exc:
        outcomes = [f"{exc.code}: {exc.reason}"]
    else:
        if resource.get("resourceType") == "Bundle":
            refs = bundle_references(resource, MAPPER)
            outcomes, others = [], 0
            for _, entry in bundle_entries(resource):
                found = outcome(entry, patients=refs.patients, encounters=refs.encounters)
                if entry.get("resourceType") in SUPPORTED:
                    outcomes.append(f"{entry['resourceType']}: {found}")
                else:
                    assert found.startswith("not-supported: "), found
                    others += 1
            outcomes.append(f"other types: {others} not supported")
        else:
            outcomes = [outcome(resource)]
    assert outcomes == EXPECTED[str(path.relative_to(CORPUS))]


@pytest.mark.corpus
@corpus
def test_corpus_resources_map_once_their_references_are_resolved() -> None:
    """What the real examples say once the HTTP layer has resolved their patient and order
    references: read from the published elements, not from our fixtures."""
    patient = Patient((PatientIdentifier("12345", "urn:oid:1.2.36.146.595.217.0.1", "MR"),))
    patients = {"Patient/example": patient, "Patient/f001": patient, "Patient/f201": patient}
    (admitted,) = MAPPER.events(
        corpus_resource("hl7-fhir-r4-spec/encounter-example-emerg.json"), NOW, patients=patients
    )
    assert isinstance(admitted, PatientAdmitted) and admitted.encounter == "emerg"
    # ED first, admitted at 09:27 (+10:00) when the class became inpatient.
    assert admitted.occurred_at == datetime(2017, 2, 1, 9, 27, tzinfo=timezone(timedelta(hours=10)))
    assert admitted.visit.location == "Ward 1, Room 42, Bed 1"
    heart = corpus_resource("hl7-fhir-r4-spec/encounter-example-f001-heart.json")
    with pytest.raises(FhirMappingError, match=r"needs period\.end"):  # finished, but when?
        MAPPER.events(heart, NOW, patients=patients)
    heart["meta"] = {"lastUpdated": "2012-12-01T12:00:00+01:00"}
    (discharged,) = MAPPER.events(heart, NOW, patients=patients)
    assert isinstance(discharged, PatientDischarged) and discharged.encounter == "v1451"
    assert discharged.visit.disposition == "306689006" and discharged.visit.patient_class == "O"
    brain = corpus_resource("hl7-fhir-r4-spec/diagnosticreport-example-f201-brainct.json")
    brain["basedOn"] = [{"reference": "ServiceRequest/ct1"}]
    (report,) = MAPPER.events(brain, NOW, patients=patients)
    assert isinstance(report, ReportIssued) and report.status == "final"
    assert report.findings == ("SCT|188340000",) and report.section == "RAD"
    assert report.patient == patient and report.procedure_code == "429858000"
    xray = corpus_resource("us-core/uscore_servicerequest_chest_xray.json")
    ordered, note = MAPPER.events(xray, NOW, patients=patients)
    assert isinstance(ordered, ImagingOrdered) and ordered.order == OrderRef("chest-xray", "FHIR")
    assert ordered.encounter == "1036" and note.text == "Bicycle accident"
