"""Projection: canonical events -> small patient facts; and the working memory rules see.

Facts are flat dicts of scalars (the rule engine keeps at most a few hundred properties per
fact). Times are stored as integer epoch seconds in fields ending in `_at` (or `at`), so that
rules can compare and add to them; text is rendered from them in the site's time zone.

Fact keys (unique per patient):
    patient                      birth, sex, the identifier Tasks name the patient by
    encounter:<visit>            class, location, attending
    admission:<visit>            an admission (A01/A06) and when
    discharge:<visit>            the latest discharge of the visit, its disposition, whether it
                                 leaves the hospital's care, and whether it was cancelled (A13)
    order:<order key>            an order: procedure, imaging or not, skeletal survey or not,
                                 orderer, when performed, cancellation
    report:<order key>:<n>       one report message for an order: status P/F/C/W, flags, alert
                                 rank, key-finding concepts, time
    flag:<id>                    a safeguarding flag: raised when, still active or not
    finding:<note>:<concept>     a concept a clinical note asserts (not negated), with the words
                                 it used and the body region (terminology.toml)
    task:<identifier>            a Task the engine raised, as rules need it: rule, order key,
                                 priority, status, deadline, escalation level (written by the
                                 processor, so rules can escalate or withdraw Tasks)
    merge:<prior key>            a merge brought in another record's history (R13)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from engine.events import (
    ALERTS,
    AdmissionCancelled,
    ClinicalNote,
    Clinician,
    DischargeCancelled,
    Event,
    ImagingOrdered,
    OrderCancelled,
    OrderChanged,
    Patient,
    PatientAdmitted,
    PatientDischarged,
    PatientRegistered,
    PatientTransferred,
    PatientUpdated,
    ReportIssued,
    SafeguardingFlagCleared,
    SafeguardingFlagRaised,
    Visit,
)
from engine.identity import preferred_identifier
from engine.ports import Fact
from engine.terminology import EMPTY as EMPTY_TERMINOLOGY
from engine.terminology import Terminology

# `cancelled_at` of an order that was never cancelled: later than any real time, so that
# "not cancelled by t" is the single comparison `cancelled_at > t` (see engine.definitions).
NEVER = 9_999_999_999
REPORT_CODES = {"preliminary": "P", "final": "F", "corrected": "C", "withdrawn": "W"}
# OBX-8 abnormal flags that mean a critical result (table 0078: panic high/low, critically
# abnormal).
CRITICAL_FLAGS = frozenset({"AA", "HH", "LL"})


@dataclass(frozen=True, slots=True)
class SiteFacts:
    """The site settings projection needs: what counts as imaging and as leaving care."""

    imaging_sections: frozenset[str]
    imaging_codes: frozenset[str]
    imaging_name_words: tuple[str, ...]
    internal_dispositions: frozenset[str]
    internal_destinations: frozenset[str]
    skeletal_codes: frozenset[str] = frozenset()
    skeletal_name_words: tuple[str, ...] = ("skeletal survey",)
    terminology: Terminology = EMPTY_TERMINOLOGY

    def is_skeletal_survey(self, code: str, name: str) -> bool:
        """A skeletal survey by procedure code, or by a configured phrase in its name."""
        if code and code in self.skeletal_codes:
            return True
        lowered = name.lower()
        return any(word in lowered for word in self.skeletal_name_words)

    def is_imaging(self, section: str, code: str, name: str) -> bool:
        """Imaging by OBR-24 section, by procedure code, or by a word in the procedure name."""
        if section.upper() in self.imaging_sections or (code and code in self.imaging_codes):
            return True
        lowered = name.lower()
        return any(word in lowered for word in self.imaging_name_words)

    def leaves_care(self, visit: Visit) -> bool:
        """False when the disposition says admitted or transferred within the hospital."""
        return not (
            visit.disposition in self.internal_dispositions
            or (visit.discharged_to and visit.discharged_to in self.internal_destinations)
        )


def epoch(at: datetime) -> int:
    """Integer epoch seconds of an aware datetime."""
    return int(at.timestamp())


def from_epoch(seconds: int) -> datetime:
    """The UTC datetime of epoch seconds."""
    return datetime.fromtimestamp(seconds, UTC)


def _clinician(prefix: str, who: Clinician | None) -> dict[str, Any]:
    if who is None or (not who.id and not who.name):
        return {}
    return {f"{prefix}_id": who.id, f"{prefix}_name": who.name, f"{prefix}_auth": who.authority}


def _merged(current: Mapping[str, Fact], key: str, kind: str, new: Mapping[str, Any]) -> Fact:
    """The fact `key` with `new`'s non-empty values laid over what is already known."""
    data: dict[str, Any] = dict(current[key].data) if key in current else {"kind": kind}
    data.update({k: v for k, v in new.items() if v not in ("", None)})
    return Fact(key, kind, data)


def _patient_fact(current: Mapping[str, Fact], patient: Patient | None) -> list[Fact]:
    if patient is None:
        return []
    new: dict[str, Any] = {"sex": patient.sex, "unmatched": 0}
    if patient.birth is not None:
        new["birth_at"] = epoch(patient.birth)
        new["birth_date"] = patient.birth.date().isoformat()
    ident = preferred_identifier(patient.identifiers)
    known = current["patient"].data if "patient" in current else {}
    # A Task names the patient by NHS number once one is known, even from an older message.
    if ident is not None and (ident.is_nhs_number or not known.get("id_nhs")):
        new.update(id_system=ident.system, id_value=ident.value, id_nhs=ident.is_nhs_number)
    return [_merged(current, "patient", "patient", new)]


def _visit_facts(
    current: Mapping[str, Fact], event: Event, visit: Visit, site: SiteFacts
) -> list[Fact]:
    out = _patient_fact(current, event.patient)
    if not event.encounter:
        return out
    enc = event.encounter
    new: dict[str, Any] = {"enc": enc, "class": visit.patient_class, "location": visit.location}
    new.update(_clinician("attending", visit.attending))
    if isinstance(event, PatientRegistered | PatientAdmitted):
        new["started_at"] = epoch(event.occurred_at)
    out.append(_merged(current, f"encounter:{enc}", "encounter", new))
    if isinstance(event, PatientAdmitted):
        out.append(
            Fact(
                f"admission:{enc}",
                "admission",
                {"kind": "admission", "enc": enc, "at": epoch(event.occurred_at), "cancelled": 0},
            )
        )
    if isinstance(event, PatientDischarged):
        encounter = out[-1].data
        data: dict[str, Any] = {
            "kind": "discharge",
            "enc": enc,
            "at": epoch(event.occurred_at),
            "leaves_care": int(site.leaves_care(visit)),
            "disposition": visit.disposition,
            "cancelled": 0,
            "class": encounter.get("class", ""),
            "location": encounter.get("location", ""),
        }
        data.update({k: v for k, v in encounter.items() if k.startswith("attending_")})
        out.append(Fact(f"discharge:{enc}", "discharge", data))
    return out


def _encounter_at(current: Mapping[str, Fact], at: int) -> str:
    """The visit open at `at`: the latest one started by then (for orders sent without PV1)."""
    best, best_start = "", -1
    for fact in current.values():
        if fact.kind == "encounter":
            start = int(fact.data.get("started_at", -1))
            if best_start < start <= at:
                best, best_start = str(fact.data["enc"]), start
    return best


def _order_fact(
    current: Mapping[str, Fact],
    order_key: str,
    event: ImagingOrdered | ReportIssued,
    site: SiteFacts,
) -> Fact:
    ref = event.order
    enc = (
        event.encounter
        or str(current.get(f"order:{order_key}", Fact("", "", {})).data.get("enc", ""))
        or _encounter_at(current, epoch(event.occurred_at))
    )
    new: dict[str, Any] = {
        "okey": order_key,
        "enc": enc,
        "code": event.procedure_code,
        "name": event.procedure_name,
        "section": event.section,
        "placer": ref.placer,
        "placer_ns": ref.placer_ns,
        "filler": ref.filler,
        "filler_ns": ref.filler_ns,
    }
    new.update(_clinician("orderer", event.orderer))
    fact = _merged(current, f"order:{order_key}", "order", new)
    data = dict(fact.data)
    data.setdefault("cancelled_at", NEVER)
    # An order first heard of through its report (a results-only feed) existed at least from
    # the examination (OBR-7), else from the report itself.
    first_seen = event.occurred_at
    if isinstance(event, ReportIssued) and event.performed_at is not None:
        first_seen = min(first_seen, event.performed_at)
    data.setdefault("ordered_at", epoch(first_seen))
    data.setdefault("performed_at", NEVER)
    if isinstance(event, ReportIssued) and event.performed_at is not None:
        data["performed_at"] = min(int(data["performed_at"]), epoch(event.performed_at))
    data["skeletal"] = int(
        site.is_skeletal_survey(str(data.get("code", "")), str(data.get("name", "")))
    )
    data["imaging"] = int(
        site.is_imaging(
            str(data.get("section", "")), str(data.get("code", "")), str(data.get("name", ""))
        )
    )
    return Fact(fact.key, "order", data)


def project(
    event: Event,
    current: Mapping[str, Fact],
    site: SiteFacts,
    order_key: str = "",
) -> list[Fact]:
    """The facts to insert or replace after `event`, given the patient's current facts.

    `order_key` is the resolved key of the event's order, for order and report events.
    """
    if isinstance(
        event,
        PatientRegistered
        | PatientAdmitted
        | PatientTransferred
        | PatientDischarged
        | PatientUpdated,
    ):
        return _visit_facts(current, event, event.visit, site)
    if isinstance(event, DischargeCancelled):
        key = f"discharge:{event.encounter}"
        if key not in current:
            return []
        return [Fact(key, "discharge", {**current[key].data, "cancelled": 1})]
    if isinstance(event, AdmissionCancelled):
        key = f"admission:{event.encounter}"
        return (
            [Fact(key, "admission", {**current[key].data, "cancelled": 1})]
            if (key in current)
            else []
        )
    if isinstance(event, ImagingOrdered):
        return [
            *_patient_fact(current, event.patient),
            _order_fact(current, order_key, event, site),
        ]
    if isinstance(event, OrderCancelled | OrderChanged):
        key = f"order:{order_key}"
        if key not in current:
            return []
        data = dict(current[key].data)
        if isinstance(event, OrderCancelled):
            data["cancelled_at"] = min(
                int(data.get("cancelled_at", NEVER)), epoch(event.occurred_at)
            )
        else:
            data["order_status"] = event.order_status
            if event.order_status in PERFORMED_STATUSES:
                data["performed_at"] = min(
                    int(data.get("performed_at", NEVER)), epoch(event.occurred_at)
                )
        return [Fact(key, "order", data)]
    if isinstance(event, ReportIssued):
        out = [*_patient_fact(current, event.patient)]
        okey = f"order:{order_key}"
        if okey not in current or (
            event.performed_at is not None
            and int(current[okey].data.get("performed_at", NEVER)) > epoch(event.performed_at)
        ):
            out.append(_order_fact(current, order_key, event, site))
        n = sum(1 for k in current if k.startswith(f"report:{order_key}:"))
        out.append(
            Fact(
                f"report:{order_key}:{n}",
                "report",
                {
                    "kind": "report",
                    "okey": order_key,
                    "status": REPORT_CODES[event.status],
                    "final": int(event.status in ("final", "corrected")),
                    "at": epoch(event.occurred_at),
                    "flags": ",".join(sorted({f for f in event.flags if f})),
                    "abnormal": int(event.abnormal),
                    "alert": alert_rank(event),
                    "findings": ",".join(sorted(set(event.findings))),
                    "wrong_patient": int(event.wrong_patient),
                    "message_id": event.source.message_id,
                },
            )
        )
        return out
    if isinstance(event, SafeguardingFlagRaised | SafeguardingFlagCleared):
        key = f"flag:{event.flag}"
        data = dict(current[key].data) if key in current else {"kind": "flag", "flag": event.flag}
        if isinstance(event, SafeguardingFlagRaised):
            data.update(active=1, category=event.category, cleared_at=NEVER)
            data.setdefault("at", epoch(event.occurred_at))
        elif key in current:
            data.update(active=0, cleared_at=epoch(event.occurred_at))
        else:
            return []
        return [*_patient_fact(current, event.patient), Fact(key, "flag", data)]
    if isinstance(event, ClinicalNote):
        out = [*_patient_fact(current, event.patient)]
        for finding in site.terminology.find(event.text):
            key = f"finding:{event.note}:{finding.concept}"
            # A note sent again (an edit) keeps the time its finding was first recorded.
            first = current[key].data["at"] if key in current else epoch(event.occurred_at)
            out.append(
                Fact(
                    key,
                    "finding",
                    {
                        "kind": "finding",
                        "concept": finding.concept,
                        "words": finding.words,
                        "region": finding.region,
                        "patterned": int(finding.patterned),
                        "at": first,
                        "source": event.source_kind,
                        "enc": event.encounter,
                        "note": event.note,
                        "terminology": site.terminology.version,
                    },
                )
            )
        return out
    return []


PERFORMED_STATUSES = frozenset({"IP", "CM"})  # ORC-5: in process, completed


def alert_rank(report: ReportIssued) -> int:
    """The report's alert as a rank (0 none, 1 significant unexpected, 2 urgent, 3 critical):
    the radiologist's category, or critical when an observation is flagged AA, HH or LL."""
    rank = ALERTS.index(report.alert) if report.alert in ALERTS else 0
    if CRITICAL_FLAGS & set(report.flags):
        rank = 3
    return rank


def months_between(birth: datetime, at: datetime) -> int:
    """Completed calendar months from `birth` to `at`."""
    months = (at.year - birth.year) * 12 + (at.month - birth.month)
    if at.day < birth.day:
        months -= 1
    return months


def working_memory(
    facts: Iterable[Fact], now: datetime, tz: Any
) -> list[tuple[str, dict[str, Any]]]:
    """What the rules see: the stored facts, each dated one (`at`; an order's `ordered_at`)
    with the patient's age at that moment (`age_months`, `age_days`; -1 when the birth date
    is unknown), and `now`."""
    facts = list(facts)
    birth_at = next((f.data.get("birth_at") for f in facts if f.kind == "patient"), None)
    born = None if birth_at is None else from_epoch(int(birth_at)).astimezone(tz)
    out: list[tuple[str, dict[str, Any]]] = []
    for fact in facts:
        data = dict(fact.data)
        at = data.get("ordered_at" if fact.kind == "order" else "at")
        if isinstance(at, int) and fact.kind != "task":
            if born is None:
                data.update(age_months=-1, age_days=-1)
            else:
                then = from_epoch(at).astimezone(tz)
                data.update(age_months=months_between(born, then), age_days=(then - born).days)
        out.append((fact.key, data))
    out.append(("now", {"kind": "now", "t": epoch(now)}))
    return out


def by_key(facts: Sequence[Fact]) -> dict[str, Fact]:
    """Index facts by key."""
    return {f.key: f for f in facts}
