"""De-identification for research export: DICOM PS3.15 Annex E, Basic Application
Confidentiality Profile, with the Retain Longitudinal Temporal Information (Full Dates) and
Clean Descriptors options selectable. Pure: datasets in, datasets out.

* The attribute actions are Table E.1-1's (the ``dicom-anonymizer`` package's transcription of
  the current standard, ``dicomfields_2026c``); compound actions take the least destructive
  choice the standard allows (``Z/D`` → D, ``X/Z`` → Z, ``X/D`` → D, ``X/Z/D`` → D,
  ``X/Z/U*`` → U for UIDs, else Z), so that type 1 and 2 attributes stay present and the
  objects stay valid. Sequences are walked: every item gets the profile too.
* UIDs (action U) are replaced by ``2.25.<keyed hash>``: the same original UID always maps to
  the same new one under the same key, so an image series and its SEG exported apart still
  reference each other (Study, Series, SOP Instance, Frame of Reference, referenced UIDs).
* The patient is a pseudonym per study: ``RS-<keyed hash of the StudyInstanceUID>`` as
  Patient's Name and Patient ID, the same for every object of that study and that key.
* Private attributes, overlay data and comments are removed; Patient Identity Removed = YES,
  De-identification Method (Code Sequence) says which profile and options were applied.

The key is the research project's (a 0600 file the exporter keeps): without it nobody can
link a pseudonym or a new UID back to the original.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from dicomanonymizer.dicom_anonymization_databases import (  # type: ignore[import-untyped]
    dicomfields_2026c as table,
)
from pydicom import Dataset, datadict
from pydicom.dataelem import DataElement
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag

PROFILE = "113100"  # DCM: Basic Application Confidentiality Profile
RETAIN_DATES = "113106"  # Retain Longitudinal Temporal Information Full Dates Option
CLEAN_DESCRIPTORS = "113105"  # Clean Descriptors Option
_MEANINGS = {
    PROFILE: "Basic Application Confidentiality Profile",
    RETAIN_DATES: "Retain Longitudinal Temporal Information Full Dates Option",
    CLEAN_DESCRIPTORS: "Clean Descriptors Option",
}

# Descriptors the Clean Descriptors option keeps, cleaned (Table E.1-1 column "Clean Desc.")
DESCRIPTORS: frozenset[int] = frozenset(
    int(Tag(t))
    for t in (
        (0x0008, 0x1030),  # Study Description
        (0x0008, 0x103E),  # Series Description
        (0x0018, 0x1030),  # Protocol Name
        (0x0020, 0x4000),  # Image Comments
        (0x0008, 0x2111),  # Derivation Description
        (0x0040, 0x0254),  # Performed Procedure Step Description
        (0x0032, 0x1060),  # Requested Procedure Description
        (0x0018, 0x4000),  # Acquisition Comments
        (0x0070, 0x0081),  # Content Description
        (0x0062, 0x0006),  # Segment Description
        (0x0008, 0x4000),  # Identifying Comments
        (0x0010, 0x4000),  # Patient Comments
    )
)
_TEMPORAL_VRS = frozenset({"DA", "DT", "TM"})
# dates that identify the patient rather than the timeline: never retained by the option
_NOT_LONGITUDINAL = frozenset({0x00100030, 0x00100032})  # Patient's Birth Date, Birth Time
_DUMMY = {"DA": "19000101", "TM": "000000", "DT": "19000101000000", "AS": "000Y"}
PATIENT_NAME = 0x00100010
PATIENT_ID = 0x00100020
STUDY_UID = 0x0020000D


def _tags(name: str) -> frozenset[int]:
    """The tags of one action list; masked entries (``50xx``, ``60xx`` groups: curves and
    overlays) are handled by :func:`_is_overlay_or_curve`."""
    return frozenset(int(Tag(t)) for t in getattr(table, name) if len(t) == 2)


def _actions() -> dict[int, str]:
    """Tag → the action applied (one of D, Z, X, U) after resolving compound actions."""
    out: dict[int, str] = {}
    for name, action in (
        ("X_TAGS", "X"),
        ("D_TAGS", "D"),
        ("Z_TAGS", "Z"),
        ("U_TAGS", "U"),
        ("Z_D_TAGS", "D"),
        ("X_Z_TAGS", "Z"),
        ("X_D_TAGS", "D"),
        ("X_Z_D_TAGS", "D"),
        ("X_Z_U_STAR_TAGS", "U*"),
    ):
        for tag in _tags(name):
            out[tag] = action
    return out


ACTIONS: dict[int, str] = _actions()
"""Every attribute of Table E.1-1 (the Basic Profile) → its action."""


@dataclass(frozen=True)
class Options:
    retain_dates: bool = False  # Retain Longitudinal Temporal Information, Full Dates
    clean_descriptors: bool = False

    @property
    def codes(self) -> list[str]:
        out = [PROFILE]
        if self.clean_descriptors:
            out.append(CLEAN_DESCRIPTORS)
        if self.retain_dates:
            out.append(RETAIN_DATES)
        return out


@dataclass
class Deidentifier:
    """Applies the profile with a project key; ``uids`` records every original → new UID
    (kept in memory only, for checks; never written out)."""

    key: bytes
    options: Options = field(default_factory=Options)
    uids: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.key) < 16:
            raise ValueError("the pseudonymisation key must have at least 128 bits")

    def _mac(self, what: str, value: str) -> bytes:
        return hmac.new(self.key, f"{what}\x00{value}".encode(), hashlib.sha256).digest()

    def uid(self, original: str) -> str:
        """The new UID for ``original``: 2.25 + a 128-bit keyed hash (PS3.5 B.2)."""
        new = self.uids.get(original)
        if new is None:
            new = "2.25." + str(int.from_bytes(self._mac("uid", original)[:16], "big"))
            self.uids[original] = new
        return new

    def pseudonym(self, study_uid: str) -> str:
        """Patient's Name and ID for every object of ``study_uid``."""
        return "RS-" + self._mac("study", study_uid)[:8].hex().upper()

    # ---- the profile ----------------------------------------------------------------------
    def apply(self, ds: Dataset) -> Dataset:
        """A de-identified copy of ``ds`` (file meta included)."""
        out = Dataset()
        study = str(ds.get("StudyInstanceUID", ""))
        pseudonym = self.pseudonym(study)
        phi = _phi_strings(ds)
        self._walk(ds, out, pseudonym, phi)
        out.PatientIdentityRemoved = "YES"
        out.DeidentificationMethod = [_MEANINGS[c] for c in self.options.codes]  # LO, 1-n
        seq = []
        for code in self.options.codes:
            item = Dataset()
            item.CodeValue, item.CodingSchemeDesignator = code, "DCM"
            item.CodeMeaning = _MEANINGS[code]
            seq.append(item)
        out.DeidentificationMethodCodeSequence = Sequence(seq)
        out.LongitudinalTemporalInformationModified = (
            "UNMODIFIED" if self.options.retain_dates else "REMOVED"
        )
        meta = getattr(ds, "file_meta", None)
        if meta is not None:
            new_meta = type(meta)()
            for elem in meta:
                new_meta.add(DataElement(elem.tag, elem.VR, elem.value))
            if "MediaStorageSOPInstanceUID" in new_meta and "SOPInstanceUID" in out:
                new_meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
            new_meta.pop("SourceApplicationEntityTitle", None)
            out.file_meta = new_meta
        return out

    def _walk(self, src: Dataset, dst: Dataset, pseudonym: str, phi: set[str]) -> None:
        for elem in src:
            tag = int(elem.tag)
            if BaseTag(tag).is_private or _is_overlay_or_curve(tag):
                continue  # private attributes, overlay data/comments, curves: removed
            if tag in (PATIENT_NAME, PATIENT_ID):
                dst.add(DataElement(elem.tag, elem.VR, pseudonym))
                continue
            action = ACTIONS.get(tag)
            retained = (
                self.options.retain_dates
                and elem.VR in _TEMPORAL_VRS
                and tag not in _NOT_LONGITUDINAL
            )
            if action is None or retained:
                self._keep(elem, dst, pseudonym, phi)
                continue
            if self.options.clean_descriptors and tag in DESCRIPTORS and action != "U":
                dst.add(DataElement(elem.tag, elem.VR, _clean(elem.value, phi)))
                continue
            if action == "X":
                continue
            if action in ("U", "U*") and elem.VR == "UI":
                dst.add(DataElement(elem.tag, elem.VR, self._map_uids(elem.value)))
            elif elem.VR == "SQ":
                if action == "Z":
                    dst.add(DataElement(elem.tag, "SQ", Sequence([])))
                else:  # D on a sequence: its items, de-identified
                    self._keep(elem, dst, pseudonym, phi)
            elif action == "D":
                dst.add(DataElement(elem.tag, elem.VR, _dummy(elem.VR)))
            else:  # Z (and U* of a non-UID value)
                dst.add(DataElement(elem.tag, elem.VR, None))

    def _keep(self, elem: DataElement, dst: Dataset, pseudonym: str, phi: set[str]) -> None:
        if elem.VR == "SQ":
            items = []
            for item in elem.value:
                new = Dataset()
                self._walk(item, new, pseudonym, phi)
                items.append(new)
            dst.add(DataElement(elem.tag, "SQ", Sequence(items)))
        else:
            dst.add(DataElement(elem.tag, elem.VR, elem.value))

    def _map_uids(self, value: object) -> object:
        if value is None or value == "":
            return value
        if isinstance(value, str):
            return self.uid(value)
        return [self.uid(str(v)) for v in _iter(value)]


def _iter(value: object) -> Iterable[object]:
    return value if isinstance(value, list | tuple) else [value]  # pydicom MultiValue is a list


def _dummy(vr: str) -> object:
    if vr in _DUMMY:
        return _DUMMY[vr]
    if vr in ("US", "SS", "UL", "SL", "FL", "FD", "IS", "DS"):
        return 0
    if vr in ("OB", "OW", "OF", "OD", "OL", "UN"):
        return b""
    return "REMOVED"


def _is_overlay_or_curve(tag: int) -> bool:
    group, element = tag >> 16, tag & 0xFFFF
    if 0x5000 <= group <= 0x50FF and group % 2 == 0:
        return True  # curves (retired)
    return 0x6000 <= group <= 0x60FF and group % 2 == 0 and element in (0x3000, 0x4000)


def _phi_strings(ds: Dataset) -> set[str]:
    """Identifying strings of ``ds`` (values of Annex E attributes, name parts), for cleaning
    descriptors: a description that mentions them loses those words."""
    found: set[str] = set()

    def visit(d: Dataset) -> None:
        for elem in d:
            if elem.VR == "SQ":
                for item in elem.value:
                    visit(item)
            elif (
                int(elem.tag) in ACTIONS
                and int(elem.tag) not in DESCRIPTORS  # the text to clean, not what to remove
                and elem.VR not in ("UI", "DA", "TM", "DT")  # digit runs go anyway
                and elem.value
            ):
                for v in _iter(elem.value):
                    text = str(v)
                    found.add(text)
                    found.update(p for p in re.split(r"[\^ ,]+", text) if len(p) >= 3)

    visit(ds)
    return {s for s in found if len(s) >= 3}


_DIGITS = re.compile(r"\d{4,}")


def _clean(value: object, phi: set[str]) -> object:
    """A descriptor with the identifying words of its object and long digit runs (dates,
    IDs, phone numbers) removed."""

    def one(text: str) -> str:
        for s in sorted(phi, key=len, reverse=True):
            text = re.sub(re.escape(s), "", text, flags=re.IGNORECASE)
        text = _DIGITS.sub("", text)
        return re.sub(r"\s{2,}", " ", text).strip(" ^,-")

    if value is None:
        return None
    if isinstance(value, list | tuple):
        return [one(str(v)) for v in value]
    return one(str(value))


def annex_e_survivors(
    original: Dataset, exported: Dataset, *, keep: Callable[[int], bool] = lambda t: False
) -> list[str]:
    """Annex E attributes of ``original`` whose value is still in ``exported`` unchanged
    (top level and inside sequences, matched by tag wherever it sits), for tests and for
    ``radstream export --check``; ``keep`` exempts tags an option retains."""
    before: dict[int, set[str]] = {}
    after: dict[int, set[str]] = {}

    def collect(d: Dataset, into: dict[int, set[str]]) -> None:
        for elem in d:
            if elem.VR == "SQ":
                for item in elem.value:
                    collect(item, into)
            elif elem.value not in (None, "", b""):
                into.setdefault(int(elem.tag), set()).add(str(elem.value))

    collect(original, before)
    collect(exported, after)
    out = []
    for tag, values in before.items():
        if tag not in ACTIONS or keep(tag):
            continue
        same = values & after.get(tag, set())
        if same:
            out.append(f"{datadict.keyword_for_tag(tag) or hex(tag)} kept its value")
    return out


def to_part10(ds: Dataset) -> bytes:
    """A de-identified dataset (with its file meta) as Part 10 bytes."""
    import io

    from pydicom.dataset import FileDataset

    buf = io.BytesIO()
    fd = FileDataset("", ds, file_meta=ds.file_meta, preamble=b"\0" * 128)
    fd.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
