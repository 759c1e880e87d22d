"""Preliminary-to-final discrepancy after discharge (clinical-rules R3).

The child went home on a preliminary read; the first final (F) or corrected (C) report after
discharge differs from it materially: (a) its flags are abnormal where the preliminary's were
normal or empty, (b) it carries a higher alert rank, or (c) its set of key-finding concepts
differs. The engine finds the pair of reports; whether they differ is decided in Python, and a
report that differs for several reasons raises one Task. `partOf` the review Task of
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
    consultant_in_charge,
    local_time,
    plus_hours,
    task_identifier,
    when,
    who,
)

REVIEW_RULE = "report-final-after-discharge"
ALERT_WORDS = ("", "significant unexpected finding", "urgent finding", "critical finding")
CRITICAL = 3


def _preliminary() -> Any:
    """A preliminary report `p` of order `o` on file at discharge `d`."""
    return c.p << (
        (m.kind == "report") & (m.okey == c.o.okey) & (m.status == "P") & (m.at <= c.d.at)
    )


def _first_final() -> Any:
    """A final or corrected report `r` of order `o` after discharge `d` (pair with
    `unless_earlier_final_after_discharge` to keep only the first)."""
    return c.r << ((m.kind == "report") & (m.okey == c.o.okey) & (m.final == 1) & (m.at > c.d.at))


def _unless_later_preliminary() -> dict[str, Any]:
    """Cancels preliminary `p` when a later preliminary of its order was on file at `d`."""
    definition: dict[str, Any] = when_all(
        c.d << (m.kind == "discharge"),
        c.p << ((m.kind == "report") & (m.status == "P")),
        c.q
        << (
            (m.kind == "report")
            & (m.okey == c.p.okey)
            & (m.status == "P")
            & (m.at > c.p.at)
            & (m.at <= c.d.at)
        ),
    ).define()
    return definition


def conditions(p: Mapping[str, Any], site: Site) -> Mapping[str, Mapping[str, Any]]:
    """One match per (discharge home, order pending then, the latest preliminary on file
    then, the first final after discharge); whether the two differ materially is decided in
    `recall_task` (one test in Python rather than a variant per reason: fewer engine rules)."""
    return {
        "final": when_all(
            *discharged_home(p["max_age_months"], site.settle_minutes),
            *pending_order(),
            _preliminary(),
            _first_final(),
        ).define(),
        "final!unless-admitted": unless_admitted_after(site.settle_minutes),
        "final!unless-final": unless_final_by_discharge(),
        "final!unless-earlier": unless_earlier_final_after_discharge(),
        "final!unless-later": _unless_later_preliminary(),
    }


def _concepts(report: Mapping[str, Any]) -> frozenset[str]:
    return frozenset(x for x in str(report.get("findings", "")).split(",") if x)


def _differences(prelim: Mapping[str, Any], final: Mapping[str, Any]) -> tuple[bool, list[str]]:
    """Whether the discrepancy is major (flags or alert worsened), and how it differs."""
    said: list[str] = []
    flags_worse = not prelim["abnormal"] and bool(final["abnormal"])
    alert_rose = int(final["alert"]) > int(prelim["alert"])
    if flags_worse:
        said.append("it is abnormal where the preliminary report was normal")
    if alert_rose:
        said.append(
            f"it is marked as {_a(ALERT_WORDS[int(final['alert'])])} and the preliminary "
            "report was not"
        )
    before, after = _concepts(prelim), _concepts(final)
    if before != after:
        if not before:
            said.append("it records findings the preliminary report did not")
        elif not after:
            said.append("it no longer records findings the preliminary report made")
        else:
            said.append("its key findings differ from the preliminary report's")
    return flags_worse or alert_rose, said


def _a(words: str) -> str:
    return f"an {words}" if words[:1] in "aeiou" else f"a {words}"


def _priority(match: RuleMatch, major: bool) -> str:
    d, r = match.facts["d"], match.facts["r"]
    if int(r["alert"]) >= CRITICAL:
        return "stat"
    # An unknown age (-1) counts as young: the net fails safe.
    if major or int(d["age_months"]) < match.p["urgent_under_months"]:
        return "urgent"
    return "asap"


def recall_task(match: RuleMatch) -> RecallTask | None:
    """The discrepancy Task: who went home on which read, how the final differs; decide on
    recall by the deadline and tell the discharging clinician."""
    site = match.site
    d, o, prelim, final = match.facts["d"], match.facts["o"], match.facts["p"], match.facts["r"]
    major, differences = _differences(prelim, final)
    if not differences:
        return None  # the final says what the preliminary said: no discrepancy
    priority = _priority(match, major)
    raised = max(int(final["at"]), int(d["at"]) + site.settle_minutes * 60)
    if priority == "stat":
        deadline = plus_hours(raised, match.p["ack_minutes_stat"] / 60, site)
    elif priority == "urgent":
        deadline = plus_hours(raised, match.p["ack_hours_urgent"], site)
    else:
        deadline = plus_hours(raised, match.p["ack_hours_asap"], site)
    subject = "child" if 0 <= int(d["age_months"]) < 18 * 12 else "patient"
    procedure = o.get("name") or "an imaging examination"
    discharger = str(d.get("attending_name") or d.get("attending_id") or "")
    tell = f", and make sure the discharging clinician ({discharger}) knows" if discharger else ""
    description = (
        f"The {who(d, match.patient())} was discharged from "
        f"{site.place(str(d.get('location', '')), str(d.get('class', '')))} at "
        f"{when(int(d['at']), site)} on the preliminary report of {procedure}. The final "
        f"report, issued at {when(int(final['at']), site)}, differs from it: "
        f"{'; '.join(differences)}. Decide by {when(int(deadline.timestamp()), site)} whether "
        f"to recall the {subject}{tell}."
    )
    trigger = discharge_trigger(d)
    return match.task(
        order=o,
        trigger=f"{trigger}:discrepancy",
        priority=priority,
        description=description,
        reason="Final imaging report differs from the preliminary read the patient was "
        "discharged on",
        owner=consultant_in_charge(site, str(d.get("attending_id", ""))),
        encounter=str(d["enc"]),
        discharge=d,
        authored_on=local_time(raised, site),
        deadline=deadline,
        part_of=task_identifier(REVIEW_RULE, str(o["okey"]), f"{trigger}:final"),
        inputs=[
            ("Discharging clinician", discharger or "not recorded"),
            ("Preliminary report", _summary(prelim, site)),
            ("Final report", _summary(final, site)),
            ("Key-finding concepts, preliminary", ", ".join(sorted(_concepts(prelim))) or "none"),
            ("Key-finding concepts, final", ", ".join(sorted(_concepts(final))) or "none"),
        ],
    )


def _summary(report: Mapping[str, Any], site: Site) -> str:
    state = "abnormal" if report["abnormal"] else "normal"
    alert = ALERT_WORDS[int(report["alert"])]
    return f"{state}{f', {alert}' if alert else ''}, issued at {when(int(report['at']), site)}"


def wake_times(
    facts: Sequence[tuple[str, Mapping[str, Any]]], p: Mapping[str, Any], site: Site
) -> Iterable[datetime]:
    """The end of each live discharge's settle time."""
    return [local_time(t, site) for t in settle_ends(facts, site.settle_minutes)]
