"""The site's terminology map: surface words in clinical text -> one concept (R10, R13, R15).

The Derby review found one injury called a "mark" in some records and a "bruise" in others.
`rules/terminology.toml` (versioned, governance-owned) lists each concept's surface words and
phrases, the phrases that look like it but are something else ("stork mark"), the cues that
negate it ("no bruising" is not a bruise) and the words that end a cue's reach ("but"), and
the TEN-4-FACESp body regions. `find` returns what a text asserts, with the words it used as
written, so a Task can show the original words next to the concept. The text itself is never
stored.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from engine.errors import ConfigurationError

# Punctuation always ends a clause; words that do ("but", "apart from") come from the map.
_CLAUSE = re.compile(r"[.;:!\n]")
# A word: letters and digits, with inner apostrophes; a leading "?" is a query ("?bruise").
# Hyphens separate words, so "grip-marks" reads as "grip marks".
_WORD = re.compile(r"\?*[a-z0-9]+(?:'[a-z0-9]+)*", re.IGNORECASE)
DEFAULT_TERMINATORS = ("but", "however", "although")
_TOP_KEYS = frozenset({"version", "concepts", "negation", "regions"})
_CONCEPT_KEYS = frozenset({"display", "words", "patterned", "exclude"})
_NEGATION_KEYS = frozenset({"cues", "window", "terminators"})

Phrase = tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Concept:
    """One concept: its code, display, surface phrases, those that mark a pattern, and the
    phrases that contain its words but mean something else ("stork mark")."""

    code: str
    display: str
    phrases: tuple[Phrase, ...]
    patterned: frozenset[Phrase]
    exclude: tuple[Phrase, ...] = ()


@dataclass(frozen=True, slots=True)
class Finding:
    """A concept a text asserts (not negated): the words used as written ("?bruise",
    "Grip marks"; several mentions joined by "; "), the body region if named, whether a
    mention named a pattern."""

    concept: str
    words: str
    region: str
    patterned: bool


@dataclass(frozen=True, slots=True)
class _Token:
    word: str  # lower case, without a leading "?": what phrases are matched against
    start: int  # where it was written in the text, to quote the original words
    end: int


@dataclass(frozen=True, slots=True)
class Terminology:
    """The parsed terminology map."""

    version: str
    concepts: tuple[Concept, ...]
    negation_cues: tuple[Phrase, ...]
    negation_window: int
    regions: Mapping[str, tuple[Phrase, ...]]
    terminators: tuple[Phrase, ...] = tuple((w,) for w in DEFAULT_TERMINATORS)

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
        . ; : ! or a new line, and at a terminator ("but", "apart from"). A leading "?"
        ("?bruise") is a query, which counts: the net asks a clinician rather than assuming
        it is nothing. The words are quoted as written ("?bruise", "grip-marks")."""
        out: dict[str, Finding] = {}
        for clause in self._clauses(text):
            words = [t.word for t in clause]
            region = self._region(words)
            for concept in self.concepts:
                excluded = _covered(words, concept.exclude)
                for start, phrase in _occurrences(words, concept.phrases):
                    span = range(start, start + len(phrase))
                    if excluded.intersection(span) or self._negated(words, start):
                        continue
                    said = text[clause[start].start : clause[span[-1]].end]
                    patterned = phrase in concept.patterned
                    found = out.get(concept.code)
                    if found is None:
                        out[concept.code] = Finding(concept.code, said, region, patterned)
                    else:
                        said_all = found.words.split("; ")
                        out[concept.code] = Finding(
                            concept.code,
                            "; ".join([*said_all, said]) if said not in said_all else found.words,
                            found.region or region,
                            found.patterned or patterned,
                        )
        return list(out.values())

    def _clauses(self, text: str) -> list[list[_Token]]:
        """The text's clauses as tokens, split at punctuation and at terminator phrases (the
        terminator's own words belong to no clause)."""
        clauses: list[list[_Token]] = []
        offset = 0
        for part in _CLAUSE.split(text):
            tokens = [
                _Token(m.group().lower().lstrip("?"), offset + m.start(), offset + m.end())
                for m in _WORD.finditer(part)
            ]
            offset += len(part) + 1  # the split removed exactly one punctuation character
            cuts = _occurrences([t.word for t in tokens], self.terminators)
            begin = 0
            for at, phrase in cuts:
                clauses.append(tokens[begin:at])
                begin = at + len(phrase)
            clauses.append(tokens[begin:])
        return [c for c in clauses if c]

    def _negated(self, words: Sequence[str], start: int) -> bool:
        before = words[max(0, start - self.negation_window) : start]
        return any(_occurrences(before, self.negation_cues))

    def _region(self, words: Sequence[str]) -> str:
        """The region named first in the clause ("" if none)."""
        first, found = len(words), ""
        for region, phrases in self.regions.items():
            hits = _occurrences(words, phrases)
            if hits and hits[0][0] < first:
                first, found = hits[0][0], region
        return found


def _occurrences(words: Sequence[str], phrases: Sequence[Phrase]) -> list[tuple[int, Phrase]]:
    """(start, phrase) of each phrase found in `words`, longest phrase first at each start."""
    found = []
    by_first = _by_first_word(tuple(phrases))
    i = 0
    while i < len(words):
        for phrase in by_first.get(words[i], ()):
            if tuple(words[i : i + len(phrase)]) == phrase:
                found.append((i, phrase))
                i += len(phrase) - 1
                break
        i += 1
    return found


@functools.lru_cache(maxsize=256)
def _by_first_word(phrases: tuple[Phrase, ...]) -> dict[str, tuple[Phrase, ...]]:
    """The phrases by their first word, longest first (the map's phrase lists are fixed)."""
    index: dict[str, list[Phrase]] = {}
    for phrase in sorted(phrases, key=len, reverse=True):
        index.setdefault(phrase[0], []).append(phrase)
    return {word: tuple(found) for word, found in index.items()}


def _covered(words: Sequence[str], phrases: Sequence[Phrase]) -> set[int]:
    """The word positions inside an occurrence of one of `phrases`."""
    return {
        i
        for start, phrase in _occurrences(words, phrases)
        for i in range(start, start + len(phrase))
    }


def _phrases(values: Any, where: str) -> tuple[Phrase, ...]:
    if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
        raise ConfigurationError(f"{where} must be a list of words or phrases")
    out = []
    for value in values:
        words = tuple(m.group().lower().lstrip("?") for m in _WORD.finditer(value))
        if not words:
            raise ConfigurationError(f"{where}: {value!r} has no words")
        out.append(words)
    return tuple(out)


def _table(raw: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise ConfigurationError(f"{where} must be a table")
    return value


def _known_keys(table: Mapping[str, Any], allowed: frozenset[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigurationError(
            f"{where} has unknown keys {unknown} (allowed: {', '.join(sorted(allowed))})"
        )


EMPTY = Terminology("none", (), (), 0, {})


def parse_terminology(raw: Mapping[str, Any], path: str) -> Terminology:
    """Build the map from `terminology.toml`'s content; ConfigurationError names the file and
    the problem (a misspelt key is refused rather than silently ignored)."""
    _known_keys(raw, _TOP_KEYS, f"{path}:")
    version = raw.get("version")
    if not isinstance(version, str) or not version.strip():
        raise ConfigurationError(f"{path}: missing 'version' (a text such as \"1.0.0\")")
    concepts = []
    for code, spec in _table(raw, "concepts", f"{path}: [concepts]").items():
        where = f"{path}: [concepts.{code}]"
        if not isinstance(spec, dict):
            raise ConfigurationError(f"{where} must be a table")
        _known_keys(spec, _CONCEPT_KEYS, where)
        if not spec.get("words"):
            raise ConfigurationError(f"{where} needs 'words', a list of words or phrases")
        phrases = _phrases(spec["words"], f"{where} words")
        patterned = _phrases(spec.get("patterned", []), f"{where} patterned")
        exclude = _phrases(spec.get("exclude", []), f"{where} exclude")
        concepts.append(
            Concept(
                code,
                str(spec.get("display", code)),
                phrases + patterned,
                frozenset(patterned),
                exclude,
            )
        )
    negation = _table(raw, "negation", f"{path}: [negation]")
    _known_keys(negation, _NEGATION_KEYS, f"{path}: [negation]")
    window = negation.get("window", 4)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ConfigurationError(
            f"{path}: [negation] window must be a whole number of words, at least 1"
        )
    regions = {
        name: _phrases(words, f"{path}: [regions] {name}")
        for name, words in _table(raw, "regions", f"{path}: [regions]").items()
    }
    return Terminology(
        version=version,
        concepts=tuple(concepts),
        negation_cues=_phrases(negation.get("cues", []), f"{path}: [negation] cues"),
        negation_window=window,
        regions=regions,
        terminators=_phrases(
            negation.get("terminators", list(DEFAULT_TERMINATORS)),
            f"{path}: [negation] terminators",
        ),
    )
