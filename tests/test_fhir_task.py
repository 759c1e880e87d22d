"""The FHIR R4 Task rendering of a RecallTask."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fhir.resources.R4B.task import Task

from adapters.fhir.task import task_resource, task_restatus
from engine.events import Clinician
from engine.processor import StatusUpdate
from engine.tasks import OrderFocus, RecallTask, task_identifier


def recall(**changes: object) -> RecallTask:
    at = datetime(2008, 5, 1, 13, 15, tzinfo=UTC)
    base = dict(
        identifier=task_identifier("imaging-pending-at-discharge", "PLAC|RIS|ORD-1", "t"),
        rule_id="imaging-pending-at-discharge",
        rule_title="Imaging pending at discharge",
        rule_version="1.0.0",
        rule_uri="urn:safetynet:rule:imaging-pending-at-discharge|1.0.0",
        priority="urgent",
        description="A sentence.",
        reason="Imaging pending",
        owner=Clinician("C1001", "Dr Ada Testdoctor", "GMC"),
        owner_is_pool=False,
        patient_system="RX1",
        patient_value="RX1000123",
        patient_is_nhs=False,
        encounter="V1",
        focus=OrderFocus("ORD-1", "RIS", "", "", "XSK", "XR skeletal survey"),
        authored_on=at,
        deadline=at + timedelta(hours=24),
    )
    base.update(changes)
    return RecallTask(**base)  # type: ignore[arg-type]


def test_identifiers_are_deterministic_and_never_use_the_patient_key() -> None:
    a = task_identifier("r", "PLAC|RIS|ORD-1", "discharge:V1:1")
    assert a == task_identifier("r", "PLAC|RIS|ORD-1", "discharge:V1:1")
    assert a != task_identifier("r", "PLAC|RIS|ORD-1", "discharge:V1:2")
    assert a != task_identifier("q", "PLAC|RIS|ORD-1", "discharge:V1:1")


def test_a_local_patient_and_a_practitioner_owner() -> None:
    resource = task_resource(recall())
    Task.model_validate(resource)
    assert resource["for"]["identifier"] == {
        "system": "urn:safetynet:authority:RX1",
        "value": "RX1000123",
    }
    assert resource["owner"]["type"] == "Practitioner"
    assert resource["owner"]["identifier"]["system"] == "https://fhir.hl7.org.uk/Id/gmc-number"
    assert resource["code"]["coding"][0] == {
        "system": "urn:safetynet:rule",
        "code": "imaging-pending-at-discharge",
        "display": "Imaging pending at discharge",
    }
    assert [i["type"]["coding"][0]["code"] for i in resource["contained"][0]["identifier"]] == [
        "PLAC"
    ]
    assert "partOf" not in resource and "meta" not in resource


def test_a_pool_owner_a_parent_task_and_shadow_mode() -> None:
    pool = Clinician("SAFETYNET-RESULTS-POOL", "Results pool", "urn:safetynet:pool")
    resource = task_resource(
        recall(
            owner=pool,
            owner_is_pool=True,
            part_of="parent-1",
            shadow=True,
            patient_is_nhs=True,
            patient_value="9990000018",
        )
    )
    assert resource["owner"]["type"] == "CareTeam"
    assert resource["owner"]["identifier"]["system"] == "urn:safetynet:pool"
    assert resource["partOf"][0]["reference"] == "Task/parent-1"
    assert resource["meta"]["tag"][0]["code"] == "shadow"
    assert resource["for"]["identifier"]["system"] == "https://fhir.nhs.uk/Id/nhs-number"


def test_a_task_about_no_order_with_inputs_an_escalation_level_and_safeguarding() -> None:
    resource = task_resource(
        recall(
            focus=None,
            inputs=(("Words recorded", "grip marks"), ("Concept", "bruise")),
            level=2,
            safeguarding=True,
        )
    )
    Task.model_validate(resource)
    assert "contained" not in resource and "focus" not in resource
    assert resource["input"] == [
        {"type": {"text": "Words recorded"}, "valueString": "grip marks"},
        {"type": {"text": "Concept"}, "valueString": "bruise"},
    ]
    assert resource["businessStatus"]["coding"][0]["code"] == "escalation-L2"
    assert resource["meta"]["tag"] == [{"system": "urn:safetynet:tag", "code": "safeguarding"}]


def test_a_result_held_unmatched_has_no_patient_but_keeps_its_order() -> None:
    resource = task_resource(recall(patient_value="", patient_system=""))
    Task.model_validate(resource)
    assert "for" not in resource
    assert resource["contained"][0]["subject"] == {
        "display": "Patient not yet identified (result held unmatched)"
    }


def test_status_changes_keep_the_reason_the_note_and_who_and_a_merge_repoints_the_patient() -> None:
    at = datetime(2008, 5, 2, 9, 0, tzinfo=UTC)
    raised = task_resource(recall())
    cancelled = task_restatus(
        raised, StatusUpdate("cancelled", at, "", reason="Discharge cancelled")
    )
    assert (cancelled["status"], cancelled["statusReason"]) == (
        "cancelled",
        {"text": "Discharge cancelled"},
    )
    assert cancelled["lastModified"].startswith("2008-05-02T09:00:00")
    done = task_restatus(raised, StatusUpdate("completed", at, "C1001", note="Family called back"))
    assert done["note"] == [
        {"text": "Family called back", "time": done["note"][0]["time"], "authorString": "C1001"}
    ]
    moved = task_restatus(
        raised, StatusUpdate("requested", at, "", patient=("NHS", "9990000018", True))
    )
    assert moved["for"]["identifier"] == {
        "system": "https://fhir.nhs.uk/Id/nhs-number",
        "value": "9990000018",
    }
    assert moved["contained"][0]["subject"] == moved["for"]
    assert moved["input"] == [
        {
            "type": {"text": "Patient identifier before the merge"},
            "valueString": "urn:safetynet:authority:RX1|RX1000123",
        }
    ]


def test_authority_of_is_the_inverse_of_authority_system() -> None:
    from adapters.fhir.task import authority_of, authority_system

    for authority in ("RIS", "PACS", "GMC", "NMC", "NHS", "RX1"):
        assert authority_of(authority_system(authority)) == authority
    assert authority_of("https://example.org/ids") == "https://example.org/ids"
