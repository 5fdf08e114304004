"""DICOMweb (PS3.18): STOW-RS in (the gateway) and out (results), QIDO-RS for idempotency."""
