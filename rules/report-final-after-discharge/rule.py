"""Final report issued after discharge (clinical-rules R2): closing the loop.

Raised for the first final (F) or corrected (C) report of an order that was pending when the
child went home; `partOf` the imaging-pending-at-discharge Task for the same order and
discharge. Urgent when the report is abnormal or its abnormal flags differ from the
preliminary report's, else routine.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from engine.catalogue import Site
from engine.definitions import (
    discharge_trigger,
    discharged_home,
    final_after_discharge,
    pending_order,
    settle_ends,
    unless_admitted_after,
    unless_earlier_final_after_discharge,
    unless_final_by_discharge,
)
from engine.rulecore import when_all
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


def conditions(p: Mapping[str, Any], site: Site) -> Mapping[str, Mapping[str, Any]]:
    """One match per (discharge home, order pending then, its first final report after)."""
    return {
        "final": when_all(
            *discharged_home(p["max_age_months"], site.settle_minutes),
            *pending_order(),
            *final_after_discharge(),
        ).define(),
        "final!unless-admitted": unless_admitted_after(site.settle_minutes),
        "final!unless-final": unless_final_by_discharge(),
        "final!unless-earlier": unless_earlier_final_after_discharge(),
    }


def _abnormal_flags(report: Mapping[str, Any]) -> frozenset[str]:
    return frozenset(f for f in str(report.get("flags", "")).split(",") if f and f != "N")


def _preliminary(match: RuleMatch, final: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The latest preliminary report on file for the order before the final one."""
    prelims = [
        r
        for r in match.of_kind("report")
        if r["okey"] == final["okey"] and r["status"] == "P" and r["at"] <= final["at"]
    ]
    return max(prelims, key=lambda r: r["at"]) if prelims else None


def _finding(final: Mapping[str, Any], prelim: Mapping[str, Any] | None) -> tuple[bool, str]:
    abnormal = bool(_abnormal_flags(final))
    changed = prelim is not None and _abnormal_flags(prelim) != _abnormal_flags(final)
    word = "abnormal" if abnormal else "normal"
    if changed and prelim is not None:
        was = "abnormal" if _abnormal_flags(prelim) else "normal"
        if was == word:
            return (
                True,
                f"The final report is {word} and its findings differ from the preliminary report.",
            )
        return True, f"The final report is {word}; the preliminary report was {was}."
    if abnormal:
        return True, "The final report is abnormal."
    return False, "The final report is recorded as normal."


def recall_task(match: RuleMatch) -> RecallTask:
    """The review Task: what was reported, when, after which discharge; what to do."""
    d, o, r, site = match.facts["d"], match.facts["o"], match.facts["r"], match.site
    patient = match.patient()
    urgent, finding = _finding(r, _preliminary(match, r))
    subject = "child" if 0 <= int(d["age_months"]) < 18 * 12 else "patient"
    procedure = o.get("name") or "an imaging examination"
    action = (
        f"Review it today and recall the {subject} if needed."
        if urgent
        else f"Review it and confirm whether the {subject} needs to be recalled."
    )
    description = (
        f"The final report of {procedure} was issued at {when(int(r['at']), site)}, after the "
        f"{who(d, patient)} was discharged from "
        f"{site.place(str(d.get('location', '')), str(d.get('class', '')))} at "
        f"{when(int(d['at']), site)}. {finding} {action}"
    )
    raised = max(int(r["at"]), int(d["at"]) + site.settle_minutes * 60)
    trigger = discharge_trigger(d)
    hours = match.p["ack_hours_abnormal"] if urgent else match.p["ack_hours_normal"]
    return match.task(
        order=o,
        trigger=f"{trigger}:final",
        priority="urgent" if urgent else "routine",
        description=description,
        reason="Final imaging report issued after the patient was discharged",
        owner=responsible_clinician(site, d, o),
        encounter=str(d["enc"]),
        discharge=d,
        authored_on=local_time(raised, site),
        deadline=plus_hours(raised, hours, site),
        part_of=task_identifier(PENDING_RULE, str(o["okey"]), trigger),
    )


def wake_times(
    facts: Sequence[tuple[str, Mapping[str, Any]]], p: Mapping[str, Any], site: Site
) -> Iterable[datetime]:
    """The end of each live discharge's settle time."""
    return [local_time(t, site) for t in settle_ends(facts, site.settle_minutes)]
