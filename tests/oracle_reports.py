"""A plain-Python statement of the report rules R3, R4 and R5, for differential checks.

Written from the READMEs of rules/discrepancy-after-discharge, rules/critical-finding-after-
discharge and rules/report-changed-after-discharge, independently of their rule.py files and
of engine/definitions.py (no durable_rules): same input (one patient's working memory), same
output ({Task identifier: priority}). The three rules raise no TaskChange.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from engine.catalogue import Catalogue
from engine.tasks import PRIORITIES, task_identifier
from tests.oracle import went_home

R2 = "report-final-after-discharge"
R3 = "discrepancy-after-discharge"
R4 = "critical-finding-after-discharge"
R5 = "report-changed-after-discharge"
RULES = (R3, R4, R5)

Fact = Mapping[str, Any]


def _abnormal(report: Fact) -> bool:
    """Any OBX-8 flag other than N or empty."""
    return any(f not in ("", "N") for f in str(report["flags"]).split(","))


def _concepts(report: Fact) -> frozenset[str]:
    return frozenset(x for x in str(report["findings"]).split(",") if x)


def _final(report: Fact) -> bool:
    return report["status"] in ("F", "C")


def _pending(facts: Sequence[Fact], d: Fact) -> Iterator[tuple[Fact, list[Fact]]]:
    """Imaging orders of the visit pending at discharge `d`, with their reports."""
    for o in facts:
        if o["kind"] != "order" or o["imaging"] != 1 or o.get("enc") != d["enc"]:
            continue
        if o["ordered_at"] > d["at"] or o["cancelled_at"] <= d["at"]:
            continue
        reports = [r for r in facts if r["kind"] == "report" and r["okey"] == o["okey"]]
        if any(_final(r) and r["at"] <= d["at"] for r in reports):
            continue
        yield o, reports


def _put(out: dict[str, str], ident: str, priority: str) -> None:
    """Several matches for one identifier give one Task at the highest priority."""
    if ident not in out or PRIORITIES.index(priority) > PRIORITIES.index(out[ident]):
        out[ident] = priority


def _discrepancies(
    facts: Sequence[Fact], now: int, p: Mapping[str, Any], settle: int, out: dict[str, str]
) -> None:
    for d in went_home(facts, now, p["max_age_months"], settle):
        trigger = f"discharge:{d['enc']}:{d['at']}"
        for o, reports in _pending(facts, d):
            prelims = [r for r in reports if r["status"] == "P" and r["at"] <= d["at"]]
            after = [r for r in reports if _final(r) and r["at"] > d["at"]]
            if not prelims or not after:
                continue
            latest = max(r["at"] for r in prelims)
            first = min(r["at"] for r in after)
            for prelim in (r for r in prelims if r["at"] == latest):
                for final in (r for r in after if r["at"] == first):
                    worse = not _abnormal(prelim) and _abnormal(final)
                    rose = final["alert"] > prelim["alert"]
                    if not (worse or rose or _concepts(prelim) != _concepts(final)):
                        continue
                    if final["alert"] == 3:
                        priority = "stat"
                    elif worse or rose or d["age_months"] < p["urgent_under_months"]:
                        priority = "urgent"
                    else:
                        priority = "asap"
                    _put(out, task_identifier(R3, o["okey"], f"{trigger}:discrepancy"), priority)


def _alerts(
    facts: Sequence[Fact], now: int, p: Mapping[str, Any], settle: int, out: dict[str, str]
) -> None:
    by_rank = {1: "asap", 2: "urgent", 3: "stat"}
    for d in went_home(facts, now, p["max_age_months"], settle):
        trigger = f"discharge:{d['enc']}:{d['at']}"
        for o, reports in _pending(facts, d):
            after = [r for r in reports if _final(r) and r["at"] > d["at"]]
            for r in after:
                earlier = [y for y in after if y["at"] < r["at"]]
                if earlier and any(y["alert"] >= r["alert"] for y in earlier):
                    continue  # a later report that does not raise the alert
                if r["alert"] >= 1:
                    _put(
                        out,
                        task_identifier(R4, o["okey"], f"{trigger}:alert:{r['at']}"),
                        by_rank[r["alert"]],
                    )


def _changed(report: Fact) -> str:
    """'corrected', 'withdrawn' (not for another patient), or '' for any other report."""
    if report["status"] == "C":
        return "corrected"
    if report["status"] == "W" and not report["wrong_patient"]:
        return "withdrawn"
    return ""


def _changes(
    facts: Sequence[Fact], now: int, p: Mapping[str, Any], settle: int, out: dict[str, str]
) -> None:
    # (order, discharge visit, discharge time) of each reviewed final report: the discharge
    # still stands, or someone has taken the review Task on.
    reviewed: set[tuple[str, str, int]] = set()
    for d in went_home(facts, now, p["max_age_months"], settle):
        for o, _ in _pending(facts, d):
            reviewed.add((o["okey"], d["enc"], d["at"]))
    for t in facts:
        if t["kind"] != "task" or t["rule"] != R2:
            continue
        if (t["open"] == 0 and t["closed"] == 0) or t["status"] == "completed":
            reviewed.add((t["okey"], t["discharge_enc"], t["discharge_at"]))
    for okey, enc, at in reviewed:
        reports = [r for r in facts if r["kind"] == "report" and r["okey"] == okey]
        for x in reports:
            change = _changed(x)
            if change and any(_final(r) and at < r["at"] < x["at"] for r in reports):
                _put(
                    out,
                    task_identifier(R5, okey, f"discharge:{enc}:{at}:{change}:{x['at']}"),
                    p["priority"],
                )


def expected(
    memory: Sequence[tuple[str, Mapping[str, Any]]], catalogue: Catalogue
) -> dict[str, str]:
    """{Task identifier: priority} for every Task R3, R4 and R5 raise over this memory (only
    the rules the catalogue evaluates: status active or shadow)."""
    facts = [f for _, f in memory]
    now = next(f["t"] for f in facts if f["kind"] == "now")
    settle = catalogue.site.settle_minutes * 60
    running = {r.id for r in catalogue.evaluated}
    out: dict[str, str] = {}
    for rule_id, decide in ((R3, _discrepancies), (R4, _alerts), (R5, _changes)):
        if rule_id in running:
            decide(facts, now, catalogue.rule(rule_id).params, settle, out)
    return out
