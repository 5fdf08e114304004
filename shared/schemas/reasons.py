"""Dead-letter reason codes: one closed set for every stage, the dead-letter topic and the
metrics (``radstream_deadletters_total{reason}``).

A :class:`Reason` is a ``StrEnum``: ``Reason.SCHEMA == "schema"``, so code may pass the plain
string. Every code any error type can carry is a member; ``tests/unit/test_reasons.py`` walks the
source and fails on a code that is not, and checks that the README, the dashboards and the alert
rules name members only. Adding a reason = adding a member here and a line to ``DESCRIPTIONS``.
"""

from __future__ import annotations

from enum import StrEnum, unique


@unique
class Reason(StrEnum):
    # the runtime: envelope and schema of the record itself
    EMPTY = "empty"
    MISSING_HEADER = "missing_header"
    INTEGRITY = "integrity"
    UNKNOWN_KEY = "unknown_key"
    SCHEMA = "schema"
    # the runtime: what the handler did
    RETRIES_EXHAUSTED = "retries_exhausted"
    HANDLER_ERROR = "handler_error"
    POISON = "poison"
    # ingest: the DICOM instance (shared/dicom/safe.py) and the series it claims
    TOO_LARGE = "too_large"
    NOT_DICOM = "not_dicom"
    MALFORMED = "malformed"
    SEQUENCE_TOO_DEEP = "sequence_too_deep"
    INFLATED_TOO_LARGE = "inflated_too_large"
    TOO_MANY_ELEMENTS = "too_many_elements"
    TOO_MANY_ITEMS = "too_many_items"
    UNSUPPORTED_TRANSFER_SYNTAX = "unsupported_transfer_syntax"
    MISSING_ATTRIBUTE = "missing_attribute"
    INVALID_UID = "invalid_uid"
    TRUNCATED = "truncated"
    PIXEL_SIZE_MISMATCH = "pixel_size_mismatch"
    PIXEL_SIZE_IMPLAUSIBLE = "pixel_size_implausible"
    CODESTREAM_MISMATCH = "codestream_mismatch"
    KEY_MISMATCH = "key_mismatch"
    SERIES_CONFLICT = "series_conflict"
    SERIES_TOO_LARGE = "series_too_large"
    # blob store (claim checks)
    BLOB_MISSING = "blob_missing"
    BLOB_INTEGRITY = "blob_integrity"
    # preprocess: pixels and geometry of the series
    NOT_AN_IMAGE = "not_an_image"
    UNDECODABLE = "undecodable"
    BAD_GEOMETRY = "bad_geometry"
    EMPTY_SERIES = "empty_series"
    MIXED_GEOMETRY = "mixed_geometry"
    DUPLICATE_SLICES = "duplicate_slices"
    INCONSISTENT_SPACING = "inconsistent_spacing"
    VOLUME_TOO_LARGE = "volume_too_large"
    MISSING_FUNCTIONAL_GROUPS = "missing_functional_groups"
    # delivery to the PACS
    UNSUPPORTED_OBJECT = "unsupported_object"
    # notifications (webhooks, FHIR, HL7 v2 over MLLP)
    NOTIFICATION_FAILED = "notification_failed"
    NOTIFICATION_REJECTED = "notification_rejected"
    # the gateway's DICOMweb STOW-RS endpoint: a part of a request
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    STUDY_MISMATCH = "study_mismatch"


DESCRIPTIONS: dict[Reason, str] = {
    Reason.EMPTY: "the record (or the DICOM instance in it) has no bytes",
    Reason.MISSING_HEADER: "the record lacks its rs-schema / rs-version headers",
    Reason.INTEGRITY: "envelope authentication failed: ciphertext, header or context altered",
    Reason.UNKNOWN_KEY: "the envelope names a key id the keyring does not hold",
    Reason.SCHEMA: "the record does not validate, or its schema version is unknown to the reader",
    Reason.RETRIES_EXHAUSTED: "a retriable error persisted through every retry",
    Reason.HANDLER_ERROR: "the handler raised an unexpected error (a bug; type and line logged)",
    Reason.POISON: "a diagnostic probe marked as poison (pass-through stage)",
    Reason.TOO_LARGE: "the instance exceeds the configured byte cap",
    Reason.NOT_DICOM: "no DICOM Part 10 preamble",
    Reason.MALFORMED: "the DICOM header or a value cannot be parsed",
    Reason.SEQUENCE_TOO_DEEP: "sequences nested deeper than the configured limit",
    Reason.INFLATED_TOO_LARGE: "a Deflated dataset inflates past the configured cap (a bomb)",
    Reason.TOO_MANY_ELEMENTS: "more data elements than the configured cap (a parser bomb)",
    Reason.TOO_MANY_ITEMS: "more sequence items or pixel fragments than the configured cap",
    Reason.UNSUPPORTED_TRANSFER_SYNTAX: "a transfer syntax the decoders do not support",
    Reason.MISSING_ATTRIBUTE: "a required attribute is missing",
    Reason.INVALID_UID: "a UID is not a valid DICOM UID",
    Reason.TRUNCATED: "pixel data shorter than its declared length",
    Reason.PIXEL_SIZE_MISMATCH: "pixel data length differs from what the geometry implies",
    Reason.PIXEL_SIZE_IMPLAUSIBLE: "the declared geometry implies an implausible pixel size",
    Reason.CODESTREAM_MISMATCH: "a compressed frame's own header disagrees with Rows/Columns/"
    "samples/bits (it would decode to another size)",
    Reason.KEY_MISMATCH: "the Kafka key is not the keyed hash of the record's series",
    Reason.SERIES_CONFLICT: "an instance names another study than its series",
    Reason.SERIES_TOO_LARGE: "the series passes the configured instance or byte cap (its "
    "instances are refused and nothing is published)",
    Reason.BLOB_MISSING: "a referenced blob is not in the blob store",
    Reason.BLOB_INTEGRITY: "a referenced blob fails authentication or its digest",
    Reason.NOT_AN_IMAGE: "an instance of the series has no pixel data",
    Reason.UNDECODABLE: "pixel data cannot be decoded",
    Reason.BAD_GEOMETRY: "orientation/position missing or degenerate",
    Reason.EMPTY_SERIES: "the series has no instances",
    Reason.MIXED_GEOMETRY: "slices of different sizes, orientations or frame layouts",
    Reason.DUPLICATE_SLICES: "two slices share a position along the normal",
    Reason.INCONSISTENT_SPACING: "slice spacing is uneven (a gap or a missing slice)",
    Reason.VOLUME_TOO_LARGE: "the volume exceeds the configured voxel cap",
    Reason.MISSING_FUNCTIONAL_GROUPS: "an enhanced multi-frame instance lacks the per-frame "
    "functional groups that give each frame's geometry",
    Reason.UNSUPPORTED_OBJECT: "only DICOM SEG and 3D SR objects are delivered to the PACS",
    Reason.NOTIFICATION_FAILED: "a notification endpoint failed through every attempt "
    "(HTTP 5xx/408/429, timeout, refused, HL7 AE)",
    Reason.NOTIFICATION_REJECTED: "a notification endpoint refused the alert for good "
    "(HTTP 4xx, HL7 AR, a FHIR resource that does not validate)",
    Reason.UNSUPPORTED_MEDIA_TYPE: "a STOW-RS part is not application/dicom",
    Reason.STUDY_MISMATCH: "a STOW-RS instance names another study than the request's URL",
}
