"""The site's terminology map: surface words in clinical text -> one concept (R10, R13, R15).

The Derby review found one injury called a "mark" in some records and a "bruise" in others.
`rules/terminology.toml` (versioned, governance-owned) lists each concept's surface words and
phrases, the cues that negate them ("no bruising" is not a bruise), and the TEN-4-FACESp body
regions. `find` returns what a text asserts, with the words it used, so a Task can show the
original words next to the concept. The text itself is never stored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from engine.errors import ConfigurationError

_CLAUSE = re.compile(r"[.;:!\n]|\bbut\b|\bhowever\b|\balthough\b", re.IGNORECASE)
_WORD = re.compile(r"\?*[a-z0-9]+(?:[-'][a-z0-9]+)*")


@dataclass(frozen=True, slots=True)
class Concept:
    """One concept: its code, display, surface phrases, and those that mark a pattern."""

    code: str
    display: str
    phrases: tuple[tuple[str, ...], ...]
    patterned: frozenset[tuple[str, ...]]


@dataclass(frozen=True, slots=True)
class Finding:
    """A concept a text asserts (not negated): the words used, the body region if named."""

    concept: str
    words: str
    region: str
    patterned: bool


@dataclass(frozen=True, slots=True)
class Terminology:
    """The parsed terminology map."""

    version: str
    concepts: tuple[Concept, ...]
    negation_cues: tuple[tuple[str, ...], ...]
    negation_window: int
    regions: Mapping[str, tuple[tuple[str, ...], ...]]

    def concept(self, code: str) -> Concept:
        """The concept with this code."""
        for concept in self.concepts:
            if concept.code == code:
                return concept
        raise KeyError(code)

    def find(self, text: str) -> list[Finding]:
        """The concepts `text` asserts, clause by clause, negated mentions left out.

        A mention is negated when a negation cue stands within `negation_window` words before
        it in the same clause ("no bruising", "no marks or bruises seen"); a clause ends at
        punctuation or at "but"/"however". A leading "?" ("?bruise") is a query, which
        counts: the net asks a clinician rather than assuming it is nothing."""
        out: dict[str, Finding] = {}
        for clause in _CLAUSE.split(text.lower()):
            words = [w.lstrip("?") for w in _WORD.findall(clause)]
            if not words:
                continue
            region = self._region(words)
            for concept in self.concepts:
                for start, phrase in _occurrences(words, concept.phrases):
                    if self._negated(words, start):
                        continue
                    found = out.get(concept.code)
                    patterned = phrase in concept.patterned
                    said = " ".join(phrase)
                    if found is None:
                        out[concept.code] = Finding(concept.code, said, region, patterned)
                    else:
                        said_all = found.words.split("; ")
                        out[concept.code] = Finding(
                            concept.code,
                            "; ".join(said_all + [said]) if said not in said_all else found.words,
                            found.region or region,
                            found.patterned or patterned,
                        )
        return list(out.values())

    def _negated(self, words: Sequence[str], start: int) -> bool:
        before = words[max(0, start - self.negation_window) : start]
        return any(_occurrences(before, self.negation_cues))

    def _region(self, words: Sequence[str]) -> str:
        for region, phrases in self.regions.items():
            if any(_occurrences(words, phrases)):
                return region
        return ""


def _occurrences(
    words: Sequence[str], phrases: Sequence[tuple[str, ...]]
) -> list[tuple[int, tuple[str, ...]]]:
    """(start, phrase) of each phrase found in `words`, longest phrase first at each start."""
    found = []
    ordered = sorted(phrases, key=len, reverse=True)
    i = 0
    while i < len(words):
        for phrase in ordered:
            if tuple(words[i : i + len(phrase)]) == phrase:
                found.append((i, phrase))
                i += len(phrase) - 1
                break
        i += 1
    return found


def _phrases(values: Any, where: str) -> tuple[tuple[str, ...], ...]:
    if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
        raise ConfigurationError(f"{where} must be a list of words or phrases")
    out = []
    for value in values:
        words = tuple(w.lstrip("?") for w in _WORD.findall(value.lower()))
        if not words:
            raise ConfigurationError(f"{where}: {value!r} has no words")
        out.append(words)
    return tuple(out)


EMPTY = Terminology("none", (), (), 0, {})


def parse_terminology(raw: Mapping[str, Any], path: str) -> Terminology:
    """Build the map from `terminology.toml`'s content; ConfigurationError names the problem."""
    if "version" not in raw:
        raise ConfigurationError(f"{path}: missing 'version'")
    concepts = []
    for code, spec in raw.get("concepts", {}).items():
        if not isinstance(spec, dict):
            raise ConfigurationError(f"{path}: [concepts.{code}] must be a table")
        phrases = _phrases(spec.get("words", []), f"{path}: [concepts.{code}] words")
        patterned = _phrases(spec.get("patterned", []), f"{path}: [concepts.{code}] patterned")
        concepts.append(
            Concept(
                code, str(spec.get("display", code)), phrases + patterned, frozenset(patterned)
            )
        )
    negation = raw.get("negation", {})
    regions = {
        name: _phrases(words, f"{path}: [regions] {name}")
        for name, words in raw.get("regions", {}).items()
    }
    return Terminology(
        version=str(raw["version"]),
        concepts=tuple(concepts),
        negation_cues=_phrases(negation.get("cues", []), f"{path}: [negation] cues"),
        negation_window=int(negation.get("window", 4)),
        regions=regions,
    )
