"""Who is calling the HTTP API, and what they may do.

Two kinds of bearer credential, told apart by their shape:

* **Opaque tokens** (`sn_...`, made by `safetynet tokens create`), stored as their SHA-256
  only. A live token's lookup is kept for at most `TOKEN_CACHE_SECONDS` (one database query
  per request cost about half a millisecond, half of an authenticated GET /fhir/metadata), so
  `safetynet tokens revoke` takes effect within that second (at once in the process that
  revokes, whose cache is dropped).
* **JWTs** (three dot-separated parts), accepted only when the service is given a JWKS
  (`JwtSettings`): the signature must verify against a key of that set named by the token's
  `kid`, with an algorithm on the allow-list (RS256, ES256); `exp` (required), `nbf` and
  `iat` are checked with a small leeway; `iss` and `aud` must be the configured ones; `sub`
  (required) is the caller's name in the audit trail. Roles come from the `roles` claim (a
  list, or a space-separated string; a dotted name such as `realm_access.roles` reaches into
  nested claims) and from the OAuth `scope` claim (space-separated; `scp` too), where
  `safetynet/<role>` grants `<role>`; names that are not roles here are ignored, and a token
  with none is authenticated but may do nothing (403). A clinician's Task owner id comes from
  the practitioner claim (`fhirUser` by default: `Practitioner/C9001`, a URL ending so, or a
  bare `C9001`); a token that grants clinician or safeguarding without one is refused, as
  `tokens create` refuses such a token.

  The key set is fetched with PyJWT's `PyJWKClient` and cached (`jwks_cache_seconds`); a key
  id not in the cached set forces one refetch at most every 30 seconds (PyJWT's cooldown), so
  a stream of made-up key ids cannot hammer the identity provider. When the key set cannot be
  fetched the request is refused with **503** (an OperationOutcome, code `transient`, and
  `Retry-After`), never let through: the credential may be perfectly good, so a 401 would tell
  the client to throw it away; after a failed fetch the service waits `jwks_retry_seconds`
  before trying again, answering 503 meanwhile, so that an unreachable provider does not hold a
  request thread per call.

Every refusal is a FHIR OperationOutcome: 401 with a `WWW-Authenticate: Bearer` challenge
(RFC 6750: `error="invalid_token"` and a description when a credential was sent) whose
diagnostic says which check failed, never the credential; 403 when the caller lacks the role.
The reason code of a refusal is left on `request.state.auth_refusal` for the request audit.

Roles:

* `feed`: send messages and resources (the integration engine);
* `clinician`: read Tasks, change the ones they own (`practitioner` names the Task owner id
  the token acts as, e.g. "C9001");
* `safeguarding`: a clinician who may also read every safeguarding Task;
* `governance`: read every Task (never change one);
* `admin`: everything.

Safeguarding Tasks are visible only to their owner, the safeguarding role and admins.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import jwt
from fastapi import Request
from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError

from adapters.fhir.http import FhirHttpError
from adapters.store import SqlStore
from adapters.store.schema import api_tokens
from engine.ports import StoredTask

__all__ = [
    "ROLES",
    "AuthError",
    "Authenticator",
    "JwtSettings",
    "Principal",
    "TokenInfo",
    "TokenStore",
    "can_change_task",
    "can_see_task",
    "hash_token",
    "principal",
    "require",
]

ROLES = ("feed", "clinician", "safeguarding", "governance", "admin")
TOKEN_PREFIX = "sn_"
TOKEN_CACHE_SECONDS = 1.0  # how long a live token's lookup is reused (revocation delay)
_TOKEN_CACHE_SIZE = 4096  # live tokens remembered at most (the cache is emptied when full)
REALM = 'Bearer realm="safetynet"'
# Roles that act on Tasks as their owner, and so need to know which owner they are.
OWNER_ROLES = frozenset({"clinician", "safeguarding"})


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller. `subject`: the token's name or the JWT's `sub` (it goes in
    the audit trail); `practitioner`: the Task owner id a clinician acts as."""

    subject: str
    roles: frozenset[str] = field(default_factory=frozenset)
    practitioner: str = ""

    def has(self, *roles: str) -> bool:
        """Whether the caller holds any of `roles` (admin holds them all)."""
        return "admin" in self.roles or any(role in self.roles for role in roles)


class AuthError(FhirHttpError):
    """A refused credential: 401 (or 503 when the JWKS cannot be had), with `reason`, a short
    code for the audit trail (`no_token`, `unknown_token`, `jwt_expired`, ...)."""

    def __init__(
        self,
        diagnostics: str,
        reason: str,
        *,
        status: int = 401,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if headers is None:
            # RFC 6750 section 3: a request that carried a credential gets invalid_token.
            headers = {
                "WWW-Authenticate": f'{REALM}, error="invalid_token", '
                f'error_description="{diagnostics}"'
            }
        super().__init__(status, diagnostics, headers=headers)
        self.reason = reason


def hash_token(token: str) -> str:
    """What is stored of a token: its SHA-256, hex."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _check_roles(roles: Iterable[str]) -> tuple[str, ...]:
    chosen = tuple(dict.fromkeys(roles))
    unknown = [role for role in chosen if role not in ROLES]
    if unknown:
        raise ValueError(
            f"unknown role {', '.join(repr(r) for r in unknown)} (the roles: {', '.join(ROLES)})"
        )
    if not chosen:
        raise ValueError(f"a token needs a role (one of {', '.join(ROLES)})")
    return chosen


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """What `safetynet tokens list` shows of a token (never its hash)."""

    name: str
    roles: tuple[str, ...]
    practitioner: str
    created_at: datetime
    revoked_at: datetime | None


class TokenStore:
    """Bearer tokens in the database. `cache_seconds`: how long `lookup` reuses a live
    token's principal (0: look up every time); `clock`: monotonic seconds (tests)."""

    def __init__(
        self,
        store: SqlStore,
        *,
        cache_seconds: float = TOKEN_CACHE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._cache_seconds = cache_seconds
        self._clock = clock
        self._cache: dict[str, tuple[float, Principal]] = {}  # token hash -> (until, caller)
        self._cache_lock = threading.Lock()

    def create(self, name: str, roles: Iterable[str], at: datetime, practitioner: str = "") -> str:
        """A new token (returned once, never stored in clear). Raises ValueError for an
        unknown role, a clinician without a practitioner, or a name already in use."""
        chosen = _check_roles(roles)
        name = name.strip()
        if not name:
            raise ValueError("a token needs a name")
        if OWNER_ROLES.intersection(chosen) and not practitioner.strip():
            raise ValueError("a clinician token needs --practitioner (the Task owner id)")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        taken = ValueError(f"a token named {name!r} exists already")
        try:
            with self._store.begin() as uow:
                found = uow.connection.execute(
                    select(api_tokens.c.id).where(api_tokens.c.name == name)
                ).first()
                if found is not None:
                    raise taken
                uow.connection.execute(
                    insert(api_tokens).values(
                        name=name,
                        token_hash=hash_token(token),
                        roles=",".join(chosen),
                        practitioner=practitioner.strip(),
                        created_at=at,
                        revoked_at=None,
                    )
                )
                uow.audit(at, "cli", "token.created", name, {"roles": list(chosen)})
        except IntegrityError as exc:  # the same name created at the same moment elsewhere
            raise taken from exc
        return token

    def revoke(self, name: str, at: datetime) -> bool:
        """Revoke a token by name; False when there is no such live token. Takes effect on
        the next request in this process (its lookups are forgotten) and within
        `cache_seconds` in others (another service process, or the one the CLI revokes in)."""
        with self._store.begin() as uow:
            done = uow.connection.execute(
                update(api_tokens)
                .where(api_tokens.c.name == name, api_tokens.c.revoked_at.is_(None))
                .values(revoked_at=at)
            )
            if done.rowcount:
                uow.audit(at, "cli", "token.revoked", name, {})
        with self._cache_lock:
            self._cache.clear()
        return bool(done.rowcount)

    def tokens(self) -> list[TokenInfo]:
        """Every token, live or revoked, oldest first."""
        with self._store.begin(read_only=True) as uow:
            rows = uow.connection.execute(
                select(
                    api_tokens.c.name,
                    api_tokens.c.roles,
                    api_tokens.c.practitioner,
                    api_tokens.c.created_at,
                    api_tokens.c.revoked_at,
                ).order_by(api_tokens.c.created_at, api_tokens.c.id)
            ).all()
        return [
            TokenInfo(
                row.name,
                tuple(filter(None, row.roles.split(","))),
                row.practitioner,
                row.created_at,
                row.revoked_at,
            )
            for row in rows
        ]

    def lookup(self, token: str) -> Principal | None:
        """The principal of a live token, or None. A live token's answer is reused for up to
        `cache_seconds`; an unknown or revoked one is looked up every time."""
        digest = hash_token(token)
        now = self._clock()
        cached = self._cache.get(digest)
        if cached is not None and now < cached[0]:
            return cached[1]
        with self._store.begin(read_only=True) as uow:
            row = uow.connection.execute(
                select(api_tokens.c.name, api_tokens.c.roles, api_tokens.c.practitioner).where(
                    api_tokens.c.token_hash == digest,
                    api_tokens.c.revoked_at.is_(None),
                )
            ).first()
        with self._cache_lock:
            if row is None:
                self._cache.pop(digest, None)
                return None
            caller = Principal(
                row.name, frozenset(filter(None, row.roles.split(","))), row.practitioner
            )
            if self._cache_seconds > 0:
                if len(self._cache) >= _TOKEN_CACHE_SIZE:
                    self._cache.clear()
                self._cache[digest] = (now + self._cache_seconds, caller)
        return caller


@dataclass(frozen=True, slots=True)
class JwtSettings:
    """How to accept JWT bearer tokens (see the module docstring).

    `jwks_url`: the identity provider's JSON Web Key Set (http or https). `issuer`: the exact
    `iss` required. `audience`: the `aud` required (this service's name at the provider).
    `roles_claim`: where the roles are (dotted for nested claims). `scope_prefix`: a scope
    `<prefix><role>` grants the role (empty: scopes grant nothing). `practitioner_claim`: the
    claim naming the Task owner id a clinician acts as. `algorithms`: the signature
    algorithms accepted. `leeway_seconds`: clock skew allowed on exp/nbf/iat.
    `jwks_cache_seconds`: how long a fetched key set is used. `jwks_timeout_seconds`: the
    fetch's timeout. `jwks_retry_seconds`: how long to answer 503 after a failed fetch before
    trying again."""

    jwks_url: str
    issuer: str
    audience: str
    roles_claim: str = "roles"
    scope_prefix: str = "safetynet/"
    practitioner_claim: str = "fhirUser"
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    leeway_seconds: float = 30.0
    jwks_cache_seconds: float = 300.0
    jwks_timeout_seconds: float = 5.0
    jwks_retry_seconds: float = 5.0

    def __post_init__(self) -> None:
        for name in ("jwks_url", "issuer", "audience"):
            if not getattr(self, name).strip():
                raise ValueError(f"JWT validation needs a {name.replace('_', ' ')}")
        if not self.jwks_url.startswith(("http://", "https://")):
            raise ValueError("the JWKS URL must be http:// or https://")
        weak = [alg for alg in self.algorithms if alg.upper().startswith("HS") or alg == "none"]
        if weak or not self.algorithms:
            raise ValueError("JWT algorithms must be asymmetric (e.g. RS256, ES256)")


def _looks_like_jwt(credential: str) -> bool:
    return not credential.startswith(TOKEN_PREFIX) and credential.count(".") == 2


def _claim(claims: Mapping[str, Any], dotted: str) -> Any:
    value: Any = claims
    for part in dotted.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _words(value: Any) -> list[str]:
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list | tuple):
        return [item for item in value if isinstance(item, str)]
    return []


def _practitioner_id(value: Any) -> str:
    """`Practitioner/C9001`, `https://x/fhir/Practitioner/C9001` or `C9001` -> "C9001";
    a reference to another resource type -> ""."""
    if not isinstance(value, str) or not value.strip():
        return ""
    parts = value.strip().rstrip("/").split("/")
    if len(parts) == 1:
        return parts[0]
    return parts[-1] if parts[-2] == "Practitioner" else ""


# Each PyJWT refusal, as the check that failed and the audit reason code.
_JWT_FAILURES: tuple[tuple[type[jwt.PyJWTError], str, str], ...] = (
    (jwt.ExpiredSignatureError, "the token has expired (exp)", "jwt_expired"),
    (jwt.ImmatureSignatureError, "the token is not valid yet (nbf or iat)", "jwt_not_yet_valid"),
    (jwt.InvalidIssuerError, "the token's issuer (iss) is not the one configured", "jwt_issuer"),
    (
        jwt.InvalidAudienceError,
        "the token's audience (aud) does not include this service",
        "jwt_audience",
    ),
    (jwt.InvalidSignatureError, "the token's signature does not verify", "jwt_signature"),
    (jwt.InvalidAlgorithmError, "the token's algorithm (alg) is not accepted", "jwt_algorithm"),
    (jwt.DecodeError, "the token is not a well-formed JWT", "jwt_malformed"),
)


class _JwtValidator:
    """Validates JWTs against one JWKS (PyJWT's `PyJWKClient`, which caches the key set)."""

    def __init__(self, settings: JwtSettings) -> None:
        self.settings = settings
        self._client = jwt.PyJWKClient(
            settings.jwks_url,
            cache_jwk_set=True,
            lifespan=settings.jwks_cache_seconds,
            timeout=settings.jwks_timeout_seconds,
        )
        self._lock = threading.Lock()
        self._down_until = 0.0  # monotonic time until which a failed fetch is not retried

    def principal(self, token: str) -> Principal:
        """The caller the token names, or AuthError."""
        settings = self.settings
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("the token is not a well-formed JWT", "jwt_malformed") from None
        if header.get("alg") not in settings.algorithms:
            raise AuthError(
                f"the token's algorithm (alg) is not accepted (accepted: "
                f"{', '.join(settings.algorithms)})",
                "jwt_algorithm",
            )
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise AuthError("the token's header names no signing key (kid)", "jwt_no_kid")
        key = self._key(kid)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=list(settings.algorithms),
                audience=settings.audience,
                issuer=settings.issuer,
                leeway=settings.leeway_seconds,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"the token has no {exc.claim!r} claim", "jwt_claim_missing") from None
        except jwt.PyJWTError as exc:
            for kind, text, reason in _JWT_FAILURES:
                if isinstance(exc, kind):
                    raise AuthError(text, reason) from None
            raise AuthError("the token is not valid", "jwt_invalid") from None
        return self._principal(claims)

    def _key(self, kid: str) -> jwt.PyJWK:
        retry = {"Retry-After": str(max(1, round(self.settings.jwks_retry_seconds)))}
        unavailable = AuthError(
            "the identity provider's signing keys (JWKS) cannot be fetched: try again later",
            "jwks_unavailable",
            status=503,
            headers=retry,
        )
        with self._lock:
            if time.monotonic() < self._down_until:
                raise unavailable
        try:
            keys = self._client.get_signing_keys()  # the cached set while it is fresh
        except (jwt.PyJWTError, ValueError):  # unreachable, not JSON, or no usable key
            self._mark_down()
            raise unavailable from None
        found = self._client.match_kid(keys, kid)
        if found is not None:
            return found
        try:
            return self._client.get_signing_key(kid)  # one refetch, at most every 30 s
        except jwt.PyJWKClientConnectionError:
            self._mark_down()
            raise unavailable from None
        except (jwt.PyJWTError, ValueError):
            # The set is there and has no such key: rotated away, or made up.
            raise AuthError(
                "the token's signing key (kid) is not in the identity provider's key set",
                "jwt_unknown_key",
            ) from None

    def _mark_down(self) -> None:
        with self._lock:
            self._down_until = time.monotonic() + self.settings.jwks_retry_seconds

    def _principal(self, claims: Mapping[str, Any]) -> Principal:
        settings = self.settings
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject.strip():
            raise AuthError("the token's subject (sub) is empty", "jwt_claim_missing")
        granted = _words(_claim(claims, settings.roles_claim))
        if settings.scope_prefix:
            for scope in _words(claims.get("scope")) + _words(claims.get("scp")):
                if scope.startswith(settings.scope_prefix):
                    granted.append(scope[len(settings.scope_prefix) :])
        roles = frozenset(role for role in granted if role in ROLES)
        practitioner = _practitioner_id(_claim(claims, settings.practitioner_claim))
        if roles & OWNER_ROLES and not practitioner:
            raise AuthError(
                f"the token grants a clinician role but names no practitioner "
                f"({settings.practitioner_claim} claim)",
                "jwt_no_practitioner",
            )
        return Principal(subject.strip(), roles, practitioner)


class Authenticator:
    """Turns an Authorization header into a Principal, or refuses with 401 (AuthError).

    `jwt`: accept JWTs validated against this JWKS too (None: opaque tokens only)."""

    def __init__(self, tokens: TokenStore, jwt: JwtSettings | None = None) -> None:
        self._tokens = tokens
        self._jwt = _JwtValidator(jwt) if jwt is not None else None

    @property
    def jwt_settings(self) -> JwtSettings | None:
        """The JWT settings in force, or None."""
        return self._jwt.settings if self._jwt is not None else None

    def authenticate(self, authorization: str | None) -> Principal:
        """The caller, or AuthError: 401 with a WWW-Authenticate challenge (503 when the
        JWKS cannot be fetched)."""
        scheme, _, credential = (authorization or "").strip().partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            raise AuthError(
                "a bearer token is required (Authorization: Bearer ...)",
                "no_token",
                headers={"WWW-Authenticate": REALM},
            )
        if _looks_like_jwt(credential):
            if self._jwt is None:
                raise AuthError(
                    "JWT bearer tokens are not accepted here (no JWKS is configured)",
                    "jwt_not_configured",
                )
            return self._jwt.principal(credential)
        found = self._tokens.lookup(credential)
        if found is None:
            raise AuthError("the token is not valid or was revoked", "unknown_token")
        return found


def principal(request: Request) -> Principal:
    """FastAPI dependency: the authenticated caller (`app.state.authenticator` decides);
    authenticated once per request, however many dependencies ask."""
    known = getattr(request.state, "principal", None)
    if isinstance(known, Principal):
        return known
    authenticator: Authenticator = request.app.state.authenticator
    try:
        caller = authenticator.authenticate(request.headers.get("authorization"))
    except AuthError as exc:
        request.state.auth_refusal = exc.reason
        raise
    request.state.principal = caller
    return caller


def require(*roles: str) -> Callable[[Request], Principal]:
    """FastAPI dependency: the caller, who must hold one of `roles` (admin always may);
    otherwise 403 with an OperationOutcome."""

    def dependency(request: Request) -> Principal:
        caller = principal(request)
        if not caller.has(*roles):
            request.state.auth_refusal = "role"
            raise FhirHttpError(403, f"this needs the role {' or '.join(roles)}")
        return caller

    return dependency


def _safeguarding(task: StoredTask) -> bool:
    tags = task.resource.get("meta", {}).get("tag", [])
    return any(tag.get("code") == "safeguarding" for tag in tags if isinstance(tag, dict))


def can_see_task(caller: Principal, task: StoredTask) -> bool:
    """Whether the caller may read this Task."""
    if "admin" in caller.roles:
        return True
    own = bool(caller.practitioner) and task.owner == caller.practitioner
    if _safeguarding(task):
        return own or "safeguarding" in caller.roles
    return own or bool(caller.roles & {"clinician", "safeguarding", "governance"})


def can_change_task(caller: Principal, task: StoredTask) -> bool:
    """Whether the caller may change this Task's status: its owner, or an admin."""
    if "admin" in caller.roles:
        return True
    return (
        bool(caller.practitioner)
        and task.owner == caller.practitioner
        and bool(caller.roles & OWNER_ROLES)
    )
