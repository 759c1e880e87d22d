"""Imaging pending at discharge (clinical-rules R1): the Derby case.

Conditions in durable_rules' language (see engine.definitions for the shared ones); the Task
text and owner in plain Python. No module-level state.
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
from engine.rulecore import when_all
from engine.tasks import (
    RecallTask,
    RuleMatch,
    local_time,
    plus_hours,
    responsible_clinician,
    when,
    who,
)


def conditions(p: Mapping[str, Any], site: Site) -> Mapping[str, Mapping[str, Any]]:
    """One match per (discharge home, order pending at that discharge)."""
    return {
        "pending": when_all(
            *discharged_home(p["max_age_months"], site.settle_minutes), *pending_order()
        ).define(),
        "pending!unless-admitted": unless_admitted_after(site.settle_minutes),
        "pending!unless-final": unless_final_by_discharge(),
    }


def _state_at_discharge(match: RuleMatch, order: Mapping[str, Any], at: int) -> str:
    reports = [r for r in match.of_kind("report") if r["okey"] == order["okey"] and r["at"] <= at]
    if any(r["status"] == "P" for r in reports):
        return "had only a preliminary report"
    return "had not been reported"


def recall_task(match: RuleMatch) -> RecallTask:
    """The Task: who left, from where, when, what was pending; review and recall."""
    d, o, site = match.facts["d"], match.facts["o"], match.site
    patient = match.patient()
    raised = int(d["at"]) + site.settle_minutes * 60
    subject = "child" if 0 <= int(d["age_months"]) < 18 * 12 else "patient"
    procedure = o.get("name") or "an imaging examination"
    description = (
        f"{who(d, patient).capitalize()} discharged from "
        f"{site.place(str(d.get('location', '')), str(d.get('class', '')))} at "
        f"{when(int(d['at']), site)} while {procedure} "
        f"{_state_at_discharge(match, o, int(d['at']))}. "
        f"Review the final report when it is issued and recall the {subject} if needed."
    )
    return match.task(
        order=o,
        trigger=discharge_trigger(d),
        priority=match.p["priority"],
        description=description,
        reason="Imaging result pending when the patient was discharged",
        owner=responsible_clinician(site, d, o),
        encounter=str(d["enc"]),
        discharge=d,
        authored_on=local_time(raised, site),
        deadline=plus_hours(raised, match.p["ack_hours"], site),
    )


def wake_times(
    facts: Sequence[tuple[str, Mapping[str, Any]]], p: Mapping[str, Any], site: Site
) -> Iterable[datetime]:
    """The end of each live discharge's settle time."""
    return [local_time(t, site) for t in settle_ends(facts, site.settle_minutes)]
