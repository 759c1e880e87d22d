"""Authentication, roles and the request audit, with real parts: the API on a real port
(tests/api_harness.ApiServer), a real SQLite file, a real JWKS served over HTTP
(tests/jwks_server.JwksServer), the `safetynet tokens` command in process and as a process.

Most HTTP checks go to three probe routes added to the real app (`/fhir/_authz/...`), so that
they test the authenticator, the error handlers and the audit middleware without depending on
the FHIR endpoints; tests/test_authz_matrix.py covers the real endpoints.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from fastapi import APIRouter, Depends, Request
from sqlalchemy import select

from adapters.cli import main as cli_main
from adapters.service.auth import (
    Authenticator,
    AuthError,
    JwtSettings,
    Principal,
    TokenStore,
    hash_token,
    require,
)
from adapters.service.logs import ALLOWED_EXTRAS, JsonLogFormatter, SafeExtrasFilter
from adapters.store import open_store
from adapters.store.schema import api_tokens, audit
from tests.api_harness import ApiServer
from tests.jwks_server import AUDIENCE, ISSUER, JwksServer, new_rsa_key

ROOT = Path(__file__).resolve().parents[1]
NHS_LIKE = "9990000018"  # synthetic (999 range), shaped like an NHS number
NOW = datetime(2026, 11, 27, 9, 0, tzinfo=UTC)


# --- probe routes on the real app ---------------------------------------------------------

probe = APIRouter()


def _who(caller: Principal) -> dict[str, Any]:
    return {
        "subject": caller.subject,
        "roles": sorted(caller.roles),
        "practitioner": caller.practitioner,
    }


@probe.get("/_authz/governance")
def _governance_only(
    caller: Annotated[Principal, Depends(require("governance"))],
) -> dict[str, Any]:
    return _who(caller)


@probe.get("/_authz/clinician")
def _clinician_only(caller: Annotated[Principal, Depends(require("clinician"))]) -> dict[str, Any]:
    return _who(caller)


@probe.post("/_authz/feed/{item}", status_code=201)
def _feed_write(
    item: str, caller: Annotated[Principal, Depends(require("feed"))]
) -> dict[str, Any]:
    return _who(caller)


@probe.get("/_authz/open")
def _open(request: Request) -> dict[str, Any]:
    return {"open": True}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """The API with the probe routes (added after start: the router is read per request)."""
    with ApiServer(tmp_path_factory.mktemp("auth") / "auth.db", worker=False) as running:
        running.app.include_router(probe, prefix="/fhir")
        yield running


def _outcome(response: httpx.Response) -> str:
    """The diagnostic of an OperationOutcome response (and checks that it is one)."""
    assert response.headers["content-type"].startswith("application/fhir+json")
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    return str(body["issue"][0]["diagnostics"])


# --- tokens in the database ---------------------------------------------------------------


def test_tokens_are_stored_hashed_never_in_clear(tmp_path: Path) -> None:
    db = tmp_path / "tokens.db"
    store = open_store(f"sqlite:///{db}")
    try:
        tokens = TokenStore(store)
        clear = tokens.create("dr-who", ["clinician"], NOW, practitioner="C9001")
        with store.begin(read_only=True) as uow:
            stored = uow.connection.execute(select(api_tokens)).one()
    finally:
        store.close()
    assert clear.startswith("sn_") and len(clear) > 40
    assert stored.token_hash == hash_token(clear) != clear
    files = [p for p in tmp_path.iterdir() if p.name.startswith("tokens.db")]
    assert files, "the database file is where the token went"
    for path in files:
        data = path.read_bytes()
        assert clear.encode() not in data, path.name
        assert clear.removeprefix("sn_").encode() not in data, path.name


def test_token_store_refuses_what_it_cannot_issue(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 't.db'}")
    try:
        tokens = TokenStore(store)
        with pytest.raises(ValueError, match=r"unknown role 'doctor' \(the roles: feed"):
            tokens.create("x", ["doctor"], NOW)
        with pytest.raises(ValueError, match="needs --practitioner"):
            tokens.create("x", ["clinician"], NOW)
        with pytest.raises(ValueError, match="needs --practitioner"):
            tokens.create("x", ["safeguarding"], NOW)
        with pytest.raises(ValueError, match="needs a role"):
            tokens.create("x", [], NOW)
        tokens.create("engine", ["feed"], NOW)
        with pytest.raises(ValueError, match="'engine' exists already"):
            tokens.create("engine", ["admin"], NOW)
        assert [t.name for t in tokens.tokens()] == ["engine"]
    finally:
        store.close()


def test_tokens_on_each_database(database_url: str) -> None:
    """Create, look up, list and revoke on SQLite and PostgreSQL alike."""
    store = open_store(database_url)
    try:
        tokens = TokenStore(store)
        clear = tokens.create("ward-7", ["clinician", "governance"], NOW, practitioner="C9001")
        with pytest.raises(ValueError, match="exists already"):
            tokens.create("ward-7", ["feed"], NOW)
        assert tokens.lookup(clear) == Principal(
            "ward-7", frozenset({"clinician", "governance"}), "C9001"
        )
        assert tokens.revoke("ward-7", NOW) is True
        assert tokens.lookup(clear) is None
        (info,) = tokens.tokens()
        assert (info.name, info.roles, info.created_at, info.revoked_at) == (
            "ward-7",
            ("clinician", "governance"),
            NOW,
            NOW,
        )
    finally:
        store.close()


# --- 401 / 403 over HTTP ------------------------------------------------------------------


def test_no_token_is_401_with_a_bearer_challenge(server: ApiServer) -> None:
    with server.client() as http:
        response = http.get("/_authz/governance")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Bearer realm="safetynet"'
    assert "bearer token is required" in _outcome(response)
    assert response.json()["issue"][0]["code"] == "login"


@pytest.mark.parametrize(
    "authorization",
    ["Bearer sn_not-a-token", "Bearer nonsense", "Basic dXNlcjpwYXNz", "Bearer"],
)
def test_a_bad_credential_is_401(server: ApiServer, authorization: str) -> None:
    with httpx.Client(base_url=server.base) as http:
        response = http.get("/_authz/governance", headers={"Authorization": authorization})
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith('Bearer realm="safetynet"')
    text = _outcome(response)
    credential = authorization.partition(" ")[2]
    assert not credential.strip() or credential not in text
    assert not credential.strip() or credential not in response.headers["www-authenticate"]


def test_the_wrong_role_is_403_and_the_right_one_passes(server: ApiServer) -> None:
    feed = server.token("engine-403", "feed")
    governance = server.token("audit-lead", "governance")
    admin = server.token("root-403", "admin")
    with server.client(feed) as http:
        refused = http.get("/_authz/governance")
    assert refused.status_code == 403
    assert "needs the role governance" in _outcome(refused)
    assert refused.json()["issue"][0]["code"] == "forbidden"
    with server.client(governance) as http:
        allowed = http.get("/_authz/governance")
    assert allowed.status_code == 200
    assert allowed.json() == {"subject": "audit-lead", "roles": ["governance"], "practitioner": ""}
    with server.client(admin) as http:
        assert http.get("/_authz/governance").status_code == 200
        assert http.get("/_authz/clinician").status_code == 200


def test_a_revoked_token_is_refused_at_once(server: ApiServer) -> None:
    token = server.token("short-lived", "governance")
    with server.client(token) as http:
        assert http.get("/_authz/governance").status_code == 200
        assert server.tokens.revoke("short-lived", datetime.now(UTC)) is True
        response = http.get("/_authz/governance")
    assert response.status_code == 401
    assert "not valid or was revoked" in _outcome(response)
    assert 'error="invalid_token"' in response.headers["www-authenticate"]
    assert server.tokens.revoke("short-lived", datetime.now(UTC)) is False


# --- JWT against a real JWKS ----------------------------------------------------------------


@pytest.fixture(scope="module")
def idp() -> Iterator[JwksServer]:
    with JwksServer() as running:
        yield running


def _settings(idp: JwksServer, **overrides: Any) -> JwtSettings:
    values: dict[str, Any] = {"jwks_url": idp.url, "issuer": ISSUER, "audience": AUDIENCE}
    values.update(overrides)
    return JwtSettings(**values)


@pytest.fixture
def jwt_auth(server: ApiServer, idp: JwksServer) -> Authenticator:
    return Authenticator(server.tokens, jwt=_settings(idp))


def _refusal(authenticator: Authenticator, token: str) -> AuthError:
    with pytest.raises(AuthError) as caught:
        authenticator.authenticate(f"Bearer {token}")
    error = caught.value
    assert token not in error.diagnostics
    assert token not in json.dumps(error.headers)
    return error


def test_a_valid_jwt_gives_its_subject_roles_and_practitioner(
    jwt_auth: Authenticator, idp: JwksServer
) -> None:
    rs256 = idp.token(idp.claims())
    es256 = idp.token(idp.claims(sub="dr-ec", roles=["safeguarding", "feed"]), kid="ec-1")
    assert jwt_auth.authenticate(f"Bearer {rs256}") == Principal(
        "dr-jwt", frozenset({"clinician"}), "C9001"
    )
    assert jwt_auth.authenticate(f"Bearer {es256}") == Principal(
        "dr-ec", frozenset({"safeguarding", "feed"}), "C9001"
    )


def test_jwt_roles_come_from_the_claim_and_from_safetynet_scopes(
    server: ApiServer, idp: JwksServer
) -> None:
    plain = Authenticator(server.tokens, jwt=_settings(idp))
    scoped = idp.token(
        idp.claims(roles=None, fhirUser=None, scope="openid safetynet/governance profile")
    )
    assert plain.authenticate(f"Bearer {scoped}").roles == {"governance"}
    as_string = idp.token(idp.claims(roles="governance wizard admin"))
    assert plain.authenticate(f"Bearer {as_string}").roles == {"governance", "admin"}
    nothing = idp.token(idp.claims(roles=["wizard"], scope="openid"))
    assert plain.authenticate(f"Bearer {nothing}").roles == frozenset()
    nested = Authenticator(server.tokens, jwt=_settings(idp, roles_claim="realm_access.roles"))
    keycloak = idp.token(
        idp.claims(
            roles=None, realm_access={"roles": ["clinician"]}, fhirUser="https://x/Practitioner/C7"
        )
    )
    assert nested.authenticate(f"Bearer {keycloak}") == Principal(
        "dr-jwt", frozenset({"clinician"}), "C7"
    )


@pytest.mark.parametrize(
    ("case", "reason", "says"),
    [
        ("expired", "jwt_expired", "has expired"),
        ("not_yet", "jwt_not_yet_valid", "not valid yet"),
        ("wrong_aud", "jwt_audience", "audience (aud)"),
        ("wrong_iss", "jwt_issuer", "issuer (iss)"),
        ("unknown_kid", "jwt_unknown_key", "signing key (kid) is not in"),
        ("no_kid", "jwt_no_kid", "names no signing key"),
        ("tampered", "jwt_signature", "signature does not verify"),
        ("other_key", "jwt_signature", "signature does not verify"),
        ("no_exp", "jwt_claim_missing", "no 'exp' claim"),
        ("no_sub", "jwt_claim_missing", "no 'sub' claim"),
        ("hs256", "jwt_algorithm", "algorithm (alg) is not accepted"),
        ("alg_mismatch", "jwt_algorithm", "algorithm (alg) is not accepted"),
        ("clinician_no_practitioner", "jwt_no_practitioner", "names no practitioner"),
        ("garbage", "jwt_malformed", "not a well-formed JWT"),
    ],
)
def test_a_bad_jwt_is_401_saying_which_check_failed(
    jwt_auth: Authenticator, idp: JwksServer, case: str, reason: str, says: str
) -> None:
    now = int(time.time())
    good = idp.claims()
    if case == "expired":
        token = idp.token(idp.claims(iat=now - 7200, nbf=now - 7200, exp=now - 3600))
    elif case == "not_yet":
        token = idp.token(idp.claims(nbf=now + 3600, exp=now + 7200))
    elif case == "wrong_aud":
        token = idp.token(idp.claims(aud="another-service"))
    elif case == "wrong_iss":
        token = idp.token(idp.claims(iss="https://evil.test/"))
    elif case == "unknown_kid":
        token = idp.token(good, kid="rsa-404", sign_with=new_rsa_key())
    elif case == "no_kid":
        import jwt as pyjwt

        token = pyjwt.encode(good, idp.keys["rsa-1"], algorithm="RS256")
    elif case == "tampered":
        head, body, sig = idp.token(good).split(".")
        import base64

        claims = dict(good, roles=["admin"])
        forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
        assert forged != body
        token = f"{head}.{forged}.{sig}"
    elif case == "other_key":
        token = idp.token(good, kid="rsa-1", sign_with=new_rsa_key())
    elif case == "no_exp":
        token = idp.token(idp.claims(exp=None))
    elif case == "no_sub":
        token = idp.token(idp.claims(sub=None))
    elif case == "hs256":
        import jwt as pyjwt

        token = pyjwt.encode(good, "s" * 32, algorithm="HS256", headers={"kid": "rsa-1"})
    elif case == "alg_mismatch":  # an ES256 token naming the RSA key
        token = idp.token(good, kid="rsa-1", sign_with=idp.keys["ec-1"])
    elif case == "clinician_no_practitioner":
        token = idp.token(idp.claims(fhirUser="Patient/123"))
    else:
        token = "abc.def.ghi"
    error = _refusal(jwt_auth, token)
    assert (error.status, error.reason) == (401, reason)
    assert says in error.diagnostics
    assert 'error="invalid_token"' in error.headers["WWW-Authenticate"]


def test_a_jwt_is_refused_when_no_jwks_is_configured(server: ApiServer, idp: JwksServer) -> None:
    error = _refusal(Authenticator(server.tokens), idp.token(idp.claims()))
    assert (error.status, error.reason) == (401, "jwt_not_configured")


def test_the_key_set_is_fetched_once_and_cached(server: ApiServer) -> None:
    with JwksServer() as own:
        authenticator = Authenticator(server.tokens, jwt=_settings(own))
        for sub in ("a", "b", "c"):
            token = own.token(own.claims(sub=sub), kid="ec-1" if sub == "b" else "rsa-1")
            assert authenticator.authenticate(f"Bearer {token}").subject == sub
        assert own.fetches == 1
        # An unknown kid right after a fetch does not make the provider serve the set again
        # (PyJWT's refresh cooldown): made-up kids cannot hammer it.
        for _ in range(3):
            _refusal(authenticator, own.token(own.claims(), kid="x", sign_with=new_rsa_key()))
        assert own.fetches == 1


def test_an_unreachable_jwks_fails_closed_with_503(server: ApiServer) -> None:
    down = JwksServer()
    token = down.token(down.claims())
    down.stop()  # never served: the port is closed
    authenticator = Authenticator(
        server.tokens,
        jwt=JwtSettings(
            jwks_url=down.url, issuer=ISSUER, audience=AUDIENCE, jwks_timeout_seconds=2.0
        ),
    )
    for _ in range(2):  # the second is answered from the back-off, without a fetch
        error = _refusal(authenticator, token)
        assert (error.status, error.reason) == (503, "jwks_unavailable")
        assert "cannot be fetched" in error.diagnostics
        assert error.headers["Retry-After"].isdigit()
    # Opaque tokens do not depend on the identity provider.
    good = server.token("independent", "feed")
    assert authenticator.authenticate(f"Bearer {good}").subject == "independent"


def test_jwt_over_http(server: ApiServer, idp: JwksServer) -> None:
    plain = server.app.state.authenticator
    server.app.state.authenticator = Authenticator(server.tokens, jwt=_settings(idp))
    try:
        governance = idp.token(idp.claims(sub="lead-jwt", roles=["governance"], fhirUser=None))
        with server.client(governance) as http:
            ok = http.get("/_authz/governance")
            wrong_role = http.get("/_authz/clinician")
        assert ok.status_code == 200 and ok.json()["subject"] == "lead-jwt"
        assert wrong_role.status_code == 403
        now = int(time.time())
        expired = idp.token(idp.claims(exp=now - 3600, iat=now - 7200, nbf=now - 7200))
        with server.client(expired) as http:
            refused = http.get("/_authz/governance")
        assert refused.status_code == 401
        assert "expired" in _outcome(refused)
        challenge = refused.headers["www-authenticate"]
        assert challenge.startswith('Bearer realm="safetynet", error="invalid_token"')
        assert expired not in refused.text and expired not in challenge
    finally:
        server.app.state.authenticator = plain


def test_jwks_down_over_http_is_503(server: ApiServer) -> None:
    down = JwksServer()
    token = down.token(down.claims(roles=["governance"], fhirUser=None))
    down.stop()
    plain = server.app.state.authenticator
    server.app.state.authenticator = Authenticator(
        server.tokens,
        jwt=JwtSettings(jwks_url=down.url, issuer=ISSUER, audience=AUDIENCE),
    )
    try:
        with server.client(token) as http:
            response = http.get("/_authz/governance")
    finally:
        server.app.state.authenticator = plain
    assert response.status_code == 503
    assert "cannot be fetched" in _outcome(response)
    assert response.json()["issue"][0]["code"] == "transient"
    assert "retry-after" in response.headers


def test_jwt_settings_refuse_an_open_door() -> None:
    with pytest.raises(ValueError, match="audience"):
        JwtSettings(jwks_url="https://idp/jwks", issuer="https://idp", audience="")
    with pytest.raises(ValueError, match="asymmetric"):
        JwtSettings(jwks_url="https://idp/jwks", issuer="i", audience="a", algorithms=("HS256",))
    with pytest.raises(ValueError, match="http"):
        JwtSettings(jwks_url="file:///etc/passwd", issuer="i", audience="a")


# --- the `safetynet tokens` command ---------------------------------------------------------


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli_main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_tokens_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'var' / 'service.db'}"
    code, out, err = _cli(capsys, "tokens", "create", "engine", "--role", "feed", "--db", url)
    assert (code, err) == (0, "")
    token = out.strip()
    assert out == token + "\n" and token.startswith("sn_")
    code, out, _ = _cli(
        capsys,
        *("tokens", "create", "dr-who", "--role", "clinician", "--role", "safeguarding"),
        *("--practitioner", "C9001", "--db", url),
    )
    assert code == 0
    store = open_store(url)
    try:
        tokens = TokenStore(store)
        assert tokens.lookup(token) == Principal("engine", frozenset({"feed"}))
        who = tokens.lookup(out.strip())
        assert who == Principal("dr-who", frozenset({"clinician", "safeguarding"}), "C9001")
    finally:
        store.close()

    code, out, _ = _cli(capsys, "tokens", "list", "--db", url)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "ROLES", "PRACTITIONER", "CREATED", "REVOKED"]
    assert lines[1].split()[:3] == ["engine", "feed", "-"] and lines[1].endswith("-")
    assert lines[2].split()[:3] == ["dr-who", "clinician,safeguarding", "C9001"]
    assert hash_token(token) not in out and token not in out

    assert _cli(capsys, "tokens", "revoke", "engine", "--db", url)[:2] == (
        0,
        "token 'engine' revoked\n",
    )
    code, out, _ = _cli(capsys, "tokens", "list", "--format", "ndjson", "--db", url)
    rows = [json.loads(line) for line in out.splitlines()]
    assert rows[0]["name"] == "engine" and rows[0]["revoked"].endswith("Z")
    assert rows[1]["revoked"] is None and rows[1]["practitioner"] == "C9001"
    store = open_store(url)
    try:
        assert TokenStore(store).lookup(token) is None
        with store.begin(read_only=True) as uow:
            actions = [row.action for row in uow.connection.execute(select(audit.c.action))]
        assert actions.count("token.created") == 2 and "token.revoked" in actions
    finally:
        store.close()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["create", "x", "--role", "doctor"], "unknown role 'doctor'"),
        (["create", "x", "--role", "clinician"], "needs --practitioner"),
        (["create", "engine", "--role", "admin"], "'engine' exists already"),
        (["revoke", "nobody"], "no live token named 'nobody'"),
    ],
)
def test_tokens_command_errors_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    url = f"sqlite:///{tmp_path / 'service.db'}"
    assert _cli(capsys, "tokens", "create", "engine", "--role", "feed", "--db", url)[0] == 0
    code, out, err = _cli(capsys, "tokens", *argv, "--db", url)
    assert (code, out) == (2, "")
    assert err.startswith("safetynet: error: tokens ") and message in err


def test_tokens_list_needs_a_database_and_takes_safetynet_db(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = f"sqlite:///{tmp_path / 'none.db'}"
    code, _, err = _cli(capsys, "tokens", "list", "--db", missing)
    assert code == 2 and "no database here" in err
    monkeypatch.setenv("SAFETYNET_DB", f"sqlite:///{tmp_path / 'env.db'}")
    assert _cli(capsys, "tokens", "create", "from-env", "--role", "governance")[0] == 0
    code, out, _ = _cli(capsys, "tokens", "list")
    assert code == 0 and "from-env" in out


def test_tokens_command_as_a_process(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'proc.db'}"
    env = {**os.environ, "SAFETYNET_DB": url}

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "adapters.cli", "tokens", *argv],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    made = run("create", "proc-feed", "--role", "feed")
    assert (made.returncode, made.stderr) == (0, "")
    token = made.stdout.strip()
    assert made.stdout == token + "\n" and token.startswith("sn_")
    bad = run("create", "proc-x", "--role", "nurse")
    assert bad.returncode == 2 and bad.stdout == ""
    assert "unknown role 'nurse'" in bad.stderr
    listed = run("list")
    assert listed.returncode == 0 and "proc-feed" in listed.stdout and token not in listed.stdout


# --- the request audit ----------------------------------------------------------------------


@pytest.fixture
def audit_lines() -> Iterator[io.StringIO]:
    """The request audit's log lines, formatted and filtered as `safetynet serve` does."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLogFormatter())
    handler.addFilter(SafeExtrasFilter())
    logger = logging.getLogger("safetynet.http")
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def _audit_rows(server: ApiServer, since: int, count: int) -> list[Any]:
    """The audit rows after id `since`, once there are `count` of them (they are written
    just after the response)."""
    deadline = time.monotonic() + 10
    while True:
        with server.store.begin(read_only=True) as uow:
            rows = list(
                uow.connection.execute(select(audit).where(audit.c.id > since).order_by(audit.c.id))
            )
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.02)


def _last_audit_id(server: ApiServer) -> int:
    with server.store.begin(read_only=True) as uow:
        ids = [row.id for row in uow.connection.execute(select(audit.c.id))]
    return max(ids, default=0)


def test_every_request_is_logged_and_writes_and_refusals_audited_without_patient_data(
    server: ApiServer, audit_lines: io.StringIO
) -> None:
    feed = server.token("engine-audit", "feed")
    governance = server.token("lead-audit", "governance")
    since = _last_audit_id(server)
    query = {"patient": NHS_LIKE, "identifier": f"https://fhir.nhs.uk/Id/nhs-number|{NHS_LIKE}"}
    with server.client(governance) as http:
        assert http.get("/_authz/governance", params=query).status_code == 200
        assert http.post(f"/_authz/feed/{NHS_LIKE}", params=query).status_code == 403
    with server.client(feed) as http:
        assert http.post(f"/_authz/feed/{NHS_LIKE}", params=query).status_code == 201
    with server.client() as http:
        assert http.get("/_authz/governance", params=query).status_code == 401
        assert http.get("/_authz/open", params=query).status_code == 200
        assert http.get(f"/no-such-thing/{NHS_LIKE}", params=query).status_code == 404
    rows = _audit_rows(server, since, 3)
    time.sleep(0.2)  # would a fourth row (a read) have come? It must not.
    rows = _audit_rows(server, since, 3)

    text = audit_lines.getvalue()
    assert NHS_LIKE not in text
    lines = [json.loads(line) for line in text.splitlines()]
    # Sorted: each line is written just after its response, the next request may come first.
    seen = sorted((ln["method"], ln["path"], ln["status_code"]) for ln in lines)
    assert seen == sorted(
        [
            ("GET", "/fhir/_authz/governance", 200),
            ("POST", "/fhir/_authz/feed/{item}", 403),
            ("POST", "/fhir/_authz/feed/{item}", 201),
            ("GET", "/fhir/_authz/governance", 401),
            ("GET", "/fhir/_authz/open", 200),
            ("GET", "(no route)", 404),
        ]
    )
    assert all(ln["message"] == "request" and ln["logger"] == "safetynet.http" for ln in lines)
    assert all(isinstance(ln["duration_ms"], float) and ln["duration_ms"] >= 0 for ln in lines)

    stored = sorted(
        (row.actor, row.action, row.subject, row.detail["status"], row.detail.get("reason") or "")
        for row in rows
    )
    assert stored == sorted(
        [
            ("lead-audit", "api.refused", "/fhir/_authz/feed/{item}", 403, "role"),
            ("engine-audit", "api.write", "/fhir/_authz/feed/{item}", 201, ""),
            ("anonymous", "api.refused", "/fhir/_authz/governance", 401, "no_token"),
        ]
    )
    assert all(
        set(row.detail) <= {"method", "route", "status", "duration_ms", "reason"} for row in rows
    )
    assert NHS_LIKE not in json.dumps([[str(v) for v in row] for row in rows])


def test_the_log_line_names_the_caller(server: ApiServer) -> None:
    """The principal reaches the line: the record carries it, and the allow-list of
    adapters/service/logs.py must let it through (a caller is staff or a system, never a
    patient)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep = Keep()
    logger = logging.getLogger("safetynet.http")
    previous = logger.level
    logger.addHandler(keep)
    logger.setLevel(logging.INFO)
    try:
        token = server.token("named-caller", "governance")
        with server.client(token) as http:
            http.get("/_authz/governance")
        with server.client() as http:
            http.get("/_authz/open")
    finally:
        logger.removeHandler(keep)
        logger.setLevel(previous)
    assert [getattr(r, "principal", None) for r in records] == ["named-caller", "anonymous"]
    assert "principal" in ALLOWED_EXTRAS, (
        "add 'principal' to ALLOWED_EXTRAS in adapters/service/logs.py: without it the "
        "request line loses its caller"
    )
