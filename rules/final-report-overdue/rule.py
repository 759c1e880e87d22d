"""Final report not received within N hours of discharge (clinical-rules R6): an absence rule.

An imaging order pending when a young child went home (the imaging-pending-at-discharge
definition) that still has no final or corrected report `hours` after the discharge, or
`skeletal_survey_hours` for a skeletal survey in a child under `survey_max_age_months`. The
Task is `partOf` the pending-imaging Task for the same order and discharge.

The clock: the `now` fact must have passed the deadline, and `wake_times` returns every
deadline, so a durable timer re-evaluates the patient then (live and in replay alike). The
answer at any moment depends only on the facts and `now`, never on when evaluation happened.
No module-level state.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from engine.catalogue import Site
from engine.definitions import discharge_trigger, unless_admitted_after
from engine.rulecore import c, m, when_all
from engine.tasks import (
    RecallTask,
    RuleMatch,
    local_time,
    plus_hours,
    responsible_clinician,
    task_identifier,
    when,
    who,
)

PENDING_RULE = "imaging-pending-at-discharge"
HOUR = 3600


def _overdue(max_age: int, settle_minutes: int, seconds: int, survey: bool) -> list[Any]:
    """A discharge home `d` (as imaging-pending-at-discharge: left care, not cancelled, in the
    cohort) at least `seconds` (and the settle time) ago, and an imaging order `o` of that
    visit placed before it and not cancelled by the deadline. `survey`: only skeletal surveys
    of children in the survey cohort (checked by the caller's `d` bound)."""
    order = (
        (m.kind == "order")
        & (m.imaging == 1)
        & (m.enc == c.d.enc)
        & (m.ordered_at <= c.d.at)
        & (m.cancelled_at > c.d.at + seconds)
    )
    if survey:
        order = order & (m.skeletal == 1)
    return [
        c.d
        << (
            (m.kind == "discharge")
            & (m.leaves_care == 1)
            & (m.cancelled == 0)
            & (m.age_months < max_age)
        ),
        c.n << ((m.kind == "now") & (m.t >= c.d.at + max(settle_minutes * 60, seconds))),
        c.o << order,
    ]


def _unless_reported_by(seconds: int) -> dict[str, Any]:
    """Cancels order `o` after discharge `d` when a final or corrected report of it arrived
    no later than `seconds` after the discharge (this covers "final before discharge")."""
    definition: dict[str, Any] = when_all(
        c.d << (m.kind == "discharge"),
        c.o << (m.kind == "order"),
        c.f
        << (
            (m.kind == "report")
            & (m.okey == c.o.okey)
            & (m.final == 1)
            & (m.at <= c.d.at + seconds)
        ),
    ).define()
    return definition


def _unless_survey(survey_max_age: int) -> dict[str, Any]:
    """Cancels a skeletal survey `o` of a child in the survey cohort at discharge `d`: the
    survey variant, with its own deadline, speaks for it."""
    definition: dict[str, Any] = when_all(
        c.d << ((m.kind == "discharge") & (m.age_months < survey_max_age)),
        c.o << ((m.kind == "order") & (m.skeletal == 1) & (m.enc == c.d.enc)),
    ).define()
    return definition


def conditions(p: Mapping[str, Any], site: Site) -> Mapping[str, Mapping[str, Any]]:
    """One match per (discharge home, order pending then and unreported at its deadline)."""
    hours = int(p["hours"] * HOUR)
    survey = int(p["skeletal_survey_hours"] * HOUR)
    survey_age = min(p["max_age_months"], p["survey_max_age_months"])
    return {
        "overdue": when_all(
            *_overdue(p["max_age_months"], site.settle_minutes, hours, survey=False)
        ).define(),
        "overdue!unless-admitted": unless_admitted_after(site.settle_minutes),
        "overdue!unless-reported": _unless_reported_by(hours),
        "overdue!unless-survey": _unless_survey(p["survey_max_age_months"]),
        "survey": when_all(
            *_overdue(survey_age, site.settle_minutes, survey, survey=True)
        ).define(),
        "survey!unless-admitted": unless_admitted_after(site.settle_minutes),
        "survey!unless-reported": _unless_reported_by(survey),
    }


def _state_by(match: RuleMatch, order: Mapping[str, Any], at: int) -> str:
    """What was on file at the deadline. An examination with no record of being done is the
    subject of imaging-not-performed-by-discharge; this Task says so rather than keep quiet,
    since only radiology can tell a lost report from an examination never done."""
    reports = [r for r in match.of_kind("report") if r["okey"] == order["okey"] and r["at"] <= at]
    if any(r["status"] == "P" for r in reports):
        return "only a preliminary report is on file"
    if not reports and int(order["performed_at"]) > at:
        return "no report is on file, and there is no record that the examination was performed"
    return "no report is on file"


def recall_task(match: RuleMatch) -> RecallTask:
    """The chase Task: which report is late, for whom, since which discharge; what to do."""
    d, o, site = match.facts["d"], match.facts["o"], match.site
    survey = match.variant == "survey"
    hours = match.p["skeletal_survey_hours"] if survey else match.p["hours"]
    due = int(d["at"]) + int(hours * HOUR)
    raised = max(due, int(d["at"]) + site.settle_minutes * 60)
    subject = "child" if 0 <= int(d["age_months"]) < 18 * 12 else "patient"
    procedure = o.get("name") or "an imaging examination"
    standard = (
        " A skeletal survey should be reported within 24 hours of the request and no later "
        "than 72 hours."
        if survey
        else ""
    )
    description = (
        f"The final report of {procedure} has not arrived {hours:g} hours after the "
        f"{who(d, match.patient())} was discharged from "
        f"{site.place(str(d.get('location', '')), str(d.get('class', '')))} at "
        f"{when(int(d['at']), site)}: {_state_by(match, o, due)}.{standard} "
        f"Ask the radiology department when it will be reported, review it as soon as it is, "
        f"and recall the {subject} if needed."
    )
    trigger = discharge_trigger(d)
    return match.task(
        order=o,
        trigger=f"{trigger}:overdue",
        priority="urgent" if survey else "routine",
        description=description,
        reason="Final imaging report overdue after the patient was discharged",
        owner=responsible_clinician(site, d, o),
        encounter=str(d["enc"]),
        discharge=d,
        authored_on=local_time(raised, site),
        deadline=plus_hours(
            raised, match.p["urgent_ack_hours"] if survey else match.p["ack_hours"], site
        ),
        part_of=task_identifier(PENDING_RULE, str(o["okey"]), trigger),
    )


def wake_times(
    facts: Sequence[tuple[str, Mapping[str, Any]]], p: Mapping[str, Any], site: Site
) -> Iterable[datetime]:
    """Each live discharge's settle end and both of its report deadlines."""
    out: set[int] = set()
    for _, fact in facts:
        if fact.get("kind") == "discharge" and not fact.get("cancelled"):
            at = int(fact["at"])
            settle = at + site.settle_minutes * 60
            for hours in (p["hours"], p["skeletal_survey_hours"]):
                out.add(max(settle, at + int(hours * HOUR)))
    return [local_time(t, site) for t in sorted(out)]
