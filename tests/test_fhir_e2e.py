"""End to end with a real FHIR client: fhirpy's SyncFHIRClient against a real `safetynet serve`
process (its HTTP listener, its worker process, SQLite on disk), with tokens made by the
`safetynet tokens create` command line.

The integration engine sends the Derby-like scenario as FHIR resources (PUT by id, as a FHIR
feed mirrors its server), the worker raises the three recall Tasks, and the clinicians find
them by owner: the attending (C1001) owns "imaging pending at discharge" and "final report
after discharge", the ED consultant in charge (C9001) the discrepancy review (as in the HL7 v2
version, tests/test_replay_e2e.py). The attending accepts one, completes it with a note of
what was done, and reads it back. Around that: what the other tokens may not do.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fhirpy import SyncFHIRClient
from fhirpy.base.exceptions import AuthorizationError, ForbiddenError, OperationOutcome

from tests.jwks_server import AUDIENCE, ISSUER, JwksServer
from tests.service_harness import ROOT, ServeProcess, message_time_rules

DERBY = ROOT / "tests" / "fixtures" / "fhir" / "derby"
ATTENDING, CONSULTANT = "C1001", "C9001"
OWNERS = {
    "imaging-pending-at-discharge": ATTENDING,
    "report-final-after-discharge": ATTENDING,
    "discrepancy-after-discharge": CONSULTANT,
}
RULES = set(OWNERS)
ACCEPTED_RULE = "imaging-pending-at-discharge"
NOTE = "Family recalled; skeletal survey reviewed with the consultant; safeguarding referral made."


def tokens_create(db_url: str, name: str, *roles: str, practitioner: str = "") -> str:
    """A token from `python -m adapters.cli tokens create` (it prints the token alone)."""
    command = [sys.executable, "-m", "adapters.cli", "tokens", "create", name, "--db", db_url]
    for role in roles:
        command += ["--role", role]
    if practitioner:
        command += ["--practitioner", practitioner]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert token.startswith("sn_") and "\n" not in token
    return token


def until(probe: Callable[[], Any], timeout: float = 60.0) -> Any:
    """Call `probe` until it returns something true (the worker is asynchronous)."""
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[ServeProcess, dict[str, str]]]:
    """`safetynet serve` with the bundled rules, the clock-driven ones off (the 2008 scenario
    is sent today: an overdue-report timer would be due at once; tests/service_harness.py
    says why), and a token per role made beforehand on its database."""
    db_url = f"sqlite:///{tmp_path / 'serve.db'}"
    tokens = {
        "feed": tokens_create(db_url, "integration-engine", "feed"),
        "attending": tokens_create(db_url, "dr-attending", "clinician", practitioner=ATTENDING),
        "consultant": tokens_create(db_url, "dr-consultant", "clinician", practitioner=CONSULTANT),
        "colleague": tokens_create(db_url, "dr-colleague", "clinician", practitioner="C9002"),
        "governance": tokens_create(db_url, "governance-lead", "governance"),
    }
    rules = message_time_rules(tmp_path / "rules")
    serve = ServeProcess(db_url, tmp_path / "serve.log", "--rules", str(rules))
    with serve:
        yield serve, tokens


def client(serve: ServeProcess, token: str) -> SyncFHIRClient:
    return SyncFHIRClient(
        f"http://127.0.0.1:{serve.http_port}/fhir",
        authorization=f"Bearer {token}",
        requests_config={"timeout": 30},
    )


def test_fhirpy_sends_the_derby_scenario_and_the_owner_completes_a_task(
    service: tuple[ServeProcess, dict[str, str]],
) -> None:
    serve, tokens = service
    engine = client(serve, tokens["feed"])
    metadata = engine.execute("metadata", method="get")
    assert metadata["resourceType"] == "CapabilityStatement"

    for path in sorted(DERBY.glob("*.json")):
        sent = json.loads(path.read_text())
        resource = engine.resource(sent["resourceType"], **sent)
        resource.save()  # PUT [base]/Type/id: the feed's ids are kept
        assert resource["id"] == sent["id"], path.name
        assert resource["meta"]["versionId"] == sent["meta"]["versionId"], path.name

    governance = client(serve, tokens["governance"])

    def all_three() -> list[Any]:
        owners = f"{ATTENDING},{CONSULTANT}"  # comma: either owner
        found: list[Any] = governance.resources("Task").search(owner=owners).fetch_all()
        return found if len(found) >= len(RULES) else []

    tasks = until(all_three)
    assert sorted(rule_of(task) for task in tasks) == sorted(RULES)
    assert all(task["status"] == "requested" for task in tasks)
    assert {rule_of(t): t["owner"]["identifier"]["value"] for t in tasks} == OWNERS

    doctor = client(serve, tokens["attending"])
    mine = doctor.resources("Task").search(owner=ATTENDING).fetch_all()
    assert {rule_of(t) for t in mine} == {r for r, o in OWNERS.items() if o == ATTENDING}
    consultant = client(serve, tokens["consultant"])
    theirs = consultant.resources("Task").search(owner=f"Practitioner/{CONSULTANT}").fetch_all()
    assert [rule_of(t) for t in theirs] == ["discrepancy-after-discharge"]

    # Paging: one Task a page, the client follows the next links.
    paged = doctor.resources("Task").search(owner=ATTENDING).limit(1).fetch_all()
    assert sorted(t["id"] for t in paged) == sorted(t["id"] for t in mine)

    pending = next(t for t in mine if rule_of(t) == ACCEPTED_RULE)
    pending["status"] = "accepted"
    pending.save()  # PUT [base]/Task/id, answered with the changed Task
    assert pending["status"] == "accepted"
    accepted_version = pending["meta"]["versionId"]

    pending["status"] = "completed"
    pending["note"] = [*pending.get("note", []), {"text": NOTE}]
    pending.save()
    assert pending["status"] == "completed"
    assert int(pending["meta"]["versionId"]) > int(accepted_version)

    read_back = doctor.reference("Task", pending["id"]).to_resource()
    assert read_back["status"] == "completed"
    assert NOTE in [note.get("text") for note in read_back.get("note", [])]
    done = doctor.resources("Task").search(owner=ATTENDING, status="completed").fetch_all()
    assert [t["id"] for t in done] == [pending["id"]]
    still_open = doctor.resources("Task").search(owner=ATTENDING, status="requested").fetch_all()
    assert [rule_of(t) for t in still_open] == ["report-final-after-discharge"]


def rule_of(task: Any) -> str:
    """The rule that raised a Task (Task.code, system urn:safetynet:rule)."""
    code: str = task["code"]["coding"][0]["code"]
    return code


def test_fhirpy_sees_the_roles_enforced(service: tuple[ServeProcess, dict[str, str]]) -> None:
    serve, tokens = service
    engine = client(serve, tokens["feed"])
    for path in sorted(DERBY.glob("*.json")):
        sent = json.loads(path.read_text())
        engine.resource(sent["resourceType"], **sent).save()
    governance = client(serve, tokens["governance"])
    tasks = until(lambda: governance.resources("Task").search(owner=ATTENDING).fetch_all())
    assert tasks, "no Task raised"

    with pytest.raises(ForbiddenError):  # a feed token reads no Task
        engine.resources("Task").search(owner=ATTENDING).fetch_all()

    colleague = client(serve, tokens["colleague"])
    theirs = colleague.reference("Task", tasks[0]["id"]).to_resource()  # may read it...
    theirs["status"] = "accepted"
    with pytest.raises(ForbiddenError):  # ...but not change another clinician's Task
        theirs.save()
    governance_copy = governance.reference("Task", tasks[0]["id"]).to_resource()
    governance_copy["status"] = "accepted"
    with pytest.raises(ForbiddenError):  # governance reads every Task, changes none
        governance_copy.save()

    # fhirpy's patch() is a JSON merge of fields; the server takes JSON Patch only and says so.
    owner = client(serve, tokens["attending"])
    with pytest.raises(OperationOutcome, match="JSON Patch"):
        owner.patch("Task", tasks[0]["id"], status="accepted")
    unchanged = owner.reference("Task", tasks[0]["id"]).to_resource()
    assert unchanged["status"] == "requested"


def test_serve_takes_jwts_from_its_configured_jwks(tmp_path: Path) -> None:
    """`--jwks-url`, `--jwt-issuer`, `--jwt-audience` reach the API: a JWT signed by the
    identity provider's key is accepted with its roles, one for another audience is not, and
    opaque tokens still work beside them."""
    db_url = f"sqlite:///{tmp_path / 'serve.db'}"
    feed = tokens_create(db_url, "integration-engine", "feed")
    with JwksServer() as idp:
        jwt_flags = ("--jwks-url", idp.url, "--jwt-issuer", ISSUER, "--jwt-audience", AUDIENCE)
        with ServeProcess(db_url, tmp_path / "serve.log", *jwt_flags) as serve:
            clinician = client(serve, idp.token(idp.claims()))  # clinician, Practitioner/C9001
            assert clinician.resources("Task").search(owner=CONSULTANT).fetch_all() == []
            stranger = client(serve, idp.token(idp.claims(aud="another-service")))
            with pytest.raises(AuthorizationError):
                stranger.resources("Task").fetch_all()
            feeder = client(serve, idp.token(idp.claims(roles=["feed"], fhirUser=None)))
            with pytest.raises(ForbiddenError):  # a feed JWT reads no Task
                feeder.resources("Task").fetch_all()
            patient = json.loads((DERBY / "01_patient.json").read_text())
            saved = client(serve, feed).resource("Patient", **patient)
            saved.save()
            assert saved["meta"]["versionId"] == "1"
