"""Patient identity: NHS number checking and the choice of a patient's internal key."""

from __future__ import annotations

from collections.abc import Sequence

from engine.events import PatientIdentifier

_WEIGHTS = (10, 9, 8, 7, 6, 5, 4, 3, 2)


def is_valid_nhs_number(value: str) -> bool:
    """True when `value` is ten digits whose last is the modulus-11 check digit of the rest.

    A remainder giving check digit 10 means the number was never issued, so it is invalid.
    """
    digits = value.replace(" ", "")
    if len(digits) != 10 or not digits.isdigit():
        return False
    total = sum(int(d) * w for d, w in zip(digits[:9], _WEIGHTS, strict=True))
    check = 11 - total % 11
    if check == 11:
        check = 0
    return check != 10 and check == int(digits[9])


def preferred_identifier(identifiers: Sequence[PatientIdentifier]) -> PatientIdentifier | None:
    """The identifier to name a patient by: a checked NHS number, else a medical record
    number, else the first identifier given."""
    for ident in identifiers:
        if ident.is_nhs_number:
            return ident
    for ident in identifiers:
        if ident.type_code == "MR":
            return ident
    return identifiers[0] if identifiers else None


def new_patient_key(identifiers: Sequence[PatientIdentifier]) -> str:
    """An internal key for a patient seen for the first time (never shown to clinicians)."""
    ident = preferred_identifier(identifiers)
    if ident is None:
        raise ValueError("a patient needs at least one identifier")
    return ident.token
