"""Shared clinical definitions as rule conditions (DESIGN.md "Discharge"; clinical-rules §1).

Rules build on these so that "discharged home" and "pending at discharge" mean the same thing
in every rule. Aliases: `d` the discharge, `n` the current time, `o` the order, `r` a report.

Conditions are plain conjunctions. Measured here (tests/test_rulecore.py), durable_rules
2.0.28 gets two constructs wrong: `none()` resolves references to earlier facts against the
wrong fact (a `none` right after `d` comparing with `d.at` never blocks), and an `$or` placed
before a comparison with another fact breaks that comparison (or never matches when the `$or`
itself refers to another fact). So facts carry flags (`final`), and negation is written as
`unless` variants. So a rule's variant `x!unless-y` matches what would cancel `x`, and the
rule core drops each match of `x` that agrees with a match of `x!unless-y` on every alias the
two share (see engine.rulecore).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from engine.rulecore import c, m, when_all


def _final_report(alias_order: Any) -> Any:
    """A final (F) or corrected (C) report of the order bound as `alias_order`."""
    return (m.kind == "report") & (m.okey == alias_order.okey) & (m.final == 1)


def discharged_home(max_age_months: int, settle_minutes: int) -> list[Any]:
    """A discharge that left the hospital's care, of a patient younger than `max_age_months`
    at that moment, not cancelled, whose settle time has passed. A patient whose date of birth
    is unknown (`age_months` -1) is included: failing safe, the net never guesses "too old".
    Pair with `unless_admitted_after`."""
    return [
        c.d
        << (
            (m.kind == "discharge")
            & (m.leaves_care == 1)
            & (m.cancelled == 0)
            & (m.age_months < max_age_months)
        ),
        c.n << ((m.kind == "now") & (m.t >= c.d.at + settle_minutes * 60)),
    ]


def unless_admitted_after(settle_minutes: int) -> dict[str, Any]:
    """Cancels a discharge `d` followed within the settle time by an admission."""
    return _defined(
        c.d << (m.kind == "discharge"),
        c.a
        << (
            (m.kind == "admission")
            & (m.cancelled == 0)
            & (m.at >= c.d.at)
            & (m.at <= c.d.at + settle_minutes * 60)
        ),
    )


def pending_order() -> list[Any]:
    """An imaging order `o` of the discharged visit, placed before discharge `d` and not
    cancelled by then. Pair with `unless_final_by_discharge`.

    An order never cancelled has `cancelled_at` = NEVER (far future) rather than 0, so "not
    cancelled by then" is one comparison (an `$or` over a reference never matches)."""
    return [
        c.o
        << (
            (m.kind == "order")
            & (m.imaging == 1)
            & (m.enc == c.d.enc)
            & (m.ordered_at <= c.d.at)
            & (m.cancelled_at > c.d.at)
        ),
    ]


def unless_final_by_discharge() -> dict[str, Any]:
    """Cancels order `o` at discharge `d` when it had a final or corrected report by then."""
    return _defined(
        c.d << (m.kind == "discharge"),
        c.o << (m.kind == "order"),
        c.f << (_final_report(c.o) & (m.at <= c.d.at)),
    )


def final_after_discharge() -> list[Any]:
    """A final or corrected report `r` of order `o` issued after discharge `d`. Pair with
    `unless_earlier_final_after_discharge` to keep only the first."""
    return [c.r << (_final_report(c.o) & (m.at > c.d.at))]


def unless_earlier_final_after_discharge() -> dict[str, Any]:
    """Cancels report `r` when another final report of its order came after discharge `d`
    and before `r`."""
    return _defined(
        c.d << (m.kind == "discharge"),
        c.r << ((m.kind == "report") & (m.final == 1)),
        c.e
        << (
            (m.kind == "report")
            & (m.okey == c.r.okey)
            & (m.final == 1)
            & (m.at > c.d.at)
            & (m.at < c.r.at)
        ),
    )


def _defined(*patterns: Any) -> dict[str, Any]:
    definition: dict[str, Any] = when_all(*patterns).define()
    return definition


def discharge_trigger(discharge: Mapping[str, Any]) -> str:
    """The trigger string naming one discharge, for deterministic Task identifiers."""
    return f"discharge:{discharge['enc']}:{discharge['at']}"


def settle_ends(facts: Iterable[tuple[str, Mapping[str, Any]]], settle_minutes: int) -> list[int]:
    """When each live discharge's settle time ends (epoch seconds): discharge rules must be
    evaluated then, even if no message arrives."""
    return [
        int(fact["at"]) + settle_minutes * 60
        for _, fact in facts
        if fact.get("kind") == "discharge" and not fact.get("cancelled")
    ]
