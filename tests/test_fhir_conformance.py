"""The FHIR API as a whole, on a real port: what it says it supports (CapabilityStatement,
OpenAPI) is what it serves, it speaks FHIR JSON only (415/406 otherwise), and schemathesis,
driving every documented operation with generated input, finds no 5xx and no answer that
breaks its documented schema or media type.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy import func, select

from adapters.fhir.capability import inventory
from adapters.store.schema import inbox
from tests.api_harness import ApiServer

ROOT = Path(__file__).resolve().parents[1]
DERBY = ROOT / "tests" / "fixtures" / "fhir" / "derby"
FHIR_JSON = "application/fhir+json"
INBOUND_TYPES = (
    "Encounter",
    "ServiceRequest",
    "DiagnosticReport",
    "ImagingStudy",
    "Patient",
    "Flag",
)
TASK_SEARCH = {"owner", "patient", "status", "priority", "code", "_lastUpdated"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """The API on a real port, holding the Tasks of the Derby-like scenario."""
    with ApiServer(tmp_path_factory.mktemp("conformance") / "api.db") as running:
        feed = running.token("conformance-seed", "feed")
        with running.client(feed) as http:
            for path in sorted(DERBY.glob("*.json")):
                resource = json.loads(path.read_text())
                answer = http.put(f"/{resource['resourceType']}/{resource['id']}", json=resource)
                assert answer.status_code in (200, 201), (path.name, answer.text)
        running.drain()
        yield running


@pytest.fixture(scope="module")
def task_ids(server: ApiServer, admin: str) -> list[str]:
    with server.client(admin) as http:
        bundle = http.get("/Task").json()
    ids = sorted(entry["resource"]["id"] for entry in bundle.get("entry", []))
    assert ids, bundle
    return ids


@pytest.fixture(scope="module")
def admin(server: ApiServer) -> str:
    return server.token("conformance-admin", "admin")


@pytest.fixture(scope="module")
def statement(server: ApiServer) -> dict[str, Any]:
    answer = httpx.get(f"{server.base}/metadata", timeout=10)  # no token: it is public
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith(FHIR_JSON)
    body: dict[str, Any] = answer.json()
    return body


@pytest.fixture(scope="module")
def openapi(server: ApiServer) -> dict[str, Any]:
    answer = httpx.get(f"{server.root}/openapi.json", timeout=10)
    assert answer.status_code == 200
    document: dict[str, Any] = answer.json()
    return document


def _outcome(answer: httpx.Response, status: int) -> str:
    """The diagnostics of an OperationOutcome answer with `status` (asserted)."""
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith(FHIR_JSON)
    body = answer.json()
    assert body["resourceType"] == "OperationOutcome"
    diagnostics: str = body["issue"][0]["diagnostics"]
    assert diagnostics
    return diagnostics


# --- the CapabilityStatement -----------------------------------------------------------------


def test_capability_statement_is_a_valid_r4_statement_of_json_only(
    statement: dict[str, Any],
) -> None:
    CapabilityStatement.model_validate(statement)
    assert statement["fhirVersion"] == "4.0.1"
    assert statement["kind"] == "instance"
    assert set(statement["format"]) == {"json", FHIR_JSON}
    assert not any("xml" in f for f in statement["format"])
    rest = statement["rest"][0]
    assert rest["mode"] == "server"
    security = rest["security"]
    assert security["service"][0]["coding"][0]["code"] == "OAuth"
    assert "bearer" in security["description"].lower()
    assert "not smart" in security["description"].lower()
    assert statement["patchFormat"] == ["application/json-patch+json"]


def test_capability_statement_lists_what_the_issue_asks_for(statement: dict[str, Any]) -> None:
    rest = statement["rest"][0]
    resources = {r["type"]: r for r in rest["resource"]}
    assert set(resources) == {*INBOUND_TYPES, "Task"}
    for kind in INBOUND_TYPES:
        assert {i["code"] for i in resources[kind]["interaction"]} == {"create", "update"}
        assert resources[kind]["updateCreate"] is True
    task = resources["Task"]
    assert {i["code"] for i in task["interaction"]} == {"read", "search-type", "update", "patch"}
    params = {p["name"]: p["type"] for p in task["searchParam"]}
    assert set(params) >= TASK_SEARCH
    assert params["owner"] == "reference"
    assert params["_lastUpdated"] == "date"
    assert params["status"] == "token"
    assert "_count" not in params  # a result parameter, not a search parameter
    assert {i["code"] for i in rest["interaction"]} == {"transaction", "batch"}
    operations = {o["name"]: o["definition"] for o in rest["operation"]}
    assert operations["process-message"].endswith("MessageHeader-process-message")
    assert "subscription-notification" in operations
    assert set(operations) == {"process-message", "subscription-notification"}


def _claims(statement: dict[str, Any]) -> set[tuple[str, str]]:
    rest = statement["rest"][0]
    claims = {("", i["code"]) for i in rest.get("interaction", [])}
    claims |= {("", "$" + o["name"]) for o in rest.get("operation", [])}
    for resource in rest["resource"]:
        claims |= {(resource["type"], i["code"]) for i in resource.get("interaction", [])}
        claims |= {(resource["type"], "$" + o["name"]) for o in resource.get("operation", [])}
    return claims


def _served(openapi: dict[str, Any]) -> set[tuple[str, str]]:
    """What the OpenAPI document says is served, read independently of the generator."""
    served: set[tuple[str, str]] = set()
    for path, item in openapi["paths"].items():
        if not path.startswith("/fhir") or path == "/fhir/metadata":
            continue
        parts = [p for p in path.split("/")[2:] if p]
        for method in item:
            if not parts:
                assert method == "post", path
                served |= {("", "transaction"), ("", "batch")}
            elif parts[0].startswith("$"):
                served.add(("", parts[0]))
            elif len(parts) == 1:
                served.add((parts[0], {"post": "create", "get": "search-type"}[method]))
            else:
                assert len(parts) == 2 and parts[1].startswith("{"), path
                code = {"get": "read", "put": "update", "patch": "patch", "delete": "delete"}
                served.add((parts[0], code[method]))
    return served


def test_capability_statement_lists_exactly_the_routes(
    server: ApiServer, statement: dict[str, Any], openapi: dict[str, Any]
) -> None:
    found = inventory(server.app.routes)
    assert found.unread == (), "routes under /fhir the CapabilityStatement cannot describe"
    assert _claims(statement) == _served(openapi)


def test_every_claimed_interaction_is_served_and_nothing_else(
    server: ApiServer, admin: str, statement: dict[str, Any]
) -> None:
    """Each claim answers something other than "no such route" (an empty body earns a 400 or
    422 from the handler itself); interactions not claimed are 404/405 from the router."""
    routing = {"Not Found", "Method Not Allowed"}
    probes = {
        "create": ("POST", "/{type}"),
        "update": ("PUT", "/{type}/probe-1"),
        "read": ("GET", "/{type}/probe-1"),
        "patch": ("PATCH", "/{type}/probe-1"),
        "search-type": ("GET", "/{type}"),
        "delete": ("DELETE", "/{type}/probe-1"),
    }
    headers = {"Authorization": f"Bearer {admin}", "Content-Type": FHIR_JSON}
    claims = _claims(statement)
    with httpx.Client(base_url=server.base, headers=headers, timeout=30) as http:
        for kind in (*INBOUND_TYPES, "Task"):
            for code, (method, template) in probes.items():
                path = template.format(type=kind)
                body = b"[]" if code == "patch" else b"{}"
                sent = {"Content-Type": "application/json-patch+json"} if code == "patch" else {}
                answer = http.request(method, path, content=body, headers=sent)
                text = answer.json().get("issue", [{}])[0].get("diagnostics", "")
                routed = any(text.startswith(refusal) for refusal in routing)
                if (kind, code) in claims:
                    assert answer.status_code != 405 and not routed, (kind, code)
                else:
                    assert answer.status_code in (404, 405) and routed, (kind, code)
        for path in ("", "/$process-message", "/$subscription-notification"):
            answer = http.post(server.base + path, content=b"{}")
            assert answer.status_code in (400, 422), (path, answer.text)


def test_metadata_needs_no_token_and_names_its_base(server: ApiServer) -> None:
    answer = httpx.get(f"{server.base}/metadata", headers={"Accept": FHIR_JSON}, timeout=10)
    assert answer.status_code == 200
    assert answer.json()["implementation"]["url"] == server.base


# --- OpenAPI --------------------------------------------------------------------------------


def test_openapi_lists_every_fhir_route_with_bodies_and_outcomes(
    server: ApiServer, openapi: dict[str, Any]
) -> None:
    found = inventory(server.app.routes)
    assert found.routes, "no FHIR routes found"
    for method, path in found.routes:
        operation = openapi["paths"][path][method.lower()]
        responses = operation["responses"]
        assert "422" not in responses or "HTTPValidationError" not in json.dumps(responses["422"])
        assert responses["400"]["content"][FHIR_JSON]["schema"]["$ref"].endswith(
            "/OperationOutcome"
        )
        assert responses["406"]["content"][FHIR_JSON]["schema"]["$ref"].endswith(
            "/OperationOutcome"
        )
        success = [code for code in responses if code.startswith("2")]
        assert success and all(FHIR_JSON in responses[c]["content"] for c in success), path
        if path != "/fhir/metadata":
            assert operation["security"] == [{"bearer": []}], path
            assert "401" in responses and "403" in responses, path
        if method in ("POST", "PUT", "PATCH"):
            body = operation["requestBody"]["content"]
            assert body, path
            assert "415" in responses, path
    documented = {(m, p) for p, item in openapi["paths"].items() for m in item if "/fhir" in p}
    assert {(m.lower(), p) for m, p in found.routes} == documented
    search = openapi["paths"]["/fhir/Task"]["get"]
    names = {p["name"] for p in search["parameters"] if p["in"] == "query"}
    assert names >= TASK_SEARCH | {"_count"}
    patch = openapi["paths"]["/fhir/Task/{task_id}"]["patch"]["requestBody"]["content"]
    assert list(patch) == ["application/json-patch+json"]
    assert openapi["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


# --- content negotiation --------------------------------------------------------------------


@pytest.mark.parametrize("xml", ["application/fhir+xml", "application/xml", "text/xml"])
@pytest.mark.parametrize("path", ["/Encounter", "", "/$process-message", "/Patient/x1"])
def test_a_body_sent_as_xml_is_refused_with_415(
    server: ApiServer, admin: str, xml: str, path: str
) -> None:
    method = "PUT" if path.startswith("/Patient/") else "POST"
    with server.client(admin) as http:
        answer = http.request(
            method,
            path,
            content=b"<Encounter xmlns='http://hl7.org/fhir'/>",
            headers={"Content-Type": xml},
        )
    assert "XML is not supported" in _outcome(answer, 415)


def test_a_body_of_another_type_is_refused_with_415(server: ApiServer, admin: str) -> None:
    with server.client(admin) as http:
        answer = http.post(
            "/Encounter",
            content=b"a=b",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        patch = http.patch("/Task/t1", content=b"[]", headers={"Content-Type": "text/plain"})
    assert "application/fhir+json" in _outcome(answer, 415)
    _outcome(patch, 415)


@pytest.mark.parametrize("asked", ["xml", "application/fhir+xml", "text/xml", "ttl", "html"])
def test_format_other_than_json_is_refused_with_406(
    server: ApiServer, admin: str, asked: str
) -> None:
    with server.client(admin) as http:
        for path in ("/metadata", "/Task"):
            answer = http.get(path, params={"_format": asked})
            assert "application/fhir+json only" in _outcome(answer, 406)


@pytest.mark.parametrize(
    "accept",
    ["application/fhir+xml", "application/xml, text/xml;q=0.9", "application/json;q=0, text/xml"],
)
def test_an_accept_that_allows_only_other_formats_is_refused_with_406(
    server: ApiServer, admin: str, accept: str
) -> None:
    with server.client(admin) as http:
        answer = http.get("/Task", headers={"Accept": accept})
    assert "Accept" in _outcome(answer, 406)


@pytest.mark.parametrize(
    ("params", "accept"),
    [
        ({"_format": "json"}, FHIR_JSON),
        ({"_format": "application/fhir+json"}, "application/fhir+xml"),  # _format wins
        ({}, "application/json"),
        ({}, "*/*"),
        ({}, "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
        ({}, "application/fhir+json; fhirVersion=4.0"),
    ],
)
def test_json_formats_are_served(
    server: ApiServer, admin: str, params: dict[str, str], accept: str
) -> None:
    with server.client(admin) as http:
        answer = http.get("/Task", params=params, headers={"Accept": accept})
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith(FHIR_JSON)
    assert answer.json()["resourceType"] == "Bundle"


def test_json_bodies_are_taken_as_fhir_json_or_plain_json(server: ApiServer) -> None:
    feed = server.token("conformance-feed", "feed")
    patient = json.loads((DERBY / "01_patient.json").read_text())
    with server.client(feed) as http:
        first = http.put("/Patient/derby-baby", json=patient)  # application/json
        again = http.put(
            "/Patient/derby-baby",
            content=json.dumps(patient).encode(),
            headers={"Content-Type": "application/fhir+json; charset=utf-8"},
        )
    assert first.status_code in (200, 201), first.text
    assert again.status_code in (200, 201), again.text  # a redelivery, answered again
    assert again.json()["resourceType"] == "Patient"
    assert again.json()["meta"]["versionId"] == first.json()["meta"]["versionId"]


def _inbox_rows(server: ApiServer) -> int:
    with server.store.begin(read_only=True) as uow:
        rows: int = uow.connection.execute(select(func.count()).select_from(inbox)).scalar_one()
    return rows


def test_a_refused_format_stores_nothing(server: ApiServer, admin: str) -> None:
    """Refused before any handler reads the body: nothing is kept, and the sender is told to
    send it again as JSON (as an AR tells an HL7 v2 sender)."""
    before = _inbox_rows(server)
    with server.client(admin) as http:
        answer = http.post("/Flag", content=b"<Flag/>", headers={"Content-Type": "text/xml"})
    _outcome(answer, 415)
    assert _inbox_rows(server) == before


def test_negotiation_is_only_for_fhir(server: ApiServer) -> None:
    """/openapi.json is plain JSON whatever is asked: the refusals are for /fhir only."""
    answer = httpx.get(
        f"{server.root}/openapi.json", params={"_format": "xml"}, headers={"Accept": "text/xml"}
    )
    assert answer.status_code == 200
    assert answer.json()["openapi"].startswith("3.")


# --- schemathesis ---------------------------------------------------------------------------

# Valid and invalid input alike ("all": positive and negative generation): whatever is sent, the
# answer must be one the document promises (status, media type, body), never a 5xx. A fixed seed
# (mixed with each operation's label by schemathesis) keeps the run the same on every machine.
CONFORMANCE_SEED = 20261127


@pytest.fixture(scope="module")
def api_schema(server: ApiServer, admin: str) -> schemathesis.BaseSchema:
    """The OpenAPI 3.1 document as the server publishes it, driven as an admin."""
    config = schemathesis.Config.from_dict(
        {
            "seed": CONFORMANCE_SEED,
            "base-url": server.root,
            "headers": {"Authorization": f"Bearer {admin}"},
            "generation": {"mode": "all"},
            "phases": {"stateful": {"enabled": False}},
        }
    )
    return schemathesis.openapi.from_url(f"{server.root}/openapi.json", config=config, timeout=10)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=15,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_schemathesis_no_5xx_and_answers_match_their_schema(
    case: schemathesis.Case, task_ids: list[str]
) -> None:
    """Every documented operation with generated input, as an admin (past authentication).
    Task paths name one of the stored Tasks for every other generated id, so that changes
    reach the status checks and not only "not found"."""
    task_id = case.path_parameters.get("task_id")
    if task_id is not None and len(str(task_id)) % 2 == 0:
        case.path_parameters["task_id"] = task_ids[len(str(task_id)) % len(task_ids)]
    case.call_and_validate(
        timeout=30,
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
        ],
    )
