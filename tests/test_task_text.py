"""Plain English in Task text: ages in weeks for infants, times as clinicians write them."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.catalogue import load_catalogue
from engine.facts import epoch
from engine.tasks import age_phrase, when, who

SITE = load_catalogue(Path(__file__).resolve().parents[1] / "rules").site


@pytest.mark.parametrize(
    ("days", "months", "phrase"),
    [
        (0, 0, "0-day-old"),
        (3, 0, "3-day-old"),
        (13, 0, "13-day-old"),
        (14, 0, "2-week-old"),
        (49, 1, "7-week-old"),
        (364, 11, "52-week-old"),
        (548, 18, "18-month-old"),
        (1900, 62, "5-year-old"),
        (-1, -1, ""),
    ],
)
def test_age_phrases(days: int, months: int, phrase: str) -> None:
    assert age_phrase(days, months) == phrase


def test_who_names_age_and_sex_or_says_the_age_is_unknown() -> None:
    assert who({"age_days": 49, "age_months": 1}, {"sex": "M"}) == "7-week-old boy"
    assert who({"age_days": 49, "age_months": 1}, {"sex": "F"}) == "7-week-old girl"
    assert who({"age_days": 49, "age_months": 1}, {}) == "7-week-old child"
    assert who({"age_days": 9000, "age_months": 300}, {"sex": "F"}) == "25-year-old woman"
    assert who({"age_days": -1, "age_months": -1}, {"sex": "M"}) == (
        "patient of unknown age (no date of birth on record)"
    )


def test_times_are_local_with_daylight_saving() -> None:
    from datetime import UTC, datetime

    assert when(epoch(datetime(2008, 5, 1, 13, 0, tzinfo=UTC)), SITE) == "14:00 on 1 May 2008"
    assert when(epoch(datetime(2008, 1, 3, 9, 5, tzinfo=UTC)), SITE) == "09:05 on 3 January 2008"
