"""Render the engine's RecallTask as a FHIR R4 Task (validated with fhir.resources' R4B model).

Shape (DESIGN.md "FHIR R4"): `for` the NHS number when known, else the local identifier;
`focus` a contained ServiceRequest with the placer (PLAC) and filler (FILL) numbers; `owner`
the clinician's identifier from the XCN with its assigning authority; `code` the rule;
`instantiatesUri` rule id and version; a deterministic `identifier`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from fhir.resources.R4B.task import Task

from engine.events import NHS_NUMBER_SYSTEM
from engine.processor import StatusUpdate
from engine.tasks import RecallTask

TASK_SYSTEM = "urn:safetynet:task"
TAG_SYSTEM = "urn:safetynet:tag"
BUSINESS_SYSTEM = "urn:safetynet:business-status"
RULE_SYSTEM = "urn:safetynet:rule"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
# Assigning authorities with a published FHIR identifier system; others get a local URN.
KNOWN_AUTHORITIES = {
    "NHS": NHS_NUMBER_SYSTEM,
    "GMC": "https://fhir.hl7.org.uk/Id/gmc-number",
    "NMC": "https://fhir.hl7.org.uk/Id/nmc-number",
}
_AUTHORITY_OF = {system: authority for authority, system in KNOWN_AUTHORITIES.items()}
AUTHORITY_PREFIX = "urn:safetynet:authority:"  # the local URN of any other authority


def authority_system(authority: str) -> str:
    """The identifier system for an HL7 assigning authority (CX.4 / XCN.9)."""
    if authority in KNOWN_AUTHORITIES:
        return KNOWN_AUTHORITIES[authority]
    if authority.startswith(("http://", "https://", "urn:")):
        return authority
    return f"{AUTHORITY_PREFIX}{authority or 'unknown'}"


def authority_of(system: str | None) -> str:
    """The HL7 assigning authority for an identifier system: the inverse of
    `authority_system`, so that FHIR and HL7 v2 feeds name patients, orders and clinicians
    alike (`urn:safetynet:authority:RIS` -> "RIS", the GMC number system -> "GMC")."""
    system = (system or "").strip()
    if system.startswith(AUTHORITY_PREFIX):
        return system[len(AUTHORITY_PREFIX) :]
    return _AUTHORITY_OF.get(system, system)


def _typed(code: str, system: str, value: str) -> dict[str, Any]:
    return {
        "type": {"coding": [{"system": V2_0203, "code": code}]},
        "system": system,
        "value": value,
    }


def task_resource(task: RecallTask) -> dict[str, Any]:
    """The FHIR R4 Task JSON for a RecallTask."""
    patient = {
        "type": "Patient",
        "identifier": {
            "system": NHS_NUMBER_SYSTEM
            if task.patient_is_nhs
            else authority_system(task.patient_system),
            "value": task.patient_value,
        },
    }
    contained: list[dict[str, Any]] = []
    if task.focus is not None:
        contained.append(_service_request(task, patient))
    owner = task.owner
    resource: dict[str, Any] = {
        "resourceType": "Task",
        "id": task.identifier,
        "identifier": [{"system": TASK_SYSTEM, "value": task.identifier}],
        "instantiatesUri": task.rule_uri,
        **({"contained": contained} if contained else {}),
        "status": task.status,
        "intent": "order",
        "priority": task.priority,
        "code": {
            "coding": [{"system": RULE_SYSTEM, "code": task.rule_id, "display": task.rule_title}]
        },
        "description": task.description,
        **({"focus": {"reference": "#order", "type": "ServiceRequest"}} if contained else {}),
        **({"for": patient} if task.patient_value else {}),
        "authoredOn": task.authored_on.isoformat(),
        "lastModified": task.authored_on.isoformat(),
        "requester": {"type": "Device", "display": "safetynet"},
        "owner": {
            "type": "CareTeam" if task.owner_is_pool else "Practitioner",
            "identifier": {
                "system": authority_system(owner.authority),
                "value": owner.id,
                **({"assigner": {"display": owner.authority}} if owner.authority else {}),
            },
            **({"display": owner.name} if owner.name else {}),
        },
        "reasonCode": {"text": task.reason},
        "restriction": {"period": {"end": task.deadline.isoformat()}},
    }
    if task.encounter:
        resource["encounter"] = {
            "type": "Encounter",
            "identifier": {
                "type": {"coding": [{"system": V2_0203, "code": "VN"}]},
                "value": task.encounter,
            },
        }
    if task.part_of:
        resource["partOf"] = [
            {
                "reference": f"Task/{task.part_of}",
                "type": "Task",
                "identifier": {"system": TASK_SYSTEM, "value": task.part_of},
            }
        ]
    if task.inputs:
        resource["input"] = [
            {"type": {"text": label}, "valueString": text} for label, text in task.inputs
        ]
    if task.level:
        resource["businessStatus"] = {
            "coding": [{"system": BUSINESS_SYSTEM, "code": f"escalation-L{task.level}"}],
            "text": f"Escalation level {task.level}",
        }
    tags = [
        code for code, on in (("shadow", task.shadow), ("safeguarding", task.safeguarding)) if on
    ]
    if tags:
        resource["meta"] = {"tag": [{"system": TAG_SYSTEM, "code": code} for code in tags]}
    return _validated(resource)


def _validated(resource: Mapping[str, Any]) -> dict[str, Any]:
    """Validate against the R4B model (it does not check value sets; ours are fixed here)."""
    validated = Task.model_validate(resource)
    out: dict[str, Any] = json.loads(validated.model_dump_json(by_alias=True, exclude_none=True))
    return out


def _service_request(task: RecallTask, patient: Mapping[str, Any]) -> dict[str, Any]:
    """The order the Task is about, contained, with its placer and filler numbers."""
    focus = task.focus
    assert focus is not None
    order_ids = []
    if focus.placer:
        order_ids.append(_typed("PLAC", authority_system(focus.placer_ns), focus.placer))
    if focus.filler:
        order_ids.append(_typed("FILL", authority_system(focus.filler_ns), focus.filler))
    service_request: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "id": "order",
        "identifier": order_ids,
        "status": "unknown",
        "intent": "order",
        # ServiceRequest.subject is 1..1: a result held unmatched (R14) has no patient yet.
        "subject": patient
        if task.patient_value
        else {"display": "Patient not yet identified (result held unmatched)"},
    }
    if focus.code or focus.name:
        coding = {"system": "urn:safetynet:procedure", "code": focus.code or focus.name}
        if focus.name:
            coding["display"] = focus.name
        service_request["code"] = {"coding": [coding], "text": focus.name or focus.code}
    return service_request


def task_restatus(resource: Mapping[str, Any], update: StatusUpdate) -> dict[str, Any]:
    """The stored Task JSON after a status change: `status`, `lastModified`, the reason
    (`statusReason`) or what was done (`note`, with who and when)."""
    out = dict(resource)
    out["status"] = update.status
    out["lastModified"] = update.at.isoformat()
    if update.reason:
        out["statusReason"] = {"text": update.reason}
    if update.note:
        note: dict[str, Any] = {"text": update.note, "time": update.at.isoformat()}
        if update.by:
            note["authorString"] = update.by
        out["note"] = [*resource.get("note", []), note]
    if update.business_status:
        out["businessStatus"] = {"text": update.business_status}
    if update.patient is not None:
        system, value, is_nhs = update.patient
        new = {
            "type": "Patient",
            "identifier": {
                "system": NHS_NUMBER_SYSTEM if is_nhs else authority_system(system),
                "value": value,
            },
        }
        before = resource.get("for", {}).get("identifier", {})
        if before and before != new["identifier"]:
            out["input"] = [
                *resource.get("input", []),
                {
                    "type": {"text": "Patient identifier before the merge"},
                    "valueString": f"{before.get('system', '')}|{before.get('value', '')}",
                },
            ]
        out["for"] = new
        for contained in out.get("contained", []):
            if contained.get("resourceType") == "ServiceRequest":
                contained["subject"] = new
    return _validated(out)
