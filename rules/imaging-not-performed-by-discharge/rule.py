"""Imaging ordered but not performed by discharge (clinical-rules R7): an absence rule.

Two triggers for an imaging order of a young child's visit that was pending when the child
went home (the imaging-pending-at-discharge definition):
- `not-performed`: at discharge it had not been performed (no performed time by then and no
  report of any status by then) and it was not cancelled before the Task falls due;
- `cancelled`: it was cancelled after the discharge without having been performed.

Both Tasks are `partOf` the pending-imaging Task for the same order and discharge: that Task
says a result is pending; this one says, more specifically, that the examination itself has
not been done, so no result will come unless someone arranges it.

`withdraw`: when a later message shows the examination was in fact performed before the
discharge (an OBR-7 arriving with the report), the Task is withdrawn while still open.
No module-level state.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from engine.catalogue import Site
from engine.definitions import (
    discharge_trigger,
    discharged_home,
    settle_ends,
    unless_admitted_after,
)
from engine.facts import NEVER
from engine.rulecore import c, m, when_all
from engine.tasks import (
    RecallTask,
    RuleMatch,
    TaskChange,
    local_time,
    plus_hours,
    responsible_clinician,
    task_identifier,
    when,
    who,
)

RULE_ID = "imaging-not-performed-by-discharge"
PENDING_RULE = "imaging-pending-at-discharge"


def _visit_order() -> Any:
    """An imaging order of the discharged visit `d`, placed before the discharge."""
    return (
        (m.kind == "order")
        & (m.imaging == 1)
        & (m.enc == c.d.enc)
        & (m.ordered_at <= c.d.at)
        & (m.performed_at > c.d.at)
    )


def _unless_reported(by_cancellation: bool) -> dict[str, Any]:
    """Cancels order `o` when any report of it (preliminary included: a report means the
    examination was done) arrived by the discharge, or by its cancellation."""
    by = c.o.cancelled_at if by_cancellation else c.d.at
    definition: dict[str, Any] = when_all(
        c.d << (m.kind == "discharge"),
        c.o << (m.kind == "order"),
        c.r << ((m.kind == "report") & (m.okey == c.o.okey) & (m.at <= by)),
    ).define()
    return definition


def conditions(p: Mapping[str, Any], site: Site) -> Mapping[str, Mapping[str, Any]]:
    """Matches per (discharge home, order not performed by then), and per open Task of this
    rule whose order turns out to have been performed before its discharge."""
    settle = site.settle_minutes * 60
    home = discharged_home(p["max_age_months"], site.settle_minutes)
    return {
        # Not cancelled before the Task falls due: an order cancelled within the settle time
        # raises the `cancelled` Task alone, not both at once.
        "not-performed": when_all(
            *home, c.o << (_visit_order() & (m.cancelled_at > c.d.at + settle))
        ).define(),
        "not-performed!unless-admitted": unless_admitted_after(site.settle_minutes),
        "not-performed!unless-reported": _unless_reported(by_cancellation=False),
        "cancelled": when_all(
            *home,
            c.o
            << (
                _visit_order()
                & (m.cancelled_at > c.d.at)
                & (m.cancelled_at < NEVER)
                & (m.performed_at > m.cancelled_at)
            ),
        ).define(),
        "cancelled!unless-admitted": unless_admitted_after(site.settle_minutes),
        "cancelled!unless-reported": _unless_reported(by_cancellation=True),
        "withdraw": when_all(
            c.t << ((m.kind == "task") & (m.rule == RULE_ID) & (m.open == 1)),
            c.o
            << ((m.kind == "order") & (m.okey == c.t.okey) & (m.performed_at <= c.t.discharge_at)),
        ).define(),
    }


def _flagged_at(match: RuleMatch, at: int) -> bool:
    """A safeguarding flag was active at `at`."""
    return any(
        int(f.get("at", NEVER)) <= at < int(f.get("cleared_at", NEVER))
        for f in match.of_kind("flag")
    )


def _withdrawal(match: RuleMatch) -> TaskChange:
    t, o, site = match.facts["t"], match.facts["o"], match.site
    procedure = o.get("name") or "the imaging examination"
    return match.change(
        str(t["id"]),
        "cancelled",
        f"A later message shows {procedure} was performed at "
        f"{when(int(o['performed_at']), site)}, before the discharge.",
    )


def recall_task(match: RuleMatch) -> RecallTask | TaskChange:
    """The Task: which examination was not done, for whom, since when; what to do."""
    if match.variant == "withdraw":
        return _withdrawal(match)
    d, o, site = match.facts["d"], match.facts["o"], match.site
    p = match.p
    cancelled = match.variant == "cancelled"
    settled = int(d["at"]) + site.settle_minutes * 60
    raised = max(settled, int(o["cancelled_at"])) if cancelled else settled
    months = int(d["age_months"])
    survey = int(o.get("skeletal", 0)) == 1 and months < p["survey_max_age_months"]
    flagged = _flagged_at(match, int(d["at"]))
    subject = "child" if 0 <= months < 18 * 12 else "patient"
    procedure = o.get("name") or "an imaging examination"
    place = site.place(str(d.get("location", "")), str(d.get("class", "")))
    requested = when(int(o["ordered_at"]), site)
    if cancelled:
        what = (
            f"{procedure}, requested at {requested} for the {who(d, match.patient())} "
            f"discharged from {place} at {when(int(d['at']), site)}, was cancelled at "
            f"{when(int(o['cancelled_at']), site)} without having been performed: the "
            f"examination will not happen. Arrange it again as an outpatient, or record that "
            f"it is no longer needed."
        )
    else:
        what = (
            f"The {who(d, match.patient())} discharged from {place} at "
            f"{when(int(d['at']), site)} left before {procedure} (requested at {requested}) "
            f"was performed: there is no record that it was done, so no report will come "
            f"until it is. Arrange it as an outpatient, or record that it is no longer needed."
        )
    if survey:
        what += (
            f" A skeletal survey is part of an assessment for suspected abuse: if it is still "
            f"needed, agree today with the safeguarding team how the {subject} will have it."
        )
    elif flagged:
        what += f" The {subject} had an active safeguarding flag at discharge."
    urgent = survey or flagged
    trigger = discharge_trigger(d)
    return match.task(
        order=o,
        trigger=f"{trigger}:{'cancelled' if cancelled else 'not-performed'}",
        priority="urgent" if urgent else "routine",
        description=what,
        reason=(
            "Imaging cancelled after the patient was discharged, without being performed"
            if cancelled
            else "Imaging ordered but not performed before the patient was discharged"
        ),
        owner=responsible_clinician(site, d, o),
        encounter=str(d["enc"]),
        discharge=d,
        authored_on=local_time(raised, site),
        deadline=plus_hours(raised, p["urgent_ack_hours"] if urgent else p["ack_hours"], site),
        part_of=task_identifier(PENDING_RULE, str(o["okey"]), trigger),
    )


def wake_times(
    facts: Sequence[tuple[str, Mapping[str, Any]]], p: Mapping[str, Any], site: Site
) -> Iterable[datetime]:
    """The end of each live discharge's settle time (a cancellation arrives as a message)."""
    return [local_time(t, site) for t in settle_ends(facts, site.settle_minutes)]
