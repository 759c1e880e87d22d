"""Follow-up skeletal survey due (clinical-rules R9): an absence rule on the clock.

A first skeletal survey done at T0 for a child younger than `max_age_months`, and no later
skeletal survey requested (and not cancelled) by T0 + `window_start_days`: one Task then, due
by T0 + `window_end_days`. T0 is the examination time (ORC-5 in process/completed, or OBR-7
of a report); when no examination time is on record but the survey has a report, the time it
was requested stands in for it (it was done after that, so the Task can only come early).

A survey done within `limit_days` after an earlier one is that one's follow-up, not a first
survey, so it never demands a follow-up of its own; and no Task is raised once `limit_days`
have passed since T0. Not discharge-dependent; the Task is a safeguarding Task. No
module-level state.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from engine.catalogue import Site
from engine.facts import NEVER
from engine.rulecore import c, m, when_all
from engine.tasks import RecallTask, RuleMatch, local_time, responsible_clinician, when, who

DAY = 86400
TRIGGER = "follow-up"


def _survey() -> Any:
    return (m.kind == "order") & (m.skeletal == 1)


def _usable_report(alias_order: Any) -> Any:
    """A report of the order that shows the examination was done for this patient."""
    return (
        (m.kind == "report")
        & (m.okey == alias_order.okey)
        & (m.status != "W")
        & (m.wrong_patient == 0)
    )


def _unless(field: str, limit: int) -> dict[str, dict[str, Any]]:
    """The negations of a first survey `o` done at its `field` (T0): a later skeletal survey
    requested and not cancelled; an earlier survey done within `limit` seconds before it
    (performed, or only reported: requested then).

    Each comparison takes a fresh reference (`t0()`): durable_rules' arithmetic on a
    reference (`ref - limit`) changes that reference object in place, so one reference
    shared by two comparisons silently turns `< T0` into `< T0 - limit` (measured)."""

    def t0() -> Any:
        return getattr(c.o, field)

    return {
        "followed": when_all(
            c.o << (m.kind == "order"),
            c.f
            << (
                _survey() & (m.okey != c.o.okey) & (m.ordered_at > t0()) & (m.cancelled_at == NEVER)
            ),
        ).define(),
        "repeat": when_all(
            c.o << (m.kind == "order"),
            c.e
            << (
                _survey()
                & (m.okey != c.o.okey)
                & (m.performed_at < t0())
                & (m.performed_at >= t0() - limit)
            ),
        ).define(),
        "repeat-reported": when_all(
            c.o << (m.kind == "order"),
            c.e
            << (
                _survey()
                & (m.okey != c.o.okey)
                & (m.performed_at == NEVER)
                & (m.ordered_at < t0())
                & (m.ordered_at >= t0() - limit)
            ),
            c.er << _usable_report(c.e),
        ).define(),
    }


def conditions(p: Mapping[str, Any], site: Site) -> Mapping[str, Mapping[str, Any]]:
    """One match per first survey whose follow-up has fallen due unrequested."""
    start, limit = p["window_start_days"] * DAY, p["limit_days"] * DAY
    out: dict[str, Mapping[str, Any]] = {
        "due": when_all(
            c.o << (_survey() & (m.performed_at < NEVER) & (m.age_months < p["max_age_months"])),
            c.n
            << (
                (m.kind == "now")
                & (m.t >= c.o.performed_at + start)
                & (m.t < c.o.performed_at + limit)
            ),
        ).define(),
        "reported": when_all(
            c.o << (_survey() & (m.performed_at == NEVER) & (m.age_months < p["max_age_months"])),
            c.r << _usable_report(c.o),
            c.n
            << (
                (m.kind == "now") & (m.t >= c.o.ordered_at + start) & (m.t < c.o.ordered_at + limit)
            ),
        ).define(),
    }
    for name, definition in _unless("performed_at", limit).items():
        out[f"due!unless-{name}"] = definition
    for name, definition in _unless("ordered_at", limit).items():
        out[f"reported!unless-{name}"] = definition
    return out


def _day(seconds: int, site: Site, days: int = 0) -> str:
    t = local_time(seconds, site) + timedelta(days=days)
    return f"{t.day} {t:%B %Y}"


def _owner_facts(match: RuleMatch, order: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The order, then its visit's encounter and discharge (for the attending)."""
    visit = [
        f
        for _, f in match.memory
        if f.get("kind") in ("encounter", "discharge")
        and str(f.get("enc", "")) == str(order.get("enc", ""))
    ]
    return [order, *visit]


def recall_task(match: RuleMatch) -> RecallTask:
    """The Task: whose survey, done when, that no follow-up is requested; the window."""
    o, site, p = match.facts["o"], match.site, match.p
    performed = match.variant == "due"
    t0 = int(o["performed_at"] if performed else o["ordered_at"])
    months = int(o["age_months"])
    subject = "child" if 0 <= months < 18 * 12 else "patient"
    procedure = o.get("name") or "a skeletal survey"
    done = (
        f"had {procedure} at {when(t0, site)}"
        if performed
        else f"had {procedure}, requested at {when(t0, site)} (no examination time is on record)"
    )
    description = (
        f"Follow-up skeletal survey not requested: the {who(o, match.patient())} {done}, and "
        f"no later skeletal survey has been requested. Guidance is to repeat it "
        f"{p['window_start_days']} to {p['window_end_days']} days after the first, that is "
        f"between {_day(t0, site, p['window_start_days'])} and "
        f"{_day(t0, site, p['window_end_days'])}, and no later than {p['limit_days']} days "
        f"({_day(t0, site, p['limit_days'])}). Request the follow-up survey now and make sure "
        f"the {subject} is brought back for it."
    )
    owner = responsible_clinician(site, *_owner_facts(match, o), roles=("orderer", "attending"))
    return match.task(
        order=o,
        trigger=TRIGGER,
        priority=p["priority"],
        description=description,
        reason="Follow-up skeletal survey due and not requested",
        owner=owner,
        encounter=str(o.get("enc", "")),
        authored_on=local_time(t0 + p["window_start_days"] * DAY, site),
        deadline=local_time(t0, site) + timedelta(days=p["window_end_days"]),
    )


def wake_times(
    facts: Sequence[tuple[str, Mapping[str, Any]]], p: Mapping[str, Any], site: Site
) -> Iterable[datetime]:
    """When each skeletal survey's follow-up falls due."""
    reported = {
        str(f["okey"])
        for _, f in facts
        if f.get("kind") == "report" and f.get("status") != "W" and not f.get("wrong_patient")
    }
    out: set[int] = set()
    for _, f in facts:
        if f.get("kind") != "order" or not f.get("skeletal"):
            continue
        if int(f["performed_at"]) < NEVER:
            out.add(int(f["performed_at"]) + p["window_start_days"] * DAY)
        elif str(f["okey"]) in reported:
            out.add(int(f["ordered_at"]) + p["window_start_days"] * DAY)
    return [local_time(t, site) for t in sorted(out)]
