"""HL7 v2 -> canonical events. Routing by MSH-9 sits here, above the ER7 reader.

Supported: ADT A01 A02 A03 A04 A06 A08 A11 A13 A40 (and A28/A31 when they carry a safeguarding
observation); ORM^O01 and OMI^O23 (ORC-1 NW, CA, CR, OC, OD, DC, DR, XO, SC); ORU^R01 (OBR-25
P, F, C, X; OBX-11 U, W, D); MDM T02 T08 T10 T11 when TXA-2 says the document is a radiology
report or a clinical note. Anything else raises `UnsupportedMessage`; content that cannot be
understood raises `MappingError` (ACK AE) naming the segment and field. Field choices follow
shared/reference/clinical-rules.md section 3; the site's codes come from settings.toml `[hl7]`.

Beyond visits, orders and reports, a message may say three more things:
  * a safeguarding flag: an OBX whose OBX-3.1 is a safeguarding code, in an ADT or an ORU
    (OBX-11 D or W clears it; anything else raises it);
  * a clinical note: an MDM note document (TXA-2), an order's clinical details (OBR-13), or a
    text OBX whose OBX-3.1 is a note code in an ORU;
  * a report's alert category and coded key findings: OBXs whose OBX-3.1 is an alert or a
    finding code.
Note text goes into `ClinicalNote.text` and nowhere else: never into an error or a log.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone, tzinfo
from typing import TYPE_CHECKING, Any

from adapters.errors import MappingError, UnsupportedMessage
from adapters.hl7v2.er7 import Delimiters, Message, Segment
from engine.errors import ConfigurationError
from engine.events import (
    ALERTS,
    AdmissionCancelled,
    ClinicalNote,
    Clinician,
    DischargeCancelled,
    Event,
    ImagingOrdered,
    OrderCancelled,
    OrderChanged,
    OrderRef,
    Patient,
    PatientAdmitted,
    PatientDischarged,
    PatientIdentifier,
    PatientRegistered,
    PatientsMerged,
    PatientTransferred,
    PatientUpdated,
    ReportIssued,
    SafeguardingFlagCleared,
    SafeguardingFlagRaised,
    SourceRef,
    Visit,
)
from engine.identity import is_valid_nhs_number

if TYPE_CHECKING:
    from engine.catalogue import Site

CANCEL_CONTROLS = frozenset({"CA", "CR", "OC", "OD", "DC", "DR"})
CHANGE_CONTROLS = frozenset({"XO", "SC"})
REPORT_STATUS = {"P": "preliminary", "F": "final", "C": "corrected"}
WITHDRAWN_OBX = frozenset({"W", "D"})
# TXA-17 document completion status (table 0271).
MDM_FINAL = frozenset({"AU", "LA"})
MDM_PRELIMINARY = frozenset({"PA"})
# OBX-2 value types (table 0125) read as text (notes) or as codes (key findings).
TEXT_TYPES = frozenset({"TX", "FT", "ST"})
CODED_TYPES = frozenset({"CE", "CWE", "CNE"})
# OBX-11 of a safeguarding observation that withdraws the flag: deleted, or posted in error.
CLEARING_OBX = frozenset({"D", "W"})
# Person-level ADT events: no visit event of their own; mapped only for safeguarding flags.
PERSON_TRIGGERS = frozenset({"A28", "A31"})
REQUEST_DETAILS = "request details"  # ClinicalNote.source_kind of an order's OBR-13

# Defaults of settings.toml [hl7] (the file documents each key).
DEFAULT_ALERT_CODES = frozenset({"ALERT", "RCRALERT"})
DEFAULT_ALERT_VALUES: Mapping[str, str] = {
    "critical": "critical",
    "urgent": "urgent",
    "significant unexpected": "significant",
    "significant": "significant",
    "cancer": "significant",
}
DEFAULT_FINDING_CODES = frozenset({"FINDING", "IMPRESSION-CODE"})
DEFAULT_SAFEGUARDING_CODES = frozenset({"SAFEGUARDING", "CPIS"})
DEFAULT_NOTE_DOCUMENT_TYPES = frozenset({"TRIAGE", "CLERK", "ED", "HV", "MW", "NOTE"})
DEFAULT_NOTE_OBSERVATION_CODES = frozenset({"CLINICAL-NOTE", "TRIAGE"})
DEFAULT_NOTE_SOURCES: Mapping[str, str] = {
    "TRIAGE": "triage note",
    "CLERK": "emergency department clerking",
    "ED": "emergency department note",
    "HV": "health visitor's note",
    "MW": "midwife's note",
    "NOTE": "clinical note",
    "CLINICAL-NOTE": "clinical note",
}
DEFAULT_NOTE_SOURCE = "clinical note"  # a note code with no [hl7.note_sources] label
HL7_KEYS = frozenset(
    {
        "alert_observation_codes",
        "alert_values",
        "finding_observation_codes",
        "safeguarding_observation_codes",
        "note_document_types",
        "note_observation_codes",
        "note_sources",
    }
)

_TS = re.compile(
    r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,4}))?(?:([+-])(\d{2})(\d{2}))?$"
)


@dataclass(frozen=True, slots=True)
class MappingSettings:
    """What mapping needs from the site: the local time zone, the MDM document types that are
    radiology reports, and the codes of settings.toml `[hl7]`. Codes are compared upper-case;
    alert values lower-case. Build it from the site with `for_site`."""

    timezone: tzinfo
    mdm_document_types: frozenset[str]
    alert_observation_codes: frozenset[str] = DEFAULT_ALERT_CODES
    alert_values: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_ALERT_VALUES)
    )
    finding_observation_codes: frozenset[str] = DEFAULT_FINDING_CODES
    safeguarding_observation_codes: frozenset[str] = DEFAULT_SAFEGUARDING_CODES
    note_document_types: frozenset[str] = DEFAULT_NOTE_DOCUMENT_TYPES
    note_observation_codes: frozenset[str] = DEFAULT_NOTE_OBSERVATION_CODES
    note_sources: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_NOTE_SOURCES)
    )

    @classmethod
    def for_site(cls, site: Site) -> MappingSettings:
        """The settings of a loaded site (see `from_settings`)."""
        return cls.from_settings(site.timezone, site.mdm_document_types, site.hl7)

    @classmethod
    def from_settings(
        cls, tz: tzinfo, mdm_document_types: Iterable[str], hl7: Mapping[str, Any]
    ) -> MappingSettings:
        """Settings from the site's time zone, `[imaging] mdm_document_types` and the `[hl7]`
        table of settings.toml (each key optional; a table given replaces its default).
        Raises ConfigurationError for an unknown key or a value of the wrong shape."""
        unknown = sorted(set(hl7) - HL7_KEYS)
        if unknown:
            raise ConfigurationError(
                f"settings.toml [hl7]: unknown key(s) {', '.join(unknown)} "
                f"(known: {', '.join(sorted(HL7_KEYS))})"
            )
        alert_values = {
            word.strip().lower(): category
            for word, category in _table(hl7, "alert_values", DEFAULT_ALERT_VALUES).items()
        }
        wrong = sorted(c for c in alert_values.values() if c not in ALERTS[1:])
        if wrong:
            raise ConfigurationError(
                f"settings.toml [hl7.alert_values]: an alert category must be one of "
                f"{', '.join(ALERTS[1:])}, not {', '.join(map(repr, wrong))}"
            )
        note_sources = {
            code.strip().upper(): label
            for code, label in _table(hl7, "note_sources", DEFAULT_NOTE_SOURCES).items()
        }
        return cls(
            timezone=tz,
            mdm_document_types=frozenset(t.strip().upper() for t in mdm_document_types),
            alert_observation_codes=_codes(hl7, "alert_observation_codes", DEFAULT_ALERT_CODES),
            alert_values=alert_values,
            finding_observation_codes=_codes(
                hl7, "finding_observation_codes", DEFAULT_FINDING_CODES
            ),
            safeguarding_observation_codes=_codes(
                hl7, "safeguarding_observation_codes", DEFAULT_SAFEGUARDING_CODES
            ),
            note_document_types=_codes(hl7, "note_document_types", DEFAULT_NOTE_DOCUMENT_TYPES),
            note_observation_codes=_codes(
                hl7, "note_observation_codes", DEFAULT_NOTE_OBSERVATION_CODES
            ),
            note_sources=note_sources,
        )

    def note_source(self, code: str) -> str:
        """The plain-English kind of note for a TXA-2 document type or an OBX-3.1 code."""
        return self.note_sources.get(code.upper(), DEFAULT_NOTE_SOURCE)


def _codes(hl7: Mapping[str, Any], key: str, default: frozenset[str]) -> frozenset[str]:
    value = hl7.get(key)
    if value is None:
        return default
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigurationError(f"settings.toml [hl7] {key} must be a list of codes (strings)")
    return frozenset(v.strip().upper() for v in value)


def _table(hl7: Mapping[str, Any], key: str, default: Mapping[str, str]) -> Mapping[str, str]:
    value = hl7.get(key)
    if value is None:
        return default
    if not isinstance(value, Mapping) or not all(
        isinstance(v, str) and v.strip() for v in value.values()
    ):
        raise ConfigurationError(f"settings.toml [hl7.{key}] must map each key to a word")
    return {str(k): v.strip() for k, v in value.items()}


def parse_ts(value: str, tz: tzinfo, where: str) -> datetime:
    """An HL7 TS/DTM value as an aware datetime; no offset means the site's local time."""
    match = _TS.match(value.strip())
    if not match:
        raise MappingError(f"{where} is not an HL7 date/time: {value[:40]!r}", where)
    year, month, day, hour, minute, second, frac, sign, off_h, off_m = match.groups()
    try:
        naive = datetime(
            int(year),
            int(month or 1),
            int(day or 1),
            int(hour or 0),
            int(minute or 0),
            int(second or 0),
            int((frac or "0").ljust(6, "0")[:6]),
        )
    except ValueError as exc:
        raise MappingError(f"{where} is not a valid date/time: {value[:40]!r}", where) from exc
    if sign:
        offset = timedelta(hours=int(off_h), minutes=int(off_m))
        return naive.replace(tzinfo=timezone(offset if sign == "+" else -offset))
    # fold=0: an ambiguous local time (the autumn change) is read as the first occurrence.
    return naive.replace(tzinfo=tz)


def _first_time(tz: tzinfo, *candidates: tuple[Segment | None, int, str]) -> datetime | None:
    for segment, field, where in candidates:
        if segment is not None:
            value = segment.get(field)
            if value:
                return parse_ts(value, tz, where)
    return None


def _clinician(segment: Segment | None, field: int, repetition: int = 0) -> Clinician | None:
    """An XCN: id (1), family (2), given (3), prefix (6), assigning authority (9)."""
    if segment is None:
        return None
    ident = segment.get(field, 1, repetition=repetition)
    family = segment.get(field, 2, repetition=repetition)
    if not ident and not family:
        return None
    given = segment.get(field, 3, repetition=repetition)
    prefix = segment.get(field, 6, repetition=repetition)
    name = " ".join(part for part in (prefix, given, family) if part)
    return Clinician(ident, name, segment.get(field, 9, repetition=repetition))


def _identifiers(segment: Segment, field: int) -> Iterator[PatientIdentifier]:
    for rep in range(segment.repetitions(field)):
        value = segment.get(field, 1, repetition=rep).strip()
        if not value:
            continue
        authority = segment.get(field, 4, repetition=rep)
        type_code = segment.get(field, 5, repetition=rep)
        claims_nhs = authority.upper() == "NHS" or type_code.upper() == "NH"
        compact = value.replace(" ", "")
        if claims_nhs and is_valid_nhs_number(compact):
            yield PatientIdentifier(compact, "NHS", type_code or "NH", is_nhs_number=True)
        else:
            # An NHS number failing modulus 11 is kept as a local identifier, never trusted.
            system = authority if not claims_nhs else "NHS-unverified"
            yield PatientIdentifier(value, system, type_code)


def _patient(pid: Segment | None, tz: tzinfo) -> Patient | None:
    if pid is None:
        return None
    idents = tuple(_identifiers(pid, 3)) or tuple(_identifiers(pid, 2))
    birth_text = pid.get(7)
    birth = parse_ts(birth_text, tz, "PID-7") if birth_text else None
    return Patient(identifiers=idents, birth=birth, sex=pid.get(8))


def _visit(pv1: Segment | None) -> Visit:
    if pv1 is None:
        return Visit()
    return Visit(
        patient_class=pv1.get(2),
        location=pv1.get(3),
        attending=_clinician(pv1, 7),
        disposition=pv1.get(36),
        discharged_to=pv1.get(37),
    )


def _about(
    message: Message, tz: tzinfo, source: SourceRef, received_at: datetime
) -> dict[str, Any]:
    """The fields every order or report event of a message shares: its source, when it was
    received, the patient (PID, optional in results) and the visit number (PV1-19)."""
    pv1 = message.segment("PV1")
    return {
        "source": source,
        "received_at": received_at,
        "patient": _patient(message.segment("PID"), tz),
        "encounter": pv1.get(19) if pv1 is not None else "",
    }


def _procedure(orc: Segment | None, obr: Segment | None) -> dict[str, Any]:
    """What was ordered (OBR-4 code and text, OBR-24 section) and by whom (ORC-12, OBR-16)."""
    return {
        "procedure_code": obr.get(4) if obr is not None else "",
        "procedure_name": obr.get(4, 2) if obr is not None else "",
        "section": obr.get(24) if obr is not None else "",
        "orderer": _clinician(orc, 12) or _clinician(obr, 16),
    }


def _flags(obxs: Sequence[Segment]) -> tuple[str, ...]:
    """Every OBX-8 abnormal flag, repetitions included."""
    return tuple(
        flag
        for obx in obxs
        for rep in range(max(obx.repetitions(8), 1))
        if (flag := obx.get(8, repetition=rep))
    )


def _code(obx: Segment) -> str:
    """OBX-3.1, the observation identifier, upper-case (site codes are compared so)."""
    return obx.get(3).strip().upper()


def _text_lines(segment: Segment, field: int, d: Delimiters) -> list[str]:
    """Each repetition of a free-text field, whole. TX/FT/ST have no components, so a "^" or
    "&" a sender left unescaped ("A&E") is part of the text: it is put back, not cut at."""
    raw = segment.raw_field(field)
    if not raw:
        return []
    lines = []
    for rep, repetition in enumerate(raw.split(d.repetition)):
        components = []
        for comp, component in enumerate(repetition.split(d.component), start=1):
            count = component.count(d.subcomponent) + 1 if d.subcomponent else 1
            components.append(
                d.subcomponent.join(
                    segment.get(field, comp, sub, repetition=rep) for sub in range(1, count + 1)
                )
            )
        lines.append(d.component.join(components))
    return lines


def _note_text(obxs: Iterable[Segment], d: Delimiters) -> str:
    """The text of the TX/FT/ST observations, line by line, in message order."""
    return "\n".join(
        line
        for obx in obxs
        if obx.get(2).upper() in TEXT_TYPES
        for line in _text_lines(obx, 5, d)
        if line.strip()
    )


def _message_time(msh: Segment, tz: tzinfo) -> datetime:
    """MSH-7, the last resort for an event time; a message without one cannot be placed."""
    at = _first_time(tz, (msh, 7, "MSH-7"))
    if at is None:
        raise MappingError("the message has no event or message time", "MSH-7")
    return at


def _order_ref(orc: Segment | None, obr: Segment | None) -> OrderRef:
    """Placer and filler numbers: ORC-2/3, else OBR-2/3 (EI: id ^ namespace)."""

    def pick(field_orc: int, field_obr: int) -> tuple[str, str]:
        for segment, field in ((orc, field_orc), (obr, field_obr)):
            if segment is not None and segment.get(field):
                return segment.get(field), segment.get(field, 2)
        return "", ""

    placer, placer_ns = pick(2, 2)
    filler, filler_ns = pick(3, 3)
    return OrderRef(placer, placer_ns, filler, filler_ns)


def _order_groups(
    message: Message,
) -> list[tuple[Segment | None, Segment | None, list[Segment]]]:
    """(ORC, OBR, OBXs) per order, in message order. An ORC opens an order; an OBR joins the
    ORC just before it, or else opens an order of its own under the last ORC seen (an ORU's
    ORC is optional and may cover several OBRs). OBXs belong to the OBR before them."""
    groups: list[tuple[Segment | None, Segment | None, list[Segment]]] = []
    last_orc: Segment | None = None
    for segment in message.segments:
        if segment.name == "ORC":
            last_orc = segment
            groups.append((segment, None, []))
        elif segment.name == "OBR":
            if groups and groups[-1][1] is None and groups[-1][0] is last_orc:
                groups[-1] = (last_orc, segment, [])
            else:
                groups.append((last_orc, segment, []))
        elif segment.name == "OBX" and groups and groups[-1][1] is not None:
            groups[-1][2].append(segment)
    return groups


@dataclass(frozen=True, slots=True)
class _Observations:
    """One order group's OBXs, sorted by what they are (see `Mapper._sort_observations`)."""

    report: list[Segment]
    notes: dict[str, list[Segment]]
    flags: list[Segment]


def _has_identifiers(about: Mapping[str, Any]) -> bool:
    patient = about["patient"]
    return patient is not None and bool(patient.identifiers)


class Mapper:
    """Turns one read HL7 v2 message into canonical events."""

    def __init__(self, settings: MappingSettings) -> None:
        self.settings = settings

    def events(self, message: Message, received_at: datetime) -> list[Event]:
        """The message's events (possibly none: e.g. a result still in progress).

        Raises UnsupportedMessage for message types safetynet does not handle and
        MappingError for content it cannot understand."""
        msh = message.segment("MSH")
        assert msh is not None  # the reader guarantees MSH first
        kind = f"{message.message_type}^{message.trigger}"
        source = SourceRef(
            sender=f"{message.sending_application}^{message.sending_facility}",
            message_id=message.control_id,
            kind=kind,
        )
        handler = {
            "ADT": self._adt,
            "ORM": self._order,
            "OMI": self._order,
            "ORU": self._result,
            "MDM": self._document,
        }.get(message.message_type)
        if handler is None:
            raise UnsupportedMessage(f"message type {kind} is not supported", "MSH-9")
        return handler(message, msh, source, received_at)

    # --- what any message may say: safeguarding flags --------------------------------------

    def _safeguarding(
        self, obxs: Iterable[Segment], about: Mapping[str, Any], fallback: datetime
    ) -> list[Event]:
        """One flag event per safeguarding OBX: cleared when OBX-11 is D (deleted) or W
        (posted in error), raised otherwise. The flag is named by OBX-3.1 and the OBX-4
        sub-id, so that a later message can clear it; OBX-5 (its code) is the category."""
        tz = self.settings.timezone
        events: list[Event] = []
        for obx in obxs:
            if _code(obx) not in self.settings.safeguarding_observation_codes:
                continue
            code, sub_id = obx.get(3).strip(), obx.get(4).strip()
            common = {
                **about,
                "occurred_at": _first_time(tz, (obx, 14, "OBX-14")) or fallback,
                "flag": f"{code}-{sub_id}" if sub_id else code,
            }
            if obx.get(11).strip().upper() in CLEARING_OBX:
                events.append(SafeguardingFlagCleared(**common))
            else:
                events.append(SafeguardingFlagRaised(**common, category=obx.get(5).strip()))
        return events

    # --- ADT -----------------------------------------------------------------------------

    def _adt(
        self, message: Message, msh: Segment, source: SourceRef, received_at: datetime
    ) -> list[Event]:
        tz = self.settings.timezone
        trigger = message.trigger
        evn, pv1 = message.segment("EVN"), message.segment("PV1")
        occurred = _first_time(
            tz,
            (evn, 6, "EVN-6"),
            *([(pv1, 45, "PV1-45")] if trigger == "A03" else []),
            (evn, 2, "EVN-2"),
        ) or _message_time(msh, tz)
        if trigger == "A40":
            return self._merges(message, source, occurred, received_at)
        patient = _patient(message.segment("PID"), tz)
        if patient is None or not patient.identifiers:
            raise MappingError("ADT message without a patient identifier", "PID-3")
        about: dict[str, Any] = dict(
            source=source,
            received_at=received_at,
            patient=patient,
            encounter=pv1.get(19) if pv1 is not None else "",
        )
        visit_event = self._visit_event(trigger, {**about, "occurred_at": occurred}, pv1)
        flags = self._safeguarding(message.all("OBX"), about, occurred)
        if visit_event is None:
            if trigger in PERSON_TRIGGERS and flags:
                return flags
            raise UnsupportedMessage(
                f"ADT event {trigger or '(none)'} is not supported", "MSH-9", hl7_code="201"
            )
        return [visit_event, *flags]

    def _visit_event(
        self, trigger: str, common: dict[str, Any], pv1: Segment | None
    ) -> Event | None:
        visit = _visit(pv1)
        if trigger in ("A01", "A06"):
            return PatientAdmitted(**common, visit=visit)
        if trigger == "A02":
            return PatientTransferred(**common, visit=visit)
        if trigger == "A03":
            return PatientDischarged(**common, visit=visit)
        if trigger == "A04":
            return PatientRegistered(**common, visit=visit)
        if trigger == "A08":
            discharged = _first_time(self.settings.timezone, (pv1, 45, "PV1-45"))
            return PatientUpdated(**common, visit=visit, discharged_at=discharged)
        if trigger == "A11":
            return AdmissionCancelled(**common)
        if trigger == "A13":
            return DischargeCancelled(**common)
        return None

    def _merges(
        self, message: Message, source: SourceRef, occurred: datetime, received_at: datetime
    ) -> list[Event]:
        """A40: each PID is followed by its MRG (the patient group repeats)."""
        tz = self.settings.timezone
        events: list[Event] = []
        pid: Segment | None = None
        for segment in message.segments:
            if segment.name == "PID":
                pid = segment
            elif segment.name == "MRG":
                patient = _patient(pid, tz)
                prior = tuple(_identifiers(segment, 1))
                if patient is None or not patient.identifiers or not prior:
                    raise MappingError("A40 needs PID-3 and MRG-1 for each merge", "MRG-1")
                events.append(
                    PatientsMerged(
                        source=source,
                        occurred_at=occurred,
                        received_at=received_at,
                        patient=patient,
                        prior=prior,
                    )
                )
        if not events:
            raise MappingError("A40 without an MRG segment", "MRG")
        return events

    # --- orders --------------------------------------------------------------------------

    def _order(
        self, message: Message, msh: Segment, source: SourceRef, received_at: datetime
    ) -> list[Event]:
        tz = self.settings.timezone
        about = _about(message, tz, source, received_at)
        events: list[Event] = []
        controls: list[str] = []
        for orc, obr, _ in _order_groups(message):
            control = orc.get(1) if orc is not None else ""
            controls.append(control or "(empty)")
            occurred = _first_time(tz, (orc, 9, "ORC-9")) or _message_time(msh, tz)
            ref = _order_ref(orc, obr)
            if not ref.tokens():
                raise MappingError("order without a placer or filler number", "ORC-2")
            common = {**about, "occurred_at": occurred, "order": ref}
            if control == "NW":
                events.append(ImagingOrdered(**common, **_procedure(orc, obr)))
            elif control in CANCEL_CONTROLS:
                events.append(OrderCancelled(**common, control=control))
            elif control in CHANGE_CONTROLS:
                events.append(
                    OrderChanged(
                        **common,
                        control=control,
                        order_status=orc.get(5) if orc is not None else "",
                    )
                )
            # The request's clinical details, written when the order is placed or changed.
            if control in ("NW", "XO") and obr is not None:
                text = "\n".join(_text_lines(obr, 13, message.delimiters))
                if text.strip():
                    if not _has_identifiers(about):
                        raise MappingError(
                            "an order with clinical details (OBR-13) needs a patient identifier",
                            "PID-3",
                        )
                    events.append(
                        ClinicalNote(
                            **about,
                            occurred_at=occurred,
                            note=ref.placer or ref.filler,
                            text=text,
                            source_kind=REQUEST_DETAILS,
                        )
                    )
        if not events:
            raise UnsupportedMessage(
                f"order control {', '.join(controls) or '(no ORC)'} is not handled", "ORC-1"
            )
        return events

    # --- results -------------------------------------------------------------------------

    def _report_content(self, status: str, obxs: Sequence[Segment]) -> dict[str, Any]:
        """What the report's observations say beyond their text and flags:

        * `alert`: the highest category the configured alert OBXs state (OBX-5: its code, its
          text, or the whole value; case-insensitive); "" for none or an unknown word;
        * `findings`: OBX-5 of CE/CWE/CNE finding OBXs as "system|code" (OBX-5.3 and OBX-5.1,
          else the alternate OBX-5.6 and OBX-5.4); a code with no system stays bare;
        * `wrong_patient`: a withdrawal by OBX-11 W (posted in error)."""
        settings = self.settings
        rank = 0
        found: dict[str, None] = {}
        for obx in obxs:
            code = _code(obx)
            if code in settings.alert_observation_codes:
                for rep in range(obx.repetitions(5)):
                    for component in (1, 2):
                        word = obx.get(5, component, repetition=rep).strip().lower()
                        category = settings.alert_values.get(word, "")
                        if category in ALERTS:
                            rank = max(rank, ALERTS.index(category))
            elif code in settings.finding_observation_codes and obx.get(2).upper() in CODED_TYPES:
                for rep in range(obx.repetitions(5)):
                    for code_at, system_at in ((1, 3), (4, 6)):
                        value = obx.get(5, code_at, repetition=rep).strip()
                        if value:
                            system = obx.get(5, system_at, repetition=rep).strip()
                            found[f"{system}|{value}" if system else value] = None
                            break
        return {
            "alert": ALERTS[rank],
            "findings": tuple(found),
            "wrong_patient": status == "withdrawn" and any(o.get(11) == "W" for o in obxs),
        }

    def _report_events(
        self,
        message: Message,
        source: SourceRef,
        received_at: datetime,
        groups: Sequence[tuple[Segment | None, Segment | None, list[Segment]]],
        status_of: dict[int, str],
        fallback_time: Callable[[], datetime],
    ) -> list[Event]:
        tz = self.settings.timezone
        about = _about(message, tz, source, received_at)
        events: list[Event] = []
        for index, (orc, obr, obxs) in enumerate(groups):
            status = status_of.get(index)
            if status is None:
                continue
            ref = _order_ref(orc, obr)
            if not ref.tokens():
                raise MappingError("result without a placer or filler order number", "OBR-2")
            occurred = (
                _first_time(tz, (obr, 22, "OBR-22"))
                or next((parse_ts(o.get(14), tz, "OBX-14") for o in obxs if o.get(14)), None)
                or fallback_time()
            )
            common = {**about, "occurred_at": occurred, "order": ref}
            if status == "cancelled":
                events.append(OrderCancelled(**common, control="OBR-25 X"))
                continue
            events.append(
                ReportIssued(
                    **common,
                    status=status,
                    flags=_flags(obxs),
                    performed_at=_first_time(tz, (obr, 7, "OBR-7")),
                    **_procedure(orc, obr),
                    **self._report_content(status, obxs),
                )
            )
        return events

    def _sort_observations(self, obxs: Sequence[Segment]) -> _Observations:
        """A result's OBXs as report observations, notes (text OBXs with a note code, by code)
        and safeguarding observations. The last two are not part of the report: their OBX-11
        says what became of the note or the flag, not of the report."""
        sorted_out = _Observations([], {}, [])
        for obx in obxs:
            code = _code(obx)
            if code in self.settings.safeguarding_observation_codes:
                sorted_out.flags.append(obx)
            elif code in self.settings.note_observation_codes and obx.get(2).upper() in TEXT_TYPES:
                sorted_out.notes.setdefault(code, []).append(obx)
            else:
                sorted_out.report.append(obx)
        return sorted_out

    def _result(
        self, message: Message, msh: Segment, source: SourceRef, received_at: datetime
    ) -> list[Event]:
        # R01 is the only ORU event up to v2.5; some v2.2/2.3 senders leave MSH-9.2 empty.
        if message.trigger not in ("R01", ""):
            raise UnsupportedMessage(
                f"ORU^{message.trigger} is not supported", "MSH-9", hl7_code="201"
            )
        groups = [g for g in _order_groups(message) if g[1] is not None]
        if not groups:
            raise MappingError("ORU^R01 without an OBR segment", "OBR")
        observations = [self._sort_observations(obxs) for _, _, obxs in groups]
        reports = [
            (orc, obr, o.report) for (orc, obr, _), o in zip(groups, observations, strict=True)
        ]
        statuses: dict[int, str] = {}
        for index, (_, obr, obxs) in enumerate(reports):
            assert obr is not None
            if groups[index][2] and not obxs:
                continue  # only notes and flags: no report
            obx_status = {o.get(11) for o in obxs}
            code = obr.get(25)
            if obx_status & WITHDRAWN_OBX:
                statuses[index] = "withdrawn"
            elif code in REPORT_STATUS:
                statuses[index] = REPORT_STATUS[code]
                if code == "P" and "U" in obx_status:
                    statuses[index] = "final"
            elif code == "X":
                statuses[index] = "cancelled"
            elif "U" in obx_status or (not code and "F" in obx_status):
                statuses[index] = "final"
        tz = self.settings.timezone
        events = self._report_events(
            message, source, received_at, reports, statuses, lambda: _message_time(msh, tz)
        )
        if any(o.notes or o.flags for o in observations):
            events += self._result_extras(message, msh, source, received_at, groups, observations)
        return events

    def _result_extras(
        self,
        message: Message,
        msh: Segment,
        source: SourceRef,
        received_at: datetime,
        groups: Sequence[tuple[Segment | None, Segment | None, list[Segment]]],
        observations: Sequence[_Observations],
    ) -> list[Event]:
        """The notes (one per note code per order, its OBX lines joined) and safeguarding
        flags a result carries. They need the patient: the order alone does not name one."""
        tz = self.settings.timezone
        about = _about(message, tz, source, received_at)
        if not _has_identifiers(about):
            raise MappingError(
                "a result carrying a clinical note or a safeguarding observation (OBX-3) needs "
                "a patient identifier",
                "PID-3",
            )
        events: list[Event] = []
        for (orc, obr, _), sorted_out in zip(groups, observations, strict=True):
            if not sorted_out.notes and not sorted_out.flags:
                continue
            # Without its own OBX-14, an observation dates from the examination, else the result.
            when = _first_time(tz, (obr, 7, "OBR-7"), (obr, 22, "OBR-22")) or _message_time(msh, tz)
            ref = _order_ref(orc, obr)
            for code, lines in sorted_out.notes.items():
                text = _note_text(lines, message.delimiters)
                if not text:
                    continue
                first = lines[0]
                events.append(
                    ClinicalNote(
                        **about,
                        occurred_at=_first_time(tz, (first, 14, "OBX-14")) or when,
                        note=f"{ref.placer or ref.filler}-{first.get(3).strip()}",
                        text=text,
                        source_kind=self.settings.note_source(code),
                    )
                )
            events.extend(self._safeguarding(sorted_out.flags, about, when))
        return events

    # --- documents -----------------------------------------------------------------------

    def _document(
        self, message: Message, msh: Segment, source: SourceRef, received_at: datetime
    ) -> list[Event]:
        trigger = message.trigger
        if trigger not in ("T02", "T08", "T10", "T11"):
            raise UnsupportedMessage(f"MDM^{trigger} is not supported", "MSH-9", hl7_code="201")
        txa = message.segment("TXA")
        if txa is None:
            raise MappingError("MDM without a TXA segment", "TXA")
        doc_type = txa.get(2).strip().upper()
        if doc_type in self.settings.mdm_document_types:
            return self._radiology_document(message, msh, txa, source, received_at)
        if doc_type in self.settings.note_document_types:
            return self._note_document(message, msh, txa, source, received_at)
        raise UnsupportedMessage(
            f"MDM document type {txa.get(2) or '(empty)'} is not a radiology report", "TXA-2"
        )

    def _note_document(
        self,
        message: Message,
        msh: Segment,
        txa: Segment,
        source: SourceRef,
        received_at: datetime,
    ) -> list[Event]:
        """A clinical note document (triage, clerking, midwife, health visitor...): one
        ClinicalNote named by TXA-12 with its TX/FT/ST OBX lines, whatever its completion
        status (a dictated note that says "mark" is still a concern). Its time is TXA-4, the
        activity it records, so that an edit (T08/T10) does not move it. A cancellation (T11)
        gives no event: findings already read from the note stand (the engine has no event
        that withdraws a note)."""
        if message.trigger == "T11":
            return []
        tz = self.settings.timezone
        text = _note_text(message.all("OBX"), message.delimiters)
        if not text:
            return []
        about = _about(message, tz, source, received_at)
        if not _has_identifiers(about):
            raise MappingError("a clinical note needs a patient identifier", "PID-3")
        note = txa.get(12).strip()
        if not note:
            raise MappingError("clinical note without a unique document number", "TXA-12")
        evn = message.segment("EVN")
        occurred = _first_time(
            tz, (txa, 4, "TXA-4"), (evn, 6, "EVN-6"), (evn, 2, "EVN-2")
        ) or _message_time(msh, tz)
        return [
            ClinicalNote(
                **about,
                occurred_at=occurred,
                note=note,
                text=text,
                source_kind=self.settings.note_source(txa.get(2).strip()),
            )
        ]

    def _radiology_document(
        self,
        message: Message,
        msh: Segment,
        txa: Segment,
        source: SourceRef,
        received_at: datetime,
    ) -> list[Event]:
        trigger = message.trigger
        completion = txa.get(17)
        if trigger == "T11":
            status = "withdrawn"
        elif completion in MDM_FINAL:
            status = "corrected" if trigger in ("T08", "T10") else "final"
        elif completion in MDM_PRELIMINARY:
            status = "preliminary"
        else:
            return []  # dictated or in progress: not yet a report
        tz = self.settings.timezone
        evn = message.segment("EVN")
        occurred = _first_time(
            tz, (evn, 6, "EVN-6"), (evn, 2, "EVN-2"), (txa, 4, "TXA-4")
        ) or _message_time(msh, tz)
        groups = [g for g in _order_groups(message) if g[1] is not None]
        if not groups:
            # TXA-14 / TXA-15 (placer / filler order number) name the order.
            placer, filler = txa.get(14), txa.get(15)
            if not placer and not filler:
                raise MappingError("radiology document names no order", "TXA-14")
            ref = OrderRef(placer, txa.get(14, 2), filler, txa.get(15, 2))
            obxs = message.all("OBX")
            return [
                ReportIssued(
                    **_about(message, tz, source, received_at),
                    occurred_at=occurred,
                    order=ref,
                    status=status,
                    flags=_flags(obxs),
                    **self._report_content(status, obxs),
                )
            ]
        return self._report_events(
            message,
            source,
            received_at,
            groups,
            dict.fromkeys(range(len(groups)), status),
            lambda: occurred,
        )
