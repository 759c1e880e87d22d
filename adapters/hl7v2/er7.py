"""A fast, strict reader for HL7 v2 messages in ER7 (pipe-and-hat) encoding.

This is the hot-path reader: it splits a message into segments eagerly and a segment into fields
only when a field is first asked for, and it unescapes a value only when the value contains the
message's escape character. It knows nothing about message structures (groups, datatypes,
optionality); for that, and for diagnostics on rejected messages, use hl7apy.

Exceptions:

    Hl7ReadError        the only exception read_message / split_messages raise; carries the ACK
                        code: "AR" when the header (MSH) cannot be read, "AE" otherwise

Delimiters come from MSH-1 and MSH-2 (custom delimiters work; MSH-2 may hold 3 characters, no
sub-component separator, or 5, the v2.7 truncation character). Segments may be separated by CR,
LF or CRLF. MLLP framing is not handled here (see the MLLP layer).
"""

from __future__ import annotations

import dataclasses
import string
from dataclasses import dataclass

from adapters.errors import AdapterError

__all__ = [
    "Delimiters",
    "Hl7ReadError",
    "Message",
    "Segment",
    "decode",
    "read_message",
    "split_messages",
]

_BOM_BYTES = b"\xef\xbb\xbf"
_BOM = "\ufeff"
_VT = "\x0b"  # MLLP start block
_FS = "\x1c"  # MLLP end block
_LINE_EDGE_JUNK = _BOM + _VT + _FS
_SEGMENT_NAME_CHARS = frozenset(string.ascii_uppercase + string.digits)
_HEX_DIGITS = frozenset(string.hexdigits)
_ENVELOPE = frozenset({"FHS", "BHS", "BTS", "FTS"})
# Formatted-text commands other than \.br\ (which becomes a newline): dropped, with their
# optional signed count (\.sp2\, \.in+4\).
_FORMATTING = frozenset({"sp", "fi", "nf", "in", "ti", "sk", "ce"})
# Segment names already checked, so that each line costs one set look-up. Bounded: 36**3 names.
_VALID_NAMES: set[str] = set()


class Hl7ReadError(AdapterError):
    """A message that cannot be read.

    Attributes: ``reason`` (plain English), ``segment`` (e.g. ``"MSH"``, or None), ``sequence``
    (1-based position of the segment in the message, or None), ``field`` (or None) and
    ``ack_code``: ``"AR"`` when the header (MSH) cannot be read, else ``"AE"``.
    """

    def __init__(
        self,
        reason: str,
        segment: str | None = None,
        sequence: int | None = None,
        field: int | None = None,
        ack_code: str = "AE",
    ) -> None:
        # Data type error for a broken field or segment; a missing or misplaced MSH is a
        # segment sequence error.
        code = "100" if segment == "MSH" and field is None else "102"
        super().__init__(reason, _location(segment, field), hl7_code=code)
        self.segment = segment
        self.sequence = sequence
        self.field = field
        self.ack_code = ack_code

    def __reduce__(self) -> tuple[type[Hl7ReadError], tuple[object, ...]]:
        return (
            type(self),
            (self.reason, self.segment, self.sequence, self.field, self.ack_code),
        )

    def __str__(self) -> str:
        where = []
        if self.segment is not None:
            where.append(f"segment {self.segment}")
        if self.sequence is not None:
            where.append(f"position {self.sequence}")
        if self.field is not None:
            where.append(f"field {self.field}")
        suffix = f" ({', '.join(where)})" if where else ""
        return f"{self.reason}{suffix} [{self.ack_code}]"


def _location(segment: str | None, field: int | None) -> str:
    """Where a rejection points, in HL7 notation: "MSH-9", "PID", or "" when nowhere."""
    if segment is None:
        return ""
    return f"{segment}-{field}" if field is not None else segment


@dataclass(frozen=True)
class Delimiters:
    """The message's delimiters, from MSH-1 (field) and MSH-2 (the encoding characters).

    ``subcomponent`` is "" when MSH-2 declares only 3 characters; ``truncation`` is the v2.7
    truncation character, "" when absent.
    """

    field: str
    component: str
    repetition: str
    escape: str
    subcomponent: str
    truncation: str = ""
    _simple: dict[str, str] = dataclasses.field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        simple = {
            "F": self.field,
            "S": self.component,
            "R": self.repetition,
            "E": self.escape,
            "H": "",
            "N": "",
            "X": "",
            ".br": "\n",
        }
        if self.subcomponent:
            simple["T"] = self.subcomponent
        if self.truncation:
            simple["P"] = self.truncation
        object.__setattr__(self, "_simple", simple)


def _translate(seq: str, d: Delimiters) -> str | None:
    """The text for one escape sequence (without its escape characters), or None if unknown."""
    simple = d._simple.get(seq)
    if simple is not None:
        return simple
    if not seq:
        return None
    head = seq[0]
    if head == "X":
        hexdigits = seq[1:]
        if len(hexdigits) % 2 or not all(c in _HEX_DIGITS for c in hexdigits):
            return None
        raw = bytes.fromhex(hexdigits)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("latin-1")
    if head == ".":
        rest = seq[3:]
        count = rest[1:] if rest[:1] in ("+", "-") else rest
        if seq[1:3] in _FORMATTING and (not rest or (count.isascii() and count.isdigit())):
            return ""
        return None
    if head == "C" or head == "M":
        digits = seq[1:]
        if len(digits) in ((4,) if head == "C" else (4, 6)) and all(
            c in _HEX_DIGITS for c in digits
        ):
            return ""
        return None
    if head == "Z":
        # Locally defined escape sequence: no meaning to this reader.
        return ""
    return None


def _unescape(text: str, d: Delimiters) -> str:
    """Resolve the escape sequences in ``text``; unknown or unterminated ones stay literal.

    After an unknown sequence only its opening escape character is taken as text: the closing
    one may open the next sequence, so a stray escape character never swallows known ones.
    """
    esc = d.escape
    parts = text.split(esc)
    last = len(parts) - 1
    out = [parts[0]]
    i = 1
    while i < last:
        replacement = _translate(parts[i], d)
        if replacement is None:
            out.append(esc)
            out.append(parts[i])
            i += 1
        else:
            out.append(replacement)
            out.append(parts[i + 1])
            i += 2
    if i == last:  # an escape character with no closing one
        out.append(esc)
        out.append(parts[last])
    return "".join(out)


class Segment:
    """One segment. Fields are split on first use and cached.

    Field numbers are HL7's: for MSH, ``get(1)`` is the field separator, ``get(2)`` the encoding
    characters and ``get(3)`` MSH-3. Repetitions count from 0, components and sub-components
    from 1. Absent parts read as "".
    """

    __slots__ = ("_delimiters", "_fields", "_line", "name")

    name: str

    def __init__(self, line: str, delimiters: Delimiters) -> None:
        self.name = line[:3]
        self._line = line
        self._delimiters = delimiters
        self._fields: list[str] | None = None

    def __repr__(self) -> str:
        return f"<Segment {self.name}>"

    @property
    def text(self) -> str:
        """The segment as sent (one line, no terminator)."""
        return self._line

    def _split(self) -> list[str]:
        fields = self._line.split(self._delimiters.field)
        if self.name == "MSH":
            # MSH-1 is the separator itself; after it, split()'s index n is MSH-(n+1).
            fields.insert(1, self._delimiters.field)
        self._fields = fields
        return fields

    def raw_field(self, field: int) -> str:
        """The field as sent, still escaped, repetitions and components included ("" if absent)."""
        fields = self._fields if self._fields is not None else self._split()
        if 0 < field < len(fields):
            return fields[field]
        return ""

    def repetitions(self, field: int) -> int:
        """How many repetitions the field holds (0 when it is empty or absent)."""
        value = self.raw_field(field)
        if not value:
            return 0
        if self.name == "MSH" and field <= 2:
            return 1
        return value.count(self._delimiters.repetition) + 1

    def get(
        self, field: int, component: int = 1, subcomponent: int = 1, repetition: int = 0
    ) -> str:
        """The unescaped text at field / component / sub-component of one repetition ("" if absent).

        A component that holds sub-components reads as its first sub-component by default; ask
        for ``raw_field`` when you need the whole structure.
        """
        fields = self._fields if self._fields is not None else self._split()
        if field < 1 or field >= len(fields) or component < 1 or subcomponent < 1 or repetition < 0:
            return ""
        value = fields[field]
        if not value:
            return ""
        d = self._delimiters
        if field <= 2 and self.name == "MSH":
            return value if component == 1 and subcomponent == 1 and repetition == 0 else ""
        if d.repetition in value:
            parts = value.split(d.repetition)
            if repetition >= len(parts):
                return ""
            value = parts[repetition]
        elif repetition:
            return ""
        if d.component in value:
            parts = value.split(d.component)
            if component > len(parts):
                return ""
            value = parts[component - 1]
        elif component != 1:
            return ""
        sub = d.subcomponent
        if sub and sub in value:
            parts = value.split(sub)
            if subcomponent > len(parts):
                return ""
            value = parts[subcomponent - 1]
        elif subcomponent != 1:
            return ""
        if d.escape in value:
            return _unescape(value, d)
        return value


class Message:
    """One HL7 v2 message: its delimiters, its segments in order (Z-segments included), its text.

    Build it with ``read_message``.
    """

    __slots__ = ("delimiters", "segments", "text")

    delimiters: Delimiters
    segments: tuple[Segment, ...]
    text: str

    def __init__(self, delimiters: Delimiters, segments: tuple[Segment, ...], text: str) -> None:
        self.delimiters = delimiters
        self.segments = segments
        self.text = text

    def __repr__(self) -> str:
        return f"<Message {self.message_type}^{self.trigger} {len(self.segments)} segments>"

    def segment(self, name: str) -> Segment | None:
        """The first segment with that name, or None."""
        for seg in self.segments:
            if seg.name == name:
                return seg
        return None

    def all(self, name: str) -> list[Segment]:
        """Every segment with that name, in order."""
        return [seg for seg in self.segments if seg.name == name]

    @property
    def _msh(self) -> Segment:
        return self.segments[0]

    @property
    def message_type(self) -> str:
        """MSH-9.1, e.g. "ORU"."""
        return self._msh.get(9, 1)

    @property
    def trigger(self) -> str:
        """MSH-9.2, e.g. "R01" ("" when absent)."""
        return self._msh.get(9, 2)

    @property
    def structure(self) -> str:
        """MSH-9.3, e.g. "ORU_R01" ("" when absent, as before v2.3.1)."""
        return self._msh.get(9, 3)

    @property
    def control_id(self) -> str:
        """MSH-10, the message control id."""
        return self._msh.get(10)

    @property
    def version(self) -> str:
        """MSH-12.1, e.g. "2.5.1"."""
        return self._msh.get(12, 1)

    @property
    def sending_application(self) -> str:
        """MSH-3.1."""
        return self._msh.get(3, 1)

    @property
    def sending_facility(self) -> str:
        """MSH-4.1."""
        return self._msh.get(4, 1)


def decode(data: bytes) -> str:
    """Bytes to text: a UTF-8 BOM is dropped; UTF-8, else latin-1. Never raises.

    MSH-18 (character set) is not consulted: latin-1 is the fallback because it maps every byte.
    """
    raw = bytes(data)
    if raw.startswith(_BOM_BYTES):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _as_text(data: str | bytes) -> str:
    if isinstance(data, str):
        text = data
    elif isinstance(data, bytes | bytearray | memoryview):
        text = decode(bytes(data))
    else:
        raise Hl7ReadError(f"expected text or bytes, got {type(data).__name__}", ack_code="AR")
    if text.startswith(_BOM):
        text = text[1:]
    return text


def _lines(text: str) -> list[str]:
    """The non-blank lines of ``text``, for any mix of CR, LF and CRLF."""
    if "\n" in text:
        text = text.replace("\r\n", "\r").replace("\n", "\r")
    return [line for line in text.split("\r") if line and not line.isspace()]


def _is_punctuation(char: str) -> bool:
    return char.isprintable() and not char.isalnum() and not char.isspace()


def _delimiters(msh: str) -> Delimiters:
    """The delimiters declared in MSH-1 and MSH-2 (raises Hl7ReadError, AR)."""
    if len(msh) < 8:
        raise Hl7ReadError(
            "the MSH segment is too short to hold the field separator and encoding characters",
            segment="MSH",
            sequence=1,
            field=2,
            ack_code="AR",
        )
    field_sep = msh[3]
    end = msh.find(field_sep, 4)
    encoding = msh[4:] if end < 0 else msh[4:end]
    if not 3 <= len(encoding) <= 5:
        raise Hl7ReadError(
            f"MSH-2 must hold 3 to 5 encoding characters, found {len(encoding)}",
            segment="MSH",
            sequence=1,
            field=2,
            ack_code="AR",
        )
    chars = field_sep + encoding
    if len(set(chars)) != len(chars):
        raise Hl7ReadError(
            "the delimiters in MSH-1 and MSH-2 are not distinct",
            segment="MSH",
            sequence=1,
            field=2,
            ack_code="AR",
        )
    if not all(_is_punctuation(c) for c in chars):
        raise Hl7ReadError(
            "the delimiters in MSH-1 and MSH-2 must be punctuation characters",
            segment="MSH",
            sequence=1,
            field=2,
            ack_code="AR",
        )
    return Delimiters(
        field=field_sep,
        component=encoding[0],
        repetition=encoding[1],
        escape=encoding[2],
        subcomponent=encoding[3] if len(encoding) > 3 else "",
        truncation=encoding[4] if len(encoding) > 4 else "",
    )


def _check_name(line: str, field_sep: str, sequence: int) -> None:
    """Raise Hl7ReadError (AE) unless the line starts with a segment name and a field separator."""
    name = line[:3]
    if name in _VALID_NAMES and (len(line) == 3 or line[3] == field_sep):
        return
    if len(name) == 3 and all(c in _SEGMENT_NAME_CHARS for c in name):
        if len(line) == 3 or line[3] == field_sep:
            _VALID_NAMES.add(name)
            return
        raise Hl7ReadError(
            f"segment {sequence} name {name!r} is followed by {line[3]!r}, "
            f"not the field separator {field_sep!r}",
            sequence=sequence,
        )
    raise Hl7ReadError(
        f"segment {sequence} does not start with a segment name "
        f"(3 upper-case letters or digits): found {name!r}",
        sequence=sequence,
    )


def _read(data: str | bytes) -> Message:
    text = _as_text(data)
    lines = _lines(text.lstrip())
    if not lines:
        raise Hl7ReadError("the message is empty", ack_code="AR")
    msh = lines[0]
    if not msh.startswith("MSH"):
        raise Hl7ReadError(
            "the message does not start with an MSH segment", sequence=1, ack_code="AR"
        )
    delimiters = _delimiters(msh)
    field_sep = delimiters.field
    segments = [Segment(msh, delimiters)]
    for sequence, line in enumerate(lines[1:], start=2):
        _check_name(line, field_sep, sequence)
        if line.startswith("MSH"):
            raise Hl7ReadError(
                "a second MSH segment: one message expected (split files with split_messages)",
                segment="MSH",
                sequence=sequence,
            )
        segments.append(Segment(line, delimiters))
    header = segments[0]
    message_type = header.get(9, 1)
    if not message_type:
        raise Hl7ReadError(
            "MSH-9 (message type) is missing", segment="MSH", sequence=1, field=9, ack_code="AR"
        )
    if len(message_type) != 3 or not all(c in _SEGMENT_NAME_CHARS for c in message_type):
        # Also catches an MSH-2 that declares the wrong characters (MSH-9 then fails to split).
        raise Hl7ReadError(
            f"MSH-9.1 (message type) {message_type[:12]!r} is not a 3-character code",
            segment="MSH",
            sequence=1,
            field=9,
            ack_code="AR",
        )
    if not header.raw_field(10):
        raise Hl7ReadError(
            "MSH-10 (message control id) is missing",
            segment="MSH",
            sequence=1,
            field=10,
            ack_code="AR",
        )
    return Message(delimiters, tuple(segments), "\r".join(lines))


def read_message(data: str | bytes) -> Message:
    """Read exactly one ER7 message (str, or bytes decoded with ``decode``).

    Raises Hl7ReadError and nothing else: AR when the header cannot be read (no MSH first, bad
    delimiters, no MSH-9 or MSH-10), AE for a malformed segment. Use ``split_messages`` for a file
    or stream holding several messages or batch envelopes.
    """
    try:
        return _read(data)
    except Hl7ReadError:
        raise
    except Exception as exc:  # a bug here must not take the listener down with it
        raise Hl7ReadError(f"internal reader error ({type(exc).__name__})", ack_code="AR") from exc


def _is_envelope(line: str) -> bool:
    return line[:3] in _ENVELOPE and (len(line) == 3 or not line[3].isalnum())


def _split(data: str | bytes) -> list[str | Hl7ReadError]:
    text = _as_text(data)
    lines = _lines(text)
    if _BOM in text or _VT in text or _FS in text:
        # files concatenated with their BOMs, or captured with MLLP framing left in
        lines = [line.strip(_LINE_EDGE_JUNK) for line in lines]
        lines = [line for line in lines if line and not line.isspace()]
    items: list[str | Hl7ReadError] = []
    current: list[str] = []
    stray: list[str] = []

    def flush() -> None:
        if current:
            items.append("\r".join(current))
            current.clear()
        if stray:
            where = "before the first MSH segment" if not items else "outside any message"
            items.append(
                Hl7ReadError(
                    f"{len(stray)} line(s) {where} are not part of a message", ack_code="AR"
                )
            )
            stray.clear()

    for line in lines:
        if line.startswith("MSH"):
            flush()
            current.append(line)
        elif _is_envelope(line):
            flush()
        elif current:
            current.append(line)
        else:
            stray.append(line)
    flush()
    return items


def split_messages(data: str | bytes) -> list[str | Hl7ReadError]:
    """Cut a file or stream into messages, in order.

    Any line ending (CR, LF, CRLF, mixed) is accepted and blank lines are ignored; a UTF-8 BOM,
    and BOMs or MLLP framing characters (VT, FS) at the edges of lines (files concatenated with
    ``cat``, captured streams), are dropped; FHS/BHS/BTS/FTS batch envelope segments are dropped
    (they are not messages). Each item is one message's text (segments joined by CR), to pass to
    ``read_message``, or an Hl7ReadError (AR) standing for lines that belong to no message
    (garbage before the first MSH). Never raises anything but Hl7ReadError.
    """
    try:
        return _split(data)
    except Hl7ReadError:
        raise
    except Exception as exc:  # a bug here must not take the file reader down with it
        raise Hl7ReadError(f"internal reader error ({type(exc).__name__})", ack_code="AR") from exc
