"""The safeguarding rules (R8, R10) in plain Python, for the differential check.

Written from rules/safeguarding-flag-with-imaging/README.md and
rules/bruise-in-non-mobile-infant/README.md, independently of their rule.py (no
durable_rules, no import of the rule modules): the same working memory in, the same Task
identifiers and priorities out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from engine.catalogue import Catalogue
from engine.tasks import PRIORITIES, task_identifier

R8 = "safeguarding-flag-with-imaging"
R10 = "bruise-in-non-mobile-infant"

Fact = Mapping[str, Any]


def expected(memory: Sequence[tuple[str, Fact]], catalogue: Catalogue) -> dict[str, str]:
    """{Task identifier: priority} for every Task R8 and R10 raise over this working memory
    (neither rule changes existing Tasks)."""
    facts = [f for _, f in memory]
    settle = catalogue.site.settle_minutes * 60
    out: dict[str, str] = {}
    out.update(_r8(facts, catalogue.rule(R8).params, settle))
    for identifier, priority in _r10(facts, catalogue.rule(R10).params, settle).items():
        seen = out.get(identifier)
        if seen is None or PRIORITIES.index(priority) > PRIORITIES.index(seen):
            out[identifier] = priority
    return out


def _of(facts: Sequence[Fact], kind: str) -> list[Fact]:
    return [f for f in facts if f.get("kind") == kind]


def _now(facts: Sequence[Fact]) -> int:
    return int(next(f["t"] for f in facts if f.get("kind") == "now"))


def _home(facts: Sequence[Fact], d: Fact, settle: int) -> bool:
    """A discharge that left the hospital's care, not cancelled, settled by now, and not
    followed within the settle time by an admission (DESIGN.md "Discharge")."""
    if d["leaves_care"] != 1 or d["cancelled"] != 0 or _now(facts) < d["at"] + settle:
        return False
    return not any(
        a["cancelled"] == 0 and d["at"] <= a["at"] <= d["at"] + settle
        for a in _of(facts, "admission")
    )


def _flag_active(facts: Sequence[Fact], at: int) -> bool:
    """A safeguarding flag raised by `at` and not cleared by then."""
    return any(g["at"] <= at < g["cleared_at"] for g in _of(facts, "flag"))


def _r8(facts: Sequence[Fact], p: Mapping[str, Any], settle: int) -> dict[str, str]:
    out: dict[str, str] = {}

    def both(okey: str, trigger: str) -> None:
        out[task_identifier(R8, okey, trigger)] = p["priority"]
        out[task_identifier(R8, okey, trigger + ":lead")] = p["priority"]

    orders = _of(facts, "order")
    reports = _of(facts, "report")
    # (a) a child with an active flag goes home while an imaging order of the visit is pending
    for d in _of(facts, "discharge"):
        if not (d["age_months"] < p["max_age_months"] and _home(facts, d, settle)):
            continue
        if not _flag_active(facts, d["at"]):
            continue
        for o in orders:
            if o["imaging"] != 1 or o.get("enc") != d["enc"]:  # no visit known: no "enc"
                continue
            if o["ordered_at"] > d["at"] or o["cancelled_at"] <= d["at"]:
                continue
            if any(
                r["okey"] == o["okey"] and r["final"] == 1 and r["at"] <= d["at"] for r in reports
            ):
                continue
            both(str(o["okey"]), f"discharge:{d['enc']}:{d['at']}")
    # (b) a final or corrected imaging report issued while a flag is active
    for r in reports:
        if r["final"] != 1 or not r["age_months"] < p["max_age_months"]:
            continue
        if not any(o["okey"] == r["okey"] and o["imaging"] == 1 for o in orders):
            continue
        if _flag_active(facts, r["at"]):
            both(str(r["okey"]), f"report:{r['at']}")
    return out


def _reasons(f: Fact, p: Mapping[str, Any]) -> set[str]:
    """Why a bruise finding counts: young (not independently mobile, or TEN-4 "any bruise"),
    a TEN-4-FACESp region, or patterned; an unknown age (-1) counts as young."""
    months = f["age_months"]
    out = set()
    if months < p["nim_age_months"] or months < p["any_bruise_age_months"]:
        out.add("young")
    if months < p["region_age_months"] and f["region"] != "":
        out.add("region")
    if months < p["patterned_age_months"] and f["patterned"] == 1:
        out.add("patterned")
    return out


def _r10(facts: Sequence[Fact], p: Mapping[str, Any], settle: int) -> dict[str, str]:
    review = p["review_hours"] * 3600
    now = _now(facts)
    bruises = [f for f in _of(facts, "finding") if f["concept"] == "bruise"]
    out: dict[str, str] = {}
    for f in bruises:
        # a flag recorded within the review time of the note, before or after it
        if any(f["at"] - review <= g["at"] <= f["at"] + review for g in _of(facts, "flag")):
            continue
        priorities = []
        for reason in _reasons(f, p):
            covered = any(
                e["enc"] != ""
                and e["enc"] == f["enc"]
                and f["at"] - review <= e["at"] < f["at"]
                and reason in _reasons(e, p)
                for e in bruises
            )
            if covered:
                continue
            if now >= f["at"] + review:
                priorities.append(p["priority"])
            if any(
                d["enc"] == f["enc"] and d["at"] <= f["at"] + review and _home(facts, d, settle)
                for d in _of(facts, "discharge")
            ):
                priorities.append(p["priority_discharged"])
        if priorities:
            priority = max(priorities, key=PRIORITIES.index)
            key = f"finding:{f['note']}:{f['concept']}"
            out[task_identifier(R10, key, "finding")] = priority
            out[task_identifier(R10, key, "finding:lead")] = priority
    return out
