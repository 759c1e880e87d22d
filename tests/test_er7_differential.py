"""Differential test: the fast ER7 reader against hl7apy on every message of the shared corpus.

hl7apy (the reference parser) decides the structure: which text sits in which repetition,
component and sub-component. hl7apy 1.3.5 does not unescape (a leaf's ``.value`` is the text as
sent, and it offers only an escaping writer), so unescaping is checked against a second,
independent implementation: python-hl7's ``unescape``, with an application map that aligns the
two presentation choices that differ by design (python-hl7 renders highlight on/off as "_" and
``\\.br\\`` as CR; this reader drops highlighting and renders a line break as LF).

Each compared value is checked twice:
  * as sent: hl7apy's leaf value == the reader's ``raw_field`` split on the message delimiters;
  * as text: the reader's ``get`` == python-hl7's unescape of hl7apy's leaf value.

A message hl7apy cannot read (``parse_message`` raises) must be listed in HL7APY_REJECTS; its
segments are then parsed one by one with hl7apy's ``parse_segment`` so that every segment hl7apy
can read is still compared. A message the reader rejects must be listed in READER_REJECTS (hl7apy
reads it) or BOTH_REJECT. A listed file whose outcome changes fails, so the lists stay honest.

The corpus is read in place (../shared/corpus/hl7v2) and never copied.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Any

import hl7
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import get_message_info, parse_message, parse_segment

from adapters.hl7v2.er7 import (
    Delimiters,
    Hl7ReadError,
    Message,
    Segment,
    read_message,
    split_messages,
)

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "hl7v2"
FILES = sorted(p for p in CORPUS.rglob("*") if p.is_file()) if CORPUS.is_dir() else []

pytestmark = pytest.mark.corpus

# hl7apy's parse_message (TOLERANT, find_groups=False) raises; the reader reads the message.
# (find_groups=True "reads" some of these only by silently dropping segments it cannot place.)
HL7APY_REJECTS: dict[str, str] = {
    "microsoft-fhir-converter/ms_oru_r01_01.hl7": (
        "why: the v2.5.1 message carries PRT segments (participation, introduced in v2.7); "
        "hl7apy looks segment names up in the declared version's tables and raises "
        "InvalidName('PRT') even in TOLERANT mode. The segments are well-formed ER7; the "
        "reader keeps them like any other segment and the engine ignores them."
    ),
}

# The reader rejects; hl7apy reads the message. Value: (text the reader's reason must contain,
# why the rejection is right).
READER_REJECTS: dict[str, tuple[str, str]] = {
    "linuxforhealth-hl7v2-fhir/lfh_adt_a34_v23_evn_a40_mismatch.hl7": (
        "MSH-10",
        "why: MSH-10 (message control id) is empty. The engine deduplicates on (MSH-3, MSH-10) "
        "and must echo MSH-10 in MSA-2, so a message without one is refused with AR instead "
        "of being processed unacknowledgeable; hl7apy does not check required fields in "
        "TOLERANT mode.",
    ),
}

# Both reject. Value: (text the reader's reason must contain, why).
BOTH_REJECT: dict[str, tuple[str, str]] = {
    "dcm4che/dcm4che_oru_r01_v251_pdf_report_ed.hl7": (
        "'A0K'",
        "why: the base64 PDF in OBX-5 contains a bare CR, so the rest of the PDF becomes a "
        "line starting 'A0KJSVFT0Y...' that is not a segment. The reader refuses it (AE, "
        "segment position 10) rather than guess where the OBX ends; hl7apy raises "
        "InvalidName('A0K').",
    ),
    "hapi-hl7v2/hapi_oru_r01_v24_three_encoding_chars_crlf.hl7": (
        "MSH-9.1",
        "why: MSH-2 is '~\\&' but the message uses '^' as the component separator. Read as "
        "declared, '~' is the component separator and MSH-9.1 becomes 'ORU^R01', which is not "
        "a message type, so the reader refuses the header (AR). hl7apy raises "
        "InvalidEncodingChars (it needs 4 encoding characters) and HAPI's own test expects "
        "an HL7Exception for this message.",
    ),
    "node-hl7-complete/nodehl7_orm_o01_v23_epic_xray_ankle.hl7": (
        "'886'",
        "why: a line break inside OBR-17 (a phone number, '(608)258-' / '8866') splits the "
        "OBR, so a line starts '8866|||...'. The reader refuses it (AE, segment position 7); "
        "hl7apy raises InvalidName('886').",
    ),
}

# Fields compared, per segment: (field, component, sub-component), every repetition.
# NTE-3 is not an engine field; it is here because it carries the corpus's escape sequences.
COMPARED: dict[str, tuple[tuple[int, int, int], ...]] = {
    "MSH": (
        (1, 1, 1),
        (2, 1, 1),
        (3, 1, 1),
        (4, 1, 1),
        (5, 1, 1),
        (6, 1, 1),
        (7, 1, 1),
        (9, 1, 1),
        (9, 2, 1),
        (9, 3, 1),
        (10, 1, 1),
        (11, 1, 1),
        (12, 1, 1),
        (15, 1, 1),
        (16, 1, 1),
    ),
    "EVN": ((1, 1, 1), (2, 1, 1), (6, 1, 1)),
    "PID": ((3, 1, 1), (3, 4, 1), (3, 5, 1), (7, 1, 1), (8, 1, 1)),
    "PV1": (
        (2, 1, 1),
        (3, 1, 1),
        (7, 1, 1),
        (7, 2, 1),
        (7, 3, 1),
        (19, 1, 1),
        (36, 1, 1),
        (37, 1, 1),
        (44, 1, 1),
        (45, 1, 1),
    ),
    "MRG": ((1, 1, 1), (1, 4, 1), (1, 5, 1)),
    "ORC": (
        (1, 1, 1),
        (2, 1, 1),
        (2, 2, 1),
        (3, 1, 1),
        (3, 2, 1),
        (5, 1, 1),
        (9, 1, 1),
        (12, 1, 1),
        (12, 2, 1),
        (12, 3, 1),
    ),
    "OBR": (
        (2, 1, 1),
        (3, 1, 1),
        (4, 1, 1),
        (4, 2, 1),
        (7, 1, 1),
        (16, 1, 1),
        (22, 1, 1),
        (24, 1, 1),
        (25, 1, 1),
    ),
    "OBX": ((2, 1, 1), (3, 1, 1), (5, 1, 1), (8, 1, 1), (11, 1, 1), (14, 1, 1)),
    "TXA": ((2, 1, 1), (12, 1, 1), (17, 1, 1)),
    "NTE": ((3, 1, 1),),
}

# python-hl7 application map: drop highlighting and formatting, a line break is LF.
_UNESCAPE_MAP = {
    "H": "",
    "N": "",
    ".br": "\n",
    ".sp": "",
    ".fi": "",
    ".nf": "",
    ".in": "",
    ".ti": "",
    ".sk": "",
    ".ce": "",
}


def _key(path: Path) -> str:
    return path.relative_to(CORPUS).as_posix()


# --- hl7apy side -----------------------------------------------------------------------------


def _hl7apy_parse(text: str) -> list[Any]:
    """hl7apy's segments for the message (raises what hl7apy raises)."""
    message = parse_message(text, validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=False)
    return list(message.children)


def _hl7apy_segment_by_segment(text: str) -> list[Any | None]:
    """Each segment parsed alone (None where hl7apy cannot read it), for rejected messages."""
    encoding_chars, _structure, version = get_message_info(text)
    out: list[Any | None] = []
    for line in text.split("\r"):
        try:
            out.append(
                parse_segment(line.strip(), version, encoding_chars, VALIDATION_LEVEL.TOLERANT)
            )
        except Exception:  # hl7apy's own errors: that segment is not compared
            out.append(None)
    return out


def _position(name: str | None, position: int) -> int:
    """hl7apy names a child 'CX_4' (numbered) or after its datatype, 'ST' (positional)."""
    if name:
        head, _, tail = name.rpartition("_")
        if head and tail.isdigit():
            return int(tail)
    return position


def _child(children: Any, index: int) -> Any | None:
    for position, child in enumerate(children, start=1):
        if _position(child.name, position) == index:
            return child
    return None


def _leaf_text(subcomponent: Any) -> str:
    value = subcomponent.value
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    inner = value.value
    # Textual types keep the text as sent; dates and numbers render it back with to_er7().
    return inner if isinstance(inner, str) else str(value.to_er7())


def _hl7apy_fields(theirs: Any, ours: Segment, d: Delimiters) -> dict[int, list[Any]]:
    """hl7apy's field instances (one per repetition) by field number.

    hl7apy names a field after its position ('PID_3') only when its version's tables define it;
    a field withdrawn in that version (EVN-1 from v2.7) comes back unnamed. Its position is
    recovered from the order: hl7apy emits one child per repetition of every non-blank field, in
    order. The named children check the alignment.
    """
    children = list(theirs.children)
    by_field: dict[int, list[Any]] = {}
    taken = 0
    field = 1
    while taken < len(children):
        raw = ours.raw_field(field)
        if ours.name == "MSH" and field <= 2:
            count = 1
        elif not raw.strip():
            count = 0
        else:
            count = raw.count(d.repetition) + 1
        group = children[taken : taken + count]
        for child in group:
            assert child.name in (None, f"{ours.name}_{field}"), (
                f"hl7apy's {child.name} is not at {ours.name}-{field}"
            )
        by_field[field] = group
        taken += count
        field += 1
        assert field < 10_000, "cannot align hl7apy's fields with the segment"
    return by_field


def _hl7apy_value(repetition: Any, component: int, subcomponent: int) -> str:
    comp = _child(repetition.children, component)
    if comp is None:
        return ""
    sub = _child(comp.children, subcomponent)
    return "" if sub is None else _leaf_text(sub)


# --- reader side -----------------------------------------------------------------------------


def _split_raw(raw: str, d: Delimiters, repetition: int, component: int, sub: int) -> str:
    """The escaped text at one position, split independently of the reader's get()."""
    reps = raw.split(d.repetition) if raw else []
    if repetition >= len(reps):
        return ""
    comps = reps[repetition].split(d.component)
    if component > len(comps):
        return ""
    subs = comps[component - 1].split(d.subcomponent) if d.subcomponent else [comps[0]]
    return subs[sub - 1] if sub <= len(subs) else ""


# --- the comparison --------------------------------------------------------------------------


def _compare(message: Message, apy_segments: list[Any | None]) -> tuple[int, list[str]]:
    """Compare the fields in COMPARED; returns (values compared, disagreements)."""
    unescaper = hl7.parse(message.text)
    d = message.delimiters
    assert len(apy_segments) == len(message.segments), "segment counts differ"
    compared = 0
    problems: list[str] = []
    for ours, theirs in zip(message.segments, apy_segments, strict=True):
        if theirs is None:
            continue
        assert theirs.name == ours.name
        apy_fields = _hl7apy_fields(theirs, ours, d)
        for field, component, sub in COMPARED.get(ours.name, ()):
            apy_reps = apy_fields.get(field, [])
            raw = ours.raw_field(field)
            where = f"{ours.name}-{field}.{component}.{sub}"
            if ours.name == "MSH" and field <= 2:
                # MSH-1 and MSH-2 are the delimiters: one value, never split.
                apy_text = _hl7apy_value(apy_reps[0], 1, 1) if apy_reps else ""
                compared += 1
                if not (ours.get(field) == raw == apy_text):
                    problems.append(f"{where}: {ours.get(field)!r} != {apy_text!r}")
                continue
            if raw.strip() == "" and not apy_reps:
                # hl7apy drops a field that is only spaces; the reader keeps it as sent.
                compared += 1
                if ours.repetitions(field) != (1 if raw else 0):
                    problems.append(f"{where}: repetitions of a blank field")
                continue
            if ours.repetitions(field) != len(apy_reps):
                problems.append(
                    f"{where}: {ours.repetitions(field)} repetitions, hl7apy {len(apy_reps)}"
                )
                continue
            for index, apy_rep in enumerate(apy_reps):
                compared += 1
                apy_text = _hl7apy_value(apy_rep, component, sub)
                our_raw = _split_raw(raw, d, index, component, sub)
                if our_raw != apy_text and not (apy_text == "" and our_raw.strip() == ""):
                    # (hl7apy also drops components and sub-components that are only spaces)
                    problems.append(f"{where}~{index} as sent: {our_raw!r} != {apy_text!r}")
                    continue
                with warnings.catch_warnings():
                    # python-hl7 logs with the deprecated Logger.warn on odd sequences.
                    warnings.simplefilter("ignore", DeprecationWarning)
                    expected = unescaper.unescape(our_raw, _UNESCAPE_MAP)
                got = ours.get(field, component, sub, index)
                if got != expected:
                    problems.append(f"{where}~{index} unescaped: {got!r} != {expected!r}")
    return compared, problems


@functools.cache
def _outcomes(path: Path) -> tuple[tuple[int, str, Message | Hl7ReadError, Any], ...]:
    """(index, text, reader's outcome, hl7apy's outcome) per message of the file; parsed once."""
    items = split_messages(path.read_bytes())
    assert items, f"{_key(path)}: no message found"
    out = []
    for index, item in enumerate(items):
        assert isinstance(item, str), f"{_key(path)}: {item}"
        try:
            ours: Message | Hl7ReadError = read_message(item)
        except Hl7ReadError as exc:
            ours = exc
        try:
            theirs: Any = _hl7apy_parse(item)
        except Exception as exc:  # whatever hl7apy raises is the outcome under test
            theirs = exc
        out.append((index, item, ours, theirs))
    return tuple(out)


@pytest.mark.parametrize("path", FILES or [None], ids=lambda p: _key(p) if p else "no-corpus")
def test_reader_agrees_with_hl7apy(path: Path | None) -> None:
    if path is None:
        pytest.skip(f"the shared HL7 v2 corpus is absent ({CORPUS})")
    key = _key(path)
    total = 0
    for index, text, ours, theirs in _outcomes(path):
        label = f"{key} message {index + 1}"
        theirs_ok = not isinstance(theirs, Exception)
        if isinstance(ours, Message) and theirs_ok:
            assert key not in HL7APY_REJECTS, f"{label}: hl7apy now reads it; unlist it"
            assert key not in READER_REJECTS, f"{label}: the reader now reads it; unlist it"
            assert key not in BOTH_REJECT, f"{label}: both now read it; unlist it"
            compared, problems = _compare(ours, theirs)
        elif isinstance(ours, Message):
            assert key in HL7APY_REJECTS, (
                f"{label}: hl7apy raises {type(theirs).__name__}: {theirs}; the reader reads it. "
                "Look at the file and list it in HL7APY_REJECTS with the reason."
            )
            compared, problems = _compare(ours, _hl7apy_segment_by_segment(text))
        elif theirs_ok:
            assert isinstance(ours, Hl7ReadError)
            assert key in READER_REJECTS, f"{label}: the reader rejects it ({ours}), hl7apy not"
            assert READER_REJECTS[key][0] in ours.reason, ours.reason
            continue
        else:
            assert isinstance(ours, Hl7ReadError)
            assert key in BOTH_REJECT, f"{label}: both reject: reader {ours}; hl7apy {theirs}"
            assert BOTH_REJECT[key][0] in ours.reason, ours.reason
            continue
        assert not problems, f"{label}:\n" + "\n".join(problems)
        assert compared > 0, f"{label}: nothing compared"
        total += compared
    expected_rejected = key in READER_REJECTS or key in BOTH_REJECT
    assert (total == 0) == expected_rejected


def test_listed_files_exist() -> None:
    if not FILES:
        pytest.skip(f"the shared HL7 v2 corpus is absent ({CORPUS})")
    keys = {_key(p) for p in FILES}
    for listed in (*HL7APY_REJECTS, *READER_REJECTS, *BOTH_REJECT):
        assert listed in keys, f"{listed} is listed but not in the corpus"


def test_corpus_mostly_agrees() -> None:
    """Guard against a silent collapse (e.g. every message suddenly rejected by both)."""
    if not FILES:
        pytest.skip(f"the shared HL7 v2 corpus is absent ({CORPUS})")
    both_read = sum(
        1
        for path in FILES
        for _i, _t, ours, theirs in _outcomes(path)
        if isinstance(ours, Message) and not isinstance(theirs, Exception)
    )
    assert both_read >= 40
