"""Unit tests of the fast ER7 reader (adapters/hl7v2/er7.py).

Every message here is synthetic and written inline: invented patients, identifiers and staff.
"""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from adapters.hl7v2.er7 import (
    Delimiters,
    Hl7ReadError,
    Message,
    decode,
    read_message,
    split_messages,
)

MSH = (
    "MSH|^~\\&|RIS|NORTH_HOSP|SAFETYNET|NORTH_HOSP|20240105103000||ORU^R01^ORU_R01|CTRL0001|P|2.5.1"
)
PID = (
    "PID|1||TEST0001^^^NORTH_HOSP&1.2.3.4&ISO^MR~9990000018^^^NHS^NH||SYNTHETIC^BABY^A||20231120|M"
)
PV1 = "PV1|1|I|WARD7^BAY2^BED3||||D123^DOCTOR^ANNA^^^DR|||||||||||V555^^^NORTH_HOSP^VN"
OBR = "OBR|1|PL100^RIS|FL200^PACS|XSKEL^Skeletal survey^LOCAL|||20240105090000"
OBX = "OBX|1|TX|REP^Report^LOCAL||No fracture seen.||||||F"
ZPI = "ZPI|1|local^stuff~more|&&&"


def message(*segments: str) -> str:
    return "\r".join(segments)


def escaped(text: str, esc: str = "\\") -> Message:
    """A message whose OBX-5 is ``text`` (already escaped, written with ``esc``)."""
    return read_message(message(MSH, f"OBX|1|TX|REP||{text}||||||F".replace("\\", esc)))


def reject(data: str | bytes) -> Hl7ReadError:
    with pytest.raises(Hl7ReadError) as info:
        read_message(data)
    return info.value


# --- the header and message-level properties --------------------------------------------------


def test_header_properties() -> None:
    m = read_message(message(MSH, PID, PV1, OBR, OBX))
    assert m.message_type == "ORU"
    assert m.trigger == "R01"
    assert m.structure == "ORU_R01"
    assert m.control_id == "CTRL0001"
    assert m.version == "2.5.1"
    assert m.sending_application == "RIS"
    assert m.sending_facility == "NORTH_HOSP"
    assert m.delimiters == Delimiters("|", "^", "~", "\\", "&")
    assert [s.name for s in m.segments] == ["MSH", "PID", "PV1", "OBR", "OBX"]
    assert m.text == message(MSH, PID, PV1, OBR, OBX)


def test_msh_field_numbering_follows_hl7() -> None:
    msh = read_message(message(MSH, PID)).segments[0]
    assert msh.get(1) == "|"
    assert msh.get(2) == "^~\\&"
    assert msh.raw_field(1) == "|"
    assert msh.raw_field(2) == "^~\\&"
    assert msh.repetitions(1) == msh.repetitions(2) == 1
    assert msh.get(2, 2) == ""  # MSH-2 is never split
    assert msh.get(3) == "RIS"
    assert msh.get(7) == "20240105103000"
    assert msh.get(8) == ""
    assert msh.get(9, 2) == "R01"


def test_segment_lookup() -> None:
    m = read_message(message(MSH, PID, OBR, OBX, OBX.replace("OBX|1", "OBX|2")))
    pid = m.segment("PID")
    assert pid is not None and pid.name == "PID"
    assert m.segment("MRG") is None
    assert [s.get(1) for s in m.all("OBX")] == ["1", "2"]
    assert m.all("NTE") == []


def test_version_and_structure_may_be_absent() -> None:
    m = read_message("MSH|^~\\&|A|B|C|D|||ORU|42")
    assert (m.message_type, m.trigger, m.structure, m.version) == ("ORU", "", "", "")


def test_z_segment_is_kept_and_harmless() -> None:
    m = read_message(message(MSH, PID, ZPI, PV1))
    assert [s.name for s in m.segments] == ["MSH", "PID", "ZPI", "PV1"]
    zpi = m.segment("ZPI")
    assert zpi is not None
    assert zpi.get(2, 2, 1, 0) == "stuff"
    assert zpi.get(2, 1, 1, 1) == "more"
    pv1 = m.segment("PV1")
    assert pv1 is not None and pv1.get(3, 1) == "WARD7"


def test_segment_with_name_only() -> None:
    m = read_message(message(MSH, "NTE", PID))
    nte = m.segment("NTE")
    assert nte is not None
    assert nte.get(1) == "" and nte.repetitions(1) == 0 and nte.raw_field(1) == ""


# --- fields, repetitions, components, sub-components ----------------------------------------


def test_components_subcomponents_repetitions() -> None:
    pid = read_message(message(MSH, PID)).segment("PID")
    assert pid is not None
    assert pid.repetitions(3) == 2
    assert pid.get(3) == "TEST0001"
    assert pid.get(3, 4) == "NORTH_HOSP"
    assert pid.get(3, 4, 2) == "1.2.3.4"
    assert pid.get(3, 4, 3) == "ISO"
    assert pid.get(3, 5) == "MR"
    assert pid.get(3, 1, 1, 1) == "9990000018"
    assert pid.get(3, 4, 1, 1) == "NHS"
    assert pid.get(3, 5, 1, 1) == "NH"
    assert pid.get(5, 2) == "BABY"
    assert pid.raw_field(3) == "TEST0001^^^NORTH_HOSP&1.2.3.4&ISO^MR~9990000018^^^NHS^NH"


def test_absent_parts_read_as_empty() -> None:
    pid = read_message(message(MSH, PID)).segment("PID")
    assert pid is not None
    assert pid.get(2) == ""
    assert pid.repetitions(2) == 0
    assert pid.get(3, 1, 1, 2) == ""  # no third repetition
    assert pid.get(3, 2) == ""  # empty component
    assert pid.get(3, 9) == ""  # beyond the last component
    assert pid.get(3, 1, 2) == ""  # no sub-components there
    assert pid.get(8, 2) == ""  # an unsplit field has only component 1
    assert pid.get(8, 1, 1, 1) == ""
    assert pid.get(99) == "" and pid.raw_field(99) == "" and pid.repetitions(99) == 0
    assert pid.get(0) == "" and pid.get(-1) == "" and pid.raw_field(0) == ""
    assert pid.get(3, 0) == "" and pid.get(3, 1, 0) == "" and pid.get(3, 1, 1, -1) == ""


def test_empty_repetitions_are_counted() -> None:
    m = read_message(message(MSH, "PID|1||~A^^^X^MR~"))
    pid = m.segment("PID")
    assert pid is not None
    assert pid.repetitions(3) == 3
    assert [pid.get(3, 1, 1, r) for r in range(3)] == ["", "A", ""]
    assert pid.get(3, 5, 1, 1) == "MR"


def test_trailing_spaces_are_data() -> None:
    m = read_message(message(MSH, "NTE|1||text with trailing spaces   "))
    nte = m.segment("NTE")
    assert nte is not None and nte.get(3) == "text with trailing spaces   "


# --- escape sequences -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "text"),
    [
        ("a\\F\\b", "a|b"),
        ("a\\S\\b", "a^b"),
        ("a\\T\\b", "a&b"),
        ("a\\R\\b", "a~b"),
        ("a\\E\\b", "a\\b"),
        ("\\E\\\\E\\", "\\\\"),
        ("line 1\\.br\\line 2", "line 1\nline 2"),
        ("\\H\\7.28\\N\\ (low)", "7.28 (low)"),
        ("\\X41\\\\X4243\\", "ABC"),
        ("caf\\XC3A9\\", "café"),  # UTF-8 bytes
        ("caf\\XE9\\", "café"),  # not UTF-8: latin-1
        ("\\X0D0A\\", "\r\n"),
        ("a\\X\\b", "ab"),
        ("a\\.sp\\b\\.sp2\\c", "abc"),
        ("\\.in+4\\indented\\.ti-2\\\\.fi\\\\.nf\\\\.sk3\\\\.ce\\x", "indentedx"),
        ("\\C2842\\Japanese\\C2B42\\", "Japanese"),
        ("\\M2442\\Kanji\\M284A\\", "Kanji"),
        ("\\M244284\\x", "x"),
        ("a\\Zlocal\\b", "ab"),
        # kept literally: unterminated, unknown, malformed
        ("50\\% off\\", "50\\% off\\"),
        ("trailing \\", "trailing \\"),
        ("C:\\temp", "C:\\temp"),
        ("C:\\temp\\file", "C:\\temp\\file"),
        ("C:\\temp\\F\\", "C:\\temp|"),
        ("\\XZZ\\", "\\XZZ\\"),
        ("\\X4\\", "\\X4\\"),
        ("\\C12\\", "\\C12\\"),
        ("\\.brx\\", "\\.brx\\"),
        ("\\.spx\\", "\\.spx\\"),
        ("\\.in+\\", "\\.in+\\"),
        ("a\\\\b", "a\\\\b"),
    ],
)
def test_escape_sequences(sent: str, text: str) -> None:
    obx = escaped(sent).segment("OBX")
    assert obx is not None
    assert obx.get(5) == text
    assert obx.raw_field(5) == sent


def test_escapes_inside_components_and_repetitions() -> None:
    obx = escaped("a\\S\\b^c\\T\\d&e\\F\\~\\R\\").segment("OBX")
    assert obx is not None
    assert obx.get(5) == "a^b"
    assert obx.get(5, 2) == "c&d"
    assert obx.get(5, 2, 2) == "e|"
    assert obx.get(5, 1, 1, 1) == "~"
    assert obx.repetitions(5) == 2


def test_no_escape_char_means_no_unescaping() -> None:
    obx = escaped("plain text: F S T R E .br").segment("OBX")
    assert obx is not None and obx.get(5) == "plain text: F S T R E .br"


def test_escape_sequences_follow_the_message_delimiters() -> None:
    text = "MSH|^~#&|A|B|C|D|||ADT^A01|1|P|2.5\rNTE|1||#F##S##T##R##E##.br#x\\y"
    nte = read_message(text).segment("NTE")
    assert nte is not None
    assert nte.get(3) == "|^&~#\nx\\y"


def test_escape_t_without_subcomponent_separator_is_literal() -> None:
    nte = read_message("MSH|^~\\|A|B|C|D|||ADT^A01|1\rNTE|1||x\\T\\y").segment("NTE")
    assert nte is not None and nte.get(3) == "x\\T\\y"


# --- delimiters -------------------------------------------------------------------------------


def test_custom_delimiters() -> None:
    text = (
        "MSH$%*!@$LAB$SOUTH_HOSP$$$20240105$$ORU%R01$C77$P$2.4\r"
        "PID$1$$A1%%%SOUTH_HOSP@1.2@ISO%MR*B2%%%NHS%NH$$SYNTHETIC%CHILD\r"
        "OBX$1$ST$CODE$$a!F!b!S!c!T!d!R!e!E!f!.br!g|^~\\&"
    )
    m = read_message(text)
    assert m.delimiters == Delimiters("$", "%", "*", "!", "@")
    assert (m.message_type, m.trigger, m.control_id, m.version) == ("ORU", "R01", "C77", "2.4")
    pid = m.segment("PID")
    obx = m.segment("OBX")
    assert pid is not None and obx is not None
    assert pid.get(3, 4) == "SOUTH_HOSP"
    assert pid.get(3, 4, 2) == "1.2"
    assert pid.get(3, 1, 1, 1) == "B2"
    assert pid.repetitions(3) == 2
    assert pid.get(5, 2) == "CHILD"
    assert obx.get(5) == "a$b%c@d*e!f\ng|^~\\&"
    assert m.segments[0].get(1) == "$" and m.segments[0].get(2) == "%*!@"


def test_dollar_percent_style_header() -> None:
    m = read_message("MSH$%~\\&$APP$FAC$$$$$ADT%A03$X1$P$2.3\rPV1$1$I$W1%B1")
    assert (m.message_type, m.trigger, m.control_id) == ("ADT", "A03", "X1")
    pv1 = m.segment("PV1")
    assert pv1 is not None and pv1.get(3, 2) == "B1"


def test_three_encoding_characters() -> None:
    m = read_message("MSH|^~\\|APP|FAC|||||ADT^A01|1|P|2.3\rPID|1||A&B^^^X^MR")
    assert m.delimiters.subcomponent == ""
    pid = m.segment("PID")
    assert pid is not None
    assert pid.get(3) == "A&B"  # '&' is plain text here
    assert pid.get(3, 1, 2) == ""
    assert pid.get(3, 5) == "MR"


def test_truncation_character_is_tolerated() -> None:
    m = read_message("MSH|^~\\&#|APP|FAC|||||ADT^A01|1|P|2.7\rNTE|1||cut\\P\\#")
    assert m.delimiters.truncation == "#"
    assert m.delimiters.subcomponent == "&"
    nte = m.segment("NTE")
    assert nte is not None and nte.get(3) == "cut##"


def test_delimiters_are_frozen() -> None:
    d = read_message(message(MSH, PID)).delimiters
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.field = "!"  # type: ignore[misc]
    assert d == Delimiters("|", "^", "~", "\\", "&")
    assert hash(d) == hash(Delimiters("|", "^", "~", "\\", "&"))


# --- line endings, bytes, BOM -----------------------------------------------------------------


@pytest.mark.parametrize("ending", ["\r", "\n", "\r\n"])
def test_segment_separators(ending: str) -> None:
    m = read_message(ending.join([MSH, PID, PV1, OBX]) + ending)
    assert [s.name for s in m.segments] == ["MSH", "PID", "PV1", "OBX"]
    assert m.text == message(MSH, PID, PV1, OBX)


def test_mixed_separators_and_blank_lines() -> None:
    m = read_message(MSH + "\r\n" + PID + "\n\n" + PV1 + "\r  \r" + OBX + "\r\n\r\n")
    assert [s.name for s in m.segments] == ["MSH", "PID", "PV1", "OBX"]
    assert m.text == message(MSH, PID, PV1, OBX)


def test_bytes_utf8_latin1_and_bom() -> None:
    text = message(MSH, "PID|1||X1^^^H^MR||ÉLODIE^SYNTHÈSE")
    for data in (
        text.encode("utf-8"),
        b"\xef\xbb\xbf" + text.encode("utf-8"),
        text.encode("latin-1"),
        "\ufeff" + text,
    ):
        pid = read_message(data).segment("PID")
        assert pid is not None and pid.get(5, 2) == "SYNTHÈSE"


def test_decode() -> None:
    assert decode(b"\xef\xbb\xbfMSH") == "MSH"
    assert decode("é".encode()) == "é"
    assert decode(b"\xe9") == "é"
    assert decode(b"\xff\xfe\x00") == "ÿþ\x00"
    assert decode(b"") == ""


def test_nul_and_huge_fields_are_read() -> None:
    big = "x" * 2_000_000
    m = read_message(message(MSH, f"OBX|1|ED|PDF||^AP^PDF^Base64^{big}|\x00|"))
    obx = m.segment("OBX")
    assert obx is not None
    assert obx.get(5, 5) == big
    assert obx.get(6) == "\x00"


# --- split_messages ---------------------------------------------------------------------------


def test_split_several_messages_any_line_ending() -> None:
    first = message(MSH, PID)
    second = message(MSH.replace("CTRL0001", "CTRL0002"), PV1)
    data = (MSH + "\r\n" + PID + "\n\n" + second.replace("\r", "\r\n") + "\r\n").encode()
    assert split_messages(data) == [first, second]
    assert [read_message(t).control_id for t in split_messages(data) if isinstance(t, str)] == [
        "CTRL0001",
        "CTRL0002",
    ]


def test_split_strips_batch_envelopes() -> None:
    one = message(MSH, PID)
    two = message(MSH.replace("CTRL0001", "CTRL0002"), PID)
    three = message(MSH.replace("CTRL0001", "CTRL0003"), PID)
    data = "\n".join(
        [
            "FHS|^~\\&|RIS|NORTH_HOSP|||20240105||file1.hl7",
            "BHS|^~\\&|RIS|NORTH_HOSP|||20240105||||batch-1",
            one,
            two,
            "BTS|2",
            "BHS|^~\\&|RIS|NORTH_HOSP|||20240105||||batch-2",
            three,
            "BTS|1",
            "FTS|2",
        ]
    ).replace("\r", "\n")
    assert split_messages(data) == [one, two, three]


def test_split_bom_and_blank_lines() -> None:
    data = b"\xef\xbb\xbf\r\n\r\n" + message(MSH, PID).encode() + b"\r\n\r\n"
    assert split_messages(data) == [message(MSH, PID)]
    # files concatenated with `cat`, each with its own BOM
    twice = ("\ufeff" + message(MSH, PID) + "\n") * 2
    assert split_messages(twice) == [message(MSH, PID)] * 2


def test_split_tolerates_mllp_framing_left_in_a_capture() -> None:
    one = message(MSH, PID)
    two = message(MSH.replace("CTRL0001", "CTRL0002"), PV1)
    data = f"\x0b{one}\r\x1c\r\x0b{two}\r\x1c\r".encode()
    assert split_messages(data) == [one, two]


def test_split_garbage_between_messages() -> None:
    items = split_messages("\n".join([message(MSH, PID), "BTS|1", "stray text", message(MSH, PV1)]))
    assert items[0] == message(MSH, PID)
    assert isinstance(items[1], Hl7ReadError)
    assert "outside any message" in items[1].reason
    assert items[2] == message(MSH, PV1)


def test_split_garbage_before_first_msh() -> None:
    items = split_messages("hello\r\nthis is not HL7\r\n" + message(MSH, PID))
    assert len(items) == 2
    error = items[0]
    assert isinstance(error, Hl7ReadError)
    assert error.ack_code == "AR"
    assert "before the first MSH" in error.reason
    assert items[1] == message(MSH, PID)


def test_split_keeps_bad_segments_inside_their_message() -> None:
    items = split_messages(message(MSH, PID, "not a segment", OBX))
    assert items == [message(MSH, PID, "not a segment", OBX)]
    text = items[0]
    assert isinstance(text, str)
    assert reject(text).sequence == 3


def test_split_nothing() -> None:
    assert split_messages(b"") == []
    assert split_messages("\r\n \n") == []


# --- rejections -------------------------------------------------------------------------------


def test_reject_empty() -> None:
    error = reject("")
    assert error.ack_code == "AR"
    assert error.reason == "the message is empty"


@pytest.mark.parametrize(
    "text", ["PID|1||X", "hello", "BHS|^~\\&|A", "msh|^~\\&|A|B|C|D|||ADT^A01|1"]
)
def test_reject_no_msh_first(text: str) -> None:
    error = reject(text)
    assert error.ack_code == "AR"
    assert error.reason == "the message does not start with an MSH segment"


@pytest.mark.parametrize("text", ["MSH", "MSH|^~\\", "MSH|^~\\\rPID|1"])
def test_reject_short_msh(text: str) -> None:
    error = reject(text)
    assert error.ack_code == "AR"
    assert (error.segment, error.sequence, error.field) == ("MSH", 1, 2)
    assert "too short" in error.reason


@pytest.mark.parametrize(
    "text", ["MSH|^^\\&|A|B|C|D|||ADT^A01|1", "MSH|^~\\~|A|B|C|D|||ADT^A01|1", "MSH|||||||"]
)
def test_reject_delimiters_not_distinct(text: str) -> None:
    error = reject(text)
    assert error.ack_code == "AR"
    assert error.field == 2
    assert error.reason in {
        "the delimiters in MSH-1 and MSH-2 are not distinct",
        "MSH-2 must hold 3 to 5 encoding characters, found 0",
        "MSH-2 must hold 3 to 5 encoding characters, found 2",
    }


def test_reject_repeated_encoding_character() -> None:
    error = reject("MSH|^^\\&|A|B|C|D|||ADT^A01|1")
    assert error.reason == "the delimiters in MSH-1 and MSH-2 are not distinct"


@pytest.mark.parametrize(
    ("text", "found"),
    [("MSH|^~|APP|FAC|||||ADT^A01|1", 2), ("MSH|^~\\&#!|APP|FAC|||||ADT^A01|1", 6)],
)
def test_reject_encoding_character_count(text: str, found: int) -> None:
    error = reject(text)
    assert error.ack_code == "AR" and error.field == 2
    assert error.reason == f"MSH-2 must hold 3 to 5 encoding characters, found {found}"


@pytest.mark.parametrize("text", ["MSHA^~\\&A", "MSH|^~\\x|A|B|C|D|||ADT^A01|1", "MSH ^~\\& A"])
def test_reject_delimiters_that_are_not_punctuation(text: str) -> None:
    error = reject(text)
    assert error.ack_code == "AR"
    assert error.reason == "the delimiters in MSH-1 and MSH-2 must be punctuation characters"


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("pid|1", "does not start with a segment name"),
        ("P-D|1", "does not start with a segment name"),
        ("PI", "does not start with a segment name"),
        ("PIDX|1", "'PID' is followed by 'X'"),
        ("8866||||Final", "'886' is followed by '6'"),
        (" PID|1", "does not start with a segment name"),
    ],
)
def test_reject_bad_segment_name(line: str, fragment: str) -> None:
    error = reject(message(MSH, PID, line, OBX))
    assert error.ack_code == "AE"
    assert error.sequence == 3
    assert error.segment is None
    assert fragment in error.reason


def test_segment_names_may_hold_digits() -> None:
    m = read_message(message(MSH, "ZB1|x", "IN1|1", "PR1|1"))
    assert [s.name for s in m.segments] == ["MSH", "ZB1", "IN1", "PR1"]


@pytest.mark.parametrize(
    "text",
    ["MSH|^~\\&|A|B|C|D|||", "MSH|^~\\&|A|B|C|D|||^A01|1", "MSH|^~\\&", "MSH|^~\\&|A|B|C|D"],
)
def test_reject_missing_msh9(text: str) -> None:
    error = reject(text)
    assert error.ack_code == "AR"
    assert (error.segment, error.sequence, error.field) == ("MSH", 1, 9)
    assert error.reason == "MSH-9 (message type) is missing"


@pytest.mark.parametrize("text", ["MSH|~\\&|A|B|C|D|||ORU^R01|1", "MSH|^~\\&|A|B|C|D|||ADTX^A01|1"])
def test_reject_msh9_that_is_not_a_message_type(text: str) -> None:
    # The first declares '~' as the component separator although '^' is used: MSH-9 does not split.
    error = reject(text)
    assert error.ack_code == "AR"
    assert error.field == 9
    assert "is not a 3-character code" in error.reason


@pytest.mark.parametrize("text", ["MSH|^~\\&|A|B|C|D|||ADT^A01", "MSH|^~\\&|A|B|C|D|||ADT^A01||P"])
def test_reject_missing_msh10(text: str) -> None:
    error = reject(text)
    assert error.ack_code == "AR"
    assert (error.segment, error.sequence, error.field) == ("MSH", 1, 10)
    assert error.reason == "MSH-10 (message control id) is missing"


def test_reject_second_message() -> None:
    error = reject(message(MSH, PID, MSH, PID))
    assert error.ack_code == "AE"
    assert (error.segment, error.sequence) == ("MSH", 3)
    assert "one message expected" in error.reason


@pytest.mark.parametrize("data", [None, 42, ["MSH"]])
def test_reject_what_is_not_text(data: object) -> None:
    error = reject(data)  # type: ignore[arg-type]
    assert error.ack_code == "AR"
    with pytest.raises(Hl7ReadError):
        split_messages(data)  # type: ignore[arg-type]


def test_error_is_plain_english_and_picklable() -> None:
    error = reject("MSH|^~\\&|A|B|C|D|||ADT^A01")
    assert str(error) == (
        "MSH-10 (message control id) is missing (segment MSH, position 1, field 10) [AR]"
    )
    copy = pickle.loads(pickle.dumps(error))
    assert isinstance(copy, Hl7ReadError)
    assert (copy.reason, copy.segment, copy.sequence, copy.field, copy.ack_code) == (
        error.reason,
        "MSH",
        1,
        10,
        "AR",
    )
    assert Hl7ReadError("x").ack_code == "AE"
