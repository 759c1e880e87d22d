"""Corpus invariants: every HL7 v2 file in ../shared/corpus/hl7v2 maps or is rejected with a
reason, and the outcome of each is pinned (golden). The corpus is read in place, never copied.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from adapters.bootstrap import build_replay_app
from adapters.errors import AdapterError
from adapters.hl7v2.er7 import Hl7ReadError, decode, read_message, split_messages

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus" / "hl7v2"
RULES = ROOT / "rules"

pytestmark = pytest.mark.skipif(
    not CORPUS.is_dir(), reason=f"corpus not found at {CORPUS} (CI has it beside the repo)"
)

# Per file, per message: "AA: <canonical events>" or "<ACK code>: <reason>".
EXPECTED = {
    "dcm4che/dcm4che_adt_a08_v251_veterinary.hl7": ["AA: PatientUpdated"],
    "dcm4che/dcm4che_adt_a40_v251_merge.hl7": ["AA: PatientsMerged"],
    "dcm4che/dcm4che_omg_o19_v251_eyecare.hl7": ["AR: message type OMG^O19 is not supported"],
    "dcm4che/dcm4che_omi_o23_v251_imaging_order.hl7": ["AA: ImagingOrdered ClinicalNote"],
    "dcm4che/dcm4che_orm_o01_v231_zds.hl7": ["AA: ImagingOrdered ClinicalNote"],
    # a bare CR inside the base64 PDF splits a segment
    "dcm4che/dcm4che_oru_r01_v251_pdf_report_ed.hl7": [
        "AE: segment 10 name 'A0K' is followed by 'J', not the field separator '|'"
    ],
    "dcm4che/dcm4che_oru_r01_v251_radiology_sr_findings.hl7": ["AA: ReportIssued"],
    "hapi-hl7v2/hapi_adt_a01_v24_uhn.hl7": ["AA: PatientAdmitted"],
    "hapi-hl7v2/hapi_adt_a01_v25_zpi_zsegment.hl7": ["AA: PatientAdmitted"],
    "hapi-hl7v2/hapi_adt_a03_v25_santer.hl7": ["AA: PatientDischarged"],
    "hapi-hl7v2/hapi_adt_a34_v231_merge.hl7": ["AR: ADT event A34 is not supported"],
    "hapi-hl7v2/hapi_orm_o01_v22_dmcoe_orc_nw_ct_biopsy.hl7": ["AA: ImagingOrdered"],
    "hapi-hl7v2/hapi_orm_o01_v22_dmcoe_orc_xr.hl7": ["AR: order control XR is not handled"],
    "hapi-hl7v2/hapi_orm_o01_v231_ris_orc_af.hl7": ["AR: order control AF is not handled"],
    # 16 digits with no decimal point: not an HL7 TS, and no OBR-22 to fall back on
    "hapi-hl7v2/hapi_oru_r01_v22_radis1_ct_chest.hl7": [
        "AE: MSH-7 is not an HL7 date/time: '1994050216163360'"
    ],
    "hapi-hl7v2/hapi_oru_r01_v24_three_encoding_chars_crlf.hl7": [
        "AR: MSH-9.1 (message type) 'ORU^R01' is not a 3-character code"
    ],
    "hapi-hl7v2/hapi_oru_v23_escape_sequences.hl7": ["AA: ReportIssued"],
    "hl7-v2-to-fhir-ig/v2tofhir_mdm_t02_v251_transcription.hl7": [
        "AR: MDM document type PN is not a radiology report"
    ],
    "hl7apy/hl7apy_adt_a01_v25_minimal.hl7": ["AA: PatientAdmitted"],
    "linuxforhealth-hl7v2-fhir/lfh_adt_a03_v26_mixed_cr_lf.hl7": ["AA: PatientDischarged"],
    "linuxforhealth-hl7v2-fhir/lfh_adt_a34_v23_evn_a40_mismatch.hl7": [
        "AR: MSH-10 (message control id) is missing"
    ],
    "linuxforhealth-hl7v2-fhir/lfh_adt_a40_v26_two_pid_mrg_pairs.hl7": [
        "AA: PatientsMerged PatientsMerged"
    ],
    "linuxforhealth-hl7v2-fhir/lfh_oru_r01_v26_imaging_report_multiline.hl7": ["AA: ReportIssued"],
    "microsoft-fhir-converter/ms_adt01_23.hl7": ["AA: PatientAdmitted"],
    "microsoft-fhir-converter/ms_adt04_28.hl7": ["AA: PatientRegistered"],
    "microsoft-fhir-converter/ms_adt_a01_01.hl7": ["AA: PatientAdmitted"],
    "microsoft-fhir-converter/ms_adt_a02_01.hl7": ["AA: PatientTransferred"],
    "microsoft-fhir-converter/ms_adt_a03_01.hl7": ["AA: PatientDischarged"],
    "microsoft-fhir-converter/ms_adt_a04_01.hl7": ["AA: PatientRegistered"],
    "microsoft-fhir-converter/ms_adt_a08_01.hl7": ["AA: PatientUpdated"],
    "microsoft-fhir-converter/ms_adt_a11_01.hl7": ["AA: AdmissionCancelled"],
    "microsoft-fhir-converter/ms_adt_a13_01.hl7": ["AA: DischargeCancelled"],
    "microsoft-fhir-converter/ms_adt_a40_02.hl7": ["AA: PatientsMerged PatientsMerged"],
    "microsoft-fhir-converter/ms_mdm_t02_01.hl7": ["AA: ReportIssued"],
    "microsoft-fhir-converter/ms_mdm_t02_03.hl7": [
        "AR: MDM document type DS is not a radiology report"
    ],
    "microsoft-fhir-converter/ms_omg_o19_02.hl7": ["AR: message type OMG^O19 is not supported"],
    "microsoft-fhir-converter/ms_orm_o01_01.hl7": ["AA: ImagingOrdered"],
    "microsoft-fhir-converter/ms_orm_o01_03.hl7": ["AA: ImagingOrdered ImagingOrdered"],
    "microsoft-fhir-converter/ms_orm_o01_05.hl7": ["AA: ImagingOrdered"],
    "microsoft-fhir-converter/ms_oru_r01_01.hl7": ["AA: ReportIssued"],
    "nextgen-connect/mirth_adt_a01_v23_minimal.hl7": ["AA: PatientAdmitted"],
    "nextgen-connect/mirth_orm_o01_v24_orc_xo_mri.hl7": [
        "AE: PID-7 is not an HL7 date/time: 'Aug 15, 1942'"
    ],
    # OBR broken inside a telephone number
    "node-hl7-complete/nodehl7_orm_o01_v23_epic_xray_ankle.hl7": [
        "AE: segment 7 name '886' is followed by '6', not the field separator '|'"
    ],
    "python-hl7/pyhl7_adt_a01_v23_cerner_nulls.hl7": ["AA: PatientAdmitted"],
    "python-hl7/pyhl7_batch_bhs_two_adt_a04.hl7": ["AA: PatientRegistered"] * 2,
    "python-hl7/pyhl7_file_fhs_bhs_two_batches_adt_a04.hl7": ["AA: PatientRegistered"] * 3,
}

FILES = sorted(CORPUS.rglob("*.hl7")) if CORPUS.is_dir() else []


def test_every_corpus_file_has_a_pinned_outcome() -> None:
    assert sorted(str(p.relative_to(CORPUS)) for p in FILES) == sorted(EXPECTED)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(CORPUS)))
def test_file_maps_or_is_rejected_with_a_reason(path: Path) -> None:
    app = build_replay_app("sqlite://", RULES)
    mapper = app.ingest._mapper
    outcomes = []
    with app.store.begin() as uow:
        for item in split_messages(decode(path.read_bytes())):
            if isinstance(item, Hl7ReadError):
                outcomes.append(f"{item.ack_code}: {item.reason}")
                continue
            # Through the whole ingest path too: never an exception, always an answer.
            result = app.ingest.ingest(uow, item, datetime.now(UTC), origin=str(path))
            assert result.ack_code in ("AA", "AE", "AR")
            assert result.ack_code == "AA" or result.reason
            try:
                events = mapper.events(read_message(item), datetime.now(UTC))
            except Hl7ReadError as exc:
                outcomes.append(f"{exc.ack_code}: {exc.reason}")
            except AdapterError as exc:
                outcomes.append(f"{exc.ack_code}: {exc.reason}")
            else:
                outcomes.append("AA: " + " ".join(type(e).__name__ for e in events))
    app.close()
    assert outcomes == EXPECTED[str(path.relative_to(CORPUS))]
