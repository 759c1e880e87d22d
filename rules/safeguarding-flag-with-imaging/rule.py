"""Safeguarding flag with imaging pending or newly reported (clinical-rules R8).

A child with an active safeguarding flag either (a) goes home while an imaging order of the
visit is still pending, or (b) has a final or corrected imaging report issued while the flag
is active. Each raises two Tasks, since a FHIR Task has one owner: one for the responsible
clinician, and one for the safeguarding team that is `partOf` it. No module-level state.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from engine.catalogue import Site
from engine.definitions import (
    discharge_trigger,
    discharged_home,
    pending_order,
    settle_ends,
    unless_admitted_after,
    unless_final_by_discharge,
)
from engine.events import Clinician
from engine.rulecore import c, m, when_all
from engine.tasks import (
    RecallTask,
    RuleMatch,
    local_time,
    plus_hours,
    responsible_clinician,
    role_owner,
    when,
    who,
)


def _flag_active_at(alias: str) -> Any:
    """A safeguarding flag `g` raised by the moment `<alias>.at` and not cleared by then.
    (A reference such as `c.d.at` is built afresh for each use: durable_rules extends the
    same object on every attribute access.)"""
    return c.g << (
        (m.kind == "flag") & (m.at <= getattr(c, alias).at) & (m.cleared_at > getattr(c, alias).at)
    )


def conditions(p: Mapping[str, Any], site: Site) -> Mapping[str, Mapping[str, Any]]:
    """(a) "pending": a discharge home `d`, an order `o` pending then, a flag `g` active then.
    (b) "reported": a final or corrected report `r` of an imaging order `o` issued while a
    flag `g` was active. Each match raises both Tasks (the clinician's, the team's)."""
    return {
        "pending": when_all(
            *discharged_home(p["max_age_months"], site.settle_minutes),
            *pending_order(),
            _flag_active_at("d"),
        ).define(),
        "pending!unless-admitted": unless_admitted_after(site.settle_minutes),
        "pending!unless-final": unless_final_by_discharge(),
        "reported": when_all(
            c.r << ((m.kind == "report") & (m.final == 1) & (m.age_months < p["max_age_months"])),
            c.o << ((m.kind == "order") & (m.okey == c.r.okey) & (m.imaging == 1)),
            _flag_active_at("r"),
        ).define(),
    }


def _flag(match: RuleMatch, at: int) -> Mapping[str, Any]:
    """The earliest flag active at `at` (several may be; the Task names one, always the same)."""
    active = [f for f in match.of_kind("flag") if f["at"] <= at < f["cleared_at"]]
    return min(active, key=lambda f: (f["at"], str(f["flag"])), default=match.facts["g"])


def _encounter(match: RuleMatch, enc: str) -> Mapping[str, Any]:
    return next((e for e in match.of_kind("encounter") if e.get("enc") == enc), {})


def _subject(age_months: int) -> str:
    return "child" if 0 <= age_months < 18 * 12 else "patient"


def recall_task(match: RuleMatch) -> list[RecallTask]:
    """The clinician's Task and the safeguarding team's, `partOf` it."""
    if match.variant == "pending":
        return _pending(match)
    return _reported(match)


def _pending(match: RuleMatch) -> list[RecallTask]:
    d, o, site, p = match.facts["d"], match.facts["o"], match.site, match.p
    flag = _flag(match, int(d["at"]))
    raised = int(d["at"]) + site.settle_minutes * 60
    procedure = o.get("name") or "an imaging examination"
    reports = [r for r in match.of_kind("report") if r["okey"] == o["okey"] and r["at"] <= d["at"]]
    state = (
        "had only a preliminary report"
        if any(r["status"] == "P" for r in reports)
        else "had not been reported"
    )
    subject = _subject(int(d["age_months"]))
    story = (
        f"{who(d, match.patient()).capitalize()} with an active safeguarding flag (recorded at "
        f"{when(int(flag['at']), site)}) was discharged home from "
        f"{site.place(str(d.get('location', '')), str(d.get('class', '')))} at "
        f"{when(int(d['at']), site)} while {procedure} {state}."
    )
    return _pair(
        match,
        trigger=discharge_trigger(d),
        story=story,
        clinician=responsible_clinician(site, d, o),
        clinician_asks=(
            "Review the final report as soon as it is issued, whatever it shows, share it "
            f"with the safeguarding team, and recall the {subject} if needed."
        ),
        team_asks=(
            "has a Task to follow the result up. Make sure the final report is shared with "
            f"the team working with the {subject} and acted on under the safeguarding plan."
        ),
        reason="Safeguarding flag: imaging pending when the patient went home",
        order=o,
        encounter=str(d["enc"]),
        discharge=d,
        authored_on=local_time(raised, site),
        deadline=plus_hours(raised, p["ack_hours"], site),
        inputs=_inputs(flag),
    )


def _reported(match: RuleMatch) -> list[RecallTask]:
    r, o, site, p = match.facts["r"], match.facts["o"], match.site, match.p
    flag = _flag(match, int(r["at"]))
    procedure = o.get("name") or "an imaging examination"
    kind = "corrected" if r["status"] == "C" else "final"
    subject = _subject(int(r["age_months"]))
    story = (
        f"The {kind} report of {procedure} for {_a(who(r, match.patient()))} with an active "
        f"safeguarding flag (recorded at {when(int(flag['at']), site)}) was issued at "
        f"{when(int(r['at']), site)}."
    )
    raised = int(r["at"])
    return _pair(
        match,
        trigger=f"report:{r['at']}",
        story=story,
        clinician=responsible_clinician(site, _encounter(match, str(o.get("enc", ""))), o),
        clinician_asks=(
            "Review the report today, whatever it shows, share it with the safeguarding "
            f"team, and recall the {subject} if needed."
        ),
        team_asks=(
            "has a Task to review it. Make sure the report is known to the team working with "
            f"the {subject} and acted on under the safeguarding plan."
        ),
        reason="Safeguarding flag: imaging report issued",
        order=o,
        encounter=str(o.get("enc", "")),
        discharge=None,
        authored_on=local_time(raised, site),
        deadline=plus_hours(raised, p["ack_hours"], site),
        inputs=_inputs(flag),
    )


def _pair(
    match: RuleMatch,
    *,
    trigger: str,
    story: str,
    clinician: tuple[Clinician, bool],
    clinician_asks: str,
    team_asks: str,
    **common: Any,
) -> list[RecallTask]:
    """The responsible clinician's Task, and the safeguarding team's, `partOf` it (a FHIR
    Task has one owner)."""
    own = match.task(
        trigger=trigger,
        description=(
            f"{story} The safeguarding team has its own Task about this. {clinician_asks}"
        ),
        owner=clinician,
        priority=match.p["priority"],
        **common,
    )
    team = match.task(
        trigger=f"{trigger}:lead",
        description=(
            f"For the safeguarding team: {story[0].lower()}{story[1:]} "
            f"{clinician[0].name or 'The responsible clinician'} {team_asks}"
        ),
        owner=role_owner(match.site, "safeguarding-lead"),
        part_of=own.identifier,
        priority=match.p["priority"],
        **common,
    )
    return [own, team]


def _inputs(flag: Mapping[str, Any]) -> list[tuple[str, str]]:
    category = str(flag.get("category", "")) or "not stated by the source"
    return [("Safeguarding flag", category)]


def _a(phrase: str) -> str:
    """`phrase` with its indefinite article: "an 8-week-old boy", "a 7-week-old boy"."""
    first = phrase.split(" ", 1)[0].split("-", 1)[0].lower()
    spoken_vowel = first in ("8", "11", "18") or (first[:1] != "" and first[0] in "8aeiou")
    return f"{'an' if spoken_vowel else 'a'} {phrase}"


def wake_times(
    facts: Sequence[tuple[str, Mapping[str, Any]]], p: Mapping[str, Any], site: Site
) -> Iterable[datetime]:
    """The end of each live discharge's settle time (variant (a)); reports are messages."""
    return [local_time(t, site) for t in settle_ends(facts, site.settle_minutes)]
