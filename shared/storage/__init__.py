"""The blob store: encrypted, content-addressed objects (claim checks)."""

from shared.storage.blobs import BlobBackend, BlobError, BlobStore, LocalDirBackend, local_store

__all__ = ["BlobBackend", "BlobError", "BlobStore", "LocalDirBackend", "local_store"]
