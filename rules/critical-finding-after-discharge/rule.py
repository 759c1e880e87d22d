"""Critical, urgent or significant unexpected finding after discharge (clinical-rules R4).

Works on the report fact's `alert` rank (0 none, 1 significant unexpected, 2 urgent,
3 critical), which the adapters reduce from the wire: OBX-8 AA/HH/LL, the site's alert code,
DiagnosticReport.conclusionCode, result Observations' interpretation. Two variants:
`first`, the first final (F) or corrected (C) report after discharge carries an alert; and
`raised`, a later final or corrected report carries a higher alert than every earlier one
after discharge. Each such report raises one Task, `partOf` the review Task of
report-final-after-discharge (R2), whose owner and status it never touches.
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
    unless_earlier_final_after_discharge,
    unless_final_by_discharge,
)
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
PRIORITY = ("", "asap", "urgent", "stat")
CATEGORY = ("", "a significant unexpected finding", "an urgent finding", "a critical finding")
# RCR category meanings (clinical-rules §0 item 7).
MEANING = (
    "",
    "timely action needed",
    "medical evaluation within 24 hours",
    "emergency action as soon as possible",
)


def _final_after_discharge(extra: Any = None) -> Any:
    """A final or corrected report of order `o` issued after discharge `d`."""
    pattern = (m.kind == "report") & (m.okey == c.o.okey) & (m.final == 1) & (m.at > c.d.at)
    return pattern if extra is None else pattern & extra


def _unless_not_higher() -> dict[str, Any]:
    """Cancels report `x` when an earlier final report of its order after discharge `d`
    already carried the same alert or a higher one."""
    definition: dict[str, Any] = when_all(
        c.d << (m.kind == "discharge"),
        c.x << ((m.kind == "report") & (m.final == 1)),
        c.y
        << (
            (m.kind == "report")
            & (m.okey == c.x.okey)
            & (m.final == 1)
            & (m.at > c.d.at)
            & (m.at < c.x.at)
            & (m.alert >= c.x.alert)
        ),
    ).define()
    return definition


def conditions(p: Mapping[str, Any], site: Site) -> Mapping[str, Mapping[str, Any]]:
    """`first`: (discharge home, order pending then, its first final after discharge with an
    alert). `raised`: (discharge home, order pending then, a final after discharge, a later
    final with a higher alert than any before it)."""
    cohort = (*discharged_home(p["max_age_months"], site.settle_minutes), *pending_order())
    return {
        "first": when_all(*cohort, c.r << _final_after_discharge(m.alert >= 1)).define(),
        "first!unless-admitted": unless_admitted_after(site.settle_minutes),
        "first!unless-final": unless_final_by_discharge(),
        "first!unless-earlier": unless_earlier_final_after_discharge(),
        "raised": when_all(
            *cohort,
            c.r << _final_after_discharge(),
            c.x << _final_after_discharge((m.at > c.r.at) & (m.alert > c.r.alert)),
        ).define(),
        "raised!unless-admitted": unless_admitted_after(site.settle_minutes),
        "raised!unless-final": unless_final_by_discharge(),
        "raised!unless-not-higher": _unless_not_higher(),
    }


def _earlier_alert(match: RuleMatch, report: Mapping[str, Any]) -> int:
    """The highest alert of the order's final reports after discharge before `report`."""
    d = match.facts["d"]
    return max(
        (
            int(r["alert"])
            for r in match.of_kind("report")
            if r["okey"] == report["okey"]
            and int(r.get("final", 0)) == 1
            and int(d["at"]) < int(r["at"]) < int(report["at"])
        ),
        default=0,
    )


def recall_task(match: RuleMatch) -> RecallTask | None:
    """The alert Task: which report, which alert, after which discharge; what to do."""
    d, o, site = match.facts["d"], match.facts["o"], match.site
    report = match.facts["x"] if match.variant == "raised" else match.facts["r"]
    rank = int(report["alert"])
    if not 1 <= rank <= 3:
        return None
    subject = "child" if 0 <= int(d["age_months"]) < 18 * 12 else "patient"
    procedure = o.get("name") or "an imaging examination"
    if match.variant == "raised":
        earlier = _earlier_alert(match, report)
        kind = "corrected report" if report["status"] == "C" else "later final report"
        before = (
            f"; the earlier report was marked as {CATEGORY[earlier]}"
            if earlier
            else "; the earlier report carried no alert"
        )
    else:
        kind, before = "final report", ""
    action = {
        3: f"Contact the family now and arrange for the {subject} to be seen as an emergency.",
        2: f"Contact the family and arrange for the {subject} to be assessed within 24 hours.",
        1: "Arrange timely follow-up and make sure the family is told.",
    }[rank]
    description = (
        f"The {kind} of {procedure}, issued at {when(int(report['at']), site)} after the "
        f"{who(d, match.patient())} was discharged from "
        f"{site.place(str(d.get('location', '')), str(d.get('class', '')))} at "
        f"{when(int(d['at']), site)}, is marked as {CATEGORY[rank]} ({MEANING[rank]})"
        f"{before}. {action}"
    )
    raised = max(int(report["at"]), int(d["at"]) + site.settle_minutes * 60)
    hours = {
        3: match.p["ack_minutes_critical"] / 60,
        2: match.p["ack_hours_urgent"],
        1: match.p["ack_hours_significant"],
    }[rank]
    trigger = discharge_trigger(d)
    concepts = ", ".join(x for x in str(report.get("findings", "")).split(",") if x)
    return match.task(
        order=o,
        trigger=f"{trigger}:alert:{report['at']}",
        priority=PRIORITY[rank],
        description=description,
        reason="Imaging report with a critical, urgent or significant unexpected finding "
        "issued after the patient was discharged",
        owner=responsible_clinician(site, o, d, roles=("orderer", "attending")),
        encounter=str(d["enc"]),
        authored_on=local_time(raised, site),
        deadline=plus_hours(raised, hours, site),
        part_of=task_identifier(REVIEW_RULE, str(o["okey"]), f"{trigger}:final"),
        inputs=[
            ("Alert", CATEGORY[rank].split(" ", 1)[1]),
            ("Abnormal flags", str(report.get("flags", "")) or "none"),
            ("Key-finding concepts", concepts or "none"),
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
