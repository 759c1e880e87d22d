"""HL7 v2 -> canonical events. Routing by MSH-9 sits here, above the ER7 reader.

Supported: ADT A01 A02 A03 A04 A06 A08 A11 A13 A40; ORM^O01 and OMI^O23 (ORC-1 NW, CA, CR,
OC, OD, DC, DR, XO, SC); ORU^R01 (OBR-25 P, F, C, X; OBX-11 U, W, D); MDM T02 T08 T10 T11 when
TXA-2 says the document is a radiology report. Anything else raises `UnsupportedMessage`;
content that cannot be understood raises `MappingError` (ACK AE) naming the segment and field.
Field choices follow shared/reference/clinical-rules.md section 3.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Any

from adapters.errors import MappingError, UnsupportedMessage
from adapters.hl7v2.er7 import Message, Segment
from engine.events import (
    AdmissionCancelled,
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
    SourceRef,
    Visit,
)
from engine.identity import is_valid_nhs_number

CANCEL_CONTROLS = frozenset({"CA", "CR", "OC", "OD", "DC", "DR"})
CHANGE_CONTROLS = frozenset({"XO", "SC"})
REPORT_STATUS = {"P": "preliminary", "F": "final", "C": "corrected"}
WITHDRAWN_OBX = frozenset({"W", "D"})
# TXA-17 document completion status (table 0271).
MDM_FINAL = frozenset({"AU", "LA"})
MDM_PRELIMINARY = frozenset({"PA"})

_TS = re.compile(
    r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,4}))?(?:([+-])(\d{2})(\d{2}))?$"
)


@dataclass(frozen=True, slots=True)
class MappingSettings:
    """What mapping needs from the site: the local time zone and radiology document types."""

    timezone: tzinfo
    mdm_document_types: frozenset[str]


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
        common: dict[str, Any] = dict(
            source=source,
            occurred_at=occurred,
            received_at=received_at,
            patient=patient,
            encounter=pv1.get(19) if pv1 is not None else "",
        )
        visit = _visit(pv1)
        if trigger in ("A01", "A06"):
            return [PatientAdmitted(**common, visit=visit)]
        if trigger == "A02":
            return [PatientTransferred(**common, visit=visit)]
        if trigger == "A03":
            return [PatientDischarged(**common, visit=visit)]
        if trigger == "A04":
            return [PatientRegistered(**common, visit=visit)]
        if trigger == "A08":
            discharged = _first_time(tz, (pv1, 45, "PV1-45"))
            return [PatientUpdated(**common, visit=visit, discharged_at=discharged)]
        if trigger == "A11":
            return [AdmissionCancelled(**common)]
        if trigger == "A13":
            return [DischargeCancelled(**common)]
        raise UnsupportedMessage(
            f"ADT event {trigger or '(none)'} is not supported", "MSH-9", hl7_code="201"
        )

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
        if not events:
            raise UnsupportedMessage(
                f"order control {', '.join(controls) or '(no ORC)'} is not handled", "ORC-1"
            )
        return events

    # --- results -------------------------------------------------------------------------

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
                )
            )
        return events

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
        statuses: dict[int, str] = {}
        for index, (_, obr, obxs) in enumerate(groups):
            assert obr is not None
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
        return self._report_events(
            message, source, received_at, groups, statuses, lambda: _message_time(msh, tz)
        )

    def _document(
        self, message: Message, msh: Segment, source: SourceRef, received_at: datetime
    ) -> list[Event]:
        trigger = message.trigger
        if trigger not in ("T02", "T08", "T10", "T11"):
            raise UnsupportedMessage(f"MDM^{trigger} is not supported", "MSH-9", hl7_code="201")
        txa = message.segment("TXA")
        if txa is None:
            raise MappingError("MDM without a TXA segment", "TXA")
        doc_type = txa.get(2)
        if doc_type.upper() not in self.settings.mdm_document_types:
            raise UnsupportedMessage(
                f"MDM document type {doc_type or '(empty)'} is not a radiology report", "TXA-2"
            )
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
            return [
                ReportIssued(
                    **_about(message, tz, source, received_at),
                    occurred_at=occurred,
                    order=ref,
                    status=status,
                    flags=_flags(message.all("OBX")),
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
