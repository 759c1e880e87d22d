"""Synthetic HL7 v2.5 traffic: determinism, order, well-formedness (hl7apy), valid NHS numbers,
the configured shares and timings, and daylight-saving changes.

The shares are checked against a fixed seed with tolerances of about four standard deviations,
so they would hold for other seeds too.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from functools import cache
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters import synth
from adapters.synth import (
    INTERNAL_TRANSFER_DISPOSITION,
    SynthConfig,
    nhs_check_digit,
    synth_messages,
    synth_to_file,
)

LONDON = ZoneInfo("Europe/London")

# --- a tiny ER7 reader, independent of the generator ------------------------------------------


def unescape(text: str) -> str:
    out = []
    i = 0
    codes = {"E": "\\", "F": "|", "S": "^", "T": "&", "R": "~"}
    while i < len(text):
        if text[i] == "\\":
            end = text.index("\\", i + 1)
            out.append(codes[text[i + 1 : end]])
            i = end + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


class Msg:
    """Segments by name; field n of a segment is `seg[n]` (MSH counted as HL7 counts it)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.segments: list[list[str]] = []
        for raw in text.split("\r"):
            fields = raw.split("|")
            if fields[0] == "MSH":
                fields = ["MSH", "|", *fields[1:]]
            self.segments.append(fields)

    def all(self, name: str) -> list[list[str]]:
        return [s for s in self.segments if s[0] == name]

    def one(self, name: str) -> list[str] | None:
        found = self.all(name)
        assert len(found) <= 1, name
        return found[0] if found else None

    def get(self, name: str, n: int) -> str:
        seg = self.one(name)
        assert seg is not None, f"no {name} in {self.kind}"
        return seg[n] if n < len(seg) else ""

    @property
    def kind(self) -> str:
        return "^".join(self.get("MSH", 9).split("^")[:2])


def hl7_time(text: str) -> datetime:
    return datetime.strptime(text, "%Y%m%d%H%M%S").replace(tzinfo=LONDON)


def local_text(t: datetime) -> str:
    return t.strftime("%Y%m%d%H%M%S")


def is_valid_nhs_number(value: str) -> bool:
    """Modulus 11, written out independently of the generator."""
    if len(value) != 10 or not value.isdigit():
        return False
    total = sum(int(value[i]) * (10 - i) for i in range(9))
    check = 11 - total % 11
    if check == 11:
        check = 0
    return check != 10 and check == int(value[9])


def months_between(born: date, on: date) -> int:
    months = (on.year - born.year) * 12 + on.month - born.month
    return months - 1 if on.day < born.day else months


@cache
def generate(config: SynthConfig) -> tuple[tuple[datetime, str], ...]:
    return tuple(synth_messages(config))


# --- a view of a whole stream: visits, orders and their times ---------------------------------


@dataclass
class OrderView:
    visit: str
    ordered: datetime
    cancelled: datetime | None = None
    prelims: list[datetime] = field(default_factory=list)
    finals: list[datetime] = field(default_factory=list)
    exam: datetime | None = None
    final_flags: set[str] = field(default_factory=set)
    prelim_flags: set[str] = field(default_factory=set)
    final_without_pv1: int = 0


@dataclass
class Stream:
    messages: list[tuple[datetime, Msg]]
    registered: dict[str, datetime] = field(default_factory=dict)  # ED visit -> A04
    discharged: dict[str, datetime] = field(default_factory=dict)  # visit -> A03 PV1-45
    visit_mrn: dict[str, str] = field(default_factory=dict)
    visit_class: dict[str, str] = field(default_factory=dict)
    dispositions: Counter[str] = field(default_factory=Counter)
    admissions: list[tuple[str, datetime]] = field(default_factory=list)  # (MRN, A01 time)
    orders: dict[str, OrderView] = field(default_factory=dict)  # by placer
    infants_at_visit: int = 0
    patients: dict[str, bool] = field(default_factory=dict)  # MRN -> has NHS number


def mrn_of(msg: Msg) -> str:
    for rep in msg.get("PID", 3).split("~"):
        parts = rep.split("^")
        if parts[4] == "MR":
            return parts[0]
    raise AssertionError("no MRN")


def read_stream(config: SynthConfig) -> Stream:
    s = Stream([(t, Msg(text)) for t, text in generate(config)])
    for t, m in s.messages:
        kind = m.kind
        pv1 = m.one("PV1")
        visit = pv1[19].split("^")[0] if pv1 else ""
        if kind.startswith("ADT"):
            mrn = mrn_of(m)
            ids = m.get("PID", 3)
            s.patients[mrn] = s.patients.get(mrn, False) or "^NHS^NH" in ids
            s.visit_mrn[visit] = mrn
            s.visit_class[visit] = m.get("PV1", 2)
        if kind == "ADT^A04":
            s.registered[visit] = t
            born = datetime.strptime(m.get("PID", 7)[:8], "%Y%m%d").date()
            if months_between(born, t.date()) < 24:
                s.infants_at_visit += 1
        elif kind == "ADT^A03":
            s.discharged[visit] = hl7_time(m.get("PV1", 45))
            if m.get("PV1", 2) == "E":
                s.dispositions[m.get("PV1", 36)] += 1
        elif kind == "ADT^A01":
            s.admissions.append((mrn_of(m), t))
        elif kind == "ORM^O01":
            placer = m.get("ORC", 2)
            if m.get("ORC", 1) == "NW":
                s.orders[placer] = OrderView(visit, hl7_time(m.get("ORC", 9)))
            else:
                assert m.get("ORC", 1) == "CA"
                s.orders[placer].cancelled = t
        elif kind == "ORU^R01":
            o = s.orders[m.get("OBR", 2)]
            flags = {obx[8] for obx in m.all("OBX")}
            o.exam = hl7_time(m.get("OBR", 7))
            if m.get("OBR", 25) == "P":
                o.prelims.append(t)
                o.prelim_flags |= flags
            else:
                assert m.get("OBR", 25) == "F"
                o.finals.append(t)
                o.final_flags |= flags
                o.final_without_pv1 += pv1 is None
    return s


SMALL = SynthConfig(patients=30)
LARGE = SynthConfig(patients=2000, seed=7)


# --- tests -------------------------------------------------------------------------------------


def test_same_config_gives_identical_output_and_another_seed_does_not() -> None:
    config = SynthConfig(patients=150, seed=3)
    first = list(synth_messages(config))
    assert first == list(synth_messages(config))
    assert first != list(synth_messages(SynthConfig(patients=150, seed=4)))


def test_event_times_are_aware_non_decreasing_and_match_the_message() -> None:
    messages = generate(LARGE)
    times = [t for t, _ in messages]
    assert all(t.tzinfo is not None for t in times)
    assert times == sorted(times)
    for t, text in messages:
        m = Msg(text)
        if m.kind.startswith("ADT"):
            assert m.get("EVN", 6) == local_text(t)
            assert m.get("EVN", 1) == m.kind[-3:]
            assert local_text(t) <= m.get("EVN", 2) <= m.get("MSH", 7)
        elif m.kind == "ORM^O01":
            assert m.get("ORC", 9) == local_text(t)
        else:
            assert m.get("OBR", 22) == local_text(t)
        lag = hl7_time(m.get("MSH", 7)) - hl7_time(local_text(t))
        assert timedelta(seconds=1) <= lag <= timedelta(seconds=5)


def test_header_fields() -> None:
    controls = []
    for _, text in generate(LARGE):
        m = Msg(text)
        msh = m.segments[0]
        assert msh[:7] == ["MSH", "|", "^~\\&", msh[3], "RX1", "SAFETYNET", "RX1"]
        assert msh[3] == ("PAS" if m.kind.startswith("ADT") else "RIS")
        assert msh[11] == "P" and msh[12] == "2.5"
        assert msh[15:17] in ([], [""], ["", ""])  # MSH-15/16 empty: original-mode ACKs
        controls.append(msh[10])
        assert "\n" not in text and text.count("\r") == len(m.segments) - 1
    assert len(set(controls)) == len(controls)


def test_every_message_parses_with_hl7apy() -> None:
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.parser import parse_message

    structures = {"ADT^A04": "ADT_A01", "ADT^A01": "ADT_A01", "ADT^A03": "ADT_A03"}
    structures |= {"ORM^O01": "ORM_O01", "ORU^R01": "ORU_R01"}
    kinds: Counter[str] = Counter()
    for _, text in generate(SMALL):
        m = Msg(text)
        parsed = parse_message(text, find_groups=False)
        assert parsed.name == structures[m.kind]
        assert [s.name for s in parsed.children] == [s[0] for s in m.segments]
        assert parsed.msh.msh_10.value == m.get("MSH", 10)
        # Strict structure and field validation. hl7apy's validator treats the ORM_O01 choice
        # group (OBR|RQD|RQ1|RXO|ODS|ODT) as a sequence and always fails it (crs4/hl7apy#151).
        strict = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT)
        if m.kind != "ORM^O01":
            assert strict.validate()
        kinds[m.kind] += 1
    assert set(kinds) == {"ADT^A04", "ADT^A03", "ORM^O01", "ORU^R01"} | ({"ADT^A01"} & set(kinds))


def test_hl7apy_reads_identifiers_clinicians_and_escaped_text() -> None:
    from hl7apy.parser import parse_message

    report = next(
        text
        for _, text in generate(LARGE)
        if text.startswith("MSH|^~\\&|RIS") and "\\T\\" in text and "|F|" in text
    )
    parsed = parse_message(report, find_groups=False)
    pid3 = parsed.pid.pid_3
    assert pid3[0].cx_5.value == "MR" and pid3[0].cx_4.to_er7() == "RX1"
    ordering = parsed.orc.orc_12
    assert ordering.xcn_1.value.startswith("C") and ordering.xcn_9.to_er7() == "GMC"
    assert ordering.xcn_6.value == "Dr"
    interpreter = parsed.obr.obr_32.to_er7()
    assert interpreter.count("&") == 8 and interpreter.endswith("&GMC")
    texts = [unescape(obx.obx_5.to_er7()) for obx in parsed.children if obx.name == "OBX"]
    assert any("&" in t for t in texts)
    assert texts[0].startswith("FINAL REPORT, verified by Dr ")


def test_escape_covers_every_delimiter() -> None:
    raw = r"a|b^c~d\e&f"
    escaped = synth._escape(raw)
    assert not set("|^~&") & set(escaped)
    assert unescape(escaped) == raw
    assert synth._escape("line\r\nbreak") == "line  break"


def test_nhs_numbers_are_valid_test_range_and_unique_per_patient() -> None:
    assert nhs_check_digit("943476591") == 9  # NHS Digital's published example 943 476 5919
    by_mrn: dict[str, str] = {}
    for _, text in generate(LARGE):
        m = Msg(text)
        pid = m.one("PID")
        assert pid is not None
        reps = [r.split("^") for r in pid[3].split("~")]
        assert reps[0][3:5] == ["RX1", "MR"]
        for rep in reps[1:]:
            assert rep[3:5] == ["NHS", "NH"]
            assert rep[0].startswith("999") and is_valid_nhs_number(rep[0]), rep[0]
            assert by_mrn.setdefault(reps[0][0], rep[0]) == rep[0]
    assert len(set(by_mrn.values())) == len(by_mrn)


def test_check_digit_rejects_remainder_ten() -> None:
    candidates = (f"999{n:06d}" for n in range(200))
    rejected = [c for c in candidates if nhs_check_digit(c) is None]
    assert rejected, "some nine-digit prefixes must have no valid check digit"
    assert not any(is_valid_nhs_number(c + str(d)) for c in rejected for d in range(10))


def test_patients_look_synthetic_and_ages_fit() -> None:
    s = read_stream(LARGE)
    for t, m in s.messages:
        if m.kind != "ADT^A04":
            continue
        family, given_name = m.get("PID", 5).split("^")[:2]
        assert family in synth._SURNAMES
        assert given_name in synth._GIVEN_FEMALE + synth._GIVEN_MALE
        assert m.get("PID", 8) in ("F", "M")
        dob = m.get("PID", 7)
        born = datetime.strptime(dob[:8], "%Y%m%d").date()
        months = months_between(born, t.date())
        if len(dob) == 12:  # infants carry a time of birth
            age = t - datetime.strptime(dob, "%Y%m%d%H%M").replace(tzinfo=LONDON)
            assert age >= timedelta(days=1) and months < 24
        else:
            assert 24 <= months <= 90 * 12
        location = m.get("PV1", 3).split("^")[0]
        assert location == ("PAEDED" if months < 16 * 12 else "ED")
        assert m.get("PV1", 2) == "E"
        assert m.get("PV1", 7).endswith("^^^Dr^^^GMC")


def test_shares_roughly_hold() -> None:
    s = read_stream(LARGE)
    visits = len(s.registered)
    assert visits == LARGE.patients

    assert abs(s.infants_at_visit / visits - LARGE.infant_share) < 0.03

    imaging_visits = {o.visit for o in s.orders.values()}
    assert abs(len(imaging_visits) / visits - LARGE.imaging_share) < 0.045

    cancelled = [o for o in s.orders.values() if o.cancelled]
    assert abs(len(cancelled) / len(s.orders) - LARGE.cancel_share) < 0.02

    live = [o for o in s.orders.values() if not o.cancelled]
    after = [o for o in live if o.finals[0] > s.discharged[o.visit]]
    assert abs(len(after) / len(live) - LARGE.pending_at_discharge_share) < 0.05

    ed_discharges = [(v, t) for v, t in s.discharged.items() if s.visit_class[v] == "E"]
    readmitted = [
        v
        for v, t in ed_discharges
        if any(
            mrn == s.visit_mrn[v] and t < at <= t + timedelta(minutes=10)
            for mrn, at in s.admissions
        )
    ]
    assert len(readmitted) == len(s.admissions)
    assert abs(len(readmitted) / len(ed_discharges) - LARGE.readmit_share) < 0.02

    with_nhs = sum(s.patients.values())
    assert abs(with_nhs / len(s.patients) - LARGE.nhs_number_share) < 0.04
    assert len(s.patients) < visits  # some patients came back

    without_pv1 = sum(o.final_without_pv1 for o in live)
    assert 0.02 < without_pv1 / len(live) < 0.09

    discrepant = [o for o in live if o.prelim_flags == {"N"} and o.final_flags == {"A"}]
    assert 0.02 < len(discrepant) / len(live) < 0.12

    assert set(s.dispositions) == {"01", "02", INTERNAL_TRANSFER_DISPOSITION}
    assert s.dispositions["01"] / len(ed_discharges) > 0.9


def test_timings_are_realistic() -> None:
    s = read_stream(LARGE)
    for visit, registered in s.registered.items():
        stay = s.discharged[visit] - registered
        assert timedelta(hours=1) <= stay <= timedelta(hours=6)
    for o in s.orders.values():
        assert s.registered[o.visit] < o.ordered < s.discharged[o.visit]
        if o.cancelled:
            assert not o.prelims and not o.finals
            assert o.cancelled - o.ordered < timedelta(minutes=20)
            continue
        assert len(o.prelims) == 1 and len(o.finals) == 1
        prelim, final = o.prelims[0], o.finals[0]
        assert o.exam is not None and o.ordered < o.exam < prelim
        assert timedelta(minutes=20) <= prelim - o.ordered <= timedelta(minutes=90)
        assert timedelta(hours=1) <= final - o.ordered <= timedelta(hours=48)
        assert prelim < final and prelim < s.discharged[o.visit]
        assert final != s.discharged[o.visit]
        assert o.prelim_flags in ({"N"}, {"A"}) and o.final_flags in ({"N"}, {"A"})
    for mrn, admitted in s.admissions:
        inpatient = [v for v, m in s.visit_mrn.items() if m == mrn and s.visit_class[v] == "I"]
        assert any(s.discharged[v] > admitted for v in inpatient)


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_pending_share_extremes(share: float) -> None:
    config = SynthConfig(patients=200, seed=11, pending_at_discharge_share=share)
    s = read_stream(config)
    live = [o for o in s.orders.values() if not o.cancelled]
    assert live
    assert all((o.finals[0] > s.discharged[o.visit]) == (share == 1.0) for o in live)


@pytest.mark.parametrize(
    "start",
    [datetime(2026, 3, 28, 12, 0, tzinfo=LONDON), datetime(2026, 10, 24, 12, 0, tzinfo=LONDON)],
    ids=["spring-forward", "fall-back"],
)
def test_daylight_saving_changes(start: datetime) -> None:
    messages = list(synth_messages(SynthConfig(patients=400, days=2, start=start, seed=5)))
    instants = [t.timestamp() for t, _ in messages]
    assert instants == sorted(instants)
    offsets = {t.utcoffset() for t, _ in messages}
    assert offsets == {timedelta(0), timedelta(hours=1)}
    for t, text in messages:
        assert t.tzinfo is start.tzinfo
        assert local_text(t) in text


def test_ten_thousand_messages_stream() -> None:
    # Generation speed is a benchmark, not a test; this only shows 10k messages stream through.
    config = SynthConfig(patients=2600, seed=2)
    ten_thousand = list(itertools.islice(synth_messages(config), 10_000))
    assert len(ten_thousand) == 10_000


def test_synth_to_file(tmp_path: Path) -> None:
    path = tmp_path / "synth.hl7"
    count = synth_to_file(SMALL, path)
    data = path.read_bytes().decode("ascii")
    lines = data.split("\n")
    assert lines[-1] == "" and len(lines) - 1 == count == len(generate(SMALL))
    assert lines[:-1] == [text for _, text in generate(SMALL)]


def test_empty_config() -> None:
    assert list(synth_messages(SynthConfig(patients=0))) == []


@pytest.mark.parametrize(
    "bad",
    [
        {"patients": -1},
        {"days": 0},
        {"infant_share": 1.5},
        {"cancel_share": -0.1},
        {"start": datetime(2026, 1, 5, 8, 0)},
        {"sending_facility": "R|X1"},
    ],
)
def test_config_is_checked(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SynthConfig(**bad)  # type: ignore[arg-type]


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    patients=st.integers(0, 12),
    infant=st.floats(0, 1),
    imaging=st.floats(0, 1),
    pending=st.floats(0, 1),
    readmit=st.floats(0, 1),
    cancel=st.floats(0, 1),
    nhs=st.floats(0, 1),
)
def test_invariants_hold_for_any_config(
    seed: int,
    patients: int,
    infant: float,
    imaging: float,
    pending: float,
    readmit: float,
    cancel: float,
    nhs: float,
) -> None:
    config = SynthConfig(
        patients=patients,
        seed=seed,
        days=0.5,
        infant_share=infant,
        imaging_share=imaging,
        pending_at_discharge_share=pending,
        readmit_share=readmit,
        cancel_share=cancel,
        nhs_number_share=nhs,
    )
    s = read_stream(config)
    times = [t for t, _ in s.messages]
    assert times == sorted(times)
    assert len(s.registered) == patients
    controls = [m.get("MSH", 10) for _, m in s.messages]
    assert len(set(controls)) == len(controls)
    for o in s.orders.values():
        assert o.cancelled or (o.ordered < o.prelims[0] < o.finals[0])
    for _, m in s.messages:
        for rep in m.get("PID", 3).split("~")[1:]:
            assert is_valid_nhs_number(rep.split("^")[0])
    by_visit: defaultdict[str, list[str]] = defaultdict(list)
    for _, m in s.messages:
        if m.kind.startswith("ADT"):
            by_visit[m.get("PV1", 19)].append(m.kind)
    assert all(kinds[-1] == "ADT^A03" and len(kinds) == 2 for kinds in by_visit.values())
