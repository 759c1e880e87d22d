"""HL7 v2 -> canonical events (adapters.hl7v2.mapping), on small synthetic messages."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from adapters.errors import MappingError, UnsupportedMessage
from adapters.hl7v2.er7 import read_message
from adapters.hl7v2.mapping import Mapper, MappingSettings, parse_ts
from engine.events import (
    DischargeCancelled,
    ImagingOrdered,
    OrderCancelled,
    OrderChanged,
    PatientDischarged,
    PatientsMerged,
    ReportIssued,
)
from engine.identity import is_valid_nhs_number

TZ = ZoneInfo("Europe/London")
MAPPER = Mapper(MappingSettings(TZ, frozenset({"RAD"})))
NOW = datetime(2026, 1, 1, tzinfo=UTC)
PID = "PID|1||9990000018^^^NHS^NH~RX1000123^^^RX1^MR||Testbaby^Alex||20080313|M"


def seg(name: str, **fields: str) -> str:
    """A segment with the given fields by number, e.g. seg("PV1", f2="E", f45="2008...")."""
    numbered = {int(k[1:]): v for k, v in fields.items()}
    return "|".join([name, *(numbered.get(i, "") for i in range(1, max(numbered) + 1))])


def events(*segments: str) -> list:
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
