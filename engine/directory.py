"""Who owns what: the site's directory of clinicians, teams and roles (rules/directory.toml).

Rules never hard-code a person. They ask for the clinician a message named, the consultant
in charge of that clinician's team, or a role (on-call lead, safeguarding lead, named doctor
for safeguarding, the identity pool...). A role nobody holds falls back to the site's pool,
so a Task is never ownerless.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.errors import ConfigurationError
from engine.events import Clinician

ROLES = (
    "consultant-in-charge",
    "on-call-lead",
    "safeguarding-lead",
    "named-doctor-safeguarding",
    "identity-pool",
    "radiology-spa-lead",
)


@dataclass(frozen=True, slots=True)
class Team:
    """A team and the consultant in charge of it."""

    id: str
    name: str
    lead: str  # clinician id of the consultant in charge


@dataclass(frozen=True, slots=True)
class Directory:
    """Clinicians (id -> name, team), teams, and roles (role -> clinician or pool)."""

    clinicians: Mapping[str, tuple[str, str]] = field(default_factory=dict)  # id -> (name, team)
    teams: Mapping[str, Team] = field(default_factory=dict)
    roles: Mapping[str, tuple[Clinician, bool]] = field(default_factory=dict)
    authority: str = ""

    def person(self, clinician_id: str) -> Clinician:
        """The clinician with this id, named as the directory knows them."""
        name, _team = self.clinicians.get(clinician_id, ("", ""))
        return Clinician(clinician_id, name, self.authority)

    def team_lead(self, clinician_id: str) -> tuple[Clinician, str] | None:
        """The consultant in charge of this clinician's team, and the team's name; None when
        the clinician has no team or is the lead themself."""
        _name, team_id = self.clinicians.get(clinician_id, ("", ""))
        team = self.teams.get(team_id)
        if team is None or not team.lead or team.lead == clinician_id:
            return None
        return self.person(team.lead), team.name

    def role(self, name: str, pool: Clinician) -> tuple[Clinician, bool]:
        """Who holds `name` (and whether it is a pool); the site's pool when nobody does."""
        return self.roles.get(name, (pool, True))


def parse_directory(raw: Mapping[str, Any], path: str) -> Directory:
    """Build the directory from `directory.toml`; ConfigurationError names the problem."""
    clinicians: dict[str, tuple[str, str]] = {}
    for ident, spec in raw.get("clinicians", {}).items():
        if not isinstance(spec, dict):
            raise ConfigurationError(f"{path}: [clinicians.{ident}] must be a table")
        clinicians[str(ident)] = (str(spec.get("name", "")), str(spec.get("team", "")))
    teams = {}
    for ident, spec in raw.get("teams", {}).items():
        if not isinstance(spec, dict):
            raise ConfigurationError(f"{path}: [teams.{ident}] must be a table")
        teams[str(ident)] = Team(
            str(ident), str(spec.get("name", ident)), str(spec.get("lead", ""))
        )
    for ident, (_name, team) in clinicians.items():
        if team and team not in teams:
            raise ConfigurationError(f"{path}: clinician {ident} names unknown team {team!r}")
    roles: dict[str, tuple[Clinician, bool]] = {}
    authority = str(raw.get("authority", ""))
    for role, spec in raw.get("roles", {}).items():
        if role not in ROLES:
            raise ConfigurationError(f"{path}: unknown role {role!r}; roles are {', '.join(ROLES)}")
        if not isinstance(spec, dict) or not spec.get("id"):
            raise ConfigurationError(f"{path}: [roles.{role}] needs an id")
        is_pool = bool(spec.get("pool", False))
        roles[role] = (
            Clinician(
                str(spec["id"]),
                str(spec.get("name", clinicians.get(str(spec["id"]), ("", ""))[0])),
                "urn:safetynet:pool" if is_pool else str(spec.get("authority", authority)),
            ),
            is_pool,
        )
    return Directory(clinicians, teams, roles, authority)
