"""Repeat attendance in infant with prior injury concern (clinical-rules R15; optional).

Two unscheduled (emergency, PV1-2 = E) attendances of an infant, the second starting within
`window_days` of the first, where a concern goes with them: a bruise or mark recorded at
either attendance; a safeguarding flag active at some time from the start of the first
attendance to the end of the second; or imaging from the first attendance reported only after
the infant went home (a `report-final-after-discharge` Task). One Task per repeat attendance,
to the safeguarding team. The infant's age is checked in Python (calendar months at the
second attendance, like every other rule; an unknown date of birth is included).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from engine.catalogue import Site
from engine.facts import from_epoch, months_between
from engine.rulecore import c, m, when_all
from engine.tasks import (
    RecallTask,
    RuleMatch,
    age_phrase,
    local_time,
    person,
    plus_hours,
    role_owner,
    when,
)

LATE_REPORT_RULE = "report-final-after-discharge"
UNSCHEDULED = "E"  # PV1-2 patient class: emergency
DAY = 86_400


def _attendances(p: Mapping[str, Any]) -> list[Any]:
    """`e1` an unscheduled attendance; `e2` a later one starting within the window."""
    return [
        c.e1
        << ((m.kind == "encounter") & (getattr(m, "class") == UNSCHEDULED) & (m.started_at >= 0)),
        c.e2
        << (
            (m.kind == "encounter")
            & (getattr(m, "class") == UNSCHEDULED)
            & (m.started_at > c.e1.started_at)
            & (m.started_at <= c.e1.started_at + p["window_days"] * DAY)
        ),
    ]


def _defined(*patterns: Any) -> Mapping[str, Any]:
    definition: Mapping[str, Any] = when_all(*patterns).define()
    return definition


def conditions(p: Mapping[str, Any], site: Site) -> Mapping[str, Mapping[str, Any]]:
    """One match per (earlier attendance, repeat attendance, concern); one Task per repeat."""
    pair = _attendances(p)
    return {
        "bruise-first": _defined(
            *pair,
            c.f << ((m.kind == "finding") & (m.concept == "bruise") & (m.enc == c.e1.enc)),
        ),
        "bruise-second": _defined(
            *pair,
            c.f << ((m.kind == "finding") & (m.concept == "bruise") & (m.enc == c.e2.enc)),
        ),
        # Active at some moment from the first attendance's start to the second's.
        "flag-between": _defined(
            *pair,
            c.g
            << ((m.kind == "flag") & (m.at <= c.e2.started_at) & (m.cleared_at > c.e1.started_at)),
        ),
        # Raised after the second attendance began, before it ended.
        "flag-during": _defined(*pair, c.g << ((m.kind == "flag") & (m.at > c.e2.started_at))),
        "flag-during!unless-left": _defined(
            c.e2 << (m.kind == "encounter"),
            c.g << (m.kind == "flag"),
            c.d
            << (
                (m.kind == "discharge") & (m.enc == c.e2.enc) & (m.cancelled == 0) & (m.at < c.g.at)
            ),
        ),
        "late-report": _defined(
            *pair,
            c.t
            << (
                (m.kind == "task")
                & (m.rule == LATE_REPORT_RULE)
                & (m.level == 0)
                & (m.enc == c.e1.enc)
            ),
        ),
    }


def _age(match: RuleMatch, at: int) -> tuple[int, int] | None:
    """(days, completed months) at `at`; None when the date of birth is unknown."""
    birth_at = match.patient().get("birth_at")
    if birth_at is None:
        return None
    tz = match.site.timezone
    born, then = from_epoch(int(birth_at)).astimezone(tz), from_epoch(at).astimezone(tz)
    return (then - born).days, months_between(born, then)


def _concern(match: RuleMatch) -> tuple[int, str]:
    """When the concern was known, and what it was, in plain English."""
    site = match.site
    if "f" in match.facts:
        f = match.facts["f"]
        which = "the earlier attendance" if match.variant == "bruise-first" else "this attendance"
        return int(f["at"]), (
            f"At {which} a possible bruise was recorded at {when(int(f['at']), site)} "
            f"(written as '{f.get('words', '')}' in the {f.get('source') or 'clinical note'})."
        )
    if "g" in match.facts:
        g = match.facts["g"]
        if match.variant == "flag-during":
            return int(g["at"]), (
                f"A safeguarding flag was raised during this attendance, at "
                f"{when(int(g['at']), site)}."
            )
        return int(g["at"]), (
            f"A safeguarding flag was active (raised at {when(int(g['at']), site)})."
        )
    t = match.facts["t"]
    return int(t["raised_at"]), (
        "Imaging from the earlier attendance was reported only after the infant had gone home."
    )


def _gap(seconds: int) -> str:
    days = seconds // DAY
    if days == 0:
        return "less than a day"
    return f"{days} day{'s' if days != 1 else ''}"


def recall_task(match: RuleMatch) -> RecallTask | None:
    """The Task: who came back, when, after which attendance, with what concern; review."""
    e1, e2, site = match.facts["e1"], match.facts["e2"], match.site
    start1, start2 = int(e1["started_at"]), int(e2["started_at"])
    age = _age(match, start2)
    if age is not None and age[1] >= match.p["max_age_months"]:
        return None
    sex = str(match.patient().get("sex", ""))
    if age is None:
        who = "Patient of unknown age (no date of birth on record)"
    else:
        who = f"{age_phrase(*age)} {person(sex, age[1])}".capitalize()
    known_at, concern = _concern(match)
    raised = max(start2, known_at)
    description = (
        f"{who} attended {site.place(str(e2.get('location', '')), str(e2.get('class', '')))} "
        f"at {when(start2, site)}, {_gap(start2 - start1)} after an earlier attendance at "
        f"{site.place(str(e1.get('location', '')), str(e1.get('class', '')))} at "
        f"{when(start1, site)}. {concern} Review both attendances together and decide on a "
        "safeguarding referral per the local procedure."
    )
    return match.task(
        order=None,
        key=f"attendance:{e2['enc']}:{start2}",
        trigger="repeat-attendance",
        priority=match.p["priority"],
        description=description,
        reason="Repeat attendance in infant with prior injury concern",
        owner=role_owner(site, "safeguarding-lead"),
        encounter=str(e2["enc"]),
        authored_on=local_time(raised, site),
        deadline=plus_hours(raised, match.p["ack_hours"], site),
        inputs=[("Earlier attendance", str(e1["enc"])), ("Repeat attendance", str(e2["enc"]))],
    )


def wake_times(
    facts: Sequence[tuple[str, Mapping[str, Any]]], p: Mapping[str, Any], site: Site
) -> Iterable[datetime]:
    """None: the answer changes only with new attendances, findings, flags or Tasks."""
    return []
