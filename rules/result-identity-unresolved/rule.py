"""Imaging result with unresolved identity (clinical-rules R14): the identity safety net.

A result that names no known order and carries no patient is kept by the engine under a
placeholder patient (engine.processor; its patient fact has `unmatched` 1) rather than refused.
Once it has waited `grace_minutes` for its order (the order message may just be late), this
rule raises a Task for the identity pool saying what is known: the order numbers, the
procedure, the report's status and time. When the order later arrives with a patient, the
engine merges the placeholder into that patient (`unmatched` becomes 0) and this rule
withdraws its still-open Task. A result withdrawn as filed against the wrong patient
(OBX-11 W) raises an urgent Task for the same pool.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from engine.catalogue import Site
from engine.facts import NEVER
from engine.rulecore import c, m, when_all
from engine.tasks import (
    RecallTask,
    RuleMatch,
    TaskChange,
    local_time,
    plus_hours,
    role_owner,
    task_identifier,
    when,
    who,
)

RULE_ID = "result-identity-unresolved"
UNRESOLVED = "unresolved-identity"
WRONG_PATIENT = "wrong-patient"
MATCHED_REASON = "matched to the patient when its order arrived"
STATUS_WORDS = {"P": "preliminary", "F": "final", "C": "corrected", "W": "withdrawn"}


def _defined(*patterns: Any) -> Mapping[str, Any]:
    definition: Mapping[str, Any] = when_all(*patterns).define()
    return definition


def conditions(p: Mapping[str, Any], site: Site) -> Mapping[str, Mapping[str, Any]]:
    """Unresolved: one match per report held by a placeholder patient whose grace time has
    passed (one Task per order). Matched: an open unresolved Task of a patient no longer
    unmatched. Wrong patient: one match per report withdrawn as filed against the wrong
    patient, of a real patient."""
    return {
        "unresolved": _defined(
            c.p << ((m.kind == "patient") & (m.unmatched == 1)),
            c.r << (m.kind == "report"),
            c.o << ((m.kind == "order") & (m.okey == c.r.okey)),
            c.n << ((m.kind == "now") & (m.t >= c.r.at + p["grace_minutes"] * 60)),
        ),
        "matched": _defined(
            c.t << ((m.kind == "task") & (m.rule == RULE_ID) & (m.open == 1) & (m.level == 0)),
            c.p << ((m.kind == "patient") & (m.unmatched == 0)),
        ),
        "wrong-patient": _defined(
            c.r << ((m.kind == "report") & (m.wrong_patient == 1)),
            c.o << ((m.kind == "order") & (m.okey == c.r.okey)),
        ),
        # A placeholder's withdrawn result is already an unresolved-identity Task.
        "wrong-patient!unless-unmatched": _defined(
            c.r << ((m.kind == "report") & (m.wrong_patient == 1)),
            c.p << ((m.kind == "patient") & (m.unmatched == 1)),
        ),
    }


def _reports(match: RuleMatch, okey: str) -> list[Mapping[str, Any]]:
    """The order's reports on file, oldest first (ties in a fixed order)."""
    return sorted(
        (r for r in match.of_kind("report") if r["okey"] == okey),
        key=lambda r: (int(r["at"]), str(r["status"]), str(r.get("message_id", ""))),
    )


def _order_numbers(o: Mapping[str, Any]) -> str:
    numbers = []
    if o.get("placer"):
        numbers.append(f"placer order number {o['placer']}")
    if o.get("filler"):
        numbers.append(f"filler order number {o['filler']}")
    return " and ".join(numbers) if numbers else "no order number"


def _report_phrase(r: Mapping[str, Any], site: Site) -> str:
    status = STATUS_WORDS.get(str(r["status"]), "")
    phrase = f"a {status} report issued at {when(int(r['at']), site)}"
    if int(r.get("alert", 0)) >= 3:
        phrase += " (critical)"
    elif int(r.get("abnormal", 0)):
        phrase += " (abnormal)"
    return phrase


def _inputs(o: Mapping[str, Any]) -> list[tuple[str, str]]:
    out = []
    for field in ("placer", "filler"):
        if o.get(field):
            ns = f" ({o[f'{field}_ns']})" if o.get(f"{field}_ns") else ""
            out.append((f"{field.capitalize()} order number", f"{o[field]}{ns}"))
    if o.get("code"):
        out.append(("Procedure code", str(o["code"])))
    return out


def _unresolved(match: RuleMatch) -> RecallTask:
    o, site = match.facts["o"], match.site
    reports = _reports(match, str(o["okey"]))
    first = reports[0]
    raised = int(first["at"]) + match.p["grace_minutes"] * 60
    procedure = o.get("name") or "an imaging examination"
    performed = int(o.get("performed_at", NEVER))
    exam = f", performed at {when(performed, site)}" if performed < NEVER else ""
    held = "; ".join(_report_phrase(r, site) for r in reports)
    description = (
        f"An imaging result names no patient and matches no known order: {procedure}"
        f"{exam}, {_order_numbers(o)}. On file: {held}. No order with these numbers has "
        f"arrived in the {match.p['grace_minutes']} minutes since. Find the patient it "
        "belongs to with the radiology department, and make sure the result reaches that "
        "patient's record and the clinician who ordered it."
    )
    return match.task(
        order=o,  # its focus: the order numbers, so the identity team can find it
        trigger=UNRESOLVED,
        priority=match.p["priority"],
        description=description,
        reason="Imaging result with unresolved identity",
        owner=role_owner(site, "identity-pool"),
        encounter="",
        authored_on=local_time(raised, site),
        deadline=plus_hours(raised, match.p["ack_hours"], site),
        inputs=_inputs(o),
    )


def _wrong_patient(match: RuleMatch) -> RecallTask:
    o, site = match.facts["o"], match.site
    reports = _reports(match, str(o["okey"]))
    withdrawal = next(r for r in reports if int(r.get("wrong_patient", 0)))
    at = int(withdrawal["at"])
    filed = [r for r in reports if r["status"] != "W" and int(r["at"]) <= at]
    procedure = o.get("name") or "an imaging examination"
    what = (
        f"The {STATUS_WORDS[str(filed[-1]['status'])]} report of {procedure} issued at "
        f"{when(int(filed[-1]['at']), site)}"
        if filed
        else f"A report of {procedure}"
    )
    description = (
        f"{what} for this {who(withdrawal, match.patient())} ({_order_numbers(o)}) was "
        f"withdrawn at {when(at, site)}: it had been filed against the wrong patient. Check "
        "whether anyone acted on it for this patient, tell the clinicians who saw it, and make "
        "sure the result is filed against the right patient."
    )
    return match.task(
        order=o,
        trigger=WRONG_PATIENT,
        priority=match.p["wrong_patient_priority"],
        description=description,
        reason="Imaging result filed against the wrong patient",
        owner=role_owner(site, "identity-pool"),
        encounter=str(o.get("enc", "")),
        authored_on=local_time(at, site),
        deadline=plus_hours(at, match.p["wrong_patient_ack_hours"], site),
        inputs=_inputs(o),
    )


def recall_task(match: RuleMatch) -> RecallTask | TaskChange | None:
    """The identity Task, or the withdrawal of an unresolved one whose patient is now known."""
    if match.variant == "matched":
        t = match.facts["t"]
        if t["id"] != task_identifier(RULE_ID, str(t["okey"]), UNRESOLVED):
            return None  # a wrong-patient Task: the patient was always known
        return match.change(str(t["id"]), "cancelled", MATCHED_REASON)
    if match.variant == "unresolved":
        return _unresolved(match)
    return _wrong_patient(match)


def wake_times(
    facts: Sequence[tuple[str, Mapping[str, Any]]], p: Mapping[str, Any], site: Site
) -> Iterable[datetime]:
    """For a placeholder patient: the end of each held report's grace time."""
    data = [f for _, f in facts]
    if not any(f.get("kind") == "patient" and f.get("unmatched") == 1 for f in data):
        return []
    return [
        local_time(int(f["at"]) + p["grace_minutes"] * 60, site)
        for f in data
        if f.get("kind") == "report"
    ]
