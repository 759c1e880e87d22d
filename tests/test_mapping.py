"""HL7 v2 -> canonical events (adapters.hl7v2.mapping), on small synthetic messages.

The fixtures under fixtures/hl7v2/rules/ are synthetic (see their README)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from adapters.errors import AdapterError, MappingError, UnsupportedMessage
from adapters.hl7v2.er7 import read_message
from adapters.hl7v2.mapping import Mapper, MappingSettings, parse_ts
from adapters.store import open_store
from engine.errors import ConfigurationError
from engine.events import (
    ClinicalNote,
    DischargeCancelled,
    Event,
    ImagingOrdered,
    OrderCancelled,
    OrderChanged,
    PatientDischarged,
    PatientRegistered,
    PatientsMerged,
    PatientUpdated,
    ReportIssued,
    SafeguardingFlagCleared,
    SafeguardingFlagRaised,
)
from engine.facts import epoch, working_memory
from engine.identity import is_valid_nhs_number

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "hl7v2" / "rules"
TZ = ZoneInfo("Europe/London")
MAPPER = Mapper(MappingSettings(TZ, frozenset({"RAD"})))
NOW = datetime(2026, 1, 1, tzinfo=UTC)
PID = "PID|1||9990000018^^^NHS^NH~RX1000123^^^RX1^MR||Testbaby^Alex||20080313|M"


def seg(name: str, **fields: str) -> str:
    """A segment with the given fields by number, e.g. seg("PV1", f2="E", f45="2008...")."""
    numbered = {int(k[1:]): v for k, v in fields.items()}
    return "|".join([name, *(numbered.get(i, "") for i in range(1, max(numbered) + 1))])


def events(*segments: str) -> list[Any]:
    return MAPPER.events(read_message("\r".join(segments)), NOW)


def msh(kind: str, control: str = "C1") -> str:
    return f"MSH|^~\\&|RIS|RX1|SAFETYNET|RX1|20080501120000||{kind}|{control}|P|2.5"


def test_nhs_numbers_are_checked_with_modulus_11() -> None:
    assert is_valid_nhs_number("9990000018")
    assert is_valid_nhs_number("999 000 0018")
    assert not is_valid_nhs_number("9990000017")  # wrong check digit
    assert not is_valid_nhs_number("999000001")
    assert not is_valid_nhs_number("99900000AB")
    (ev,) = events(msh("ADT^A03"), "EVN|A03|20080501140000", PID, "PV1|1|E")
    nhs, mrn = ev.patient.identifiers
    assert nhs.is_nhs_number and nhs.value == "9990000018"
    assert not mrn.is_nhs_number and (mrn.system, mrn.type_code) == ("RX1", "MR")
    bad_pid = PID.replace("9990000018", "9990000017")
    (ev,) = events(msh("ADT^A03"), "EVN|A03|20080501140000", bad_pid, "PV1|1|E")
    assert not any(i.is_nhs_number for i in ev.patient.identifiers)
    assert ev.patient.identifiers[0].system == "NHS-unverified"


def test_local_times_follow_the_site_time_zone_with_daylight_saving() -> None:
    assert parse_ts("20080501140000", TZ, "X").utcoffset() == timedelta(hours=1)
    assert parse_ts("20080112140000", TZ, "X").utcoffset() == timedelta(0)
    assert parse_ts("200805011400-0500", TZ, "X") == datetime(
        2008, 5, 1, 14, 0, tzinfo=timezone(timedelta(hours=-5))
    )
    assert parse_ts("20080501", TZ, "X") == datetime(2008, 5, 1, tzinfo=TZ)
    assert parse_ts("20080501140000.1234", TZ, "X").microsecond == 123400
    with pytest.raises(MappingError, match="PV1-45 is not a valid date/time"):
        parse_ts("20081301", TZ, "PV1-45")


def test_discharge_time_prefers_evn6_then_pv1_45() -> None:
    pv1 = seg(
        "PV1",
        f2="E",
        f3="PAEDED",
        f7="C1^Doc^Ann^^^Dr^^^GMC",
        f19="V1",
        f36="01",
        f44="20080501130000",
        f45="20080501140000",
    )
    (ev,) = events(msh("ADT^A03"), "EVN|A03|20080501150000", PID, pv1)
    assert isinstance(ev, PatientDischarged)
    assert ev.occurred_at == datetime(2008, 5, 1, 14, 0, tzinfo=TZ)  # PV1-45 before EVN-2
    assert ev.visit.disposition == "01" and ev.encounter == "V1"
    assert ev.visit.attending is not None and ev.visit.attending.name == "Dr Ann Doc"
    (ev,) = events(msh("ADT^A03"), "EVN|A03|20080501150000||||20080501141500", PID, pv1)
    assert ev.occurred_at == datetime(2008, 5, 1, 14, 15, tzinfo=TZ)  # EVN-6 first


def test_order_controls() -> None:
    orc = "ORC|{}|ORD-1^RIS|ACC-1^PACS||SC||||20080501121000|||C2^Ord^Sam^^^Dr^^^GMC"
    obr = (
        "OBR|1|ORD-1^RIS|ACC-1^PACS|XSK^XR skeletal survey \\T\\ views^LOCAL||||||||||||||||||||RAD"
    )
    (new,) = events(msh("ORM^O01"), PID, orc.format("NW"), obr)
    assert isinstance(new, ImagingOrdered)
    assert (new.order.placer, new.order.placer_ns, new.order.filler) == ("ORD-1", "RIS", "ACC-1")
    assert new.procedure_name == "XR skeletal survey & views"
    assert new.section == "RAD" and new.orderer is not None and new.orderer.id == "C2"
    assert new.occurred_at == datetime(2008, 5, 1, 12, 10, tzinfo=TZ)
    for control in ("CA", "CR", "OC", "OD", "DC", "DR"):
        (ev,) = events(msh("ORM^O01"), PID, orc.format(control), obr)
        assert isinstance(ev, OrderCancelled) and ev.control == control
    for control in ("XO", "SC"):
        (ev,) = events(msh("OMI^O23"), PID, orc.format(control), obr)
        assert isinstance(ev, OrderChanged) and ev.order_status == "SC"
    with pytest.raises(UnsupportedMessage, match="order control HD is not handled"):
        events(msh("ORM^O01"), PID, orc.format("HD"), obr)


@pytest.mark.parametrize(
    ("obr25", "obx11", "expected"),
    [
        ("P", "P", "preliminary"),
        ("F", "F", "final"),
        ("C", "C", "corrected"),
        ("P", "U", "final"),
        ("F", "W", "withdrawn"),
        ("F", "D", "withdrawn"),
    ],
)
def test_result_status(obr25: str, obx11: str, expected: str) -> None:
    (ev,) = events(
        msh("ORU^R01"),
        PID,
        seg("OBR", f2="ORD-1^RIS", f4="XSK^XR^LOCAL", f22="20080501160000", f25=obr25),
        seg("OBX", f2="TX", f3="XSK", f5="text", f11=obx11),
        seg("OBX", f2="CE", f3="FLAG", f5="A", f8="A~H", f11=obx11),
    )
    assert isinstance(ev, ReportIssued) and ev.status == expected
    assert ev.flags == ("A", "H") and ev.abnormal
    assert ev.occurred_at == datetime(2008, 5, 1, 16, 0, tzinfo=TZ)  # OBR-22


def test_result_cancelled_and_in_progress() -> None:
    (ev,) = events(msh("ORU^R01"), PID, seg("OBR", f2="ORD-1^RIS", f4="XSK", f25="X"))
    assert isinstance(ev, OrderCancelled)
    assert events(msh("ORU^R01"), PID, seg("OBR", f2="ORD-1^RIS", f4="XSK", f25="I")) == []


def test_a_result_without_patient_group_keeps_its_order_numbers() -> None:
    (ev,) = events(
        msh("ORU^R01"),
        seg("OBR", f2="ORD-1^RIS", f3="ACC-1^PACS", f4="XSK", f22="20080501160000", f25="F"),
    )
    assert ev.patient is None and ev.order.tokens() == ("PLAC|RIS|ORD-1", "FILL|PACS|ACC-1")


def test_mdm_radiology_report_and_other_documents() -> None:
    txa = seg("TXA", f1="1", f2="{}", f3="TX", f4="20080501160000", f14="ORD-1^RIS", f17="{}")
    (ev,) = events(msh("MDM^T02"), "EVN|T02|20080501160000", PID, txa.format("RAD", "AU"))
    assert isinstance(ev, ReportIssued) and ev.status == "final"
    assert ev.order.placer == "ORD-1"
    (ev,) = events(msh("MDM^T08"), "EVN|T08|20080501160000", PID, txa.format("RAD", "LA"))
    assert ev.status == "corrected"
    (ev,) = events(msh("MDM^T11"), "EVN|T11|20080501160000", PID, txa.format("RAD", "AU"))
    assert ev.status == "withdrawn"
    assert events(msh("MDM^T02"), "EVN|T02|20080501160000", PID, txa.format("RAD", "DI")) == []
    with pytest.raises(UnsupportedMessage, match="document type DS is not a radiology report"):
        events(msh("MDM^T02"), "EVN|T02|20080501160000", PID, txa.format("DS", "AU"))


def test_merge_and_cancel_discharge() -> None:
    merged = events(
        msh("ADT^A40"),
        "EVN|A40|20080501160000",
        PID,
        "MRG|RX1000999^^^RX1^MR",
        PID.replace("9990000018", "9990000026"),
        "MRG|RX1000998^^^RX1^MR",
    )
    assert [type(e) for e in merged] == [PatientsMerged, PatientsMerged]
    assert merged[0].prior[0].value == "RX1000999" and merged[1].prior[0].value == "RX1000998"
    (ev,) = events(msh("ADT^A13"), "EVN|A13|20080501160000", PID, seg("PV1", f2="E", f19="V1"))
    assert isinstance(ev, DischargeCancelled) and ev.encounter == "V1"


def test_unsupported_and_wrong_content() -> None:
    with pytest.raises(UnsupportedMessage, match="SIU\\^S12"):
        events(msh("SIU^S12"), "SCH|1")
    with pytest.raises(UnsupportedMessage, match="ADT event A31"):
        events(msh("ADT^A31"), "EVN|A31|20080501160000", PID)
    with pytest.raises(MappingError, match="without a patient identifier") as info:
        events(msh("ADT^A03"), "EVN|A03|20080501140000", "PID|1", "PV1|1|E")
    assert info.value.location == "PID-3" and info.value.ack_code == "AE"
    with pytest.raises(MappingError, match="PID-7 is not an HL7 date/time"):
        events(msh("ADT^A03"), "EVN|A03|20080501140000", PID.replace("20080313", "13/03/2008"))


def test_a_message_with_no_time_at_all_is_rejected_naming_the_field() -> None:
    no_time = "MSH|^~\\&|RIS|RX1|SAFETYNET|RX1|||ORM^O01|C1|P|2.5"
    with pytest.raises(MappingError, match="no event or message time") as info:
        events(no_time, PID, seg("ORC", f1="NW", f2="ORD-1^RIS"))
    assert info.value.location == "MSH-7"


# --- issue 5: alert, findings, wrong patient, safeguarding flags, clinical notes -------------

SAM = "PID|1||9990000115^^^NHS^NH~RX2000115^^^RX1^MR||Testbaby^Sam^^^^^L||20260105|F"
PV1 = seg("PV1", f1="1", f2="E", f3="PAEDED^^^RX1", f19="V0101^^^RX1^VN")


def fixture_segments(name: str) -> list[str]:
    """A fixture message's segments (one message per file, CR separators)."""
    return [s for s in (FIXTURES / name).read_bytes().decode().split("\r") if s]


def fixture(name: str, mapper: Mapper = MAPPER) -> list[Event]:
    return mapper.events(read_message((FIXTURES / name).read_bytes()), NOW)


def with_settings(**hl7: Any) -> Mapper:
    return Mapper(MappingSettings.from_settings(TZ, ["rad"], hl7))


def result(*obxs: str, obr25: str = "F", pid: str = SAM, mapper: Mapper = MAPPER) -> list[Event]:
    obr = seg(
        "OBR",
        f1="1",
        f2="ORD-1^RIS",
        f3="ACC-1^PACS",
        f4="XSK^XR skeletal survey^LOCAL",
        f7="20260316120000",
        f22="20260316150000",
        f25=obr25,
    )
    lines = [msh("ORU^R01"), *([pid, PV1] if pid else []), obr, *obxs]
    return mapper.events(read_message("\r".join(lines)), NOW)


def report_text(status: str = "F") -> str:
    return seg("OBX", f1="1", f2="TX", f3="XSK^XR^LOCAL", f5="No fracture seen.", f11=status)


def the_report(evs: list[Event]) -> ReportIssued:
    (report,) = [e for e in evs if isinstance(e, ReportIssued)]
    return report


def test_the_alert_observation_gives_the_highest_category() -> None:
    (report,) = fixture("01_oru_r01_alert.hl7")
    assert isinstance(report, ReportIssued)
    # RCRALERT says URGENT (CWE code), ALERT says "Critical" (ST): the highest wins.
    assert report.alert == "critical" and report.status == "final"


@pytest.mark.parametrize(
    ("value_type", "value", "expected"),
    [
        ("ST", "Significant unexpected", "significant"),
        ("ST", "  URGENT ", "urgent"),
        ("CWE", "CANCER^National cancer alert^LOCAL", "significant"),
        ("CE", "^Significant^LOCAL", "significant"),  # the text when the code is empty
        ("ST", "routine", ""),  # not an alert value
        ("ST", "", ""),
    ],
)
def test_alert_values(value_type: str, value: str, expected: str) -> None:
    alert = seg("OBX", f1="2", f2=value_type, f3="ALERT^Alert^LOCAL", f5=value, f11="F")
    assert the_report(result(report_text(), alert)).alert == expected


def test_unknown_alert_codes_and_critical_flags_do_not_set_the_alert() -> None:
    other = seg("OBX", f1="2", f2="ST", f3="PRIORITY^Priority^LOCAL", f5="Critical", f11="F")
    flagged = seg("OBX", f1="3", f2="CE", f3="RADFLAG", f5="AA", f8="AA", f11="F")
    report = the_report(result(report_text(), other, flagged))
    # OBX-8 AA reaches `flags`; the fact layer ranks it critical, not the mapper.
    assert report.alert == "" and report.flags == ("AA",)


def test_a_site_maps_its_own_alert_codes_and_words() -> None:
    mapper = with_settings(alert_observation_codes=["RADALERT"], alert_values={"Red": "critical"})
    red = seg("OBX", f1="2", f2="ST", f3="RADALERT", f5="RED", f11="F")
    assert the_report(result(report_text(), red, mapper=mapper)).alert == "critical"
    # The site's table replaces the defaults: "urgent" and the default ALERT code now mean nothing.
    urgent = seg("OBX", f1="2", f2="ST", f3="RADALERT", f5="urgent", f11="F")
    assert the_report(result(report_text(), urgent, mapper=mapper)).alert == ""
    default_code = seg("OBX", f1="2", f2="ST", f3="ALERT", f5="red", f11="F")
    assert the_report(result(report_text(), default_code, mapper=mapper)).alert == ""


def test_coded_findings_become_system_and_code() -> None:
    (report,) = fixture("02_oru_r01_coded_findings.hl7")
    assert isinstance(report, ReportIssued)
    # CWE repetitions in order, then a CE whose primary code is empty (the alternate is used).
    assert report.findings == ("SCT|125605004", "SCT|125667009", "L|RIB-FX")


def test_findings_need_a_coded_value_and_a_finding_code() -> None:
    text_value = seg("OBX", f1="2", f2="TX", f3="FINDING", f5="125605004", f11="F")
    unknown_code = seg("OBX", f1="3", f2="CWE", f3="DIAGNOSIS", f5="125605004^Fx^SCT", f11="F")
    bare = seg("OBX", f1="4", f2="CWE", f3="impression-code", f5="RIBFX^Rib fracture", f11="F")
    report = the_report(result(report_text(), text_value, unknown_code, bare))
    assert report.findings == ("RIBFX",)  # no coding system: the bare code
    assert the_report(result(report_text(), text_value, unknown_code)).findings == ()


def test_obx11_w_is_a_wrong_patient_withdrawal_and_d_a_plain_one() -> None:
    (report,) = fixture("03_oru_r01_withdrawn_wrong_patient.hl7")
    assert isinstance(report, ReportIssued)
    assert (report.status, report.wrong_patient) == ("withdrawn", True)
    report = the_report(result(report_text("D")))
    assert (report.status, report.wrong_patient) == ("withdrawn", False)
    assert not the_report(result(report_text("F"))).wrong_patient


def test_performed_at_is_obr7() -> None:
    (report,) = fixture("03_oru_r01_withdrawn_wrong_patient.hl7")
    assert isinstance(report, ReportIssued)
    assert report.performed_at == datetime(2026, 3, 16, 12, 0, tzinfo=TZ)  # OBR-7
    assert report.occurred_at == datetime(2026, 3, 16, 17, 0, tzinfo=TZ)  # OBR-22


def test_an_mdm_radiology_report_carries_alert_findings_and_wrong_patient() -> None:
    txa = seg("TXA", f1="1", f2="RAD", f3="TX", f14="ORD-1^RIS", f17="AU")
    alert = seg("OBX", f1="1", f2="ST", f3="ALERT", f5="urgent", f11="W")
    finding = seg("OBX", f1="2", f2="CWE", f3="FINDING", f5="125605004^Fx^SCT", f11="W")
    lines = [msh("MDM^T02"), "EVN|T02|20260316160000", SAM, txa, alert, finding]
    (report,) = MAPPER.events(read_message("\r".join(lines)), NOW)
    assert isinstance(report, ReportIssued) and report.status == "final"
    assert (report.alert, report.findings, report.wrong_patient) == (
        "urgent",
        ("SCT|125605004",),
        False,  # only a withdrawn report is withdrawn from the wrong patient
    )
    lines[0] = msh("MDM^T11")
    (report,) = MAPPER.events(read_message("\r".join(lines)), NOW)
    assert isinstance(report, ReportIssued)
    assert (report.status, report.wrong_patient) == ("withdrawn", True)


def test_a_safeguarding_observation_in_an_adt_raises_a_flag_beside_the_visit_event() -> None:
    visit, flag = fixture("04_adt_a08_safeguarding_raised.hl7")
    assert isinstance(visit, PatientUpdated)
    assert visit.occurred_at == datetime(2026, 3, 16, 11, 30, tzinfo=TZ)
    assert isinstance(flag, SafeguardingFlagRaised)
    assert (flag.flag, flag.category, flag.encounter) == ("SAFEGUARDING-1", "CIN", "V0101")
    assert flag.occurred_at == datetime(2026, 3, 16, 11, 25, tzinfo=TZ)  # OBX-14
    assert flag.patient == visit.patient and flag.patient is not None
    assert flag.patient.nhs_number == "9990000115"


def test_a_cleared_flag_from_an_a31() -> None:
    (cleared,) = fixture("05_adt_a31_cpis_cleared.hl7")
    assert isinstance(cleared, SafeguardingFlagCleared)
    assert cleared.flag == "CPIS"  # no OBX-4 sub-id: the code names the flag
    assert cleared.occurred_at == datetime(2026, 3, 20, 9, 0, tzinfo=TZ)  # EVN-2
    segments = fixture_segments("05_adt_a31_cpis_cleared.hl7")
    for status, kind in (("W", SafeguardingFlagCleared), ("F", SafeguardingFlagRaised)):
        obx = segments[-1].split("|")
        obx[11] = status
        (event,) = MAPPER.events(read_message("\r".join([*segments[:-1], "|".join(obx)])), NOW)
        assert isinstance(event, kind)


def test_adt_without_a_safeguarding_observation_gives_only_the_visit_event() -> None:
    other = seg("OBX", f1="1", f2="ST", f3="WEIGHT", f5="4.1", f11="F")
    evn = "EVN|A04|20260316100000"
    (event,) = events(msh("ADT^A04"), evn, SAM, PV1, other)
    assert isinstance(event, PatientRegistered)
    with pytest.raises(UnsupportedMessage, match="ADT event A31"):
        events(msh("ADT^A31"), "EVN|A31|20260316100000", SAM, other)


def test_a_site_names_its_own_safeguarding_codes() -> None:
    mapper = with_settings(safeguarding_observation_codes=["CPP-ALERT"])
    segments = fixture_segments("04_adt_a08_safeguarding_raised.hl7")
    assert [type(e) for e in mapper.events(read_message("\r".join(segments)), NOW)] == [
        PatientUpdated
    ]
    segments[-1] = segments[-1].replace("SAFEGUARDING^", "cpp-alert^")
    *_, flag = mapper.events(read_message("\r".join(segments)), NOW)
    assert isinstance(flag, SafeguardingFlagRaised) and flag.flag == "cpp-alert-1"


def test_a_safeguarding_observation_in_a_result_is_a_flag_not_part_of_the_report() -> None:
    report, flag = fixture("06_oru_r01_safeguarding_and_report.hl7")
    assert isinstance(report, ReportIssued) and report.status == "final"
    assert isinstance(flag, SafeguardingFlagRaised)
    assert (flag.flag, flag.category) == ("CPIS", "LAC")
    assert flag.occurred_at == datetime(2026, 3, 16, 12, 0, tzinfo=TZ)  # OBR-7, no OBX-14
    # A cleared flag (OBX-11 D) in a result does not withdraw the report.
    cleared = seg("OBX", f1="2", f2="CWE", f3="CPIS", f5="LAC", f11="D")
    report, flag = result(report_text(), cleared)
    assert isinstance(report, ReportIssued) and report.status == "final"
    assert isinstance(flag, SafeguardingFlagCleared)


def test_a_result_of_only_flags_and_notes_is_no_report() -> None:
    flag = seg("OBX", f1="1", f2="CWE", f3="SAFEGUARDING", f5="CIN", f11="F")
    (event,) = result(flag)
    assert isinstance(event, SafeguardingFlagRaised)


def test_flags_and_notes_in_a_result_need_the_patient() -> None:
    flag = seg("OBX", f1="2", f2="CWE", f3="SAFEGUARDING", f5="CIN", f11="F")
    with pytest.raises(MappingError, match="needs a patient identifier") as info:
        result(report_text(), flag, pid="")
    assert info.value.location == "PID-3"
    # Without them, a result with no patient group still maps (linked by its order).
    (report,) = result(report_text(), pid="")
    assert isinstance(report, ReportIssued) and report.patient is None


def test_an_mdm_triage_note() -> None:
    (note,) = fixture("07_mdm_t02_triage_note.hl7")
    assert isinstance(note, ClinicalNote)
    assert (note.note, note.source_kind, note.encounter) == (
        "DOC-0000107",
        "triage note",
        "V0101",
    )
    # Both TX lines, the second's repetitions as lines; \\T\\ unescaped to "&".
    assert note.text == (
        "Brought in by mother & father: feeding less.\nSmall mark on left cheek.\nSettled, alert."
    )
    assert note.occurred_at == datetime(2026, 3, 16, 10, 5, tzinfo=TZ)  # TXA-4
    assert note.patient is not None and note.patient.nhs_number == "9990000115"


def note_document(trigger: str, doc_type: str = "TRIAGE", *obxs: str, **txa: str) -> list[Event]:
    fields = {"f1": "1", "f2": doc_type, "f3": "TX", "f4": "20260316100500", "f12": "DOC-1"}
    lines = [msh(f"MDM^{trigger}"), f"EVN|{trigger}|20260316101000", SAM, PV1]
    lines.append(seg("TXA", **{**fields, **txa}))
    text = seg("OBX", f1="1", f2="TX", f3="NOTE", f5="Small mark on cheek.", f11="F")
    return MAPPER.events(read_message("\r".join([*lines, *(obxs or (text,))])), NOW)


@pytest.mark.parametrize(
    ("doc_type", "kind"),
    [
        ("TRIAGE", "triage note"),
        ("clerk", "emergency department clerking"),
        ("ED", "emergency department note"),
        ("HV", "health visitor's note"),
        ("MW", "midwife's note"),
        ("NOTE", "clinical note"),
    ],
)
def test_note_document_types_and_their_kinds(doc_type: str, kind: str) -> None:
    for trigger in ("T02", "T08", "T10"):
        (note,) = note_document(trigger, doc_type)
        assert isinstance(note, ClinicalNote) and note.source_kind == kind


def test_note_documents_that_give_no_note() -> None:
    assert note_document("T11") == []  # a cancelled note: what was read from it stands
    pdf = seg("OBX", f1="1", f2="ED", f3="NOTE", f5="^application^pdf^Base64^JVBERi0=", f11="F")
    assert note_document("T02", "TRIAGE", pdf) == []  # no text to read
    with pytest.raises(UnsupportedMessage, match="document type DS is not a radiology report"):
        note_document("T02", "DS")
    (report,) = note_document("T02", "RAD", f14="ORD-1^RIS", f17="AU")
    assert isinstance(report, ReportIssued)  # radiology documents keep their mapping


def test_a_label_for_a_site_note_type() -> None:
    mapper = with_settings(note_document_types=["PAED"], note_sources={"paed": "paediatric note"})
    segments = fixture_segments("07_mdm_t02_triage_note.hl7")
    txa = next(i for i, s in enumerate(segments) if s.startswith("TXA"))
    with pytest.raises(UnsupportedMessage):
        mapper.events(read_message("\r".join(segments)), NOW)  # TRIAGE is no longer a note
    segments[txa] = segments[txa].replace("|TRIAGE|", "|PAED|")
    (note,) = mapper.events(read_message("\r".join(segments)), NOW)
    assert isinstance(note, ClinicalNote) and note.source_kind == "paediatric note"
    unlabelled = with_settings(note_document_types=["PAED"], note_sources={})
    (note,) = unlabelled.events(read_message("\r".join(segments)), NOW)
    assert isinstance(note, ClinicalNote) and note.source_kind == "clinical note"


def test_order_request_details_are_a_note() -> None:
    order, note = fixture("08_orm_o01_request_details.hl7")
    assert isinstance(order, ImagingOrdered) and isinstance(note, ClinicalNote)
    assert (note.note, note.source_kind, note.encounter) == (
        "ORD-0000108",
        "request details",
        "V0101",
    )
    assert note.text == "10-week-old with bruising to the left cheek. ?NAI"
    assert note.occurred_at == order.occurred_at == datetime(2026, 3, 16, 12, 10, tzinfo=TZ)


def test_request_details_only_on_new_or_changed_orders() -> None:
    segments = fixture_segments("08_orm_o01_request_details.hl7")
    orc = next(i for i, s in enumerate(segments) if s.startswith("ORC"))

    def kinds(control: str, obr13: str | None = None) -> list[type]:
        lines = list(segments)
        lines[orc] = lines[orc].replace("ORC|NW|", f"ORC|{control}|")
        if obr13 is not None:
            obr = lines[-1].split("|")
            obr[13] = obr13
            lines[-1] = "|".join(obr)
        return [type(e) for e in MAPPER.events(read_message("\r".join(lines)), NOW)]

    assert kinds("XO") == [OrderChanged, ClinicalNote]
    assert kinds("CA") == [OrderCancelled]
    assert kinds("SC") == [OrderChanged]
    assert kinds("NW", "") == [ImagingOrdered]
    with pytest.raises(MappingError, match="needs a patient identifier") as info:
        MAPPER.events(read_message("\r".join(s for s in segments if s[:3] != "PID")), NOW)
    assert "bruising" not in str(info.value) and info.value.location == "PID-3"


def test_a_triage_observation_in_a_result_is_a_note() -> None:
    (note,) = fixture("09_oru_r01_triage_observation.hl7")
    assert isinstance(note, ClinicalNote)
    assert (note.note, note.source_kind) == ("ORD-0000109-TRIAGE", "triage note")
    assert note.text == "Parent reports a blue mark on the back.\nNo other concerns."
    assert note.occurred_at == datetime(2026, 3, 16, 9, 30, tzinfo=TZ)  # the first OBX-14


def test_only_text_observations_with_a_note_code_are_notes() -> None:
    coded = seg("OBX", f1="2", f2="CWE", f3="TRIAGE", f5="CAT2^Category 2^LOCAL", f11="F")
    other = seg("OBX", f1="3", f2="TX", f3="HISTORY", f5="Small mark on cheek.", f11="F")
    (report,) = result(report_text(), coded, other)
    assert isinstance(report, ReportIssued)
    note = seg("OBX", f1="2", f2="TX", f3="clinical-note", f5="Mark on ear.", f11="F")
    report, clinical = result(report_text(), note)
    assert isinstance(report, ReportIssued) and isinstance(clinical, ClinicalNote)
    assert (clinical.note, clinical.source_kind) == ("ORD-1-clinical-note", "clinical note")


def test_flag_and_note_times_in_a_result() -> None:
    note = seg("OBX", f1="2", f2="TX", f3="TRIAGE", f5="Well baby.", f11="F")
    flag = seg("OBX", f1="3", f2="CWE", f3="CPIS", f5="CPP", f11="F", f14="20260316091500")
    _, clinical, raised = result(report_text(), note, flag)
    assert clinical.occurred_at == datetime(2026, 3, 16, 12, 0, tzinfo=TZ)  # OBR-7
    assert raised.occurred_at == datetime(2026, 3, 16, 9, 15, tzinfo=TZ)  # its OBX-14
    # A result timed only by its OBX-14 (no MSH-7, OBR-7 or OBR-22) still maps.
    no_time = "MSH|^~\\&|RIS|RX1|SAFETYNET|RX1|||ORU^R01|C1|P|2.5"
    obr = seg("OBR", f1="1", f2="ORD-1^RIS", f4="XSK", f25="F")
    obx = seg("OBX", f1="1", f2="TX", f3="XSK", f5="No fracture.", f11="F", f14="20260316150000")
    (report,) = MAPPER.events(read_message("\r".join([no_time, SAM, obr, obx])), NOW)
    assert report.occurred_at == datetime(2026, 3, 16, 15, 0, tzinfo=TZ)


def test_note_text_never_reaches_an_error() -> None:
    secret = "Small mark on cheek"
    no_pid = [s for s in fixture_segments("07_mdm_t02_triage_note.hl7") if s[:3] != "PID"]
    calls: list[Callable[[], object]] = [
        lambda: note_document("T02", f12=""),  # no TXA-12
        lambda: MAPPER.events(read_message("\r".join(no_pid)), NOW),
        lambda: result(seg("OBX", f1="1", f2="TX", f3="TRIAGE", f5=secret, f11="F"), pid=""),
    ]
    failures: list[AdapterError] = []
    for call in calls:
        with pytest.raises(MappingError) as info:
            call()
        failures.append(info.value)
    assert [f.location for f in failures] == ["TXA-12", "PID-3", "PID-3"]
    for failure in failures:
        assert secret.lower() not in f"{failure} {failure.reason!r}".lower()


# --- settings.toml [hl7] ---------------------------------------------------------------------


def site_hl7() -> dict[str, Any]:
    with (ROOT / "rules" / "settings.toml").open("rb") as file:
        return dict(tomllib.load(file).get("hl7", {}))


def test_settings_toml_states_the_defaults() -> None:
    """The [hl7] table documents the defaults: reading it changes nothing."""
    from_file = MappingSettings.from_settings(TZ, ["RAD"], site_hl7())
    assert from_file == MappingSettings(TZ, frozenset({"RAD"}))
    assert MappingSettings.from_settings(TZ, ["RAD"], {}) == from_file


@pytest.mark.parametrize(
    ("hl7", "message"),
    [
        ({"alert_codes": ["ALERT"]}, "unknown key"),
        ({"alert_observation_codes": "ALERT"}, "must be a list of codes"),
        ({"note_document_types": ["TRIAGE", ""]}, "must be a list of codes"),
        ({"alert_values": {"red": "amber"}}, "must be one of significant, urgent, critical"),
        ({"note_sources": {"TRIAGE": 1}}, "must map each key to a word"),
        ({"note_sources": ["TRIAGE"]}, "must map each key to a word"),
    ],
)
def test_wrong_hl7_settings_are_refused(hl7: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        MappingSettings.from_settings(TZ, [], hl7)


def test_codes_and_words_are_compared_without_case() -> None:
    settings = MappingSettings.from_settings(
        TZ, ["rad"], {"note_observation_codes": ["Triage"], "alert_values": {"RED": "urgent"}}
    )
    assert settings.mdm_document_types == {"RAD"}
    assert settings.note_observation_codes == {"TRIAGE"}
    assert settings.alert_values == {"red": "urgent"}
    assert replace(settings, note_sources={"TRIAGE": "x"}).note_source("triage") == "x"


# --- end to end ------------------------------------------------------------------------------


def test_replayed_triage_mark_and_safeguarding_alert_become_facts(tmp_path: Path) -> None:
    """`safetynet replay` of a 10-week-old in the paediatric ED: registration, a triage note
    (MDM) that says "small mark on cheek", then an A08 carrying a safeguarding alert. The
    store holds a bruise finding on the cheek and an active flag. (Which Tasks they raise is
    the rules' business and is tested with them.)"""
    db = f"sqlite:///{tmp_path / 'cheek.db'}"
    run = subprocess.run(
        [sys.executable, "-m", "adapters.cli", "replay", str(FIXTURES / "cheek-mark"), "--db", db],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""  # every message accepted and processed
    store = open_store(db)
    try:
        with store.begin() as uow:
            states = uow.connection.exec_driver_sql("select state from inbox").fetchall()
            token = "https://fhir.nhs.uk/Id/nhs-number|9990000107"
            key = uow.patients_for([token])[token]
            stored = uow.facts(key)
    finally:
        store.close()
    assert [s for (s,) in states] == ["processed"] * 3
    facts = {f.key: f.data for f in stored}
    finding = facts["finding:DOC-0000201:bruise"]
    assert {k: finding[k] for k in ("concept", "words", "region", "source", "enc", "note")} == {
        "concept": "bruise",
        "words": "mark",
        "region": "cheek",
        "source": "triage note",
        "enc": "V0201",
        "note": "DOC-0000201",
    }
    assert finding["at"] == epoch(datetime(2026, 3, 16, 10, 15, tzinfo=TZ))  # TXA-4
    flag = facts["flag:SAFEGUARDING-1"]
    assert (flag["active"], flag["category"]) == (1, "CIN")
    assert flag["at"] == epoch(datetime(2026, 3, 16, 10, 35, tzinfo=TZ))  # OBX-14
    memory = dict(working_memory(stored, datetime(2026, 3, 16, 11, 0, tzinfo=TZ), TZ))
    assert memory["finding:DOC-0000201:bruise"]["age_days"] == 70  # 10 weeks old
    assert memory["patient"]["unmatched"] == 0
