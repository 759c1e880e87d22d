r"""HL7 v2 acknowledgements (ACK): read what an ACK needs from a message's header, build the ACK.

The header is read tolerantly (``read_header``), apart from the strict reader (er7), because a
message the strict reader rejects must still be answered, with its own delimiters, version and
control id whenever they can be found.

The ACK takes the form of the original message's version:

- MSH-9 is ``ACK^<trigger>^ACK`` from v2.3.1 (message structure), ``ACK^<trigger>`` before;
- an error goes in ERR-1 (ELD: segment^sequence^field^code) up to v2.4, with the reason in
  MSA-3; from v2.5 in ERR-2 (ERL), ERR-3 (CWE code from HL7 table 0357), ERR-4 (severity) and
  ERR-8 (the reason), and MSA-3 (deprecated from v2.5) is left out;
- original mode codes (AA/AE/AR) when MSH-15 and MSH-16 are empty, enhanced mode (CA/CE/CR)
  otherwise; ``should_send`` applies MSH-15 (accept acknowledgement type).

Every text put in the ACK is escaped with the message's own delimiters (\F\ \S\ \T\ \R\ \E\,
control characters as \Xhh\), and values echoed from the original keep its escaping, so an
ACK is well formed whatever a reason says or a sender sent.

Errors: none of its own. ``read_header`` never raises; ``ack_code`` and ``build_ack`` raise
ValueError only for a caller's mistake (unknown outcome or MSA-1 code, naive datetime, empty
control id), never because of what a sender sent.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from types import MappingProxyType

from adapters.hl7v2.er7 import decode

__all__ = [
    "ERROR_CODES",
    "AckError",
    "Header",
    "ack_code",
    "build_ack",
    "read_header",
    "should_send",
]

DEFAULT_FIELD_SEPARATOR = "|"
DEFAULT_ENCODING = "^~\\&"
# The form an ACK takes when the original's version is unknown or unreadable.
DEFAULT_VERSION = "2.5.1"
_DEFAULT_VERSION_TUPLE = (2, 5, 1)

#: HL7 table 0357 (message error condition codes): code -> text, for ERR-1.4 / ERR-3.
ERROR_CODES: Mapping[str, str] = MappingProxyType(
    {
        "0": "Message accepted",
        "100": "Segment sequence error",
        "101": "Required field missing",
        "102": "Data type error",
        "103": "Table value not found",
        "104": "Value too long",
        "200": "Unsupported message type",
        "201": "Unsupported event code",
        "202": "Unsupported processing id",
        "203": "Unsupported version id",
        "204": "Unknown key identifier",
        "205": "Duplicate key",
        "206": "Application record locked",
        "207": "Application internal error",
    }
)
# HL7 table 0516 (error severity).
_SEVERITIES = frozenset({"E", "F", "I", "W"})
_CODES = {
    ("accept", False): "AA",
    ("error", False): "AE",
    ("reject", False): "AR",
    ("accept", True): "CA",
    ("error", True): "CE",
    ("reject", True): "CR",
}
_ACK_CODES = frozenset(_CODES.values())
_LOCATION = re.compile(r"([A-Z][A-Z0-9]{2})(?:-(\d{1,4})(?:\.(\d{1,4}))?)?")
_VERSION = re.compile(r"2(?:\.\d{1,3}){1,2}")
# Characters allowed to start a line before "MSH": a BOM, an MLLP start byte, blanks.
_LINE_LEAD = "\ufeff\x0b \t"


@dataclass(frozen=True, slots=True)
class Header:
    """What an ACK needs from the original message's MSH segment.

    Values are as sent: still escaped, components kept (``sending_application`` may be
    ``"LAB^1.2.3^ISO"``), so that they can be echoed verbatim with the same delimiters. The
    short codes (version, message type, trigger, MSH-15/16) are stripped of blanks. Do not use
    it to route or process a message: read that with the strict reader (er7).
    """

    field_sep: str
    encoding: str
    sending_application: str
    sending_facility: str
    receiving_application: str
    receiving_facility: str
    control_id: str
    processing_id: str
    version: str
    message_type: str
    trigger: str
    accept_ack_type: str
    application_ack_type: str

    @property
    def enhanced(self) -> bool:
        """True when the sender asked for enhanced acknowledgement (MSH-15 or MSH-16 set)."""
        return bool(self.accept_ack_type or self.application_ack_type)


@dataclass(frozen=True, slots=True)
class AckError:
    """Why a message was not accepted, for the ACK's ERR segment (and MSA-3 up to v2.4).

    ``reason`` is plain English (no patient data: ACKs are logged by integration engines);
    ``location`` is ``"SEG"``, ``"SEG-n"`` or ``"SEG-n.c"`` (e.g. ``"PID-3"``) or ``""`` when
    the error has no place; anything else is ignored rather than trusted. ``hl7_code`` is from
    HL7 table 0357 (see ERROR_CODES), ``severity`` from table 0516 (E, F, I, W). Values
    outside those tables are not refused here, because the ACK must still go out: ``build_ack``
    sends 207 (application internal error) and severity E instead.
    """

    reason: str
    location: str = ""
    hl7_code: str = "207"
    severity: str = "E"


def _is_delimiter(char: str) -> bool:
    return char.isprintable() and not char.isalnum() and not char.isspace()


def _usable_encoding(encoding: str, field_sep: str) -> bool:
    chars = field_sep + encoding
    return (
        3 <= len(encoding) <= 5
        and len(set(chars)) == len(chars)
        and all(_is_delimiter(c) for c in encoding)
    )


def _fallback_encoding(field_sep: str) -> str:
    """The standard encoding characters, with substitutes for any that the separator took."""
    return "".join(c for c in DEFAULT_ENCODING + "#$*!" if c != field_sep)[:4]


def _read_header(raw: str | bytes) -> Header | None:
    text = raw if isinstance(raw, str) else decode(raw)
    if "\n" in text:
        text = text.replace("\r\n", "\r").replace("\n", "\r")
    for candidate in text.split("\r"):
        line = candidate.lstrip(_LINE_LEAD)
        if line.startswith("MSH"):
            break
    else:
        return None
    if len(line) < 4 or not _is_delimiter(line[3]):
        return None
    sep = line[3]
    fields = line.split(sep)
    declared = fields[1]
    encoding = declared if _usable_encoding(declared, sep) else _fallback_encoding(sep)
    component = encoding[0]

    def field(number: int) -> str:
        # fields[0] is "MSH" and fields[1] is MSH-2: MSH-n is fields[n - 1].
        return fields[number - 1] if number - 1 < len(fields) else ""

    message_type = field(9).split(component)
    return Header(
        field_sep=sep,
        encoding=encoding,
        sending_application=field(3),
        sending_facility=field(4),
        receiving_application=field(5),
        receiving_facility=field(6),
        control_id=field(10),
        processing_id=field(11),
        version=field(12).split(component)[0].strip(),
        message_type=message_type[0].strip(),
        trigger=message_type[1].strip() if len(message_type) > 1 else "",
        accept_ack_type=field(15).strip(),
        application_ack_type=field(16).strip(),
    )


def read_header(raw: str | bytes) -> Header | None:
    """The header of a message, read tolerantly, for answering it; None when there is none.

    Finds the first line starting with "MSH" (lines end with CR, LF or CRLF; a BOM, an MLLP
    start byte or blanks before "MSH" are ignored) and takes the delimiters from MSH-1 and
    MSH-2; an MSH-2 that cannot serve (not 3 to 5 distinct punctuation characters) is replaced
    by the standard ``^~\\&``. Returns None only when there is no MSH line or MSH-1 is missing
    or not a punctuation character. Never raises. Not a validator: a Header says nothing about
    whether the message is readable.
    """
    try:
        return _read_header(raw)
    except Exception:  # answering must not fail: an unreadable header gets a default ACK
        return None


def ack_code(outcome: str, enhanced: bool) -> str:
    """MSA-1 for an outcome ("accept", "error" or "reject"): AA/AE/AR, or CA/CE/CR in enhanced
    mode. "error" is for content that is wrong; "reject" for a header that cannot be read or a
    message type, version or processing id that is not supported."""
    try:
        return _CODES[outcome, enhanced]
    except KeyError:
        raise ValueError(f"outcome must be accept, error or reject, not {outcome!r}") from None


def should_send(header: Header | None, code: str) -> bool:
    """Whether to send an ACK with MSA-1 ``code`` at all, per the sender's MSH-15.

    Original mode (or no readable header): always. Enhanced mode: MSH-15 AL or empty, always;
    NE, never; ER, only for an error or reject (CE/CR); SU, only for an accept (CA). An MSH-15
    value outside the table counts as AL: a sender that gets an unwanted ACK recovers, one that
    waits for a missing ACK stalls. Not for MSH-16 (application acknowledgements are separate
    messages).
    """
    if header is None or not header.enhanced:
        return True
    mode = header.accept_ack_type.upper()
    if mode == "NE":
        return False
    if mode == "ER":
        return code[1:] in ("E", "R")
    if mode == "SU":
        return code[1:] == "A"
    return True


def _version_tuple(version: str) -> tuple[int, ...] | None:
    if not _VERSION.fullmatch(version):
        return None
    return tuple(int(part) for part in version.split("."))


@lru_cache(maxsize=64)
def _escape_table(field_sep: str, encoding: str) -> dict[int, str]:
    """str.translate table that escapes free text for these delimiters."""
    esc = encoding[2]
    table = {c: f"{esc}X{c:02X}{esc}" for c in (*range(0x20), 0x7F)}
    for char, name in zip(encoding, ("S", "R", "E", "T", "P"), strict=False):
        table[ord(char)] = f"{esc}{name}{esc}"
    table[ord(field_sep)] = f"{esc}F{esc}"
    return table


@lru_cache(maxsize=64)
def _control_table(escape: str) -> dict[int, str]:
    """str.translate table that escapes only control characters, for echoed values (a raw 0x1C
    or CR would break the framing or the segment)."""
    return {c: f"{escape}X{c:02X}{escape}" for c in (*range(0x20), 0x7F)}


def _timestamp(now: datetime) -> str:
    offset = now.utcoffset()
    if offset is None:
        raise ValueError("now must be an aware datetime")
    seconds = int(offset.total_seconds())
    sign = "-" if seconds < 0 else "+"
    hours, rest = divmod(abs(seconds), 3600)
    # TS offsets carry minutes only; historical zones with second offsets are cut, not rounded.
    return f"{now:%Y%m%d%H%M%S}{sign}{hours:02d}{rest // 60:02d}"


def _location(location: str) -> tuple[str, str, str, str]:
    """(segment, sequence, field, component) for ERR, "" where unknown."""
    found = _LOCATION.fullmatch(location.strip().upper())
    if not found:
        return ("", "", "", "")
    segment, field, component = found.groups()
    return (segment, "1", field or "", component or "")


def build_ack(
    header: Header | None,
    code: str,
    *,
    control_id: str,
    now: datetime,
    error: AckError | None = None,
    application: str = "SAFETYNET",
    facility: str = "",
) -> str:
    """The ACK for a message whose header is ``header`` (None when unreadable), as ER7 text.

    Segments MSH, MSA and (when ``error`` is given) ERR, each ended by CR, in the original's
    delimiters and version form (v2.5.1 form when the version is missing or unreadable, and
    then MSH-12 says 2.5.1). ``control_id`` is the ACK's own MSH-10 (a new id, not the
    original's: that goes in MSA-2); ``now`` (aware) is MSH-7. ``application`` and ``facility``
    (plain text) stand in MSH-3/4 when the original left MSH-5/6 empty. Encode the text with
    the message's character set before framing it. Not for application acknowledgements
    (MSH-16) or for answering batches.
    """
    if code not in _ACK_CODES:
        raise ValueError(f"code must be one of {sorted(_ACK_CODES)}, not {code!r}")
    if not control_id:
        raise ValueError("control_id (the ACK's own MSH-10) must not be empty")
    stamp = _timestamp(now)
    sep = header.field_sep if header is not None else DEFAULT_FIELD_SEPARATOR
    encoding = header.encoding if header is not None else DEFAULT_ENCODING
    component = encoding[0]
    subcomponent = encoding[3] if len(encoding) > 3 else ""
    table = _escape_table(sep, encoding)
    controls = _control_table(encoding[2])

    def text(value: str) -> str:
        return value.translate(table)

    def echo(value: str) -> str:
        return value.translate(controls)

    parsed = _version_tuple(header.version) if header is not None else None
    version = echo(header.version) if header is not None and parsed is not None else None
    form = parsed or _DEFAULT_VERSION_TUPLE
    trigger = echo(header.trigger) if header is not None else ""
    if not trigger:
        message_type = "ACK"
    elif form >= (2, 3, 1):
        message_type = f"ACK{component}{trigger}{component}ACK"
    else:
        message_type = f"ACK{component}{trigger}"

    msh = [
        "MSH",
        encoding,
        echo(header.receiving_application) if header and header.receiving_application else "",
        echo(header.receiving_facility) if header and header.receiving_facility else "",
        echo(header.sending_application) if header else "",
        echo(header.sending_facility) if header else "",
        stamp,
        "",
        message_type,
        text(control_id),
        echo(header.processing_id) if header and header.processing_id else "P",
        version or DEFAULT_VERSION,
    ]
    msh[2] = msh[2] or text(application)
    msh[3] = msh[3] or text(facility)
    msa = ["MSA", code, echo(header.control_id) if header else ""]
    segments = [sep.join(msh)]
    if error is None:
        segments.append(sep.join(msa))
        return "\r".join(segments) + "\r"

    segment, sequence, field, comp = _location(error.location)
    hl7_code = error.hl7_code if error.hl7_code in ERROR_CODES else "207"
    severity = error.severity if error.severity in _SEVERITIES else "E"
    code_text = text(ERROR_CODES[hl7_code])
    if form < (2, 5):
        msa.append(text(error.reason))
        # When MSH-2 declared no sub-component separator, only the code fits in ERR-1.4.
        coded = subcomponent.join((hl7_code, code_text, "HL70357")) if subcomponent else hl7_code
        err = ["ERR", component.join((segment, sequence, field, coded))]
    else:
        erl = [segment, sequence, field] if field else [segment, sequence]
        if comp:
            erl += ["1", comp]  # ERL-4 field repetition, ERL-5 component
        err = [
            "ERR",
            "",
            component.join(erl) if segment else "",
            component.join((hl7_code, code_text, "HL70357")),
            severity,
            "",
            "",
            "",
            text(error.reason),
        ]
    segments.append(sep.join(msa))
    segments.append(sep.join(err))
    return "\r".join(segments) + "\r"
