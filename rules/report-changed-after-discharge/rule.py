"""Report corrected or withdrawn after discharge (clinical-rules R5).

A corrected (C) or withdrawn (W) report of an order whose final report after discharge has
already been issued, so that the review Task of report-final-after-discharge (R2) exists:
either the discharge still stands (variants `corrected`, `withdrawn`), or that review Task has
been taken on (accepted, in progress, acknowledged through an escalation, or completed), even
if the discharge was later cancelled or replaced (variants `reviewed-*`, `completed-*`). All
variants raise the same Task for the same changed report. `partOf` the review Task, whose
owner and status it never touches. A report withdrawn because it belongs to another patient
(wrong_patient) is left to the identity rule (R14).
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
    task_identifier,
    when,
    who,
)

REVIEW_RULE = "report-final-after-discharge"


def _changes() -> dict[str, Any]:
    """The changed report `x`, per change: corrected (C), or withdrawn (W) but not for
    belonging to another patient."""
    return {
        "corrected": m.status == "C",
        "withdrawn": (m.status == "W") & (m.wrong_patient == 0),
    }


def _taken_on() -> dict[str, Any]:
    """A review Task someone has taken on: accepted or in progress (open 0, closed 0; also a
    Task acknowledged through its escalation), or completed."""
    return {
        "reviewed": (m.open == 0) & (m.closed == 0),
        "completed": m.status == "completed",
    }


def conditions(p: Mapping[str, Any], site: Site) -> Mapping[str, Mapping[str, Any]]:
    """Per change (corrected, withdrawn): (discharge home, order pending then, a final after
    discharge, the changed report after it); and (a review Task taken on, a final of its order
    after its discharge, the changed report after it). Expressions are built afresh for each
    definition: durable_rules' `<<` sets the alias on the expression object."""
    out: dict[str, Mapping[str, Any]] = {}
    for change in _changes():
        out[change] = when_all(
            *discharged_home(p["max_age_months"], site.settle_minutes),
            *pending_order(),
            c.r << ((m.kind == "report") & (m.okey == c.o.okey) & (m.final == 1) & (m.at > c.d.at)),
            c.x
            << ((m.kind == "report") & (m.okey == c.o.okey) & (m.at > c.r.at) & _changes()[change]),
        ).define()
        out[f"{change}!unless-admitted"] = unless_admitted_after(site.settle_minutes)
        out[f"{change}!unless-final"] = unless_final_by_discharge()
        for taken in _taken_on():
            out[f"{taken}-{change}"] = when_all(
                c.t << ((m.kind == "task") & (m.rule == REVIEW_RULE) & _taken_on()[taken]),
                c.r
                << (
                    (m.kind == "report")
                    & (m.okey == c.t.okey)
                    & (m.final == 1)
                    & (m.at > c.t.discharge_at)
                ),
                c.x
                << (
                    (m.kind == "report")
                    & (m.okey == c.t.okey)
                    & (m.at > c.r.at)
                    & _changes()[change]
                ),
            ).define()
    return out


def _owner(
    match: RuleMatch, review: Mapping[str, Any] | None, *facts: Mapping[str, Any]
) -> tuple[Clinician, bool]:
    """The review Task's owner; before it is written (same evaluation), whom R2 gives it to:
    the attending on the discharge, else the ordering clinician, else the pool."""
    site = match.site
    if review is None or not review.get("owner"):
        return responsible_clinician(site, *facts)
    ident = str(review["owner"])
    if ident == site.pool.id:
        return site.pool, True
    for fact in facts:
        for role in ("attending", "orderer"):
            if str(fact.get(f"{role}_id", "")) == ident:
                return (
                    Clinician(
                        ident, str(fact.get(f"{role}_name", "")), str(fact.get(f"{role}_auth", ""))
                    ),
                    False,
                )
    return site.directory.person(ident), False


def recall_task(match: RuleMatch) -> RecallTask | None:
    """The change Task: which report, reviewed after which discharge, was corrected or
    withdrawn when; check the decisions made on the earlier version."""
    x = match.facts["x"]
    if "t" in match.facts:
        t = match.facts["t"]
        okey, enc, at = str(t["okey"]), str(t["discharge_enc"]), int(t["discharge_at"])
    else:
        d, o = match.facts["d"], match.facts["o"]
        okey, enc, at = str(o["okey"]), str(d["enc"]), int(d["at"])
    return _change_task(match, okey, enc, at, x)


def _change_task(
    match: RuleMatch, okey: str, enc: str, at: int, x: Mapping[str, Any]
) -> RecallTask | None:
    """The same Task whichever variant matched: built from the order, the discharge and the
    changed report alone."""
    site = match.site
    discharges = [f for f in match.of_kind("discharge") if str(f.get("enc")) == enc]
    same = [f for f in discharges if int(f["at"]) == at]
    live = next((f for f in same if int(f.get("cancelled", 0)) == 0), None)
    d: Mapping[str, Any] = (same or discharges or [{"enc": enc, "at": at}])[0]
    order = next((f for f in match.of_kind("order") if str(f.get("okey")) == okey), None)
    trigger = discharge_trigger({"enc": enc, "at": at})
    review_id = task_identifier(REVIEW_RULE, okey, f"{trigger}:final")
    review = next((f for f in match.of_kind("task") if f.get("id") == review_id), None)
    # Once someone has taken the review on, decisions were made on the earlier version: the
    # Task stands whatever becomes of the discharge (a cancelled discharge does not withdraw it).
    taken_on = review is not None and (
        (int(review.get("open", 1)) == 0 and int(review.get("closed", 0)) == 0)
        or review.get("status") == "completed"
    )
    earlier = [
        f
        for f in match.of_kind("report")
        if f.get("okey") == okey
        and int(f.get("final", 0)) == 1
        and at < int(f["at"]) < int(x["at"])
    ]
    if not earlier:
        return None
    previous = max(earlier, key=lambda f: int(f["at"]))
    withdrawn = x["status"] == "W"
    change = "withdrawn" if withdrawn else "corrected"
    ages: Mapping[str, Any] = d if "age_months" in d else x
    subject = "child" if 0 <= int(ages["age_months"]) < 18 * 12 else "patient"
    procedure = (order or {}).get("name") or "an imaging examination"
    action = (
        "Check any decision made on it, whether the examination needs to be reported again, "
        "and what the family was told."
        if withdrawn
        else "Read the corrected report, check that the decisions made on the earlier version "
        f"still stand, and recall the {subject} if needed."
    )
    description = (
        f"The final report of {procedure}, issued at {when(int(previous['at']), site)} after "
        f"the {who(ages, match.patient())} was discharged from "
        f"{site.place(str(d.get('location', '')), str(d.get('class', '')))} at "
        f"{when(at, site)}, was {change} at {when(int(x['at']), site)}. {action}"
    )
    raised = max(int(x["at"]), at + site.settle_minutes * 60)
    return match.task(
        order=order,
        key=okey,
        trigger=f"{trigger}:{change}:{x['at']}",
        priority=match.p["priority"],
        description=description,
        reason=f"Imaging report {change} after the patient was discharged",
        owner=_owner(match, review, d, *([order] if order is not None else [])),
        encounter=enc,
        discharge=None if taken_on else live,
        authored_on=local_time(raised, site),
        deadline=plus_hours(raised, match.p["ack_hours"], site),
        part_of=review_id,
        inputs=[
            ("Change", change),
            ("Earlier final report", f"issued at {when(int(previous['at']), site)}"),
            (
                "Discharging clinician",
                str(d.get("attending_name") or d.get("attending_id") or "not recorded"),
            ),
        ],
    )


def wake_times(
    facts: Sequence[tuple[str, Mapping[str, Any]]], p: Mapping[str, Any], site: Site
) -> Iterable[datetime]:
    """The end of each live discharge's settle time."""
    return [local_time(t, site) for t in settle_ends(facts, site.settle_minutes)]
