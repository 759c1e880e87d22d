"""A plain-Python statement of the absence rules (R6, R7, R9), for differential checks.

Written from the READMEs of rules/final-report-overdue, rules/imaging-not-performed-by-discharge
and rules/follow-up-skeletal-survey-due, independently of their rule.py (no durable_rules):
the same input (one patient's working memory) gives {Task identifier: priority} for every Task
the rules raise and {Task identifier: "change:<status>"} for every change they make.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from engine.catalogue import Catalogue, Rule
from engine.tasks import task_identifier
from tests.oracle import went_home

R1 = "imaging-pending-at-discharge"
R6 = "final-report-overdue"
R7 = "imaging-not-performed-by-discharge"
R9 = "follow-up-skeletal-survey-due"
NEVER = 9_999_999_999
HOUR, DAY = 3600, 86400

Fact = Mapping[str, Any]


def _running(catalogue: Catalogue, rule_id: str) -> Rule | None:
    try:
        rule = catalogue.rule(rule_id)
    except KeyError:
        return None
    return rule if rule.status != "off" else None


def _of(facts: Sequence[Fact], kind: str) -> list[Fact]:
    return [f for f in facts if f["kind"] == kind]


def _visit_orders(facts: Sequence[Fact], d: Fact) -> Iterator[Fact]:
    """Imaging orders of the discharged visit, placed by the discharge."""
    for o in _of(facts, "order"):
        # An order sent without a visit has no `enc` (empty values are not stored).
        if o["imaging"] == 1 and o.get("enc") == d["enc"] and o["ordered_at"] <= d["at"]:
            yield o


def _reports(facts: Sequence[Fact], okey: str) -> list[Fact]:
    return [r for r in _of(facts, "report") if r["okey"] == okey]


def _trigger(d: Fact) -> str:
    return f"discharge:{d['enc']}:{d['at']}"


def final_report_overdue(
    facts: Sequence[Fact], now: int, rule: Rule, settle: int
) -> dict[str, str]:
    """R6: no final or corrected report by the deadline after discharge (urgent for a
    skeletal survey in the survey cohort, on its own deadline; else routine)."""
    p = rule.params
    out: dict[str, str] = {}
    for d in went_home(facts, now, p["max_age_months"], settle):
        for o in _visit_orders(facts, d):
            survey = o["skeletal"] == 1 and d["age_months"] < p["survey_max_age_months"]
            due = d["at"] + (p["skeletal_survey_hours"] if survey else p["hours"]) * HOUR
            if now < due or o["cancelled_at"] <= due:
                continue
            if any(r["final"] == 1 and r["at"] <= due for r in _reports(facts, o["okey"])):
                continue
            ident = task_identifier(R6, o["okey"], _trigger(d) + ":overdue")
            out[ident] = "urgent" if survey else "routine"
    return out


def imaging_not_performed(
    facts: Sequence[Fact], now: int, rule: Rule, settle: int
) -> dict[str, str]:
    """R7: not performed by discharge (and not cancelled within the settle time), or
    cancelled after discharge without being performed; withdrawn when the examination turns
    out to have been performed before the discharge."""
    p = rule.params
    out: dict[str, str] = {}
    for d in went_home(facts, now, p["max_age_months"], settle):
        flagged = any(
            f.get("at", NEVER) <= d["at"] < f.get("cleared_at", NEVER) for f in _of(facts, "flag")
        )
        for o in _visit_orders(facts, d):
            if o["performed_at"] <= d["at"]:
                continue
            reports = _reports(facts, o["okey"])
            survey = o["skeletal"] == 1 and d["age_months"] < p["survey_max_age_months"]
            priority = "urgent" if survey or flagged else "routine"
            if o["cancelled_at"] > d["at"] + settle and not any(
                r["at"] <= d["at"] for r in reports
            ):
                out[task_identifier(R7, o["okey"], _trigger(d) + ":not-performed")] = priority
            cancelled = o["cancelled_at"]
            if (
                d["at"] < cancelled < NEVER
                and o["performed_at"] > cancelled
                and not any(r["at"] <= cancelled for r in reports)
            ):
                out[task_identifier(R7, o["okey"], _trigger(d) + ":cancelled")] = priority
    for t in _of(facts, "task"):
        if t["rule"] != R7 or t["open"] != 1:
            continue
        if any(
            o["okey"] == t["okey"] and o["performed_at"] <= t["discharge_at"]
            for o in _of(facts, "order")
        ):
            out[t["id"]] = "change:cancelled"
    return out


def follow_up_survey_due(facts: Sequence[Fact], now: int, rule: Rule) -> dict[str, str]:
    """R9: a first skeletal survey in the cohort, no later survey requested (not cancelled),
    between window_start_days and limit_days after it."""
    p = rule.params
    start, limit = p["window_start_days"] * DAY, p["limit_days"] * DAY
    surveys = [o for o in _of(facts, "order") if o["skeletal"] == 1]

    def done_at(o: Fact) -> int | None:
        if o["performed_at"] < NEVER:
            return int(o["performed_at"])
        if any(r["status"] != "W" and r["wrong_patient"] == 0 for r in _reports(facts, o["okey"])):
            return int(o["ordered_at"])  # done after it was requested: the earliest it can be
        return None

    out: dict[str, str] = {}
    for o in surveys:
        t0 = done_at(o)
        if t0 is None or not o["age_months"] < p["max_age_months"]:
            continue
        if not t0 + start <= now < t0 + limit:
            continue
        others = [e for e in surveys if e["okey"] != o["okey"]]
        if any(f["ordered_at"] > t0 and f["cancelled_at"] == NEVER for f in others):
            continue
        earlier = [done_at(e) for e in others]
        if any(t is not None and t0 - limit <= t < t0 for t in earlier):
            continue
        out[task_identifier(R9, o["okey"], "follow-up")] = p["priority"]
    return out


def expected(
    memory: Sequence[tuple[str, Mapping[str, Any]]], catalogue: Catalogue
) -> dict[str, str]:
    """{identifier: priority} of every Task R6, R7 and R9 raise over this working memory, and
    {identifier: "change:<status>"} of every change they make."""
    facts = [f for _, f in memory]
    now = next(int(f["t"]) for f in facts if f["kind"] == "now")
    settle = catalogue.site.settle_minutes * 60
    out: dict[str, str] = {}
    rule = _running(catalogue, R6)
    if rule is not None:
        out.update(final_report_overdue(facts, now, rule, settle))
    rule = _running(catalogue, R7)
    if rule is not None:
        out.update(imaging_not_performed(facts, now, rule, settle))
    rule = _running(catalogue, R9)
    if rule is not None:
        out.update(follow_up_survey_due(facts, now, rule))
    return out
