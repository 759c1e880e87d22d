"""Property tests of the fast ER7 reader: it never fails in an unplanned way, and what a sender
escapes with the message's own delimiters reads back as the same text."""

from __future__ import annotations

import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.hl7v2.er7 import Hl7ReadError, Message, read_message, split_messages

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

HEADER = "MSH|^~\\&|APP|FAC|||20240105||ADT^A01|1|P|2.5"

# Inputs that get past the first checks: MSH prefixes, delimiters, escapes and line breaks.
_ER7_ALPHABET = "MSHPIDOBXZ019|^~\\&#$%!.FSTREXHNbr \r\n\x00\ufeffé"
_near_messages = st.one_of(
    st.binary(max_size=400),
    st.text(alphabet=_ER7_ALPHABET, max_size=300),
    st.text(alphabet=_ER7_ALPHABET, max_size=300).map(lambda tail: "MSH" + tail),
    st.text(alphabet=_ER7_ALPHABET, max_size=300).map(lambda tail: HEADER + "\r" + tail),
    st.binary(max_size=300).map(lambda tail: HEADER.encode() + b"\r" + tail),
)


def _exercise(message: Message) -> None:
    """Read every part of every field: lazy splitting and unescaping must not fail either."""
    for segment in message.segments:
        for field in range(0, 12):
            segment.raw_field(field)
            for repetition in range(segment.repetitions(field) + 1):
                for component in range(1, 4):
                    for sub in range(1, 3):
                        assert isinstance(segment.get(field, component, sub, repetition), str)
    for name in ("message_type", "trigger", "structure", "control_id", "version"):
        assert isinstance(getattr(message, name), str)


@SETTINGS
@given(_near_messages)
def test_read_message_only_raises_hl7readerror(data: str | bytes) -> None:
    try:
        message = read_message(data)
    except Hl7ReadError as error:
        assert not error.reason.startswith("internal"), error.reason
        assert error.ack_code in {"AE", "AR"}
        return
    assert message.segments[0].name == "MSH"
    _exercise(message)


@SETTINGS
@given(_near_messages)
def test_split_messages_only_raises_hl7readerror(data: str | bytes) -> None:
    try:
        items = split_messages(data)
    except Hl7ReadError as error:  # pragma: no cover - only for input that is not text/bytes
        assert not error.reason.startswith("internal"), error.reason
        return
    for item in items:
        if isinstance(item, Hl7ReadError):
            assert item.ack_code == "AR"
            continue
        assert item.startswith("MSH")
        try:
            _exercise(read_message(item))
        except Hl7ReadError as error:
            assert not error.reason.startswith("internal"), error.reason


# --- round trip -------------------------------------------------------------------------------


def _escape(text: str, d: dict[str, str]) -> str:
    """What a sender writes for ``text`` (the escape character first, then the delimiters)."""
    esc = d["escape"]
    out = text.replace(esc, f"{esc}E{esc}")
    for key, code in (("field", "F"), ("component", "S"), ("repetition", "R")):
        out = out.replace(d[key], f"{esc}{code}{esc}")
    if d["subcomponent"]:
        out = out.replace(d["subcomponent"], f"{esc}T{esc}")
    # \.br\ cannot be written when '.' is a delimiter: a sender then has only \X0A\.
    newline = f"{esc}X0A{esc}" if "." in d.values() else f"{esc}.br{esc}"
    return out.replace("\r", f"{esc}X0D{esc}").replace("\n", newline)


# A value is repetitions of components of sub-components of text.
_text = st.text(max_size=12)
_value = st.lists(
    st.lists(st.lists(_text, min_size=1, max_size=3), min_size=1, max_size=3),
    min_size=1,
    max_size=3,
)


@st.composite
def _delimiters(draw: st.DrawFn) -> dict[str, str]:
    count = draw(st.sampled_from([4, 5, 5, 5, 6]))  # field + 3, 4 or 5 encoding characters
    chars = draw(st.permutations(string.punctuation).map(lambda p: p[:count]))
    return {
        "field": chars[0],
        "component": chars[1],
        "repetition": chars[2],
        "escape": chars[3],
        "subcomponent": chars[4] if count > 4 else "",
        "truncation": chars[5] if count > 5 else "",
    }


def _build(d: dict[str, str], fields: list[list[list[list[str]]]]) -> str:
    encoding = d["component"] + d["repetition"] + d["escape"] + d["subcomponent"] + d["truncation"]
    fs, comp = d["field"], d["component"]
    header = fs.join(["MSH", encoding, "APP", "FAC", "", "", "", "", f"ORU{comp}R01", "9", "P"])

    def write(value: list[list[list[str]]]) -> str:
        sub = d["subcomponent"]
        return d["repetition"].join(
            comp.join(sub.join(_escape(t, d) for t in subs) for subs in components)
            for components in value
        )

    return header + "\r" + fs.join(["ZRT", *(write(v) for v in fields)])


def _check_round_trip(d: dict[str, str], fields: list[list[list[list[str]]]]) -> None:
    if not d["subcomponent"]:  # no sub-component separator: one sub-component each
        fields = [[[subs[:1] for subs in comps] for comps in value] for value in fields]
    message = read_message(_build(d, fields))
    assert message.delimiters.field == d["field"]
    assert message.delimiters.subcomponent == d["subcomponent"]
    assert message.delimiters.truncation == d["truncation"]
    assert (message.message_type, message.trigger, message.control_id) == ("ORU", "R01", "9")
    segment = message.segment("ZRT")
    assert segment is not None
    for number, value in enumerate(fields, start=1):
        flat = "".join(t for comps in value for subs in comps for t in subs)
        structure = len(value) > 1 or len(value[0]) > 1 or len(value[0][0]) > 1
        if not flat and not structure:
            assert segment.repetitions(number) == 0
        else:
            assert segment.repetitions(number) == len(value)
        for repetition, components in enumerate(value):
            for component, subs in enumerate(components, start=1):
                for sub, text in enumerate(subs, start=1):
                    assert segment.get(number, component, sub, repetition) == text


@SETTINGS
@given(st.lists(_value, min_size=1, max_size=5))
def test_escaped_text_reads_back(fields: list[list[list[list[str]]]]) -> None:
    standard = {
        "field": "|",
        "component": "^",
        "repetition": "~",
        "escape": "\\",
        "subcomponent": "&",
        "truncation": "",
    }
    _check_round_trip(standard, fields)


@SETTINGS
@given(_delimiters(), st.lists(_value, min_size=1, max_size=4), st.data())
def test_custom_delimiters_read_back(
    d: dict[str, str], fields: list[list[list[list[str]]]], data: st.DataObject
) -> None:
    # Make the delimiters themselves likely in the text, so that escaping matters.
    alphabet = "".join(d.values()) + "ab \r\n"
    extra = data.draw(st.lists(st.text(alphabet=alphabet, min_size=1, max_size=8), max_size=3))
    fields = [*fields, *([[[t]]] for t in extra)]
    _check_round_trip(d, fields)
