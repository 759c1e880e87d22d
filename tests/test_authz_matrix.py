"""Who may do what on the real FHIR endpoints: one table, every role against every endpoint.

The server is the real app on a real port (tests/api_harness.ApiServer) with its worker. The
Tasks come from the Derby-like scenario sent as HL7 v2 into the inbox (so the table does not
depend on the FHIR inbound endpoints it also checks), plus copies of one of them: a
safeguarding Task (meta.tag "safeguarding") and one fresh Task for each status change the
table expects to succeed, so that the rows are independent of each other's order. All are
owned by C9001.

Callers: feed, clinician C9001 (the owner), clinician C1234 (not the owner), safeguarding
S5001 (not the owner), governance, admin, and no token at all.

Expected answers (a hidden Task is answered 404, the same as a missing one: the API does not
tell a caller that a Task it may not see exists):

| endpoint                         | feed | owner | other | safeg. | gov. | admin | none |
|----------------------------------|------|-------|-------|--------|------|-------|------|
| POST /fhir/Encounter             | 2xx  | 403   | 403   | 403    | 403  | 2xx   | 401  |
| POST /fhir (transaction Bundle)  | 2xx  | 403   | 403   | 403    | 403  | 2xx   | 401  |
| GET /fhir/Task                   | 403  | 200   | 200*  | 200    | 200* | 200   | 401  |
| GET /fhir/Task/{id}              | 403  | 200   | 200   | 200    | 200  | 200   | 401  |
| GET /fhir/Task/{safeguarding id} | 403  | 200   | 404   | 200    | 404  | 200   | 401  |
| PUT /fhir/Task/{id}              | 403  | 2xx   | 403   | 403    | 403  | 2xx   | 401  |
| PATCH /fhir/Task/{id}            | 403  | 2xx   | 403   | 403    | 403  | 2xx   | 401  |
| GET /fhir/metadata (public)      | 200  | 200   | 200   | 200    | 200  | 200   | 200  |

(*) the search answers, without the safeguarding Task in it. A refused change leaves the Task
as it was.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from adapters.store.schema import audit
from engine.ports import StoredTask
from tests.api_harness import ApiServer

ROOT = Path(__file__).resolve().parents[1]
HL7_DERBY = ROOT / "tests" / "fixtures" / "hl7v2" / "derby"
FHIR_DERBY = ROOT / "tests" / "fixtures" / "fhir" / "derby"
OWNER = "C9001"
SAFEGUARDING_TAG = {"system": "urn:safetynet:tag", "code": "safeguarding"}

CALLERS: dict[str, tuple[tuple[str, ...], str] | None] = {
    "feed": (("feed",), ""),
    "owner": (("clinician",), OWNER),
    "other": (("clinician",), "C1234"),
    "safeguarding": (("safeguarding",), "S5001"),
    "governance": (("governance",), ""),
    "admin": (("admin",), ""),
    "none": None,
}

OK = frozenset({200})
WRITTEN = frozenset({200, 201, 202})
CHANGED = frozenset({200, 202})
FORBIDDEN = frozenset({403})
HIDDEN = frozenset({404})
LOGIN = frozenset({401})


def _row(*answers: frozenset[int]) -> dict[str, frozenset[int]]:
    return dict(zip(CALLERS, answers, strict=True))


MATRIX: dict[str, dict[str, frozenset[int]]] = {
    "POST /fhir/Encounter": _row(WRITTEN, *[FORBIDDEN] * 4, WRITTEN, LOGIN),
    "POST /fhir (Bundle)": _row(WRITTEN, *[FORBIDDEN] * 4, WRITTEN, LOGIN),
    "GET /fhir/Task": _row(FORBIDDEN, *[OK] * 5, LOGIN),
    "GET /fhir/Task/{id}": _row(FORBIDDEN, *[OK] * 5, LOGIN),
    "GET /fhir/Task/{safeguarding id}": _row(FORBIDDEN, OK, HIDDEN, OK, HIDDEN, OK, LOGIN),
    "PUT /fhir/Task/{id}": _row(FORBIDDEN, CHANGED, *[FORBIDDEN] * 3, CHANGED, LOGIN),
    "PATCH /fhir/Task/{id}": _row(FORBIDDEN, CHANGED, *[FORBIDDEN] * 3, CHANGED, LOGIN),
    "GET /fhir/metadata": _row(*[OK] * 7),
}

# Callers who may see the safeguarding Task in a search.
SEES_SAFEGUARDING = {"owner", "safeguarding", "admin"}


@dataclass
class World:
    """The running server, a token per caller, and the Tasks the rows act on."""

    server: ApiServer
    tokens: dict[str, str | None]
    normal: str  # a Task everybody who reads Tasks may see (refused changes target it)
    safeguarding: str
    fresh: dict[tuple[str, str], str]  # (endpoint, caller) -> a Task of its own to change


def _copy(task: StoredTask, identifier: str, safeguarding: bool) -> StoredTask:
    resource = json.loads(json.dumps(task.resource))
    resource["id"] = identifier
    for item in resource.get("identifier", []):
        if item.get("system") == "urn:safetynet:task":
            item["value"] = identifier
    if safeguarding:
        meta = resource.setdefault("meta", {})
        meta["tag"] = [*meta.get("tag", []), SAFEGUARDING_TAG]
    return replace(task, identifier=identifier, resource=resource)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with ApiServer(tmp_path_factory.mktemp("matrix") / "matrix.db", task_wait=10.0) as server:
        now = datetime.now(UTC)
        for path in sorted(HL7_DERBY.glob("*.hl7")):
            raw = path.read_bytes().decode().strip()
            with server.store.begin() as uow:
                accepted = server.parts.ingest.accept(uow, raw, now, origin=path.name)
            assert accepted.ack_code == "AA", (path.name, accepted.reason)
        server.drain()
        with server.store.begin(read_only=True) as uow:
            owned = uow.tasks(owner=OWNER)
        assert owned, "the Derby-like scenario raised no Task for C9001"
        model = owned[0]
        assert model.status == "requested" and not model.shadow
        fresh = {
            (endpoint, caller): f"matrix-{endpoint.split()[0].lower()}-{caller}"
            for endpoint, row in MATRIX.items()
            if endpoint.startswith(("PUT", "PATCH"))
            for caller, allowed in row.items()
            if allowed == CHANGED
        }
        with server.store.begin() as uow:
            uow.put_task(_copy(model, "matrix-safeguarding", True), now, "test copy")
            for identifier in fresh.values():
                uow.put_task(_copy(model, identifier, False), now, "test copy")
        tokens: dict[str, str | None] = {}
        for caller, spec in CALLERS.items():
            tokens[caller] = (
                None
                if spec is None
                else server.token(f"matrix-{caller}", *spec[0], practitioner=spec[1])
            )
        yield World(server, tokens, model.identifier, "matrix-safeguarding", fresh)


def _encounter() -> dict[str, Any]:
    """The Derby-like ED Encounter, naming its patient by identifier (the local MRN) so that
    it stands alone."""
    loaded: dict[str, Any] = json.loads(
        (FHIR_DERBY / "02_encounter_registered_ed.json").read_text()
    )
    loaded["subject"] = {
        "type": "Patient",
        "identifier": {"system": "urn:safetynet:authority:RX1", "value": "RX1000123"},
    }
    return loaded


def _task_as_admin(world: World, identifier: str) -> dict[str, Any]:
    with world.server.client(world.tokens["admin"]) as http:
        response = http.get(f"/Task/{identifier}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _status(world: World, identifier: str) -> str:
    with world.server.store.begin(read_only=True) as uow:
        found = [t for t in uow.tasks(owner=OWNER) if t.identifier == identifier]
    assert found, identifier
    return found[0].status


def _send(world: World, endpoint: str, caller: str) -> httpx.Response:
    writes = endpoint.startswith(("PUT", "PATCH"))
    target = world.fresh.get((endpoint, caller), world.normal) if writes else world.normal
    with world.server.client(world.tokens[caller]) as http:
        if endpoint == "POST /fhir/Encounter":
            return http.post(
                "/Encounter",
                content=json.dumps(_encounter()),
                headers={"Content-Type": "application/fhir+json"},
            )
        if endpoint == "POST /fhir (Bundle)":
            bundle = {
                "resourceType": "Bundle",
                "type": "transaction",
                "entry": [
                    {
                        "fullUrl": "urn:uuid:9b5d3a52-5a1c-4f39-9d7e-3c1f1d7e2a11",
                        "resource": _encounter(),
                        "request": {"method": "PUT", "url": "Encounter/derby-visit"},
                    }
                ],
            }
            return http.post(  # the base itself: httpx would add a slash to ""
                world.server.base,
                content=json.dumps(bundle),
                headers={"Content-Type": "application/fhir+json"},
            )
        if endpoint == "GET /fhir/Task":
            return http.get("/Task", params={"_count": "100"})
        if endpoint == "GET /fhir/Task/{id}":
            return http.get(f"/Task/{world.normal}")
        if endpoint == "GET /fhir/Task/{safeguarding id}":
            return http.get(f"/Task/{world.safeguarding}")
        if endpoint == "PUT /fhir/Task/{id}":
            body = _task_as_admin(world, target)
            body["status"] = "accepted"
            return http.put(
                f"/Task/{target}",
                content=json.dumps(body),
                headers={"Content-Type": "application/fhir+json"},
            )
        if endpoint == "PATCH /fhir/Task/{id}":
            patch = [{"op": "replace", "path": "/status", "value": "accepted"}]
            return http.patch(
                f"/Task/{target}",
                content=json.dumps(patch),
                headers={"Content-Type": "application/json-patch+json"},
            )
        assert endpoint == "GET /fhir/metadata"
        return http.get("/metadata")


CASES = [(endpoint, caller) for endpoint, row in MATRIX.items() for caller in row]


def _audit_after(world: World, since: int) -> list[Any]:
    """The audit rows after id `since`, waiting briefly for the first (the request audit
    writes its row just after the response)."""
    deadline = time.monotonic() + 10
    while True:
        with world.server.store.begin(read_only=True) as uow:
            rows = list(
                uow.connection.execute(
                    select(audit).where(audit.c.id > since, audit.c.action.like("api.%"))
                )
            )
        if rows or time.monotonic() > deadline:
            return rows
        time.sleep(0.02)


def _last_audit_id(world: World) -> int:
    with world.server.store.begin(read_only=True) as uow:
        return int(uow.connection.execute(select(func.max(audit.c.id))).scalar() or 0)


@pytest.mark.parametrize(("endpoint", "caller"), CASES, ids=[f"{e} as {c}" for e, c in CASES])
def test_authorisation_matrix(world: World, endpoint: str, caller: str) -> None:
    expected = MATRIX[endpoint][caller]
    since = _last_audit_id(world)
    response = _send(world, endpoint, caller)
    assert response.status_code in expected, (
        f"{endpoint} as {caller}: got {response.status_code}, expected "
        f"{sorted(expected)}: {response.text[:300]}"
    )
    if response.status_code >= 400:
        body = response.json()
        assert body["resourceType"] == "OperationOutcome"
        assert response.headers["content-type"].startswith("application/fhir+json")
    if response.status_code == 401:
        assert response.headers["www-authenticate"].startswith("Bearer")
    if endpoint.startswith(("PUT", "PATCH")):
        target = world.fresh.get((endpoint, caller), world.normal)
        if expected == CHANGED:
            world.server.drain()
            assert _status(world, target) == "accepted"
        else:
            assert _status(world, world.normal) == "requested", "a refused change changed it"
    if endpoint.startswith(("POST", "PUT", "PATCH")) or response.status_code in (401, 403):
        # The request audit recorded it: who, the route template (never an id), the answer.
        rows = [r for r in _audit_after(world, since) if r.detail["status"] == response.status_code]
        assert rows, f"no audit row for {endpoint} as {caller}"
        actor = "anonymous" if caller == "none" else f"matrix-{caller}"
        assert rows[0].actor == actor
        assert rows[0].subject.startswith("/fhir")
        target = world.fresh.get((endpoint, caller), world.normal)
        assert target not in rows[0].subject and "derby" not in rows[0].subject
    if endpoint == "GET /fhir/Task" and response.status_code == 200:
        ids = {entry["resource"]["id"] for entry in response.json().get("entry", [])}
        assert world.normal in ids
        assert (world.safeguarding in ids) == (caller in SEES_SAFEGUARDING)
