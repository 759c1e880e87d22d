"""The rule catalogue: rule folders (`rules/<id>/`) and the site's `rules/settings.toml`.

A rule folder holds `rule.toml` (id, title, version, status, parameters with defaults, units,
docs and hard limits, and a `[tasks]` table saying how the engine treats its Tasks:
governance-owned), `rule.py` (the durable_rules conditions and the Task they raise:
engineer-owned, no module-level state), `cases/*.toml` and `README.md`. `settings.toml` holds
the site's overrides: each rule's status and parameters under `[rules.<id>]`, and the shared
definitions (time zone, what counts as imaging, what counts as leaving the hospital's care,
owners, location names). Beside it, `directory.toml` maps clinicians to teams and roles to
people, and `terminology.toml` maps surface words in clinical text to concepts.
"""

from __future__ import annotations

import importlib.util
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from engine.directory import Directory, parse_directory
from engine.errors import ConfigurationError
from engine.events import Clinician
from engine.facts import SiteFacts
from engine.terminology import EMPTY as EMPTY_TERMINOLOGY
from engine.terminology import Terminology, parse_terminology

STATUSES = ("active", "shadow", "off")


@dataclass(frozen=True, slots=True)
class Parameter:
    """One tunable value of a rule, and where its value came from."""

    name: str
    value: Any
    default: Any
    unit: str
    doc: str
    source: str  # "default" | "site"
    maximum: Any = None  # a hard limit no site may exceed (e.g. 72 h for a skeletal survey)


@dataclass(frozen=True, slots=True)
class Site:
    """Shared definitions every rule relies on."""

    timezone: ZoneInfo
    settle_minutes: int
    facts: SiteFacts
    pool: Clinician
    locations: Mapping[str, str]
    mdm_document_types: frozenset[str]
    directory: Directory = field(default_factory=Directory)
    terminology: Terminology = EMPTY_TERMINOLOGY
    hl7: Mapping[str, Any] = field(default_factory=dict)  # settings.toml [hl7], for the mapper
    fhir: Mapping[str, Any] = field(default_factory=dict)  # settings.toml [fhir], for the mapper

    def place(self, location: str, patient_class: str) -> str:
        """A plain-English place for a PV1-3 location, e.g. "the paediatric emergency
        department"; falls back on the patient class, then on the raw code."""
        if location in self.locations:
            return self.locations[location]
        if patient_class == "E":
            return "the emergency department"
        return f"{location}" if location else "hospital"


class RuleModule(Protocol):
    """What a rule folder's `rule.py` provides."""

    def conditions(self, p: Mapping[str, Any], site: Site) -> Mapping[str, Mapping[str, Any]]:
        """Named durable_rules definitions (without actions)."""
        ...

    def recall_task(self, match: Any) -> Any:
        """What one match decides: a Task (`engine.tasks.RecallTask`), a change to an
        existing Task (`engine.tasks.TaskChange`), a list of these, or None."""
        ...

    def wake_times(
        self, facts: Sequence[tuple[str, Mapping[str, Any]]], p: Mapping[str, Any], site: Site
    ) -> Iterable[datetime]:
        """When this patient must be evaluated again for this rule."""
        ...


@dataclass(frozen=True)
class Rule:
    """A loaded rule: its card, its parameters with their sources, and its logic."""

    id: str
    title: str
    version: str
    status: str
    summary: str
    parameters: Mapping[str, Parameter]
    module: RuleModule
    path: Path
    status_source: str = "default"
    # How the engine treats this rule's Tasks (rule.toml [tasks]):
    discharge_dependent: bool = False  # withdrawn when their discharge is cancelled (R12)
    safeguarding: bool = False  # safeguarding Tasks: never withdrawn; escalate to L3
    escalates: bool = True  # escalated when not accepted in time (R11)

    @cached_property
    def params(self) -> dict[str, Any]:
        """Parameter values by name (computed once: a rule is immutable)."""
        return {name: p.value for name, p in self.parameters.items()}

    @property
    def uri(self) -> str:
        """`urn:safetynet:rule:<id>|<version>`, the Task's instantiatesUri."""
        return f"urn:safetynet:rule:{self.id}|{self.version}"


@dataclass(frozen=True)
class Catalogue:
    """Every rule of a rules folder plus the site settings."""

    rules: tuple[Rule, ...]
    site: Site
    path: Path

    def rule(self, rule_id: str) -> Rule:
        """The rule with this id."""
        for rule in self.rules:
            if rule.id == rule_id:
                return rule
        raise KeyError(rule_id)

    @property
    def evaluated(self) -> tuple[Rule, ...]:
        """Rules that run: active and shadow ones."""
        return tuple(r for r in self.rules if r.status != "off")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigurationError(f"{path}: file not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{path}: invalid TOML: {exc}") from exc


def _load_module(path: Path, rule_id: str) -> RuleModule:
    name = "safetynet_rule_" + rule_id.replace("-", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigurationError(f"{path}: cannot be loaded as a Python module")
    module: ModuleType = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise ConfigurationError(f"{path}: {type(exc).__name__}: {exc}") from exc
    for needed in ("conditions", "recall_task", "wake_times"):
        if not callable(getattr(module, needed, None)):
            raise ConfigurationError(f"{path}: defines no function {needed}()")
    return module  # type: ignore[return-value,unused-ignore]


def _site(
    settings: Mapping[str, Any], path: Path, directory: Directory, terminology: Terminology
) -> Site:
    try:
        tz = ZoneInfo(str(settings.get("timezone", "Europe/London")))
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ConfigurationError(f"{path}: unknown time zone {settings.get('timezone')!r}") from exc
    discharge = settings.get("discharge", {})
    imaging = settings.get("imaging", {})
    skeletal = imaging.get("skeletal_survey", {})
    owners = settings.get("owners", {})
    pool = owners.get("pool", {})
    if not pool.get("id"):
        raise ConfigurationError(f"{path}: [owners.pool] needs an id (no Task is ever ownerless)")
    return Site(
        timezone=tz,
        settle_minutes=int(discharge.get("settle_minutes", 15)),
        facts=SiteFacts(
            imaging_sections=frozenset(s.upper() for s in imaging.get("sections", [])),
            imaging_codes=frozenset(imaging.get("procedure_codes", [])),
            imaging_name_words=tuple(w.lower() for w in imaging.get("procedure_name_words", [])),
            internal_dispositions=frozenset(discharge.get("internal_dispositions", [])),
            internal_destinations=frozenset(discharge.get("internal_destinations", [])),
            skeletal_codes=frozenset(skeletal.get("procedure_codes", [])),
            skeletal_name_words=tuple(
                w.lower() for w in skeletal.get("procedure_name_words", ["skeletal survey"])
            ),
            terminology=terminology,
        ),
        pool=Clinician(str(pool["id"]), str(pool.get("name", "")), str(pool.get("system", ""))),
        locations=dict(settings.get("locations", {})),
        mdm_document_types=frozenset(imaging.get("mdm_document_types", [])),
        directory=directory,
        terminology=terminology,
        hl7=dict(settings.get("hl7", {})),
        fhir=dict(settings.get("fhir", {})),
    )


def load_rule(folder: Path, overrides: Mapping[str, Any]) -> Rule:
    """Load one rule folder, applying the site's overrides for it."""
    card_path = folder / "rule.toml"
    card = _read_toml(card_path)
    for key in ("id", "title", "version", "status"):
        if key not in card:
            raise ConfigurationError(f"{card_path}: missing '{key}'")
    if card["id"] != folder.name:
        raise ConfigurationError(f"{card_path}: id {card['id']!r} differs from folder name")
    status, status_source = card["status"], "default"
    if "status" in overrides:
        status, status_source = overrides["status"], "site"
    if status not in STATUSES:
        raise ConfigurationError(f"{card_path}: status {status!r} is not one of {STATUSES}")
    params: dict[str, Parameter] = {}
    for name, spec in card.get("parameters", {}).items():
        if not isinstance(spec, dict) or "default" not in spec:
            raise ConfigurationError(f"{card_path}: parameter {name!r} needs a default")
        value, source = spec["default"], "default"
        if name in overrides:
            value, source = overrides[name], "site"
            if type(value) is not type(spec["default"]):
                raise ConfigurationError(
                    f"settings.toml: [rules.{card['id']}] {name} must be "
                    f"{type(spec['default']).__name__}, like its default"
                )
        maximum = spec.get("max")
        if maximum is not None and value > maximum:
            raise ConfigurationError(
                f"{'settings.toml' if source == 'site' else card_path}: [rules.{card['id']}] "
                f"{name} = {value} exceeds its hard limit {maximum}"
            )
        params[name] = Parameter(
            name,
            value,
            spec["default"],
            str(spec.get("unit", "")),
            str(spec.get("doc", "")),
            source,
            maximum,
        )
    tasks = card.get("tasks", {})
    unknown_flags = set(tasks) - {"discharge_dependent", "safeguarding", "escalates"}
    if unknown_flags:
        raise ConfigurationError(f"{card_path}: [tasks] has unknown keys {sorted(unknown_flags)}")
    unknown = set(overrides) - set(params) - {"status"}
    if unknown:
        raise ConfigurationError(
            f"settings.toml: [rules.{card['id']}] has unknown parameters {sorted(unknown)}"
        )
    return Rule(
        id=card["id"],
        title=card["title"],
        version=str(card["version"]),
        status=status,
        summary=str(card.get("summary", "")),
        parameters=params,
        module=_load_module(folder / "rule.py", card["id"]),
        path=folder,
        status_source=status_source,
        discharge_dependent=bool(tasks.get("discharge_dependent", False)),
        safeguarding=bool(tasks.get("safeguarding", False)),
        escalates=bool(tasks.get("escalates", True)),
    )


def load_catalogue(path: Path) -> Catalogue:
    """Load every rule folder under `path` (folders holding a rule.toml, in name order) and
    `path/settings.toml`. Raises ConfigurationError naming the file and the problem."""
    if not path.is_dir():
        raise ConfigurationError(f"{path}: rules folder not found")
    settings = _read_toml(path / "settings.toml")
    directory = Directory()
    if (path / "directory.toml").is_file():
        directory = parse_directory(
            _read_toml(path / "directory.toml"), str(path / "directory.toml")
        )
    terminology = EMPTY_TERMINOLOGY
    if (path / "terminology.toml").is_file():
        terminology = parse_terminology(
            _read_toml(path / "terminology.toml"), str(path / "terminology.toml")
        )
    site = _site(settings, path / "settings.toml", directory, terminology)
    overrides = settings.get("rules", {})
    rules = tuple(
        load_rule(folder, overrides.get(folder.name, {}))
        for folder in sorted(p for p in path.iterdir() if (p / "rule.toml").is_file())
    )
    unknown = set(overrides) - {r.id for r in rules}
    if unknown:
        raise ConfigurationError(f"{path / 'settings.toml'}: no rule folder for {sorted(unknown)}")
    return Catalogue(rules=rules, site=site, path=path)
