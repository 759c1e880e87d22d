"""The rule core: durable_rules used as a pure, stateless evaluator.

This is the only module that imports durable_rules. Its hazards are measured in
shared/reference/durable-rules.md; this module applies section 7 of that report:

- one Host per RuleCore whose background threads never start (`_SyncHost`);
- one throw-away session per evaluation, built in ONE batch from the patient's complete facts,
  so `none()` sees the final set and nothing fires early;
- short per-evaluation ids (`f0`, `f1`, ...) checked against each other's 32-bit FNV-1a hashes
  (and against the session id and `$pulse`) and re-keyed on a clash, because the engine
  silently treats a colliding id as "already observed";
- a `keep_` rule every fact matches and whose join never completes, so the engine stores every
  fact and `len(get_facts) == len(batch)` proves nothing was dropped;
- a `close_` rule that fires once per session, so `delete_state` never frees uninitialised
  pointers (a crash path on some heaps);
- action exceptions captured and raised (the engine would swallow them); a bound on facts per
  evaluation and on properties per fact (fail closed).

Negation: `none()` is NOT re-exported. Measured here (tests/test_rulecore.py), it resolves
references to earlier facts against the wrong fact, so it blocks when it should not and lets
through what it should block. A rule states a negation as a variant named `<name>!unless-<why>`
whose matches cancel those of `<name>` that agree with them on every alias both share; the
subtraction happens here, in plain Python, after the engine has fired.

Conjunctions are flattened before the engine sees them: measured here, a comparison with
another fact placed after a nested `$and` is ignored. And arithmetic on a reference
(`c.o.at - 5`) changes that reference object in place: never keep a reference in a variable
and use it in two comparisons; write `c.o.at` afresh each time (measured: `t = c.o.at`, then
`(m.at < t) & (m.at >= t - 5)` serialises as two `$sub` tests).

Rules are written with durable_rules' own language, re-exported here (`m`, `c`, `when_all`,
`when_any`), so rule folders never import durable_rules themselves.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from durable import engine as _dr_engine
from durable.lang import c, m, when_all, when_any

from engine.errors import RuleEvaluationError

__all__ = [
    "Match",
    "RuleCore",
    "c",
    "engine_hash",
    "m",
    "when_all",
    "when_any",
]

UNLESS = "!unless"
# Operators measured to give wrong answers (see module docstring); refused in definitions.
_FORBIDDEN = frozenset({"$or", "$not", "$any"})
MAX_FACTS = 5000
MAX_PROPERTIES = 200
SLOW_ACTION_SECONDS = 2.0
_SCALARS = (str, int, float, bool)


def engine_hash(text: str) -> int:
    """The engine's 32-bit id hash (state.c `fnv1Hash32`: FNV-1a order over signed chars)."""
    h = 0x811C9DC5
    for b in text.encode("utf-8"):
        h = ((h ^ ((b - 256) & 0xFFFFFFFF if b > 127 else b)) * 0x01000193) & 0xFFFFFFFF
    return h


@dataclass(frozen=True, slots=True)
class Match:
    """One firing of one rule: which rule (and variant) and the facts it matched, by alias.

    `facts` maps each alias in the rule (`d`, `o`, `r`...) to the caller's id of that fact.
    """

    rule: str
    facts: Mapping[str, str]


_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "$eq": lambda a, b: a == b,
    "$neq": lambda a, b: a != b,
    "$lt": lambda a, b: a < b,
    "$lte": lambda a, b: a <= b,
    "$gt": lambda a, b: a > b,
    "$gte": lambda a, b: a >= b,
}
Test = tuple[str, str, Any]  # (operator, property, constant)


def _constant_tests(expression: Any) -> list[Test]:
    """The tests of one alias pattern that compare a property with a constant. Tests that
    refer to another fact, or do arithmetic, are left out (they need the join)."""
    if not isinstance(expression, Mapping):
        return []
    tests: list[Test] = []
    for key, value in expression.items():
        if key == "$and":
            for term in value:
                tests.extend(_constant_tests(term))
        elif key in _COMPARE:
            for prop, operand in value.items():
                if isinstance(operand, (str, int, float, bool)):
                    tests.append((key, prop, operand))
        elif not key.startswith("$") and isinstance(value, (str, int, float, bool)):
            tests.append(("$eq", key, value))
    return tests


def _alpha_filter(definition: Mapping[str, Any]) -> list[list[Test]]:
    """For each alias of a conjunctive rule, its constant tests."""
    return [
        _constant_tests(expression)
        for pattern in definition.get("all", [])
        for expression in pattern.values()
    ]


def _passes(fact: Mapping[str, Any], tests: Sequence[Test]) -> bool:
    """False only when a test certainly fails; anything uncertain (a missing property under
    `!=`, text against a number) is left for the engine to decide."""
    for op, prop, constant in tests:
        value = fact.get(prop)
        if value is None:
            if op == "$neq":
                continue
            return False
        if isinstance(value, str) != isinstance(constant, str):
            continue
        if not _COMPARE[op](value, constant):
            return False
    return True


class _AlphaFilter:
    """Whether any rule could match a fact set: each rule could only when every one of its
    aliases has a fact passing that alias's constant tests (the engine's alpha network, in
    Python). Rules are grouped by the fact kinds they need, so a patient without, say, a
    Task or a flag skips every rule about those at once; identical alias tests are shared
    between rules, tried once per fact set and only against facts of the kind they test."""

    def __init__(self, rules: Sequence[Sequence[Sequence[Test]]]) -> None:
        unique: dict[tuple[Test, ...], int] = {}
        indexed = [
            tuple(unique.setdefault(tuple(tests), len(unique)) for tests in aliases)
            for aliases in rules
        ]
        self._tests = list(unique)
        self._kinds = [
            next((v for op, prop, v in tests if op == "$eq" and prop == "kind"), None)
            for tests in self._tests
        ]
        groups: dict[frozenset[Any], list[tuple[int, ...]]] = {}
        for aliases in indexed:
            needs = frozenset(self._kinds[i] for i in aliases) - {None}
            groups.setdefault(needs, []).append(aliases)
        self._groups = list(groups.items())

    def could_match(self, facts: Sequence[Mapping[str, Any]]) -> bool:
        """False only when no rule can match, whatever its joins."""
        by_kind: dict[Any, list[Mapping[str, Any]]] = {}
        for fact in facts:
            by_kind.setdefault(fact.get("kind"), []).append(fact)
        present = by_kind.keys()
        known: dict[int, bool] = {}

        def passes(i: int) -> bool:
            if i not in known:
                kind = self._kinds[i]
                candidates = facts if kind is None else by_kind.get(kind, ())
                known[i] = any(_passes(fact, self._tests[i]) for fact in candidates)
            return known[i]

        return any(
            all(passes(i) for i in aliases)
            for needs, rules in self._groups
            if needs <= present
            for aliases in rules
        )


def _operators(node: Any) -> set[str]:
    """Every key (operator or alias) used anywhere in a rule definition."""
    found: set[str] = set()
    if isinstance(node, Mapping):
        for key, value in node.items():
            if key != "run":
                # "m_1$not" (a none()) counts as "$not"; "$or" as itself.
                found.add("$" + key.rsplit("$", 1)[-1] if "$" in key[1:] else key)
                found |= _operators(value)
    elif isinstance(node, list):
        for item in node:
            found |= _operators(item)
    return found


def _flatten(node: Any) -> Any:
    """Conjunctions inside conjunctions lifted into their parent. Measured here
    (tests/test_rulecore.py), durable_rules 2.0.28 ignores a comparison with another fact
    placed after a nested `$and`: `a & (b & c) & (m.at >= c.d.at)` matches when the last
    test fails. Flat conjunctions are evaluated correctly, and mean the same."""
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key == "$and":
                terms: list[Any] = []
                for term in value:
                    flat = _flatten(term)
                    if isinstance(flat, Mapping) and set(flat) == {"$and"}:
                        terms.extend(flat["$and"])
                    else:
                        terms.append(flat)
                out[key] = terms
            else:
                out[key] = _flatten(value)
        return out
    if isinstance(node, list):
        return [_flatten(item) for item in node]
    return node


RESERVED = frozenset({"id", "sid", "src_id", "keep_"})  # the rule core's own properties


def _reserved_uses(definition: Mapping[str, Any]) -> set[str]:
    """Properties a definition tests or refers to that the rule core overwrites in every
    fact it hands the engine (a test on them would silently compare the wrong values)."""
    found: set[str] = set()

    def operand(value: Any) -> None:
        if isinstance(value, Mapping):
            if len(value) == 1 and not str(next(iter(value))).startswith("$"):
                found.update(p for p in value.values() if p in RESERVED)  # {alias: property}
            else:
                for inner in value.values():  # arithmetic: {"$add": {"$l": ..., "$r": ...}}
                    operand(inner)

    def expression(node: Mapping[str, Any]) -> None:
        for key, value in node.items():
            if key in ("$and", "$or"):
                for term in value:
                    expression(term)
            elif key.startswith("$"):  # a comparison: {"$lt": {property: operand}}
                for prop, inner in value.items():
                    found.update({prop} & RESERVED)
                    operand(inner)
            else:  # equality: {property: operand}
                found.update({key} & RESERVED)
                operand(value)

    for group in ("all", "any"):
        for pattern in definition.get(group, []):
            for expr in pattern.values():
                if isinstance(expr, Mapping):
                    expression(expr)
    return found


def _subtract_unless(matches: Sequence[Match]) -> list[Match]:
    """The matches of plain variants, less those cancelled by an `!unless` variant's match
    that binds the same facts to every alias the two share."""
    cancels: dict[str, list[Match]] = {}
    for match in matches:
        if UNLESS in match.rule:
            cancels.setdefault(match.rule.split(UNLESS, 1)[0], []).append(match)
    kept = []
    for match in matches:
        if UNLESS in match.rule:
            continue
        cancelled = False
        for cancel in cancels.get(match.rule, ()):
            shared = match.facts.keys() & cancel.facts.keys()
            if not shared:
                raise RuleEvaluationError(f"{cancel.rule} shares no alias with {match.rule}")
            if all(match.facts[a] == cancel.facts[a] for a in shared):
                cancelled = True
                break
        if not cancelled:
            kept.append(match)
    return kept


class _SyncHost(_dr_engine.Host):  # type: ignore[misc]
    def _run(self) -> None:
        # No dispatch or timer threads: nothing walks the session table behind our back.
        return None


class RuleCore:
    """Evaluates named durable_rules definitions over one patient's facts at a time.

    Not thread-safe, and holds no patient state between calls. Build one per process (the
    engine registers rulesets in a process-wide table that is never freed).
    """

    _names = itertools.count(1)

    def __init__(
        self,
        definitions: Mapping[str, Mapping[str, Any]],
        max_facts: int = MAX_FACTS,
    ) -> None:
        """`definitions` maps a unique rule name to a durable_rules definition without
        its action (e.g. `when_all(...).define()`); the core supplies the action."""
        self._out: list[Match] = []
        self._errors: list[str] = []
        self._max_facts = max_facts
        self._evaluations = 0
        self._ruleset = f"safetynet{next(self._names)}"
        rules: dict[str, Any] = {}
        for name, definition in definitions.items():
            if name.endswith("_") or "$" in name:
                raise RuleEvaluationError(f"rule name {name!r} is reserved")
            forbidden = _FORBIDDEN & _operators(definition)
            if forbidden:
                raise RuleEvaluationError(
                    f"rule {name!r} uses {sorted(forbidden)}, which durable_rules 2.0.28 "
                    "evaluates wrongly: use flags on facts and '!unless' variants"
                )
            reserved = _reserved_uses(definition)
            if reserved:
                raise RuleEvaluationError(
                    f"rule {name!r} tests {sorted(reserved)}, which the rule core sets on every "
                    "fact for the engine: compare another property"
                )
            base = name.split(UNLESS, 1)[0]
            if base != name and base not in definitions:
                raise RuleEvaluationError(
                    f"{name!r} cancels matches of {base!r}, which is not defined"
                )
            rule = {k: _flatten(v) for k, v in definition.items() if k != "run"}
            rule["run"] = self._action(name)
            rules[name] = rule
        # Each plain rule's constant tests per alias (`kind == "discharge"`, `age_months < 24`):
        # when some alias has no fact passing them the rule cannot match, and when no rule can,
        # the engine need not be asked (a pure short cut; the differential tests cover it).
        self._filter = _AlphaFilter(
            [_alpha_filter(d) for name, d in definitions.items() if UNLESS not in name]
        )
        self.kinds = frozenset(
            value
            for definition in definitions.values()
            for tests in _alpha_filter(definition)
            for op, prop, value in tests
            if op == "$eq" and prop == "kind"
        )
        """The fact kinds the rules test for (`kind == ...`), e.g. whether any reads Tasks."""
        rules["keep_"] = {
            "all": [{"m": {"keep_": 1}}, {"n": {"never_": 1}}],
            "run": lambda _c: None,
        }
        rules["close_"] = {"all": [{"m": {"$and": [{"close_": 1}, {"$s": 1}]}}], "run": self._close}
        try:
            self._host = _SyncHost({self._ruleset: rules})
        except Exception as exc:  # the engine raises bare Exception for bad definitions
            raise RuleEvaluationError(f"rule definitions rejected by the engine: {exc}") from exc

    @staticmethod
    def _close(closure: Any) -> None:
        closure.s["close_"] = None  # else the state update would re-fire this rule for ever

    def _action(self, name: str) -> Callable[[Any], None]:
        def run(closure: Any) -> None:
            started = time.monotonic()
            try:
                matched = closure._m or {}
                self._out.append(
                    Match(name, {alias: str(f["src_id"]) for alias, f in matched.items()})
                )
            except BaseException as exc:  # the engine would swallow it
                self._errors.append(f"{name}: {exc!r}")
            if time.monotonic() - started > SLOW_ACTION_SECONDS:
                self._errors.append(f"{name}: slow action")

        return run

    @staticmethod
    def _engine_ids(count: int, sid: str) -> list[str]:
        """Short ids `f0..fN` whose 32-bit hashes clash with none of the others, the session
        id or `$pulse` (the engine treats a clash as "already observed")."""
        return _engine_ids(count, engine_hash("sid-" + sid))

    def evaluate(self, facts: Sequence[tuple[str, Mapping[str, Any]]]) -> list[Match]:
        """Evaluate every rule over one patient's complete fact set.

        `facts` is a sequence of (caller id, fact) pairs; only scalar properties reach the
        engine. Returns the matches in firing order. Raises RuleEvaluationError, never
        returns a partial answer.
        """
        if len(facts) > self._max_facts:
            raise RuleEvaluationError(
                f"working-memory bound: {len(facts)} facts exceed {self._max_facts}"
            )
        plain = [fact for _, fact in facts]
        if not self._filter.could_match(plain):
            return []  # no rule can match: nothing to ask the engine (and nothing at risk)
        self._evaluations += 1
        sid = f"e{self._evaluations}"
        batch: list[dict[str, Any]] = []
        for eid, (src_id, fact) in zip(self._engine_ids(len(facts), sid), facts, strict=True):
            props = {key: v for key, v in fact.items() if isinstance(v, _SCALARS)}
            if len(props) > MAX_PROPERTIES:
                raise RuleEvaluationError(f"fact {src_id} has {len(props)} properties")
            props.update(src_id=src_id, id=eid, sid=sid, keep_=1)
            batch.append(props)
        self._out.clear()
        self._errors.clear()
        try:
            if batch:
                self._host.assert_facts(self._ruleset, batch)
                kept = sum(
                    1 for f in self._host.get_facts(self._ruleset, sid) if f.get("keep_") == 1
                )
                if kept != len(batch):
                    raise RuleEvaluationError(f"engine kept {kept} of {len(batch)} facts")
        except RuleEvaluationError:
            raise
        except Exception as exc:  # MessageObserved/NotHandled and engine error codes
            raise RuleEvaluationError(f"rule engine error: {exc!r}") from exc
        finally:
            try:
                self._host.update_state(
                    self._ruleset, {"sid": sid, "id": "sid-" + sid, "close_": 1}
                )
            finally:
                self._host.delete_state(self._ruleset, sid)
        if self._errors:
            raise RuleEvaluationError("rule action failed: " + "; ".join(self._errors[:3]))
        return _subtract_unless(self._out)


def _engine_ids(count: int, sid_hash: int) -> list[str]:
    """See RuleCore._engine_ids; ids for a count are computed once and reused while the
    session id's hash does not clash with them."""
    cached = _ID_CACHE.get(count)
    if cached is not None and sid_hash not in cached[1]:
        return cached[0]
    ids = _fresh_engine_ids(count, sid_hash)
    if len(_ID_CACHE) < 10_000:
        _ID_CACHE[count] = (ids, frozenset(engine_hash(i) for i in ids))
    return ids


_ID_CACHE: dict[int, tuple[list[str], frozenset[int]]] = {}


def _fresh_engine_ids(count: int, sid_hash: int) -> list[str]:
    used = {sid_hash, engine_hash("$pulse")}
    ids = []
    for i in range(count):
        eid, k = f"f{i}", 0
        while engine_hash(eid) in used:  # re-key on a 32-bit clash
            k += 1
            eid = f"f{i}.{k}"
        used.add(engine_hash(eid))
        ids.append(eid)
    return ids
