"""Corpus invariant over real HTTP: every file in ../shared/corpus/fhir, sent to the endpoint
that fits it, is either taken (2xx) or answered with an OperationOutcome (4xx); none gives a
5xx. The answer of each is pinned (golden). The corpus is read in place, never copied.

Where each goes: a resource to `POST /fhir/{type}`; a transaction or batch Bundle to `POST
/fhir`; a message Bundle to `POST /fhir/$process-message`; anything else (another Bundle, a
type safetynet does not take, FHIR XML) to `POST /fhir/{type}` too. One server for all files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from adapters.store.schema import inbox
from tests.api_harness import ApiServer

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus" / "fhir"
FILES = sorted(p for p in CORPUS.rglob("*") if p.is_file()) if CORPUS.is_dir() else []

pytestmark = [
    pytest.mark.corpus,
    pytest.mark.skipif(
        not CORPUS.is_dir(), reason=f"corpus not found at {CORPUS} (CI has it beside the repo)"
    ),
]

# Per file, in name order on one server: the endpoint and the answer ("<status> <issue code>"
# for an error). The order matters where references do: patient-example-a.json names a patient
# that message-request-link.json carried (200: a new version), and the US Core chest X-ray
# order names the US Core infant sent just before it, so its clinical details have a patient.
# Unsupported types and Bundles that are neither transaction, batch nor message are kept and
# answered 404 not-supported (405 for Task, which has other methods); FHIR XML is refused
# before any route (415).
NO_ORDER = "422 required"  # a report or study naming no order (nothing to link it to)
NO_PATIENT = "422 required"  # Encounter.subject "Patient/example", never received
EXPECTED = {
    "hl7-fhir-r4-spec/bundle-transaction.json": "/ 400 required",  # a Patient without identifier
    "hl7-fhir-r4-spec/diagnosticreport-example-dxa.json": f"/DiagnosticReport {NO_ORDER}",
    "hl7-fhir-r4-spec/diagnosticreport-example-f201-brainct.json": f"/DiagnosticReport {NO_ORDER}",
    "hl7-fhir-r4-spec/diagnosticreport-example-ultrasound.json": f"/DiagnosticReport {NO_ORDER}",
    "hl7-fhir-r4-spec/encounter-example-emerg.json": f"/Encounter {NO_PATIENT}",
    "hl7-fhir-r4-spec/encounter-example-f001-heart.json": f"/Encounter {NO_PATIENT}",
    "hl7-fhir-r4-spec/encounter-example.json": f"/Encounter {NO_PATIENT}",
    "hl7-fhir-r4-spec/flag-example-encounter.json": "/Flag 422 not-supported",  # not safeguarding
    "hl7-fhir-r4-spec/flag-example.json": "/Flag 422 not-supported",
    "hl7-fhir-r4-spec/imagingstudy-example.json": f"/ImagingStudy {NO_ORDER}",
    "hl7-fhir-r4-spec/message-request-link.json": "/$process-message 200",
    "hl7-fhir-r4-spec/patient-example-a.json": "/Patient 200",
    "hl7-fhir-r4-spec/patient-example-newborn.json": "/Patient 422 required",  # no identifier
    "hl7-fhir-r4-spec/patient-example.json": "/Patient 201",
    "hl7-fhir-r4-spec/servicerequest-example-di.json": "/ServiceRequest 422 not-supported",
    "hl7-fhir-r4-spec/servicerequest-example.json": "/ServiceRequest 422 not-supported",
    "hl7-fhir-r4-spec/subscription-example.json": "/Subscription 404 not-supported",
    "hl7-fhir-r4-spec/task-example1.json": "/Task 405 not-supported",
    "hl7-fhir-r4-spec/task-example6.json": "/Task 405 not-supported",
    "microsoft-fhir-converter/ms_expected_adt_a11_01_batch_bundle.json": "/ 200",
    "nhs-bars/bars_validation_request_message_bundle.json": "/$process-message 200",
    "subscription-backport-ig-draft/notification_id_only_history_bundle.json": (
        "/Bundle 404 not-supported"
    ),
    "uk-core/UKCore-DiagnosticReport-CTChestScan-Example.xml": (
        "/DiagnosticReport 415 not-supported"
    ),
    "uk-core/UKCore-ImagingStudy-CTChestScan-Example.xml": "/ImagingStudy 415 not-supported",
    "uk-core/UKCore-ServiceRequest-CTChestScan-Example.xml": "/ServiceRequest 415 not-supported",
    "us-core/uscore_diagnosticreport_chest_xray_report.json": f"/DiagnosticReport {NO_ORDER}",
    "us-core/uscore_patient_infant.json": "/Patient 201",
    "us-core/uscore_servicerequest_chest_xray.json": "/ServiceRequest 201",
}


def endpoint(path: Path) -> tuple[str, str]:
    """(path under /fhir, Content-Type) a file is sent to."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".xml":
        found = re.search(r"<([A-Z][A-Za-z]+)[\s>]", text)
        return f"/{found.group(1) if found else 'Basic'}", "application/fhir+xml"
    try:
        value = json.loads(text)
    except ValueError:
        return "/Basic", "application/fhir+json"
    kind = value.get("resourceType", "Basic") if isinstance(value, dict) else "Basic"
    if kind == "Bundle":
        bundle_type = value.get("type")
        if bundle_type in ("transaction", "batch"):
            return "", "application/fhir+json"
        if bundle_type == "message":
            return "/$process-message", "application/fhir+json"
    return f"/{kind}", "application/fhir+json"


def verdict(answer: httpx.Response) -> str:
    """ "201", or "422 required": the status and, for an error, the issue code."""
    if answer.status_code < 400:
        return str(answer.status_code)
    body: dict[str, Any] = answer.json()
    assert body["resourceType"] == "OperationOutcome", body
    return f"{answer.status_code} {body['issue'][0]['code']}"


def test_every_corpus_file_is_taken_or_answered_with_an_operation_outcome(
    tmp_path: Path,
) -> None:
    got: dict[str, str] = {}
    with ApiServer(tmp_path / "api.db") as server:
        with server.client(server.token("corpus-feed", "feed")) as http:
            for path in FILES:
                where, media_type = endpoint(path)
                answer = http.post(
                    server.base + where,
                    content=path.read_bytes(),
                    headers={"Content-Type": media_type},
                )
                assert answer.status_code < 500, (path.name, answer.text)
                assert answer.headers["content-type"].startswith("application/fhir+json")
                got[str(path.relative_to(CORPUS))] = f"{where or '/'} {verdict(answer)}"
        server.drain()
        with server.store.begin(read_only=True) as uow:
            states = {row[0] for row in uow.connection.execute(select(inbox.c.state).distinct())}
    assert got == EXPECTED
    # What was taken was processed: nothing crashed the processor or is left waiting.
    assert states <= {"processed", "split", "quarantined", "unsupported"}, states
