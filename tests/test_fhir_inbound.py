"""FHIR R4 resources in over real HTTP (tests/api_harness.ApiServer: uvicorn on a free port, a
real store, the worker in a thread): create, update, transaction, batch and $process-message,
inbox first, and the same Tasks as the HL7 v2 version of the Derby-like scenario.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from fhir.resources.R4B.bundle import Bundle
from sqlalchemy import func, select

from adapters.bootstrap import build_replay_app
from adapters.fhir.inbound import SPLIT, FhirIngest
from adapters.store.operations import quarantine_items, retry
from adapters.store.schema import fhir_resources, inbox
from engine.ports import StoredTask
from tests.api_harness import ApiServer

ROOT = Path(__file__).resolve().parents[1]
DERBY_FHIR = ROOT / "tests" / "fixtures" / "fhir" / "derby"
DERBY_HL7 = ROOT / "tests" / "fixtures" / "hl7v2" / "derby"
RULES = ROOT / "rules"
FHIR_JSON = "application/fhir+json"
JSON_BODY = {"Content-Type": FHIR_JSON}
DERBY_RULES = {
    "imaging-pending-at-discharge",
    "report-final-after-discharge",
    "discrepancy-after-discharge",
}
# What the Derby patient's resources carry that must never come back in an error.
PATIENT_DATA = ("9990000018", "RX1000123", "Testbaby", "Alex", "2008-03-13", "V0001")

Summary = set[tuple[str, str, str, str, str]]


def base(http: httpx.Client) -> str:
    """The FHIR base itself (POST [base] is a transaction or batch)."""
    return str(http.base_url).rstrip("/")


def derby() -> list[dict[str, Any]]:
    """The Derby-like scenario as FHIR resources, in sending order."""
    return [json.loads(p.read_text()) for p in sorted(DERBY_FHIR.glob("*.json"))]


def summary(tasks: list[StoredTask]) -> Summary:
    return {(t.identifier, t.rule_id, t.priority, t.owner, t.status) for t in tasks}


def tasks_of(server: ApiServer) -> list[StoredTask]:
    server.drain()
    with server.store.begin(read_only=True) as uow:
        return uow.tasks()


def inbox_rows(server: ApiServer) -> list[Any]:
    with server.store.begin(read_only=True) as uow:
        return list(
            uow.connection.execute(
                select(inbox.c.id, inbox.c.state, inbox.c.raw, inbox.c.message_type).order_by(
                    inbox.c.id
                )
            )
        )


def entry(resource: dict[str, Any], method: str = "PUT") -> dict[str, Any]:
    kind, ident = resource["resourceType"], resource["id"]
    url = f"{kind}/{ident}" if method == "PUT" else kind
    return {
        "fullUrl": f"https://pas.rx1.example.org/fhir/{kind}/{ident}",
        "resource": resource,
        "request": {"method": method, "url": url},
    }


def transaction(resources: list[dict[str, Any]], kind: str = "transaction") -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": [entry(r) for r in resources]}


def message(resources: list[dict[str, Any]], ident: str = "derby-message-1") -> dict[str, Any]:
    header = {
        "resourceType": "MessageHeader",
        "id": "derby-header-1",
        "eventCoding": {"system": "urn:safetynet:test", "code": "derby"},
        "source": {"endpoint": "https://pas.rx1.example.org/fhir"},
    }
    entries = [{"fullUrl": "urn:uuid:7a1c2c4e-1f7e-4a43-9a64-8e6c7b6f0001", "resource": header}]
    entries += [{"fullUrl": entry(r)["fullUrl"], "resource": copy.deepcopy(r)} for r in resources]
    practitioner = {"resourceType": "Practitioner", "id": "c1001"}
    entries.append(
        {"fullUrl": "https://pas.rx1.example.org/fhir/Practitioner/c1001", "resource": practitioner}
    )
    return {"resourceType": "Bundle", "id": ident, "type": "message", "entry": entries}


def is_outcome(response: httpx.Response, status: int, code: str, where: str = "") -> dict[str, Any]:
    """The response is an OperationOutcome with `status`, issue `code` and (if given) an
    expression `where`, in application/fhir+json, naming no patient data."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(FHIR_JSON)
    body: dict[str, Any] = response.json()
    assert body["resourceType"] == "OperationOutcome", body
    issue = body["issue"][0]
    assert issue["severity"] == "error" and issue["code"] == code, issue
    assert issue["diagnostics"].strip()
    if where:
        assert issue.get("expression") == [where], issue
    for value in PATIENT_DATA:
        assert value not in response.text
    return body


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ApiServer]:
    with ApiServer(tmp_path / "api.db") as running:
        yield running


@pytest.fixture
def feed(server: ApiServer) -> Iterator[httpx.Client]:
    with server.client(server.token("pas-feed", "feed")) as http:
        yield http


# --- the Derby-like scenario: the same Tasks as HL7 v2 ------------------------------------


@pytest.fixture(scope="module")
def hl7_replay() -> dict[str, StoredTask]:
    """The Derby Tasks of `safetynet replay` on the HL7 v2 version (tests/test_fhir_mapping)."""
    app = build_replay_app("sqlite://", RULES)
    try:
        with app.store.begin() as uow:
            for path in sorted(DERBY_HL7.glob("*.hl7")):
                assert app.ingest.ingest(uow, path.read_text(), datetime.now(UTC)).ack_code == "AA"
            app.processor.fire_due(uow, app.clock.now())
            return {t.identifier: t for t in uow.tasks() if t.rule_id in DERBY_RULES}
    finally:
        app.close()


def send_one_by_one(http: httpx.Client) -> None:
    answers = [
        http.put(f"/{r['resourceType']}/{r['id']}", content=json.dumps(r), headers=JSON_BODY)
        for r in derby()
    ]
    assert [a.status_code for a in answers] == [201, 201, 201, 201, 200, 200]
    # The second Encounter and the final report are new versions of stored resources.
    assert answers[4].headers["location"].endswith("/fhir/Encounter/derby-visit/_history/2")
    assert answers[5].headers["etag"] == 'W/"2"'
    assert answers[5].json()["meta"]["versionId"] == "2"


def send_transaction(http: httpx.Client) -> None:
    answer = http.post(base(http), json=transaction(derby()), headers=JSON_BODY)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    Bundle.model_validate(body)
    assert body["type"] == "transaction-response"
    assert [e["response"]["status"] for e in body["entry"]] == [
        "201 Created",
        "201 Created",
        "201 Created",
        "201 Created",
        "200 OK",
        "200 OK",
    ]
    assert body["entry"][5]["response"]["location"] == "DiagnosticReport/derby-report/_history/2"


def send_message(http: httpx.Client) -> None:
    answer = http.post("/$process-message", json=message(derby()), headers=JSON_BODY)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    Bundle.model_validate(body)
    header, outcome = (e["resource"] for e in body["entry"])
    assert body["type"] == "message" and header["resourceType"] == "MessageHeader"
    assert header["response"]["identifier"] == "derby-header-1"
    assert header["response"]["code"] == "ok"
    assert header["response"]["details"]["reference"] == body["entry"][1]["fullUrl"]
    assert header["eventCoding"]["code"] == "derby"
    said = [i["diagnostics"] for i in outcome["issue"]]
    assert "Bundle.entry[6]: stored as DiagnosticReport/derby-report/_history/2" in said
    assert any("Practitioner is not used" in d for d in said)


@pytest.mark.parametrize(
    "send", [send_one_by_one, send_transaction, send_message], ids=lambda f: f.__name__
)
def test_the_derby_scenario_gives_the_hl7_tasks(
    send: Any, server: ApiServer, feed: httpx.Client, hl7_replay: dict[str, StoredTask]
) -> None:
    """The scenario's three Tasks, as replay raises them from the HL7 v2 messages. (Live,
    processing time reaches the wall clock, so the escalations of Tasks nobody accepted
    follow too: which ones depends on when the worker caught up, for HL7 v2 as for FHIR.)"""
    send(feed)
    raised = {t.identifier: t for t in tasks_of(server) if t.rule_id in DERBY_RULES}
    assert summary(list(raised.values())) == summary(list(hl7_replay.values()))
    assert {t.rule_id for t in raised.values()} == DERBY_RULES
    for identifier, task in raised.items():
        mine, theirs = task.resource, hl7_replay[identifier].resource
        for key in ("for", "owner", "encounter", "contained", "description", "priority"):
            assert mine.get(key) == theirs.get(key), key
    assert all(state in ("processed", SPLIT) for _, state, _, _ in inbox_rows(server))


# --- idempotency and versions -------------------------------------------------------------


def test_a_redelivery_is_answered_the_same_and_has_no_second_effect(
    server: ApiServer, feed: httpx.Client
) -> None:
    patient, encounter = derby()[:2]
    first = feed.post("/Patient", json=patient, headers=JSON_BODY)
    again = feed.post("/Patient", content=json.dumps(patient, indent=4), headers=JSON_BODY)
    assert first.status_code == again.status_code == 201
    assert first.headers["location"] == again.headers["location"]
    assert first.headers["location"].endswith("/fhir/Patient/derby-baby/_history/1")
    bundle = transaction([encounter])
    sent = feed.post(base(feed), json=bundle, headers=JSON_BODY)
    resent = feed.post(base(feed), json=bundle, headers=JSON_BODY)
    assert sent.status_code == resent.status_code == 200 and sent.json() == resent.json()
    # The encounter alone, already taken in the transaction: the same version, no new row.
    alone = feed.put("/Encounter/derby-visit", json=encounter, headers=JSON_BODY)
    assert alone.status_code == 201
    assert alone.headers["location"].endswith("/Encounter/derby-visit/_history/1")
    server.drain()
    rows = inbox_rows(server)
    assert [(r.message_type, r.state) for r in rows] == [
        ("Patient", "processed"),
        ("Bundle transaction", SPLIT),
        ("Encounter", "processed"),
    ]
    # Another sender's copy is another message (its ids are another server's).
    with server.client(server.token("other-feed", "feed")) as other:
        assert other.post("/Patient", json=patient, headers=JSON_BODY).status_code == 201
    with server.store.begin(read_only=True) as uow:
        count = uow.connection.execute(select(func.count()).select_from(fhir_resources))
        assert count.scalar_one() == 3


def test_a_resource_without_id_gets_one_from_its_content(feed: httpx.Client) -> None:
    patient = {k: v for k, v in derby()[0].items() if k not in ("id", "meta")}
    first = feed.post("/Patient", json=patient, headers=JSON_BODY)
    again = feed.post("/Patient", json=patient, headers=JSON_BODY)
    assert first.status_code == again.status_code == 201
    assert first.headers["location"] == again.headers["location"]
    assert first.json()["id"] in first.headers["location"]


def test_prefer_return_minimal_representation_and_operation_outcome(feed: httpx.Client) -> None:
    patient = derby()[0]
    minimal = feed.put(
        "/Patient/derby-baby", json=patient, headers={**JSON_BODY, "Prefer": "return=minimal"}
    )
    assert minimal.status_code == 201 and minimal.content == b""
    assert minimal.headers["location"].endswith("/Patient/derby-baby/_history/1")
    patient["gender"] = "unknown"
    told = feed.put(
        "/Patient/derby-baby",
        json=patient,
        headers={**JSON_BODY, "Prefer": "return=OperationOutcome"},
    )
    assert told.status_code == 200 and told.headers["content-type"].startswith(FHIR_JSON)
    issue = told.json()["issue"][0]
    assert issue["severity"] == "information"
    assert "Patient/derby-baby/_history/2" in issue["diagnostics"]
    patient["gender"] = "female"
    shown = feed.put(
        "/Patient/derby-baby", json=patient, headers={"Content-Type": "application/json"}
    )
    assert shown.status_code == 200 and shown.headers["etag"] == 'W/"3"'
    assert shown.json()["meta"]["versionId"] == "3" and shown.json()["gender"] == "female"


# --- references ---------------------------------------------------------------------------


def test_a_reference_to_a_patient_never_received_is_refused_then_retried(
    server: ApiServer, feed: httpx.Client
) -> None:
    """An Encounter must name its patient: `Patient/derby-baby` before the Patient came is
    refused (422, kept); retried from quarantine once the Patient has come, it is taken."""
    patient, encounter = derby()[:2]
    early = feed.put("/Encounter/derby-visit", json=encounter, headers=JSON_BODY)
    is_outcome(early, 422, "required", "Encounter.subject")
    assert feed.put("/Patient/derby-baby", json=patient, headers=JSON_BODY).status_code == 201
    server.drain()
    with server.store.begin() as uow:
        (item,) = quarantine_items(uow)
        assert item.message_type == "Encounter"
        retry(uow, item.id, datetime.now(UTC), "test")
    server.api.notify()
    server.drain()
    states = [(r.message_type, r.state) for r in inbox_rows(server)]
    assert states == [("Encounter", "processed"), ("Patient", "processed")]
    # Now known: the next version is version 2.
    encounter["meta"]["versionId"] = "2"
    later = feed.put("/Encounter/derby-visit", json=encounter, headers=JSON_BODY)
    assert later.status_code == 200 and later.headers["etag"] == 'W/"2"'


def test_a_refused_resource_sent_again_once_its_patient_came_is_taken(
    server: ApiServer, feed: httpx.Client
) -> None:
    patient, encounter = derby()[:2]
    refused = feed.put("/Encounter/derby-visit", json=encounter, headers=JSON_BODY)
    is_outcome(refused, 422, "required", "Encounter.subject")
    # Sent again as it was, before anything changed: the same answer.
    again = feed.put("/Encounter/derby-visit", json=encounter, headers=JSON_BODY)
    assert again.json() == refused.json()
    assert feed.put("/Patient/derby-baby", json=patient, headers=JSON_BODY).status_code == 201
    taken = feed.put("/Encounter/derby-visit", json=encounter, headers=JSON_BODY)
    assert taken.status_code == 201, taken.text
    server.drain()
    assert [r.state for r in inbox_rows(server)] == ["processed", "processed"]
    with server.store.begin(read_only=True) as uow:
        assert quarantine_items(uow) == []  # the review item was settled by the redelivery


def test_references_resolve_as_they_did_when_accepted(
    server: ApiServer, feed: httpx.Client
) -> None:
    """The worker maps a resource with what its references meant when it was accepted,
    even if the referenced resource changed before the worker took it."""
    patient, encounter = derby()[:2]
    changed = copy.deepcopy(patient)
    changed["identifier"] = [{"system": "urn:safetynet:authority:RX1", "value": "RX9"}]
    changed["meta"]["versionId"] = "2"
    with server.store.begin() as uow:  # accepted as the API does, the worker not yet woken
        ingest = server.parts.protocols["fhir"]
        assert isinstance(ingest, FhirIngest)
        answers = [
            ingest.accept_resource(uow, r, datetime.now(UTC), sender="pas-feed").status
            for r in (patient, encounter, changed)
        ]
    assert answers == [201, 201, 200]
    server.api.notify()
    server.drain()
    with server.store.begin(read_only=True) as uow:
        nhs = uow.patients_for(["https://fhir.nhs.uk/Id/nhs-number|9990000018"])
        now = uow.patients_for(["RX1|RX9"])
        visits = {key: [f.key for f in uow.facts(key)] for key in {*nhs.values(), *now.values()}}
    assert "encounter:V0001" in visits[next(iter(nhs.values()))]
    assert "encounter:V0001" not in visits[next(iter(now.values()))]


# --- Bundles ------------------------------------------------------------------------------


def test_a_transaction_is_all_or_nothing(server: ApiServer, feed: httpx.Client) -> None:
    resources = derby()
    resources[4]["status"] = "bogus"
    text = json.dumps(transaction(resources))
    answer = feed.post(base(feed), content=text, headers=JSON_BODY)
    body = is_outcome(answer, 400, "code-invalid", "Bundle.entry[4].resource.status")
    assert body["issue"][0]["diagnostics"].startswith("Bundle.entry[4]: Encounter.status is")
    assert "nothing in the transaction was stored" in body["issue"][0]["diagnostics"]
    assert tasks_of(server) == []
    (row,) = inbox_rows(server)  # the Bundle alone, kept as sent, for review
    assert (row.state, row.raw, row.message_type) == ("quarantined", text, "Bundle transaction")
    with server.store.begin(read_only=True) as uow:
        (item,) = quarantine_items(uow)
        assert item.location == "Bundle.entry[4].resource.status"
        assert (
            uow.connection.execute(select(func.count()).select_from(fhir_resources)).scalar() == 0
        )


def test_a_transaction_entry_must_say_what_to_do(feed: httpx.Client) -> None:
    patient = derby()[0]
    wrong_id = transaction([patient])
    wrong_id["entry"][0]["request"]["url"] = "Patient/someone-else"
    is_outcome(
        feed.post(base(feed), json=wrong_id, headers=JSON_BODY),
        400,
        "invalid",
        "Bundle.entry[0].resource.id",
    )
    read = transaction([patient])
    read["entry"].append({"request": {"method": "GET", "url": "Patient?identifier=x"}})
    is_outcome(
        feed.post(base(feed), json=read, headers=JSON_BODY),
        400,
        "not-supported",
        "Bundle.entry[1].request.method",
    )


def test_urn_uuid_references_between_transaction_entries(
    server: ApiServer, feed: httpx.Client
) -> None:
    patient, encounter = derby()[:2]
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:0d9e3c35-5a7e-4f55-9c3c-111111111111",
                "resource": patient,
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "fullUrl": "urn:uuid:0d9e3c35-5a7e-4f55-9c3c-222222222222",
                "resource": {
                    **encounter,
                    "subject": {"reference": "urn:uuid:0d9e3c35-5a7e-4f55-9c3c-111111111111"},
                },
                "request": {"method": "POST", "url": "Encounter"},
            },
        ],
    }
    answer = feed.post(base(feed), json=bundle, headers=JSON_BODY)
    assert answer.status_code == 200, answer.text
    server.drain()
    assert [r.state for r in inbox_rows(server)] == [SPLIT, "processed", "processed"]


def test_a_batch_takes_each_entry_on_its_own(server: ApiServer, feed: httpx.Client) -> None:
    patient, encounter = derby()[:2]
    bad = {**encounter, "status": "bogus"}
    observation = {
        "resourceType": "Observation",
        "id": "o1",
        "status": "final",
        "code": {"text": "x"},
    }
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            entry(patient),
            entry(bad),
            entry(observation, "POST"),
            {"request": {"method": "GET", "url": "Patient/derby-baby"}},
            entry(encounter),
        ],
    }
    answer = feed.post(base(feed), json=bundle, headers=JSON_BODY)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    Bundle.model_validate(body)
    responses = [e["response"] for e in body["entry"]]
    assert body["type"] == "batch-response"
    assert [r["status"] for r in responses] == [
        "201 Created",
        "422 Unprocessable Entity",
        "404 Not Found",
        "405 Method Not Allowed",
        "201 Created",
    ]
    assert responses[1]["outcome"]["issue"][0]["expression"] == ["Encounter.status"]
    assert responses[2]["outcome"]["issue"][0]["code"] == "not-supported"
    assert responses[4]["location"] == "Encounter/derby-visit/_history/1"
    server.drain()
    states = [(r.message_type, r.state) for r in inbox_rows(server)]
    assert states == [
        ("Bundle batch", SPLIT),
        ("Patient", "processed"),
        ("Encounter", "quarantined"),  # kept for review
        ("Observation", "unsupported"),  # kept; nobody needs to review it
        ("entry", "unsupported"),
        ("Encounter", "processed"),
    ]


def test_message_errors(server: ApiServer, feed: httpx.Client) -> None:
    resources = derby()
    headless = message(resources)
    headless["entry"] = headless["entry"][1:]
    is_outcome(
        feed.post("/$process-message", json=headless, headers=JSON_BODY),
        400,
        "required",
        "Bundle.entry[0].resource",
    )
    is_outcome(
        feed.post("/$process-message", json=transaction(resources), headers=JSON_BODY),
        400,
        "invalid",
        "Bundle.type",
    )
    is_outcome(
        feed.post(base(feed), json=message(resources), headers=JSON_BODY),
        422,
        "not-supported",
        "Bundle.type",
    )
    broken = message(resources[:2], ident="derby-message-2")
    del broken["entry"][1]["resource"]["identifier"]  # the Patient: an identifier is required
    answer = feed.post("/$process-message", json=broken, headers=JSON_BODY)
    is_outcome(answer, 422, "required", "Bundle.entry[1].resource.identifier")
    # A message whose orders are not imaging: taken, the order ignored and said so.
    lab = copy.deepcopy(resources[2])
    lab["category"] = [{"coding": [{"system": "http://snomed.info/sct", "code": "108252007"}]}]
    lab["code"] = {"text": "Full blood count"}
    taken = feed.post(
        "/$process-message", json=message([resources[0], lab], "m3"), headers=JSON_BODY
    )
    assert taken.status_code == 200
    notes = taken.json()["entry"][1]["resource"]["issue"]
    assert [n["severity"] for n in notes] == ["warning", "information", "information"]
    assert "not an imaging request" in notes[0]["diagnostics"]
    server.drain()
    kept = [(r.message_type, r.state) for r in inbox_rows(server)]
    assert kept[:4] == [
        ("Bundle message", "quarantined"),
        ("Bundle transaction", "quarantined"),
        ("Bundle message", "unsupported"),
        ("Bundle message", "quarantined"),
    ]


# --- errors -------------------------------------------------------------------------------


def test_bodies_that_are_not_fhir_json(server: ApiServer, feed: httpx.Client) -> None:
    is_outcome(
        feed.post("/Patient", content=b'{"resourceType": "Patient",', headers=JSON_BODY),
        400,
        "invalid",
    )
    is_outcome(feed.post("/Patient", content=b"[1, 2]", headers=JSON_BODY), 400, "invalid")
    is_outcome(
        feed.post("/Patient", json={"id": "x"}, headers=JSON_BODY), 400, "required", "resourceType"
    )
    is_outcome(
        feed.post("/Patient", json=derby()[1], headers=JSON_BODY), 400, "invalid", "resourceType"
    )
    invalid = {**derby()[0], "birthDate": "the thirteenth of March"}
    is_outcome(
        feed.post("/Patient", json=invalid, headers=JSON_BODY), 400, "invalid", "Patient.birthDate"
    )
    xml = b'<Patient xmlns="http://hl7.org/fhir"><id value="x"/></Patient>'
    is_outcome(feed.post("/Patient", content=xml, headers=JSON_BODY), 415, "not-supported")
    refused = feed.post("/Patient", content=xml, headers={"Content-Type": "application/fhir+xml"})
    is_outcome(refused, 415, "not-supported")
    kept = inbox_rows(server)
    assert kept[0].raw == '{"resourceType": "Patient",'
    assert xml.decode() in [r.raw for r in kept]
    assert {r.state for r in kept} == {"quarantined", "unsupported"}


def test_put_needs_the_url_id_in_the_body(feed: httpx.Client) -> None:
    patient = derby()[0]
    is_outcome(
        feed.put("/Patient/someone-else", json=patient, headers=JSON_BODY),
        400,
        "invalid",
        "Patient.id",
    )
    anonymous = {k: v for k, v in patient.items() if k != "id"}
    is_outcome(
        feed.put("/Patient/derby-baby", json=anonymous, headers=JSON_BODY),
        400,
        "invalid",
        "Patient.id",
    )


def test_unsupported_types_and_business_checks(server: ApiServer, feed: httpx.Client) -> None:
    observation = {"resourceType": "Observation", "status": "final", "code": {"text": "x"}}
    before = len(inbox_rows(server))
    unknown = feed.post("/Observation", json=observation, headers=JSON_BODY)
    is_outcome(unknown, 404, "not-supported", "Observation")
    again = feed.put("/Observation/o1", json={**observation, "id": "o1"}, headers=JSON_BODY)
    is_outcome(again, 404, "not-supported", "Observation")
    kept = inbox_rows(server)[before:]  # a type not taken is still kept, as HL7 v2 keeps one
    assert [(row.state, json.loads(row.raw)["resourceType"]) for row in kept] == [
        ("unsupported", "Observation"),
        ("unsupported", "Observation"),
    ]
    task = feed.post("/Task", json={"resourceType": "Task"}, headers=JSON_BODY)
    is_outcome(task, 405, "not-supported", "")
    encounter = {**derby()[1], "status": "bogus"}
    is_outcome(
        feed.put("/Encounter/derby-visit", json=encounter, headers=JSON_BODY),
        422,
        "code-invalid",
        "Encounter.status",
    )
    flag = {
        "resourceType": "Flag",
        "id": "f1",
        "status": "active",
        "code": {"text": "x"},
        "subject": {"reference": "Patient/derby-baby"},
    }
    is_outcome(
        feed.post("/Flag", json=flag, headers=JSON_BODY), 422, "not-supported", "Flag.category"
    )
    server.drain()
    with server.store.begin(read_only=True) as uow:
        (item,) = quarantine_items(uow)  # the bogus status; the Flag is unsupported, not wrong
        assert item.location == "Encounter.status" and item.message_type == "Encounter"


def test_a_feed_token_is_needed(server: ApiServer) -> None:
    patient = derby()[0]
    with server.client() as anonymous:
        is_outcome(anonymous.post("/Patient", json=patient, headers=JSON_BODY), 401, "login")
    clinician = server.token("dr-who", "clinician", practitioner="C9001")
    with server.client(clinician) as http:
        for answer in (
            http.post("/Patient", json=patient, headers=JSON_BODY),
            http.put("/Patient/derby-baby", json=patient, headers=JSON_BODY),
            http.post(base(http), json=transaction([patient]), headers=JSON_BODY),
            http.post("/$process-message", json=message([patient]), headers=JSON_BODY),
        ):
            is_outcome(answer, 403, "forbidden")
    assert inbox_rows(server) == []
    with server.client(server.token("root", "admin")) as admin:
        assert admin.post("/Patient", json=patient, headers=JSON_BODY).status_code == 201


def test_hostile_bodies_are_refused_and_nothing_reaches_the_processor(database_url: str) -> None:
    """Nesting, NUL and control characters (FHIR strings may not hold them, PostgreSQL
    cannot store NUL), ids too long for an index: 400, kept, never a 5xx."""
    patient = derby()[0]
    nul = {**patient, "identifier": [{"system": "urn:x", "value": "a\u0000b"}]}
    bodies = {
        b'{"resourceType":"Patient","x":' + b"[" * 5000 + b"]" * 5000 + b"}": "",
        json.dumps(nul).encode(): "Patient.identifier[0].value",
        json.dumps({**patient, "id": "x" * 20000}).encode(): "Patient.id",
        b'{"resourceType":"Patient",\x00}': "",
        b'{"resourceType":"Patient","id":"\xff\xfe"}': "Patient.id",
    }
    with ApiServer(database_url) as server, server.client(server.token("f", "feed")) as http:
        for body, where in bodies.items():
            is_outcome(
                http.post("/Patient", content=body, headers=JSON_BODY), 400, "invalid", where
            )
        sent = message([nul])
        is_outcome(
            http.post("/$process-message", json=sent, headers=JSON_BODY),
            400,
            "invalid",
            "Bundle.entry[1].resource.identifier[0].value",
        )
        server.drain()
        assert {r.state for r in inbox_rows(server)} == {"quarantined"}
        assert len(inbox_rows(server)) == len(bodies) + 1


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_the_derby_scenario_on_postgresql(database_url: str) -> None:
    """The version upsert and the FHIR tables on the other backend."""
    with ApiServer(database_url) as server, server.client(server.token("f", "feed")) as http:
        send_one_by_one(http)
        assert {t.rule_id for t in tasks_of(server)} >= DERBY_RULES
