"""The terminology map (rules/terminology.toml, engine/terminology.py): surface words -> one
concept, negation, regions, patterns, the words as written, and a malformed map refused with
the file and the problem named."""

from __future__ import annotations

import shutil
import tomllib
from datetime import UTC, datetime
from pathlib import Path

import pytest

from engine.catalogue import load_catalogue
from engine.errors import ConfigurationError
from engine.events import ClinicalNote, SourceRef
from engine.facts import SiteFacts, project
from engine.terminology import Finding, Terminology, parse_terminology

RULES = Path(__file__).resolve().parents[1] / "rules"
PATH = RULES / "terminology.toml"
MAP = parse_terminology(tomllib.loads(PATH.read_text()), str(PATH))


def bruise(text: str, terminology: Terminology = MAP) -> Finding | None:
    found = [f for f in terminology.find(text) if f.concept == "bruise"]
    assert len(found) <= 1, "one finding per concept per text"
    return found[0] if found else None


# --- the words ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("Small mark on thigh", "mark"),
        ("grip marks to both upper arms", "grip marks"),
        ("Discolouration over left shin", "Discolouration"),
        ("?bruise on forehead", "?bruise"),
        ("Father says he squeezed him", "squeezed"),
        ("bruising noted", "bruising"),
        ("purple mark on the thigh", "purple mark"),
        ("faint discoloration", "discoloration"),
        ("petechiae on face", "petechiae"),
        ("Contusion to scalp", "Contusion"),
    ],
)
def test_each_surface_word_is_one_concept_and_keeps_its_words_as_written(
    text: str, words: str
) -> None:
    found = bruise(text)
    assert found is not None, text
    assert found.words == words


def test_every_word_and_phrase_of_the_map_is_found_and_negated() -> None:
    for concept in MAP.concepts:
        for phrase in concept.phrases:
            said = " ".join(phrase)
            found = [f for f in MAP.find(f"Seen: {said} today") if f.concept == concept.code]
            assert found and found[0].words == said, said
            assert not [f for f in MAP.find(f"no {said}") if f.concept == concept.code], said


def test_the_query_mark_is_kept_in_the_words_and_counts() -> None:
    found = bruise("? NAI. ?Bruise on cheek")
    assert found is not None and found.words == "?Bruise" and found.region == "cheek"


# --- negation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "no bruising",
        "No bruising seen.",
        "nil marks",
        "no marks or bruises",
        "No marks, bruises or rashes",
        "no swelling, deformity or bruising",
        "Skin: no evidence of bruising",
        "negative for petechiae",
        "free of marks",
        "denies any bruising",
    ],
)
def test_negated_mentions_are_not_findings(text: str) -> None:
    assert bruise(text) is None


@pytest.mark.parametrize(
    ("text", "words", "region"),
    [
        ("no bruising but a mark on the cheek", "mark", "cheek"),
        ("No bruising. Mark on the cheek.", "Mark", "cheek"),
        ("no bruises apart from a mark on the hip", "mark", "torso"),
        ("nil marks on limbs; bruise behind ear", "bruise", "ear"),
        ("No marks or bruises but ?bruise behind ear", "?bruise", "ear"),
        ("no rash however bruised neck", "bruised", "neck"),
    ],
)
def test_a_clause_break_ends_the_negation(text: str, words: str, region: str) -> None:
    found = bruise(text)
    assert found is not None, text
    assert (found.words, found.region) == (words, region)


def test_a_cue_reaches_only_window_words_back() -> None:
    # "no" is 5 words before "mark": outside the window of 4
    assert bruise("no rash on the left arm mark on leg") is not None
    assert bruise("no rash on arm mark on leg") is None


# --- regions, patterns, exclusions ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "region"),
    [
        ("bruise on chest", "torso"),
        ("bruising over lower back", "torso"),
        ("mark on buttock", "torso"),
        ("bruise on left hip", "torso"),
        ("bruise to pinna of left ear", "ear"),
        ("marks on neck", "neck"),
        ("bruised frenulum", "frenulum"),
        ("bruise at the angle of the jaw", "angle-of-jaw"),
        ("mark on cheek", "cheek"),
        ("bruised eyelid", "eyelid"),
        ("subconjunctival haemorrhage right eye", "subconjunctiva"),
        ("bruise on shin", ""),
        ("mark on forearm", ""),
    ],
)
def test_ten4_facesp_regions(text: str, region: str) -> None:
    found = bruise(text)
    assert found is not None and found.region == region


def test_the_region_is_the_first_named_in_the_clause() -> None:
    found = bruise("mark on cheek and ear")
    assert found is not None and found.region == "cheek"


@pytest.mark.parametrize(
    ("text", "patterned"),
    [
        ("grip marks on chest", True),
        ("Grip-marks on chest", True),
        ("fingertip bruising to arms", True),
        ("finger-tip bruising to arms", True),
        ("slap mark on face", True),
        ("bite mark on arm", True),
        ("loop marks on back", True),
        ("red mark on arm", False),
    ],
)
def test_patterned_bruising(text: str, patterned: bool) -> None:
    found = bruise(text)
    assert found is not None and found.patterned is patterned


@pytest.mark.parametrize(
    "text", ["Stork mark on nape of neck", "strawberry mark on scalp", "Birth mark on back"]
)
def test_named_birthmarks_are_not_bruises(text: str) -> None:
    assert bruise(text) is None


def test_a_birthmark_does_not_hide_a_bruise_beside_it() -> None:
    found = bruise("stork mark on neck and a bruise on the back")
    assert found is not None and found.words == "bruise"


def test_several_mentions_are_one_finding_with_every_word() -> None:
    found = bruise("Grip marks to chest. ?bruise on cheek. Another mark on leg.")
    assert found is not None
    assert found.words == "Grip marks; ?bruise; mark"
    assert found.region == "torso" and found.patterned


# --- a note becomes a finding fact --------------------------------------------------------------


def test_a_clinical_note_projects_a_finding_fact_with_the_words_not_the_text() -> None:
    at = datetime(2026, 3, 2, 9, 45, tzinfo=UTC)
    note = ClinicalNote(
        source=SourceRef("test", "m1", "MDM^T02"),
        occurred_at=at,
        received_at=at,
        patient=None,
        encounter="V1",
        note="TRIAGE-1",
        text="Well baby. Dad says he squeezed him. Grip-marks on chest.",
        source_kind="triage note",
    )
    site = SiteFacts(frozenset(), frozenset(), (), frozenset(), frozenset(), terminology=MAP)
    facts = project(note, {}, site)
    assert [f.key for f in facts] == ["finding:TRIAGE-1:bruise"]
    data = facts[0].data
    assert data["words"] == "squeezed; Grip-marks"
    assert (data["region"], data["patterned"], data["enc"]) == ("torso", 1, "V1")
    assert "Dad" not in str(data)  # the text itself is not kept


def test_no_bruising_projects_nothing() -> None:
    at = datetime(2026, 3, 2, 9, 45, tzinfo=UTC)
    note = ClinicalNote(
        source=SourceRef("test", "m1", "MDM^T02"),
        occurred_at=at,
        received_at=at,
        patient=None,
        encounter="V1",
        note="N1",
        text="No bruising. No marks.",
    )
    site = SiteFacts(frozenset(), frozenset(), (), frozenset(), frozenset(), terminology=MAP)
    assert project(note, {}, site) == []


# --- the map is versioned, and a broken map is refused ---------------------------------------


def test_the_map_is_versioned() -> None:
    parts = MAP.version.split(".")
    assert len(parts) == 3 and all(p.isdigit() for p in parts)
    assert "HOW TO CHANGE IT" in PATH.read_text()


def _rules_with_map(tmp_path: Path, text: str) -> Path:
    shutil.copy(RULES / "settings.toml", tmp_path / "settings.toml")
    (tmp_path / "terminology.toml").write_text(text)
    return tmp_path


GOOD = PATH.read_text()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("version = \n", "invalid TOML"),
        (GOOD.replace('version = "1.1.0"', ""), "missing 'version'"),
        (GOOD.replace('version = "1.1.0"', "version = 1"), "missing 'version'"),
        (GOOD.replace("words = [", "word = [", 1), "unknown keys ['word']"),
        (GOOD.replace("window = 4", 'window = "four"'), "window must be a whole number"),
        (GOOD.replace("window = 4", "window = 0"), "window must be a whole number"),
        (GOOD.replace("[regions]", "[regoins]"), "unknown keys ['regoins']"),
        (GOOD.replace('neck = ["neck"]', 'neck = "neck"'), "[regions] neck must be a list"),
        (GOOD.replace('"squeezed",', '"squeezed", 3,'), "words must be a list of words"),
        (GOOD.replace('"squeezed",', '"squeezed", "?",'), "'?' has no words"),
        (GOOD.replace("cues = [", "cues = 4\nx = [", 1), "unknown keys ['x']"),
        ('version = "2.0.0"\nconcepts = 3\n', "[concepts] must be a table"),
        ('version = "2.0.0"\n[concepts.bruise]\ndisplay = "b"\n', "needs 'words'"),
    ],
)
def test_a_malformed_map_names_the_file_and_the_problem(
    tmp_path: Path, text: str, problem: str
) -> None:
    folder = _rules_with_map(tmp_path, text)
    with pytest.raises(ConfigurationError) as caught:
        load_catalogue(folder)
    message = str(caught.value)
    assert str(folder / "terminology.toml") in message
    assert problem in message, message


def test_the_shipped_map_loads_with_the_site(tmp_path: Path) -> None:
    folder = _rules_with_map(tmp_path, GOOD)
    assert load_catalogue(folder).site.terminology.version == MAP.version
