"""ACKs for every HL7 v2 version, checked against hl7apy (the oracle), python-hl7 and our own
strict reader; the tolerant header reader; enhanced-mode rules.

The original messages are written here, synthetic (no real patient data): an ORU^R01 from a
made-up radiology system "RIS" with an HD-style sending application.
"""

from __future__ import annotations

import string
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import hl7
import hl7apy
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.hl7v2.ack import (
    ERROR_CODES,
    AckError,
    Header,
    ack_code,
    build_ack,
    read_header,
    should_send,
)
from adapters.hl7v2.er7 import Message, read_message
from adapters.mllp.framing import encode_frame

VERSIONS = ["2.1", "2.2", "2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.8", "2.8.1"]
VERSIONS += ["2.8.2"]
NOW = datetime(2024, 3, 1, 12, 30, 5, tzinfo=UTC)
NASTY = "bad | ^ & ~ \\ id, \\F\\ kept"


def original(
    version: str = "2.5.1",
    *,
    msh15: str = "",
    msh16: str = "",
    sending_application: str = "RIS^1.2.3^ISO",
    receiving: str = "SAFETYNET|TRUST",
    trigger: str = "R01",
) -> str:
    msh9 = f"ORU^{trigger}" if trigger else "ORU"
    return (
        f"MSH|^~\\&|{sending_application}|RADIOLOGY|{receiving}|20240301121500||{msh9}"
        f"|MSG0001|P|{version}|||{msh15}|{msh16}\r"
        "PID|1||TEST0001^^^H^MR||SYNTHETIC^TEST\r"
        "OBR|1|PL1|FL1|XR^Skeletal survey|||20240301110000\r"
    )


def ack_for(version: str, error: AckError | None = None, **options: str) -> str:
    header = read_header(original(version, **options))
    assert header is not None
    return build_ack(header, "AE" if error else "AA", control_id="ACK0001", now=NOW, error=error)


def oracle(ack: str, version: str) -> Any:
    """hl7apy's reading of an ACK. Strict from v2.3.1; before that hl7apy cannot instantiate
    any ACK strictly: it names the structure from MSH-9.3, else "<type>_<trigger>" (ACK_R01,
    which does not exist), and 2.3 has no MSH-9.3; v2.1 also types MSH-3/5 as ST (no
    components)."""
    strict = _version(version) >= (2, 3, 1)
    level = VALIDATION_LEVEL.STRICT if strict else VALIDATION_LEVEL.TOLERANT
    message = parse_message(ack, find_groups=strict, validation_level=level)
    if strict:
        message.validate()
    return message


def _version(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


def parts(field: Any) -> list[str]:
    """hl7apy: the components of a field, as sent."""
    return [child.to_er7() for child in field.children]


def test_versions_are_all_supported_by_the_oracle() -> None:
    assert set(VERSIONS) <= set(hl7apy.SUPPORTED_LIBRARIES)
    assert set(VERSIONS) >= {"2.1", "2.2", "2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7"}


@pytest.mark.parametrize("version", VERSIONS)
def test_accept_ack_reads_in_every_version(version: str) -> None:
    ack = ack_for(version)
    assert ack.endswith("\r") and ack.count("\r") == 2
    m = oracle(ack, version)
    assert m.msa.msa_1.value == "AA"
    assert m.msa.msa_2.value == "MSG0001"
    assert m.msh.msh_3.to_er7() == "SAFETYNET"  # the original's MSH-5
    assert m.msh.msh_4.to_er7() == "TRUST"
    assert m.msh.msh_5.to_er7() == "RIS^1.2.3^ISO"  # the original's MSH-3, components kept
    assert m.msh.msh_6.to_er7() == "RADIOLOGY"
    assert m.msh.msh_7.to_er7() == "20240301123005+0000"
    expected_type = "ACK^R01^ACK" if _version(version) >= (2, 3, 1) else "ACK^R01"
    assert m.msh.msh_9.to_er7() == expected_type
    assert m.msh.msh_10.to_er7() == "ACK0001"
    assert m.msh.msh_11.to_er7() == "P"
    assert m.msh.msh_12.to_er7() == version
    assert not [s for s in m.children if s.name == "ERR"]

    other = hl7.parse(ack)
    assert str(other.segment("MSA")[1]) == "AA"
    assert str(other.segment("MSA")[2]) == "MSG0001"
    assert str(other.segment("MSH")[5]) == "RIS^1.2.3^ISO"

    ours = read_message(ack)
    assert (ours.message_type, ours.trigger, ours.control_id) == ("ACK", "R01", "ACK0001")
    assert ours.version == version


@pytest.mark.parametrize("version", VERSIONS)
def test_error_ack_carries_err_in_the_form_of_its_version(version: str) -> None:
    ack = ack_for(version, AckError(NASTY, "PID-3", "102"))
    m = oracle(ack, version)
    assert m.msa.msa_1.value == "AE"
    assert m.msa.msa_2.value == "MSG0001"
    assert m.msh.msh_5.to_er7() == "RIS^1.2.3^ISO"
    err = m.err
    escaped = "bad \\F\\ \\S\\ \\T\\ \\R\\ \\E\\ id, \\E\\F\\E\\ kept"
    if _version(version) < (2, 5):
        # ERR-1 (ELD): segment ^ sequence ^ field ^ code & text & coding system; reason in MSA-3
        assert parts(err.err_1) == ["PID", "1", "3", "102&Data type error&HL70357"]
        assert m.msa.msa_3.to_er7() == escaped
        reason_at = ("MSA", 3)
    else:
        assert parts(err.err_2) == ["PID", "1", "3"]  # ERL
        assert parts(err.err_3) == ["102", "Data type error", "HL70357"]  # CWE, table 0357
        assert err.err_4.to_er7() == "E"
        assert err.err_8.to_er7() == escaped
        assert m.msa.to_er7() == "MSA|AE|MSG0001"  # no MSA-3 from v2.5
        reason_at = ("ERR", 8)

    # hl7apy keeps values escaped; python-hl7 and our reader unescape them
    other = hl7.parse(ack)
    assert other.unescape(str(other.segment(reason_at[0])[reason_at[1]])) == NASTY
    ours = read_message(ack)
    segment = ours.segment(reason_at[0])
    assert segment is not None
    assert segment.get(reason_at[1]) == NASTY
    assert [s.name for s in ours.segments] == ["MSH", "MSA", "ERR"]


@pytest.mark.parametrize("version", ["2.4", "2.5.1"])
def test_enhanced_mode_codes_read_back(version: str) -> None:
    header = read_header(original(version, msh15="ER", msh16="NE"))
    assert header is not None and header.enhanced
    code = ack_code("reject", header.enhanced)
    ack = build_ack(header, code, control_id="A2", now=NOW, error=AckError("no", "MSH-9", "200"))
    m = oracle(ack, version)
    assert m.msa.msa_1.value == "CR"
    assert m.msh.msh_15.to_er7() == "" and m.msh.msh_16.to_er7() == ""


def test_control_characters_in_a_reason_cannot_break_the_segment_or_the_frame() -> None:
    reason = "line one\rline two\nthree\x0bfour\x1c\x0dfive"
    ack = ack_for("2.5.1", AckError(reason))
    assert "\n" not in ack and "\x0b" not in ack and "\x1c" not in ack
    assert ack.count("\r") == 3
    encode_frame(ack.encode())
    err = read_message(ack).segment("ERR")
    assert err is not None and err.get(8) == reason
    oracle(ack, "2.5.1")


def test_unreadable_header_gets_a_2_5_1_reject_with_empty_msa_2() -> None:
    error = AckError("the message does not start with an MSH segment", "", "100")
    ack = build_ack(None, "AR", control_id="A3", now=NOW, error=error, facility="TRUST")
    m = parse_message(ack, find_groups=False)
    assert m.msh.msh_12.to_er7() == "2.5.1"
    assert m.msh.msh_9.to_er7() == "ACK"
    assert m.msh.msh_3.to_er7() == "SAFETYNET" and m.msh.msh_4.to_er7() == "TRUST"
    assert m.msh.msh_5.to_er7() == ""
    assert m.msa.msa_1.value == "AR" and m.msa.msa_2.value == ""
    assert m.err.err_2.to_er7() == ""  # no location
    assert parts(m.err.err_3) == ["100", "Segment sequence error", "HL70357"]
    ours = read_message(ack)
    assert ours.version == "2.5.1"
    assert ack.split("\r")[1] == "MSA|AR|"


def test_sender_and_receiver_swap_and_fallbacks() -> None:
    header = read_header(original(receiving="|"))
    assert header is not None
    ack = build_ack(header, "AA", control_id="A4", now=NOW, application="SN", facility="HOSP")
    msh = read_message(ack).segments[0]
    assert (msh.raw_field(3), msh.raw_field(4)) == ("SN", "HOSP")
    assert (msh.raw_field(5), msh.raw_field(6)) == ("RIS^1.2.3^ISO", "RADIOLOGY")


@pytest.mark.parametrize(
    ("version", "msh9", "msh12"),
    [
        ("2.3", "ACK^R01", "2.3"),
        ("2.3.1", "ACK^R01^ACK", "2.3.1"),
        ("2.10", "ACK^R01^ACK", "2.10"),
        ("", "ACK^R01^ACK", "2.5.1"),
        ("banana", "ACK^R01^ACK", "2.5.1"),
        ("2", "ACK^R01^ACK", "2.5.1"),
    ],
)
def test_version_forms(version: str, msh9: str, msh12: str) -> None:
    ack = ack_for(version, AckError("x", "PID-3"))
    msh = read_message(ack).segments[0]
    assert (msh.raw_field(9), msh.raw_field(12)) == (msh9, msh12)
    err = read_message(ack).segment("ERR")
    assert err is not None
    if msh12 in ("2.3", "2.3.1"):
        assert err.raw_field(1).startswith("PID^1^3^207&")
    else:
        assert err.raw_field(2) == "PID^1^3"


@pytest.mark.parametrize("version", ["2.2", "2.5.1"])
def test_no_trigger_gives_ack_alone(version: str) -> None:
    msh = read_message(ack_for(version, trigger="")).segments[0]
    assert msh.raw_field(9) == "ACK"


@pytest.mark.parametrize(
    ("location", "eld", "erl"),
    [
        ("PID-3", "PID^1^3", "PID^1^3"),
        ("OBR-25", "OBR^1^25", "OBR^1^25"),
        ("msh-9", "MSH^1^9", "MSH^1^9"),
        ("PID", "PID^1^", "PID^1"),
        ("OBR-4.2", "OBR^1^4", "OBR^1^4^1^2"),
        ("", "^^", ""),
        ("not a place", "^^", ""),
    ],
)
def test_error_locations(location: str, eld: str, erl: str) -> None:
    old = read_message(ack_for("2.4", AckError("x", location))).segment("ERR")
    new = read_message(ack_for("2.5.1", AckError("x", location))).segment("ERR")
    assert old is not None and new is not None
    assert old.raw_field(1) == f"{eld}^207&Application internal error&HL70357"
    assert new.raw_field(2) == erl


def test_codes_and_severities_outside_their_tables_still_make_an_ack() -> None:
    ack = ack_for("2.5.1", AckError("x", "PID-3", hl7_code="999", severity="?"))
    err = read_message(ack).segment("ERR")
    assert err is not None
    assert (err.raw_field(3), err.raw_field(4)) == ("207^Application internal error^HL70357", "E")


def test_every_table_0357_code_has_its_text() -> None:
    for code, text in ERROR_CODES.items():
        err = read_message(ack_for("2.5.1", AckError("x", "", code))).segment("ERR")
        assert err is not None and (err.get(3, 1), err.get(3, 2)) == (code, text)


def test_custom_delimiters_are_used_and_escaped() -> None:
    raw = "MSH#$*!%#RIS$X#RAD#SN#TR#2024##ORU$R01#C1#P#2.5.1\rPID#1\r"
    header = read_header(raw)
    assert header is not None
    assert (header.field_sep, header.encoding) == ("#", "$*!%")
    ack = build_ack(header, "AE", control_id="A5", now=NOW, error=AckError("a#b$c*d!e%f", "PID-3"))
    assert ack.startswith("MSH#$*!%#SN#TR#RIS$X#RAD#")
    ours = read_message(ack)
    err = ours.segment("ERR")
    assert err is not None and err.get(8) == "a#b$c*d!e%f"
    assert ours.trigger == "R01"
    m = parse_message(ack, find_groups=False)
    assert m.msa.msa_2.value == "C1"


def test_three_encoding_characters_leave_out_sub_components() -> None:
    raw = "MSH|^~\\|RIS|RAD|SN|TR|2024||ORU^R01|C1|P|2.4\r"
    header = read_header(raw)
    assert header is not None and header.encoding == "^~\\"
    ack = build_ack(header, "AE", control_id="A6", now=NOW, error=AckError("x & y", "PID-3"))
    err = read_message(ack).segment("ERR")
    assert err is not None and err.raw_field(1) == "PID^1^3^207"
    msa = read_message(ack).segment("MSA")
    assert msa is not None and msa.get(3) == "x & y"  # "&" is text here: no escape needed


def test_truncation_character_is_kept_and_escaped() -> None:
    raw = "MSH|^~\\&#|RIS|RAD|SN|TR|2024||ORU^R01^ORU_R01|C1|P|2.7\r"
    header = read_header(raw)
    assert header is not None and header.encoding == "^~\\&#"
    ack = build_ack(header, "AE", control_id="A7", now=NOW, error=AckError("no. #1"))
    assert ack.endswith("|no. \\P\\1\r")
    err = read_message(ack).segment("ERR")
    assert err is not None and err.get(8) == "no. #1"


@pytest.mark.parametrize(
    ("offset", "stamp"),
    [
        (timedelta(hours=1), "20240301123005+0100"),
        (timedelta(hours=-5, minutes=-30), "20240301123005-0530"),
        (timedelta(0), "20240301123005+0000"),
    ],
)
def test_timestamp_carries_the_offset(offset: timedelta, stamp: str) -> None:
    now = NOW.replace(tzinfo=timezone(offset))
    ack = build_ack(read_header(original()), "AA", control_id="A8", now=now)
    assert read_message(ack).segments[0].raw_field(7) == stamp


def test_caller_mistakes_are_refused() -> None:
    header = read_header(original())
    with pytest.raises(ValueError):
        build_ack(header, "AA", control_id="A9", now=datetime(2024, 3, 1))  # naive
    with pytest.raises(ValueError):
        build_ack(header, "OK", control_id="A9", now=NOW)
    with pytest.raises(ValueError):
        build_ack(header, "AA", control_id="", now=NOW)
    with pytest.raises(ValueError):
        ack_code("maybe", False)


def test_our_own_control_id_is_escaped() -> None:
    ack = build_ack(read_header(original()), "AA", control_id="A|1", now=NOW)
    assert read_message(ack).control_id == "A|1"


@pytest.mark.parametrize(
    ("outcome", "original_mode", "enhanced_mode"),
    [("accept", "AA", "CA"), ("error", "AE", "CE"), ("reject", "AR", "CR")],
)
def test_ack_codes(outcome: str, original_mode: str, enhanced_mode: str) -> None:
    assert ack_code(outcome, False) == original_mode
    assert ack_code(outcome, True) == enhanced_mode


@pytest.mark.parametrize(
    ("msh15", "msh16", "sent"),
    [
        # original mode: always
        ("", "", {"AA", "AE", "AR"}),
        # enhanced mode, by MSH-15
        ("AL", "", {"CA", "CE", "CR"}),
        ("", "AL", {"CA", "CE", "CR"}),  # MSH-16 alone makes it enhanced; MSH-15 empty = always
        ("NE", "AL", set()),
        ("ER", "", {"CE", "CR"}),
        ("SU", "", {"CA"}),
        ("su", "", {"CA"}),
        ("XX", "", {"CA", "CE", "CR"}),  # outside the table: send rather than stall the sender
    ],
)
def test_should_send(msh15: str, msh16: str, sent: set[str]) -> None:
    header = read_header(original(msh15=msh15, msh16=msh16))
    assert header is not None
    assert header.enhanced == bool(msh15 or msh16)
    codes = ["CA", "CE", "CR"] if header.enhanced else ["AA", "AE", "AR"]
    assert {code for code in codes if should_send(header, code)} == sent


def test_should_send_without_a_header() -> None:
    assert all(should_send(None, code) for code in ("AA", "AE", "AR"))


def test_read_header_fields() -> None:
    header = read_header(original("2.5.1", msh15="AL", msh16="NE"))
    assert header == Header(
        field_sep="|",
        encoding="^~\\&",
        sending_application="RIS^1.2.3^ISO",
        sending_facility="RADIOLOGY",
        receiving_application="SAFETYNET",
        receiving_facility="TRUST",
        control_id="MSG0001",
        processing_id="P",
        version="2.5.1",
        message_type="ORU",
        trigger="R01",
        accept_ack_type="AL",
        application_ack_type="NE",
    )


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "garbage",
        "\x00\xff\r\n",
        "PID|1||X\rOBR|1\r",
        "MSH",
        "\ufeffMSH\r",
        "MSHX|^~\\&|",
        "MSH |",
    ],
)
def test_read_header_none(raw: str) -> None:
    assert read_header(raw) is None


def test_read_header_tolerates_lf_crlf_bom_and_leading_lines() -> None:
    text = original("2.4").replace("\r", "\n")
    for raw in (
        text,
        original("2.4").replace("\r", "\r\n"),
        "\ufeff" + original("2.4"),
        "PID|junk\n\n  " + text,
        "\x0b" + original("2.4"),
        original("2.4").encode("utf-8"),
    ):
        header = read_header(raw)
        assert header is not None
        assert (header.control_id, header.version, header.trigger) == ("MSG0001", "2.4", "R01")


def test_read_header_with_little_in_it() -> None:
    header = read_header("MSH|")
    assert header is not None
    assert (header.field_sep, header.encoding, header.control_id, header.version) == (
        "|",
        "^~\\&",
        "",
        "",
    )
    ack = build_ack(header, "AR", control_id="A10", now=NOW, error=AckError("MSH-9 missing"))
    assert read_message(ack).segments[0].raw_field(12) == "2.5.1"


def test_read_header_replaces_an_unusable_msh_2() -> None:
    for raw, encoding in (
        ("MSH|ab|A|B|C|D|2024||ADT^A01|X|P|2.4", "^~\\&"),
        ("MSH|^^\\&|A|B|C|D|2024||ADT^A01|X|P|2.4", "^~\\&"),
        ("MSH^^A^B", "~\\&#"),  # the separator took "^": a substitute stands in
    ):
        header = read_header(raw)
        assert header is not None and header.encoding == encoding, raw
        ack = build_ack(header, "AR", control_id="A11", now=NOW, error=AckError("x ^ y"))
        read_message(ack)


def test_read_header_never_raises_on_odd_input() -> None:
    assert read_header(123) is None  # type: ignore[arg-type]


_line = st.text(alphabet=string.ascii_uppercase + "0123456789|^~\\&#.-_ \x00\x1c\x0bé", max_size=80)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    head=st.one_of(_line, _line.map(lambda s: "MSH" + s), _line.map(lambda s: "MSH|^~\\&|" + s)),
    reason=st.text(max_size=60),
    location=st.text(max_size=8),
    code=st.sampled_from(["AA", "AE", "AR", "CA", "CE", "CR"]),
    with_error=st.booleans(),
)
def test_any_header_and_reason_make_an_ack_our_reader_reads(
    head: str, reason: str, location: str, code: str, with_error: bool
) -> None:
    header = read_header(head + "\rPID|1\r")
    error = AckError(reason, location) if with_error else None
    ack = build_ack(header, code, control_id="P1", now=NOW, error=error)
    message: Message = read_message(ack)
    encode_frame(ack.encode("utf-8"))
    msa = message.segment("MSA")
    assert msa is not None and msa.get(1) == code
    assert [s.name for s in message.segments] == ["MSH", "MSA", "ERR"][: 3 if error else 2]
    if error is not None:
        err = message.segment("ERR")
        assert err is not None
        if err.raw_field(1):  # up to v2.4 (ERR-1 is never empty there): reason in MSA-3
            assert msa.get(3) == reason
        else:
            assert err.get(8) == reason
    if header is not None and header.control_id.isprintable():
        assert msa.raw_field(2) == header.control_id
