"""Who is calling the HTTP API, and what they may do.

Bearer tokens (`safetynet tokens create|revoke|list`) are stored as their SHA-256 only. Roles:

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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime

from fastapi import Request
from sqlalchemy import insert, select, update

from adapters.fhir.http import FhirHttpError
from adapters.store import SqlStore
from adapters.store.schema import api_tokens
from engine.ports import StoredTask

__all__ = [
    "ROLES",
    "Authenticator",
    "Principal",
    "TokenStore",
    "can_change_task",
    "can_see_task",
    "hash_token",
    "principal",
    "require",
]

ROLES = ("feed", "clinician", "safeguarding", "governance", "admin")
TOKEN_PREFIX = "sn_"


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


def hash_token(token: str) -> str:
    """What is stored of a token: its SHA-256, hex."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _check_roles(roles: Iterable[str]) -> tuple[str, ...]:
    chosen = tuple(dict.fromkeys(roles))
    unknown = [role for role in chosen if role not in ROLES]
    if unknown or not chosen:
        raise ValueError(
            f"unknown role {', '.join(unknown)}" if unknown else "a token needs a role"
        ) from None
    return chosen


class TokenStore:
    """Bearer tokens in the database."""

    def __init__(self, store: SqlStore) -> None:
        self._store = store

    def create(self, name: str, roles: Iterable[str], at: datetime, practitioner: str = "") -> str:
        """A new token (returned once, never stored in clear). Raises ValueError for an
        unknown role, a clinician without a practitioner, or a name already in use."""
        chosen = _check_roles(roles)
        if ("clinician" in chosen or "safeguarding" in chosen) and not practitioner:
            raise ValueError("a clinician token needs --practitioner (the Task owner id)")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self._store.begin() as uow:
            taken = uow.connection.execute(
                select(api_tokens.c.id).where(api_tokens.c.name == name)
            ).first()
            if taken is not None:
                raise ValueError(f"a token named {name!r} exists already")
            uow.connection.execute(
                insert(api_tokens).values(
                    name=name,
                    token_hash=hash_token(token),
                    roles=",".join(chosen),
                    practitioner=practitioner,
                    created_at=at,
                    revoked_at=None,
                )
            )
            uow.audit(at, "cli", "token.created", name, {"roles": list(chosen)})
        return token

    def revoke(self, name: str, at: datetime) -> bool:
        """Revoke a token by name; False when there is no such live token."""
        with self._store.begin() as uow:
            done = uow.connection.execute(
                update(api_tokens)
                .where(api_tokens.c.name == name, api_tokens.c.revoked_at.is_(None))
                .values(revoked_at=at)
            )
            if done.rowcount:
                uow.audit(at, "cli", "token.revoked", name, {})
            return bool(done.rowcount)

    def lookup(self, token: str) -> Principal | None:
        """The principal of a live token, or None."""
        with self._store.begin(read_only=True) as uow:
            row = uow.connection.execute(
                select(api_tokens.c.name, api_tokens.c.roles, api_tokens.c.practitioner).where(
                    api_tokens.c.token_hash == hash_token(token),
                    api_tokens.c.revoked_at.is_(None),
                )
            ).first()
        if row is None:
            return None
        return Principal(row.name, frozenset(filter(None, row.roles.split(","))), row.practitioner)


class Authenticator:
    """Turns an Authorization header into a Principal, or refuses with 401."""

    def __init__(self, tokens: TokenStore) -> None:
        self._tokens = tokens

    def authenticate(self, authorization: str | None) -> Principal:
        """The caller, or FhirHttpError 401 (with a WWW-Authenticate challenge)."""
        scheme, _, credential = (authorization or "").partition(" ")
        challenge = {"WWW-Authenticate": 'Bearer realm="safetynet"'}
        if scheme.lower() != "bearer" or not credential.strip():
            raise FhirHttpError(
                401, "a bearer token is required (Authorization: Bearer ...)", headers=challenge
            )
        found = self._tokens.lookup(credential.strip())
        if found is None:
            raise FhirHttpError(401, "the token is not valid or was revoked", headers=challenge)
        return found


def principal(request: Request) -> Principal:
    """FastAPI dependency: the authenticated caller (`app.state.authenticator` decides)."""
    authenticator: Authenticator = request.app.state.authenticator
    caller = authenticator.authenticate(request.headers.get("authorization"))
    request.state.principal = caller
    return caller


def require(*roles: str) -> Callable[[Request], Principal]:
    """FastAPI dependency: the caller, who must hold one of `roles` (admin always may);
    otherwise 403 with an OperationOutcome."""

    def dependency(request: Request) -> Principal:
        caller = principal(request)
        if not caller.has(*roles):
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
        and bool(caller.roles & {"clinician", "safeguarding"})
    )
