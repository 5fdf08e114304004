"""De-identified research export (PS3.15 Annex E Basic Profile): no Annex E attribute keeps
its value, pseudonyms and UIDs are consistent across an image series and its SEG, the options
do what they say, dciodvfy still accepts the output."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.dataset import FileDataset

from shared.dicom.deid import (
    ACTIONS,
    CLEAN_DESCRIPTORS,
    DESCRIPTORS,
    PROFILE,
    RETAIN_DATES,
    Deidentifier,
    Options,
    annex_e_survivors,
)
from shared.dicom.phantom import head_ct
from shared.dicom.seg import Algorithm, build_seg

KEY = b"k" * 32
PHI = {
    "PatientName": "DOE^JANE^Q",
    "PatientID": "MRN-4455667",
    "PatientBirthDate": "19610203",
    "OtherPatientIDs": "ALT-99887",
    "PatientAddress": "12 Elm Street, Springfield",
    "PatientTelephoneNumbers": "555-0199",
    "InstitutionName": "St Example Hospital",
    "InstitutionAddress": "1 Hospital Road",
    "ReferringPhysicianName": "WHO^DR",
    "OperatorsName": "TECH^TOM",
    "PerformingPhysicianName": "RAD^RITA",
    "StationName": "CT-ROOM-7",
    "DeviceSerialNumber": "SN-123456",
    "AccessionNumber": "ACC20260001",
    "StudyID": "S777",
    "StudyDescription": "CT HEAD for DOE JANE 20260101",
    "SeriesDescription": "Axial DOE MRN-4455667",
    "ImageComments": "call 5550199 re Jane",
    "PatientAge": "064Y",
}


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Dataset], Dataset]:
    """A real head CT series (phantom) with PHI in many Annex E attributes, a private tag
    and an overlay, and the SEG of its haemorrhage (highdicom, as the results stage makes)."""
    ph = head_ct(tmp_path_factory.mktemp("ph"), size=64, slices=8, bleed_ml=2.0)
    images = []
    for path in ph.files:
        ds = pydicom.dcmread(path)
        for name, value in PHI.items():
            setattr(ds, name, value)
        ds.add_new(0x00091010, "LO", "private vendor note DOE")
        ds.add_new(0x60004000, "LT", "overlay comment DOE")
        ds.AcquisitionDateTime = "20260101083000"
        images.append(ds)
    seg_bytes = build_seg(
        images,
        {"haemorrhage": ph.truth["haemorrhage"]},
        series_instance_uid=ph.series_instance_uid,
        revision=1,
        algorithm=Algorithm("radstream-test", "1.0"),
    )
    return images, pydicom.dcmread(io.BytesIO(seg_bytes))


def _strings(ds: Dataset) -> list[str]:
    out: list[str] = []
    for elem in ds.iterall():
        if elem.VR != "SQ" and elem.value is not None:
            out.append(str(elem.value))
    return out


def test_no_annex_e_attribute_keeps_its_value(study: tuple[list[Dataset], Dataset]) -> None:
    images, seg = study
    deid = Deidentifier(KEY)
    for original in [*images, seg]:
        out = deid.apply(original)
        assert annex_e_survivors(original, out) == []
        text = "\n".join(_strings(out)).upper()
        for value in PHI.values():  # not even inside another attribute
            assert value.upper() not in text, value
        assert "DOE" not in text and "20260101" not in text
        assert not any(elem.tag.is_private for elem in out.iterall())
        assert 0x60004000 not in out
        assert out.PatientIdentityRemoved == "YES"
        assert [c.CodeValue for c in out.DeidentificationMethodCodeSequence] == [PROFILE]
        assert out.LongitudinalTemporalInformationModified == "REMOVED"
        # a UID of the original survives nowhere (file meta included)
        originals = {str(e.value) for e in original.iterall() if e.VR == "UI"}
        mapped = set(deid.uids)
        for elem in [*out.iterall(), *out.file_meta]:
            if elem.VR == "UI":
                assert str(elem.value) not in mapped, elem.keyword
        assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
        assert out.SOPClassUID == original.SOPClassUID  # what it is stays
        assert originals & mapped  # it had identifying UIDs, now remapped
    assert len(ACTIONS) > 300  # the whole Table E.1-1, not a hand-picked list


def test_uids_and_pseudonyms_stay_consistent_across_the_series_and_its_seg(
    study: tuple[list[Dataset], Dataset],
) -> None:
    images, seg = study
    deid = Deidentifier(KEY)
    out_images = [deid.apply(ds) for ds in images]
    out_seg = Deidentifier(KEY).apply(seg)  # exported apart, same project key
    (series_uid,) = {ds.SeriesInstanceUID for ds in out_images}
    sops = {ds.SOPInstanceUID for ds in out_images}
    assert len(sops) == len(images)
    assert out_seg.StudyInstanceUID == out_images[0].StudyInstanceUID
    assert out_seg.FrameOfReferenceUID == out_images[0].FrameOfReferenceUID
    (ref_series,) = out_seg.ReferencedSeriesSequence
    assert ref_series.SeriesInstanceUID == series_uid
    referenced = {i.ReferencedSOPInstanceUID for i in ref_series.ReferencedInstanceSequence}
    assert referenced and referenced <= sops
    sources = {
        src.ReferencedSOPInstanceUID
        for frame in out_seg.PerFrameFunctionalGroupsSequence
        for der in frame.DerivationImageSequence
        for src in der.SourceImageSequence
    }
    assert sources and sources <= sops
    names = {str(ds.PatientName) for ds in [*out_images, out_seg]}
    ids = {ds.PatientID for ds in [*out_images, out_seg]}
    assert len(names) == 1 and names == ids and names.pop().startswith("RS-")
    # another project key: other UIDs and pseudonym (no linkage across projects)
    other = Deidentifier(b"o" * 32).apply(images[0])
    assert other.SOPInstanceUID != out_images[0].SOPInstanceUID
    assert other.PatientID != out_images[0].PatientID
    with pytest.raises(ValueError):
        Deidentifier(b"short")


def test_retain_dates_and_clean_descriptors_options(study: tuple[list[Dataset], Dataset]) -> None:
    images, _ = study
    original = images[0]
    basic = Deidentifier(KEY).apply(original)
    assert basic.StudyDate == "19000101" or basic.StudyDate in ("", None)
    assert "StudyDescription" not in basic or not basic.StudyDescription
    opts = Options(retain_dates=True, clean_descriptors=True)
    out = Deidentifier(KEY, opts).apply(original)
    assert out.StudyDate == original.StudyDate and out.StudyTime == original.StudyTime
    assert out.AcquisitionDateTime == original.AcquisitionDateTime
    assert out.LongitudinalTemporalInformationModified == "UNMODIFIED"
    codes = [c.CodeValue for c in out.DeidentificationMethodCodeSequence]
    assert codes == [PROFILE, CLEAN_DESCRIPTORS, RETAIN_DATES]
    # descriptors kept, cleaned of the names, IDs and numbers in them
    assert out.StudyDescription.startswith("CT HEAD")
    for name in ("StudyDescription", "SeriesDescription", "ImageComments"):
        value = str(out.get(name, "")).upper()
        assert "DOE" not in value and "JANE" not in value and "4455667" not in value, name
        assert "5550199" not in value and "20260101" not in value, name
    # everything else of the profile still applies
    assert out.get("PatientBirthDate") != PHI["PatientBirthDate"]  # not a timeline date
    assert out.InstitutionName != PHI["InstitutionName"]
    kept = annex_e_survivors(original, out, keep=lambda t: t in DESCRIPTORS or _temporal(t))
    assert kept == []


def _temporal(tag: int) -> bool:
    from pydicom import datadict

    try:
        return tag != 0x00100030 and datadict.dictionary_VR(tag) in ("DA", "DT", "TM")
    except KeyError:
        return False


def test_dciodvfy_accepts_the_deidentified_image_and_seg(
    study: tuple[list[Dataset], Dataset], tmp_path: Path
) -> None:
    if shutil.which("dciodvfy") is None:
        pytest.fail("dciodvfy not found: 'make setup' installs Debian's dicom3tools")
    images, seg = study
    deid = Deidentifier(KEY, Options(clean_descriptors=True))

    def errors(ds: Dataset, path: Path) -> list[str]:
        fd = FileDataset(str(path), ds, file_meta=ds.file_meta, preamble=b"\0" * 128)
        fd.save_as(path, enforce_file_format=True)
        check = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
        return [ln for ln in (check.stdout + check.stderr).splitlines() if ln.startswith("Error")]

    for name, ds in (("image", images[0]), ("seg", seg)):
        out = deid.apply(ds)
        path = tmp_path / f"{name}.dcm"
        # no error the original did not have (the phantom's own gaps are not ours to judge)
        assert set(errors(out, path)) <= set(errors(ds, tmp_path / f"{name}-original.dcm"))
        back = pydicom.dcmread(path)
        assert back.PatientIdentityRemoved == "YES"
        assert np.array_equal(back.pixel_array, ds.pixel_array)  # pixels untouched
