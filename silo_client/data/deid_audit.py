"""`silo data audit`: which identifying attributes a dataset's files carry.

Checks every usable file of a catalogued dataset against the attributes of the DICOM PS3.15
Annex E *Basic Application Level Confidentiality Profile* (table E.1-1; the action column is
the profile's: X remove, Z empty, D dummy, U new UID, combinations where the standard gives a
choice), counts files with private tags (the profile removes them) and tallies
BurnedInAnnotation (YES means identifying text may be in the pixels themselves).

The report holds counts and attribute names only, never values; it stays in the silo.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
from pydicom.datadict import tag_for_keyword

from silo_client.data.catalogue import Catalogue

__all__ = ["BASIC_PROFILE", "audit_dataset", "audit_files"]

#: keyword -> action of the PS3.15 basic profile (subset of table E.1-1 that occurs in images).
BASIC_PROFILE: dict[str, str] = {
    "AccessionNumber": "Z",
    "AcquisitionComments": "X",
    "AcquisitionDate": "X/Z",
    "AcquisitionDateTime": "X/D",
    "AcquisitionDeviceProcessingDescription": "X/D",
    "AcquisitionTime": "X/Z",
    "ActualHumanPerformersSequence": "X",
    "AdditionalPatientHistory": "X",
    "AdmissionID": "X",
    "AdmittingDiagnosesDescription": "X",
    "Allergies": "X",
    "BranchOfService": "X",
    "ContentCreatorName": "Z",
    "ContentDate": "Z/D",
    "ContentTime": "Z/D",
    "CountryOfResidence": "X",
    "DerivationDescription": "X",
    "DeviceSerialNumber": "X/Z/D",
    "DeviceUID": "U",
    "EthnicGroup": "X",
    "FrameOfReferenceUID": "U",
    "ImageComments": "X",
    "InstanceCreationDate": "X/D",
    "InstanceCreationTime": "X/Z/D",
    "InstanceCreatorUID": "U",
    "InstitutionAddress": "X",
    "InstitutionCodeSequence": "X/Z/D",
    "InstitutionName": "X/Z/D",
    "InstitutionalDepartmentName": "X",
    "IrradiationEventUID": "U",
    "IssuerOfPatientID": "X",
    "MedicalAlerts": "X",
    "MedicalRecordLocator": "X",
    "MilitaryRank": "X",
    "NameOfPhysiciansReadingStudy": "X",
    "Occupation": "X",
    "OperatorIdentificationSequence": "X",
    "OperatorsName": "X/Z/D",
    "OtherPatientIDsSequence": "X",
    "OtherPatientNames": "X",
    "PatientAddress": "X",
    "PatientAge": "X",
    "PatientBirthDate": "Z",
    "PatientBirthName": "X",
    "PatientBirthTime": "X",
    "PatientComments": "X",
    "PatientID": "Z",
    "PatientInsurancePlanCodeSequence": "X",
    "PatientMotherBirthName": "X",
    "PatientName": "Z",
    "PatientReligiousPreference": "X",
    "PatientSex": "Z",
    "PatientSize": "X",
    "PatientState": "X",
    "PatientTelephoneNumbers": "X",
    "PatientWeight": "X",
    "PerformedProcedureStepDescription": "X",
    "PerformedProcedureStepID": "X",
    "PerformedProcedureStepStartDate": "X",
    "PerformedProcedureStepStartTime": "X",
    "PerformingPhysicianName": "X",
    "PhysiciansOfRecord": "X",
    "PregnancyStatus": "X",
    "ProtocolName": "X/D",
    "ReferencedPatientSequence": "X",
    "ReferencedSOPInstanceUID": "U",
    "ReferencedStudySequence": "X/Z",
    "ReferringPhysicianAddress": "X",
    "ReferringPhysicianName": "Z",
    "ReferringPhysicianTelephoneNumbers": "X",
    "RegionOfResidence": "X",
    "RequestAttributesSequence": "X",
    "RequestedProcedureDescription": "X/Z",
    "RequestedProcedureID": "X",
    "RequestingPhysician": "X",
    "RequestingService": "X",
    "ResponsibleOrganization": "X",
    "ResponsiblePerson": "X",
    "SOPInstanceUID": "U",
    "SeriesDate": "X/D",
    "SeriesDescription": "X",
    "SeriesInstanceUID": "U",
    "SeriesTime": "X/D",
    "SmokingStatus": "X",
    "StationName": "X/Z/D",
    "StorageMediaFileSetUID": "U",
    "StudyDate": "Z",
    "StudyDescription": "X",
    "StudyID": "Z",
    "StudyInstanceUID": "U",
    "StudyTime": "Z",
    "TimezoneOffsetFromUTC": "X",
    "UID": "U",
    "VerifyingObserverName": "D",
}


def _tag_text(keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})" if tag is not None else "(?)"


def audit_files(paths: list[Path]) -> dict[str, Any]:
    """Count basic-profile attributes (non-empty), private tags and BurnedInAnnotation."""
    present: dict[str, int] = dict.fromkeys(BASIC_PROFILE, 0)
    burned = {"YES": 0, "NO": 0, "absent": 0}
    with_private = 0
    unreadable = 0
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception:
            unreadable += 1
            continue
        for keyword in BASIC_PROFILE:
            elem = ds.get(keyword)
            if elem is not None and str(elem).strip() not in ("", "[]"):
                present[keyword] += 1
        flag = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
        burned[flag if flag in ("YES", "NO") else "absent"] += 1
        if any(elem.tag.is_private for elem in ds.iterall()):
            with_private += 1
    attributes = [
        {"keyword": k, "tag": _tag_text(k), "action": BASIC_PROFILE[k], "files": n}
        for k, n in sorted(present.items(), key=lambda kv: (-kv[1], kv[0]))
        if n
    ]
    return {
        "files": len(paths) - unreadable,
        "unreadable": unreadable,
        "profile": "DICOM PS3.15 Annex E basic application level confidentiality profile",
        "attributes": attributes,
        "burned_in_annotation": burned,
        "files_with_private_tags": with_private,
    }


def audit_dataset(home_root: Path, name: str) -> dict[str, Any]:
    """Audit every usable file of catalogued dataset ``name`` of the silo home."""
    with Catalogue.of_home(home_root) as catalogue:
        record = catalogue.require(name)
        rows = catalogue.usable(name)
    root = Path(record.files_root)
    return {"name": name, **audit_files([root / r["path"] for r in rows])}
