"""Synthetic HL7 v2.5 (ER7) traffic: ED visits, imaging orders, reports and discharges.

For demos, tests and benchmarks. Every patient, clinician and identifier is invented: names are
obviously fake ("Testperson", "Dr Alpha Mockwell"), NHS numbers come from the 999 test range
(valid modulus-11 check digit), MRNs are `MRNnnnnnnnn`. Nothing here is drawn from real data.

One visit produces, in event-time order:

* ``ADT^A04`` ED registration (PV1-2 ``E``, PV1-3 ``PAEDED`` for under-16s, ``ED`` otherwise);
* for imaging visits, per order: ``ORM^O01`` (ORC-1 ``NW``), optionally ``ORM^O01`` ORC-1 ``CA``
  (cancelled before any result), else ``ORU^R01`` preliminary (OBR-25 ``P``), and
  ``ORU^R01`` final (OBR-25 ``F``) before or after the discharge;
* ``ADT^A03`` ED discharge (PV1-45, PV1-36 disposition);
* for a share of visits, ``ADT^A01`` admission of the same patient within 10 minutes of the ED
  discharge (a new inpatient visit number) and its own ``ADT^A03`` 12 hours to 5 days later.

Shares not in `SynthConfig` are module constants below. Generation is by string formatting, not
hl7apy (tens of thousands of messages per second); tests check the output against hl7apy.
Times are computed in whole seconds of UTC and written as local time (the zone of
`SynthConfig.start`) without an offset, so the text and the yielded datetimes always agree, also
across daylight-saving changes.
"""

from __future__ import annotations

import heapq
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from pathlib import Path
from zoneinfo import ZoneInfo

__all__ = [
    "DISCHARGE_HOME",
    "DISCHARGE_OTHER_HOSPITAL",
    "INTERNAL_TRANSFER_DISPOSITION",
    "SynthConfig",
    "nhs_check_digit",
    "synth_messages",
    "synth_to_file",
]

# PV1-36 discharge disposition (HL7 table 0112 is user-defined; each site maps its own codes).
DISCHARGE_HOME = "01"  # HL7 0112: discharged to home or self care
DISCHARGE_OTHER_HOSPITAL = "02"  # HL7 0112: transferred to another short-term general hospital
# PV1-36 (table 0112) is user-defined, so "admitted or transferred within this hospital" has no
# standard code. The synthetic site uses the local code "AW" (admitted to a ward), which
# rules/settings.toml lists under [discharge] internal_dispositions; a real site maps its own.
INTERNAL_TRANSFER_DISPOSITION = "AW"

INTERNAL_TRANSFER_SHARE = 0.03  # of ED discharges
OTHER_HOSPITAL_SHARE = 0.02  # of ED discharges
REVISIT_SHARE = 0.05  # of visits, by a patient seen earlier in the stream
SECOND_ORDER_SHARE = 0.15  # of imaging visits (besides CT head after an infant skeletal survey)
CT_HEAD_AFTER_SURVEY_SHARE = 0.5  # infant skeletal surveys with a CT head as well
DISCREPANCY_SHARE = 0.08  # normal preliminaries whose final is abnormal
OVERCALL_SHARE = 0.03  # abnormal preliminaries whose final is normal
FINAL_WITHOUT_PV1_SHARE = 0.05  # final ORUs with no PV1 (link by placer/filler only)
NON_MOBILE_SHARE = 0.5  # of infants: under 6 months

RECEIVING_APPLICATION = "SAFETYNET"
HL7_VERSION = "2.5"

_MINUTE = 60
_HOUR = 3600
_DAY = 86400

# Relative ED arrivals by local hour (quiet at night, busy from late morning to evening).
_ARRIVALS_BY_HOUR = (
    0.35, 0.30, 0.25, 0.22, 0.20, 0.22, 0.30, 0.45, 0.70, 0.90, 1.00, 1.00,
    1.00, 0.95, 0.95, 0.95, 0.95, 0.95, 0.95, 0.90, 0.85, 0.75, 0.60, 0.45,
)  # fmt: skip

_SURNAMES = (
    "Testperson", "Fakeley", "Samplesworth", "Mockridge", "Dummington", "Exampleton",
    "Placeholder", "Notarealname", "Synthson", "Fictionby", "Madeupson", "Trialby",
    "Demoford", "Pretendwell", "Specimen", "Stubbington", "Fixturely", "Pseudonymous",
    "Imaginary", "Inventedale",
)  # fmt: skip
_GIVEN_FEMALE = (
    "Testa", "Dema", "Sampla", "Fakira", "Mocka", "Stubbelle", "Dummina", "Examplia",
    "Fixie", "Triala",
)  # fmt: skip
_GIVEN_MALE = (
    "Testo", "Demo", "Samplo", "Fakeard", "Mockton", "Stubby", "Dummo", "Examplar",
    "Fixo", "Trialo",
)  # fmt: skip

_HL7_ESCAPES = str.maketrans(
    {"\\": "\\E\\", "|": "\\F\\", "^": "\\S\\", "&": "\\T\\", "~": "\\R\\", "\r": " ", "\n": " "}
)


def _escape(text: str) -> str:
    """Escape ER7 delimiters (default encoding characters) in free text."""
    return text.translate(_HL7_ESCAPES)


def nhs_check_digit(first_nine: str) -> int | None:
    """Modulus-11 check digit for the first nine digits of an NHS number.

    Returns None when the remainder gives 10: no valid NHS number has those nine digits.
    """
    total = sum(int(d) * w for d, w in zip(first_nine, range(10, 1, -1), strict=True))
    check = 11 - total % 11
    if check == 11:
        return 0
    if check == 10:
        return None
    return check


@dataclass(frozen=True)
class SynthConfig:
    """What to generate. Shares are probabilities per visit (or per order), not exact counts.

    `start` must be timezone-aware: its zone is the local time written into the messages.
    """

    patients: int = 1000  # number of visits (one patient per visit, some patients revisit)
    seed: int = 1
    start: datetime = datetime(2026, 1, 5, 8, 0, tzinfo=ZoneInfo("Europe/London"))
    days: float = 7.0  # visits spread over this period
    infant_share: float = 0.15  # share of patients under 24 months at visit
    imaging_share: float = 0.6  # share of visits with at least one imaging order
    # share of (not cancelled) imaging orders whose FINAL report comes after the discharge
    pending_at_discharge_share: float = 0.4
    # ED discharges followed within 10 minutes by an admission (A01) of the same patient
    readmit_share: float = 0.05
    cancel_share: float = 0.03  # orders cancelled (ORC-1 CA) before any result
    # patients with a valid NHS number (modulus 11) in PID-3 (^^^NHS^NH), besides the MRN
    nhs_number_share: float = 0.8
    sending_facility: str = "RX1"

    def __post_init__(self) -> None:
        if self.patients < 0:
            raise ValueError("patients must be >= 0")
        if not self.days > 0:
            raise ValueError("days must be > 0")
        if self.start.tzinfo is None or self.start.utcoffset() is None:
            raise ValueError("start must be timezone-aware")
        for name in (
            "infant_share",
            "imaging_share",
            "pending_at_discharge_share",
            "readmit_share",
            "cancel_share",
            "nhs_number_share",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {value}")
        if not self.sending_facility or any(c in self.sending_facility for c in "|^~\\&\r\n"):
            raise ValueError("sending_facility must be non-empty and free of HL7 delimiters")


@dataclass(frozen=True, slots=True)
class _Procedure:
    code: str
    name: str
    section: str  # OBR-24, table 0074
    indications: tuple[str, ...]
    views: str
    normal: tuple[str, ...]
    abnormal: tuple[tuple[str, ...], ...]  # alternative findings
    abnormal_share: float

    @property
    def obr4(self) -> str:
        return f"{self.code}^{_escape(self.name)}^LOCAL"


def _proc(
    code: str,
    name: str,
    section: str,
    indications: Sequence[str],
    views: str,
    normal: Sequence[str],
    abnormal: Sequence[Sequence[str]],
    abnormal_share: float,
) -> _Procedure:
    return _Procedure(
        code,
        name,
        section,
        tuple(indications),
        views,
        tuple(normal),
        tuple(tuple(a) for a in abnormal),
        abnormal_share,
    )


_SKELETAL_SURVEY = _proc(
    "XSKSU",
    "XR skeletal survey",
    "RAD",
    (
        "Bruise to left cheek noticed by parent",
        "Mark on right upper arm, cause unclear",
        "Reduced movement of left leg",
        "Irritable & crying on handling",
        "Unexplained swelling of right thigh",
    ),
    "Skeletal survey: AP & lateral views of the axial and appendicular skeleton.",
    ("No fracture or bony injury identified.",),
    (
        (
            "Healing fractures of the left posterior 5th to 7th ribs with callus formation.",
            "Metaphyseal corner fracture of the distal right femur.",
            "Multiple fractures of differing ages, suspicious for non-accidental injury.",
        ),
        ("Classic metaphyseal lesion of the proximal left tibia.",),
    ),
    0.15,
)
_INFANT_CHEST = _proc(
    "XCHES",
    "XR chest",
    "RAD",
    ("Cough and fever for 3 days", "Noisy breathing", "Apnoeic episode at home"),
    "AP chest, supine.",
    ("Lungs clear. Heart size normal. No rib fracture seen.",),
    (
        ("Right upper lobe consolidation.",),
        ("Healing fracture of the right posterior 6th rib, incidental to the indication.",),
    ),
    0.25,
)
_INFANT_CT_HEAD = _proc(
    "CHEAD",
    "CT head",
    "CT",
    ("Fall from changing table", "Bulging fontanelle & vomiting", "Scalp swelling"),
    "CT head without contrast.",
    ("No intracranial haemorrhage. No skull fracture. Ventricles normal in size.",),
    (
        ("Thin left parietal subdural collection & linear left parietal skull fracture.",),
        ("Bilateral subdural collections of differing density.",),
    ),
    0.12,
)
_INFANT_US_ABDOMEN = _proc(
    "UABDO",
    "US abdomen",
    "RUS",
    ("Vomiting, ?intussusception", "Projectile vomiting", "Abdominal distension"),
    "Ultrasound abdomen.",
    ("Bowel loops unremarkable. No intussusception. No free fluid.",),
    (
        ("Target sign in the right upper quadrant: ileocolic intussusception.",),
        ("Pyloric muscle thickness ~4 mm & channel length 18 mm: pyloric stenosis.",),
    ),
    0.2,
)
_INFANT_FOREARM = _proc(
    "XFORE",
    "XR forearm",
    "RX",
    ("Not using right arm", "Swelling of left forearm after a fall from sofa"),
    "Forearm: AP & lateral.",
    ("No fracture. Normal alignment.",),
    (("Transverse fracture of the distal right radius & ulna.",),),
    0.2,
)
_CHEST = _proc(
    "XCHES",
    "XR chest",
    "RAD",
    ("Shortness of breath", "Cough and fever", "Chest pain", "Fall onto right side"),
    "PA chest.",
    ("Lungs clear. Heart size normal (CTR < 0.5). No effusion or pneumothorax.",),
    (
        ("Right lower lobe consolidation & small parapneumonic effusion.",),
        ("Left apical pneumothorax, rim ~2 cm.",),
        ("Undisplaced fractures of the right 7th & 8th ribs.",),
    ),
    0.3,
)
_CT_HEAD = _proc(
    "CHEAD",
    "CT head",
    "CT",
    ("Head injury, GCS 14", "Fall with head strike on anticoagulants", "Sudden headache"),
    "CT head without contrast.",
    ("No intracranial haemorrhage, mass or territorial infarct. No skull fracture.",),
    (
        ("Acute right frontal subdural haematoma, 6 mm, no midline shift.",),
        ("Small left frontal contusion. Undisplaced left frontal bone fracture.",),
    ),
    0.12,
)
_US_ABDOMEN = _proc(
    "UABDO",
    "US abdomen",
    "RUS",
    ("Right iliac fossa pain", "Right upper quadrant pain", "Abdominal pain & vomiting"),
    "Ultrasound abdomen.",
    ("Liver, spleen, kidneys & pancreas unremarkable. No free fluid.",),
    (
        ("Appendix non-compressible, ~8 mm diameter, with free fluid: acute appendicitis.",),
        ("Gallstones with a thickened gallbladder wall: acute cholecystitis.",),
    ),
    0.25,
)
_WRIST = _proc(
    "XWRIS",
    "XR wrist",
    "RX",
    ("Fall on outstretched hand", "Wrist pain after fall", "Anatomical snuffbox tenderness"),
    "Views: PA | lateral | scaphoid.",
    ("No fracture. Carpal alignment normal.",),
    (
        ("Buckle fracture of the distal radial metaphysis.",),
        ("Undisplaced fracture of the scaphoid waist.",),
    ),
    0.35,
)
_FOREARM = _proc(
    "XFORE",
    "XR forearm",
    "RX",
    ("Fall from climbing frame", "Forearm deformity after fall"),
    "Forearm: AP & lateral.",
    ("No fracture. Normal alignment.",),
    (("Greenstick fractures of the mid-shaft radius & ulna.",),),
    0.4,
)
_ANKLE = _proc(
    "XANKL",
    "XR ankle",
    "RX",
    ("Inversion injury, Ottawa rules positive", "Ankle swelling after fall"),
    "Ankle: AP, mortise & lateral.",
    ("No fracture. Ankle mortise congruent.",),
    (("Undisplaced fracture of the lateral malleolus below the syndesmosis (Weber A).",),),
    0.3,
)
_CT_CSPINE = _proc(
    "CCSPI",
    "CT cervical spine",
    "CT",
    ("High-speed road traffic collision", "Fall down stairs, neck pain"),
    "CT cervical spine.",
    ("No cervical spine fracture. Normal alignment C1 to T1.",),
    (("Undisplaced fracture of the C6 spinous process.",),),
    0.1,
)
_HIP = _proc(
    "XHIPS",
    "XR hip",
    "RX",
    ("Fall, unable to weight-bear", "Hip pain & shortened externally rotated leg"),
    "Pelvis AP & lateral hip.",
    ("No fracture. Joint spaces preserved.",),
    (("Displaced intracapsular fracture of the left neck of femur.",),),
    0.4,
)

_Weighted = tuple[tuple[_Procedure, ...], tuple[float, ...]]
_INFANT_PROCEDURES: _Weighted = (
    (_SKELETAL_SURVEY, _INFANT_CHEST, _INFANT_CT_HEAD, _INFANT_US_ABDOMEN, _INFANT_FOREARM),
    (0.35, 0.25, 0.15, 0.10, 0.15),
)
_CHILD_PROCEDURES: _Weighted = (
    (_WRIST, _FOREARM, _ANKLE, _CHEST, _CT_HEAD, _US_ABDOMEN),
    (0.25, 0.15, 0.15, 0.20, 0.10, 0.15),
)
_ADULT_PROCEDURES: _Weighted = (
    (_CHEST, _CT_HEAD, _WRIST, _ANKLE, _CT_CSPINE, _US_ABDOMEN, _HIP),
    (0.35, 0.20, 0.10, 0.10, 0.08, 0.10, 0.07),
)


@dataclass(frozen=True, slots=True)
class _Clinician:
    gmc: str
    family: str
    given: str

    @property
    def xcn(self) -> str:
        return f"C{self.gmc}^{self.family}^{self.given}^^^Dr^^^GMC"

    @property
    def cnn(self) -> str:
        # OBR-32 (NDL): the name is the first component, so its parts are sub-components.
        return f"C{self.gmc}&{self.family}&{self.given}&&&Dr&&&GMC"

    @property
    def display(self) -> str:
        return f"Dr {self.given} {self.family}"


def _staff(start: int, names: Sequence[tuple[str, str]]) -> tuple[_Clinician, ...]:
    return tuple(
        _Clinician(f"{(start + 7919 * i) % 10_000_000:07d}", family, given)
        for i, (family, given) in enumerate(names)
    )


_ED_DOCTORS = _staff(
    4100023,
    (("Mockwell", "Alpha"), ("Testdoc", "Bravo"), ("Syntheticus", "Charlie"),
     ("Fakesmith", "Delta"), ("Demoheart", "Echo"), ("Stubfield", "Foxtrot"),
     ("Samplebone", "Golf"), ("Placebo", "Hotel")),
)  # fmt: skip
_PAED_ED_DOCTORS = _staff(
    6200041,
    (("Fixtureby", "India"), ("Notadoctor", "Juliet"), ("Pretendley", "Kilo"),
     ("Madeupova", "Lima"), ("Testkins", "Mike"), ("Fauxley", "November")),
)  # fmt: skip
_REGISTRARS = _staff(
    7300057,
    (("Draftwell", "Oscar"), ("Provisional", "Papa"), ("Firstlook", "Quebec"),
     ("Initialby", "Romeo"), ("Earlyread", "Sierra")),
)  # fmt: skip
_RADIOLOGISTS = _staff(
    3500069,
    (("Finalson", "Tango"), ("Verifield", "Uniform"), ("Signoff", "Victor"),
     ("Reportwell", "Whiskey"), ("Lightbox", "Xray")),
)  # fmt: skip
_MEDICAL_CONSULTANTS = _staff(
    2900083,
    (("Wardley", "Yankee"), ("Bedsworth", "Zulu"), ("Roundsby", "Ada"), ("Admitson", "Basil")),
)  # fmt: skip
_PAED_CONSULTANTS = _staff(
    5600097,
    (("Cotsworth", "Cressida"), ("Nurseryfield", "Dorian"), ("Tinyton", "Eudora")),
)  # fmt: skip


@dataclass(slots=True)
class _Patient:
    mrn: str
    nhs_number: str | None
    family: str
    given: str
    sex: str
    birth: int  # epoch seconds
    free_at: int = 0  # not in hospital from this time on
    pid: str = ""


@dataclass(slots=True)
class _Visit:
    patient: _Patient
    number: str
    patient_class: str
    location: str  # PV1-3 (PL)
    service: str  # PV1-10, NHS treatment function code
    attending: _Clinician
    admit: int
    discharge: int = 0
    disposition: str = DISCHARGE_HOME
    pv1: str = ""  # PV1 without discharge fields, as sent while the visit is open


@dataclass(slots=True)
class _Order:
    visit: _Visit
    placer: str
    filler: str
    procedure: _Procedure
    indication: str
    ordering: _Clinician
    ordered: int
    cancelled: bool = False
    exam: int = 0
    prelim: int = 0
    final: int = 0
    prelim_abnormal: bool = False
    final_abnormal: bool = False
    findings: tuple[str, ...] = ()
    prelim_reporter: _Clinician | None = None
    final_reporter: _Clinician | None = None
    final_without_pv1: bool = False


@dataclass(slots=True)
class _Event:
    kind: str  # A04 A01 A03 O01NW O01CA R01P R01F
    lag: int  # MSH-7 is this many seconds after the event
    visit: _Visit
    order: _Order | None = None


@dataclass(slots=True)
class _Counters:
    mrn: int = 0
    visit: int = 0
    order: int = 0
    message: int = 0
    nhs_numbers: set[str] = field(default_factory=set)


class _Generator:
    """Plans visits (every random choice) and renders them (formatting only, no randomness)."""

    def __init__(self, config: SynthConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        tz = config.start.tzinfo
        assert tz is not None  # checked by SynthConfig
        self.tz: tzinfo = tz
        self.fac = config.sending_facility
        self.start = int(config.start.timestamp())
        self.counters = _Counters()
        self.patients: list[_Patient] = []
        self.heap: list[tuple[int, int, _Event]] = []
        self.seq = 0

    # --- formatting -------------------------------------------------------------------------
    def local(self, epoch: int) -> datetime:
        return datetime.fromtimestamp(epoch, self.tz)

    def ts(self, epoch: int) -> str:
        d = datetime.fromtimestamp(epoch, self.tz)
        return f"{d.year:04d}{d.month:02d}{d.day:02d}{d.hour:02d}{d.minute:02d}{d.second:02d}"

    # --- planning ---------------------------------------------------------------------------
    def arrival_times(self) -> list[int]:
        rng = self.rng
        span = self.config.days * _DAY
        times: list[int] = []
        while len(times) < self.config.patients:
            t = self.start + int(rng.random() * span)
            if rng.random() < _ARRIVALS_BY_HOUR[self.local(t).hour]:
                times.append(t)
        times.sort()
        return times

    def nhs_number(self) -> str:
        rng = self.rng
        while True:
            first_nine = f"999{rng.randrange(1_000_000):06d}"
            check = nhs_check_digit(first_nine)
            if check is None:
                continue
            number = f"{first_nine}{check}"
            if number not in self.counters.nhs_numbers:
                self.counters.nhs_numbers.add(number)
                return number

    def new_patient(self, arrival: int, infant: bool) -> _Patient:
        rng = self.rng
        c = self.config
        if infant:
            # 1 day to 23 months; half of infants under 6 months (non-independently mobile).
            if rng.random() < NON_MOBILE_SHARE:
                age = rng.randrange(_DAY, 182 * _DAY)
            else:
                age = rng.randrange(182 * _DAY, 700 * _DAY)
        elif rng.random() < 0.25:
            age = rng.randrange(732 * _DAY, 16 * 365 * _DAY)  # children, 2 to 15 years
        else:
            age = rng.randrange(16 * 365 * _DAY, 90 * 365 * _DAY)
        sex = "F" if rng.random() < 0.5 else "M"
        given = rng.choice(_GIVEN_FEMALE if sex == "F" else _GIVEN_MALE)
        self.counters.mrn += 1
        patient = _Patient(
            mrn=f"MRN{self.counters.mrn:08d}",
            nhs_number=self.nhs_number() if rng.random() < c.nhs_number_share else None,
            family=rng.choice(_SURNAMES),
            given=given,
            sex=sex,
            birth=arrival - age,
        )
        ids = f"{patient.mrn}^^^{self.fac}^MR"
        if patient.nhs_number is not None:
            ids += f"~{patient.nhs_number}^^^NHS^NH"
        born = self.local(patient.birth)
        # Infants keep the time of birth (neonatal ages count in hours); adults the date only.
        dob = f"{born:%Y%m%d%H%M}" if infant else f"{born:%Y%m%d}"
        patient.pid = (
            f"PID|1||{ids}||{_escape(patient.family)}^{_escape(patient.given)}^^^^^L||{dob}|{sex}"
        )
        self.patients.append(patient)
        return patient

    def choose_patient(self, arrival: int, infant: bool) -> _Patient:
        if self.patients and self.rng.random() < REVISIT_SHARE:
            for _ in range(4):
                p = self.rng.choice(self.patients)
                if p.free_at >= arrival:
                    continue  # still in hospital
                age = arrival - p.birth
                # Margins around 24 months so that any month-length convention agrees.
                if (infant and age < 729 * _DAY) or (not infant and age >= 732 * _DAY):
                    return p
        return self.new_patient(arrival, infant)

    def pv1(self, v: _Visit, discharged: bool) -> str:
        f = [""] * 46
        f[0] = "PV1"
        f[1] = "1"
        f[2] = v.patient_class
        f[3] = v.location
        f[4] = "E"  # admission type: emergency
        f[7] = v.attending.xcn
        f[10] = v.service
        if v.patient_class == "I":
            f[17] = v.attending.xcn
        f[19] = f"{v.number}^^^{self.fac}^VN"
        f[39] = self.fac
        f[44] = self.ts(v.admit)
        if discharged:
            f[36] = v.disposition
            f[45] = self.ts(v.discharge)
        return "|".join(f).rstrip("|")

    def push(self, epoch: int, kind: str, visit: _Visit, order: _Order | None = None) -> None:
        self.seq += 1
        event = _Event(kind, self.rng.randint(1, 5), visit, order)
        heapq.heappush(self.heap, (epoch, self.seq, event))

    def new_visit(self, patient: _Patient, cls: str, arrival: int, child: bool) -> _Visit:
        rng = self.rng
        self.counters.visit += 1
        if cls == "E":
            area = "PAEDED" if child else "ED"
            room = rng.choice(("RESUS", "MAJORS", "MINORS")) if not child else "PAEDS"
            location = f"{area}^{room}^^{self.fac}"
            service = "420" if child else "180"  # treatment functions: paediatrics, EM
            attending = rng.choice(_PAED_ED_DOCTORS if child else _ED_DOCTORS)
        else:
            ward = "PAEDWARD" if child else "AMU"
            location = f"{ward}^BAY{rng.randint(1, 6)}^{rng.randint(1, 8)}^{self.fac}"
            service = "420" if child else "300"  # paediatrics, general internal medicine
            attending = rng.choice(_PAED_CONSULTANTS if child else _MEDICAL_CONSULTANTS)
        visit = _Visit(
            patient,
            f"V{self.counters.visit:08d}",
            cls,
            location,
            service,
            attending,
            arrival,
        )
        visit.pv1 = self.pv1(visit, discharged=False)
        return visit

    def new_order(
        self, visit: _Visit, procedure: _Procedure, ordered: int, department: Sequence[_Clinician]
    ) -> _Order:
        rng = self.rng
        self.counters.order += 1
        n = self.counters.order
        ordering = visit.attending if rng.random() < 0.7 else rng.choice(department)
        return _Order(
            visit=visit,
            placer=f"ORD-{n:07d}^RIS",
            filler=f"ACC{4_000_000 + n:07d}^PACS",
            procedure=procedure,
            indication=rng.choice(procedure.indications),
            ordering=ordering,
            ordered=ordered,
        )

    def visit(self, arrival: int) -> None:
        rng = self.rng
        c = self.config
        infant = rng.random() < c.infant_share
        patient = self.choose_patient(arrival, infant)
        age = arrival - patient.birth
        child = age < 16 * 365 * _DAY
        visit = self.new_visit(patient, "E", arrival, child)
        self.push(arrival, "A04", visit)
        department = _PAED_ED_DOCTORS if child else _ED_DOCTORS

        # Orders.
        orders: list[_Order] = []
        if rng.random() < c.imaging_share:
            procs, weights = (
                _INFANT_PROCEDURES if infant else _CHILD_PROCEDURES if child else _ADULT_PROCEDURES
            )
            first = rng.choices(procs, weights)[0]
            chosen = [first]
            if first is _SKELETAL_SURVEY and rng.random() < CT_HEAD_AFTER_SURVEY_SHARE:
                chosen.append(_INFANT_CT_HEAD)
            elif rng.random() < SECOND_ORDER_SHARE:
                second = rng.choices(procs, weights)[0]
                if second is not first:
                    chosen.append(second)
            t = arrival + rng.randint(10 * _MINUTE, 40 * _MINUTE)
            for proc in chosen:
                orders.append(self.new_order(visit, proc, t, department))
                t += rng.randint(1 * _MINUTE, 30 * _MINUTE)

        # Cancellations, preliminaries; the stay must outlast every preliminary.
        discharge = arrival + rng.randint(1 * _HOUR, 6 * _HOUR)
        live: list[_Order] = []
        for o in orders:
            if rng.random() < c.cancel_share:
                o.cancelled = True
                o.exam = o.ordered + rng.randint(5 * _MINUTE, 19 * _MINUTE)  # cancel time
                continue
            o.prelim = o.ordered + rng.randint(20 * _MINUTE, 90 * _MINUTE)
            o.exam = o.ordered + rng.randint(5 * _MINUTE, o.prelim - o.ordered - 5 * _MINUTE)
            live.append(o)
        if live:
            last_prelim = max(o.prelim for o in live)
            if discharge <= last_prelim + _MINUTE:
                discharge = last_prelim + rng.randint(5 * _MINUTE, 30 * _MINUTE)
        # Finals: reported before the discharge (stretching the stay if needed) or after it.
        pending = [rng.random() < c.pending_at_discharge_share for _ in live]
        for o, is_pending in zip(live, pending, strict=True):
            if not is_pending:
                earliest = max(o.ordered + _HOUR, o.prelim + 5 * _MINUTE)
                if discharge < earliest + 2 * _MINUTE:
                    discharge = earliest + rng.randint(10 * _MINUTE, 60 * _MINUTE)
        for o, is_pending in zip(live, pending, strict=True):
            if is_pending:
                earliest = max(o.ordered + _HOUR, o.prelim + 5 * _MINUTE, discharge + _MINUTE)
                latest = o.ordered + 48 * _HOUR
                o.final = min(earliest + int(rng.expovariate(1 / (8 * _HOUR))), latest)
            else:
                earliest = max(o.ordered + _HOUR, o.prelim + 5 * _MINUTE)
                o.final = rng.randint(earliest, discharge - _MINUTE)
        visit.discharge = discharge

        for o in orders:
            self.push(o.ordered, "O01NW", visit, o)
            if o.cancelled:
                self.push(o.exam, "O01CA", visit, o)
                continue
            proc = o.procedure
            o.prelim_abnormal = rng.random() < proc.abnormal_share
            if o.prelim_abnormal:
                o.final_abnormal = rng.random() >= OVERCALL_SHARE
            else:
                o.final_abnormal = rng.random() < DISCREPANCY_SHARE
            o.findings = rng.choice(proc.abnormal)
            o.prelim_reporter = rng.choice(_REGISTRARS)
            o.final_reporter = rng.choice(_RADIOLOGISTS)
            o.final_without_pv1 = rng.random() < FINAL_WITHOUT_PV1_SHARE
            self.push(o.prelim, "R01P", visit, o)
            self.push(o.final, "R01F", visit, o)

        # Discharge, and possibly an admission of the same patient minutes later.
        roll = rng.random()
        if roll < INTERNAL_TRANSFER_SHARE:
            visit.disposition = INTERNAL_TRANSFER_DISPOSITION
        elif roll < INTERNAL_TRANSFER_SHARE + OTHER_HOSPITAL_SHARE:
            visit.disposition = DISCHARGE_OTHER_HOSPITAL
        self.push(discharge, "A03", visit)
        patient.free_at = discharge
        if rng.random() < c.readmit_share:
            admitted = discharge + rng.randint(1 * _MINUTE, 10 * _MINUTE)
            inpatient = self.new_visit(patient, "I", admitted, child)
            inpatient.discharge = admitted + rng.randint(12 * _HOUR, 5 * _DAY)
            self.push(admitted, "A01", inpatient)
            self.push(inpatient.discharge, "A03", inpatient)
            patient.free_at = inpatient.discharge

    # --- rendering --------------------------------------------------------------------------
    def msh(self, app: str, epoch: int, lag: int, kind: str) -> str:
        self.counters.message += 1
        control = f"SYN{self.config.seed}-{self.counters.message:08d}"
        return (
            f"MSH|^~\\&|{app}|{self.fac}|{RECEIVING_APPLICATION}|{self.fac}|"
            f"{self.ts(epoch + lag)}||{kind}|{control}|P|{HL7_VERSION}"
        )

    def render(self, epoch: int, e: _Event) -> str:
        kind = e.kind
        v = e.visit
        if kind in ("A04", "A01", "A03"):
            structure = "ADT_A03" if kind == "A03" else "ADT_A01"
            msh = self.msh("PAS", epoch, e.lag, f"ADT^{kind}^{structure}")
            evn = f"EVN|{kind}|{self.ts(epoch + e.lag - 1)}|||PASUSER|{self.ts(epoch)}"
            pv1 = self.pv1(v, discharged=True) if kind == "A03" else v.pv1
            return f"{msh}\r{evn}\r{v.patient.pid}\r{pv1}"
        o = e.order
        assert o is not None
        proc = o.procedure
        if kind in ("O01NW", "O01CA"):
            msh = self.msh("RIS", epoch, e.lag, "ORM^O01^ORM_O01")
            if kind == "O01NW":
                orc = f"ORC|NW|{o.placer}|{o.filler}||SC||||{self.ts(epoch)}|||{o.ordering.xcn}"
            else:
                orc = (
                    f"ORC|CA|{o.placer}|{o.filler}||CA||||{self.ts(epoch)}|||{o.ordering.xcn}"
                    "||||CANC^Cancelled by requesting clinician^LOCAL"
                )
            obr = (
                f"OBR|1|{o.placer}|{o.filler}|{proc.obr4}||{self.ts(o.ordered)}|||||||"
                f"{_escape(o.indication)}|||{o.ordering.xcn}||||||||{proc.section}"
            )
            return f"{msh}\r{v.patient.pid}\r{v.pv1}\r{orc}\r{obr}"

        final = kind == "R01F"
        status = "F" if final else "P"
        abnormal = o.final_abnormal if final else o.prelim_abnormal
        reporter = o.final_reporter if final else o.prelim_reporter
        assert reporter is not None
        msh = self.msh("RIS", epoch, e.lag, "ORU^R01^ORU_R01")
        orc = f"ORC|RE|{o.placer}|{o.filler}||{'CM' if final else 'A'}||||{self.ts(epoch)}"
        orc += f"|||{o.ordering.xcn}"
        obr = (
            f"OBR|1|{o.placer}|{o.filler}|{proc.obr4}||{self.ts(o.ordered)}|{self.ts(o.exam)}"
            f"||||||{_escape(o.indication)}|||{o.ordering.xcn}||||||{self.ts(epoch)}||"
            f"{proc.section}|{status}|||||||{reporter.cnn}"
        )
        lines = [
            ("FINAL REPORT, verified by " if final else "PRELIMINARY REPORT, by ")
            + reporter.display,
            f"Clinical details: {o.indication}",
            proc.views,
        ]
        lines.extend(o.findings if abnormal else proc.normal)
        if final and abnormal and not o.prelim_abnormal:
            lines.append("Addendum: these findings were not described on the preliminary report.")
        elif final and o.prelim_abnormal and not abnormal:
            lines.append("Addendum: on review the preliminary finding is not confirmed.")
        flag = "A" if abnormal else "N"
        exam = self.ts(o.exam)
        segments = [msh, v.patient.pid]
        if not (final and o.final_without_pv1):
            segments.append(v.pv1)
        segments.append(orc)
        segments.append(obr)
        for i, line in enumerate(lines, 1):
            segments.append(
                f"OBX|{i}|TX|{proc.code}-REP^{_escape(proc.name)} report^LOCAL|1|{_escape(line)}"
                f"|||{flag}|||{status}|||{exam}"
            )
        return "\r".join(segments)

    def drain(self, until: int | None) -> Iterator[tuple[datetime, str]]:
        heap = self.heap
        while heap and (until is None or heap[0][0] <= until):
            epoch, _, event = heapq.heappop(heap)
            yield self.local(epoch), self.render(epoch, event)

    def run(self) -> Iterator[tuple[datetime, str]]:
        # Every event of a visit is at or after its arrival, and arrivals come in order, so all
        # queued events up to the next arrival can be emitted: memory stays bounded.
        for arrival in self.arrival_times():
            yield from self.drain(arrival)
            self.visit(arrival)
        yield from self.drain(None)


def synth_messages(config: SynthConfig) -> Iterator[tuple[datetime, str]]:
    """Yields (event time, ER7 message text with '\\r' segment separators) in event-time order.

    Deterministic for a given config. The event time is timezone-aware, in the zone of
    `config.start`; it equals EVN-6 for ADT, ORC-9 for orders and OBR-22 for results (MSH-7 is
    1-5 seconds later). Not for load tests of parsing edge cases: the output is well-formed.
    """
    return _Generator(config).run()


def synth_to_file(config: SynthConfig, path: Path) -> int:
    """Writes the messages of `config` to `path`, one per line ('\\n'; segments by '\\r').

    Returns the number of messages written. Overwrites `path`.
    """
    count = 0
    with path.open("w", encoding="ascii", newline="") as out:
        for _, message in synth_messages(config):
            out.write(message + "\n")
            count += 1
    return count


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m adapters.synth OUT [--patients N] [--seed S] [--days D]``."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("out", type=Path)
    parser.add_argument("--patients", type=int, default=SynthConfig.patients)
    parser.add_argument("--seed", type=int, default=SynthConfig.seed)
    parser.add_argument("--days", type=float, default=SynthConfig.days)
    args = parser.parse_args(argv)
    config = SynthConfig(patients=args.patients, seed=args.seed, days=args.days)
    began = time.perf_counter()
    count = synth_to_file(config, args.out)
    elapsed = time.perf_counter() - began
    print(f"{count} messages to {args.out} in {elapsed:.2f} s ({count / elapsed:,.0f}/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
