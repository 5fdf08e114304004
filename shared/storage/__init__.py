"""The blob store: encrypted, content-addressed objects (claim checks)."""

from shared.storage.blobs import BlobBackend, BlobError, BlobStore, LocalDirBackend

__all__ = ["BlobBackend", "BlobError", "BlobStore", "LocalDirBackend"]
