"""Results service: SegmentationDone → DICOM SEG + SR (TID 1500) + overlay PNGs → PACS, and a
ResultsReady record per series revision, after (never before) its alerts."""

from __future__ import annotations

from shared.runtime.graceful import exit_on_sigterm

exit_on_sigterm(__name__)  # first: a SIGTERM during the heavy imports below exits 0

import os  # noqa: E402
import sys  # noqa: E402

from prometheus_client import CollectorRegistry  # noqa: E402

from services.results.core import ResultsCore, ResultsMetrics  # noqa: E402
from shared.config import Settings  # noqa: E402
from shared.dicom.pacs import Pacs, configured  # noqa: E402
from shared.dicomweb.client import DicomWebPacs  # noqa: E402
from shared.runtime.service import serve  # noqa: E402
from shared.runtime.stage import StageSpec  # noqa: E402
from shared.schemas import SegmentationDone  # noqa: E402
from shared.security.envelope import Keyring  # noqa: E402
from shared.storage import local_store  # noqa: E402
from shared.topology import stage  # noqa: E402

STAGE = stage("results")


def build(
    settings: Settings, keyring: Keyring, registry: CollectorRegistry | None = None
) -> StageSpec[SegmentationDone]:
    c = settings.results
    pacs: Pacs | DicomWebPacs | None = None
    if c.pacs_protocol == "dicomweb":
        pacs = DicomWebPacs(
            c.dicomweb_url,
            c.dicomweb_token.get_secret_value() or None,
            c.dicomweb_ca_file,
            c.dicomweb_client_cert,
            c.dicomweb_client_key,
            c.pacs_timeout_s,
            allow_plaintext=c.pacs_allow_plaintext,
        )
    elif c.pacs_protocol == "dimse" and c.pacs_host:
        pacs = configured(
            c.pacs_host,
            c.pacs_port,
            c.pacs_ae_title,
            c.calling_ae_title,
            c.pacs_timeout_s,
            tls_ca=c.pacs_tls_ca,
            tls_cert=c.pacs_tls_cert,
            tls_key=c.pacs_tls_key,
            allow_plaintext=c.pacs_allow_plaintext,
        )
    core = ResultsCore(
        local_store(settings.blob_path, keyring, registry, STAGE.name),
        pacs,
        c.seg_max_frames,
        ResultsMetrics(registry) if registry is not None else None,
    )
    return StageSpec(
        name=STAGE.name,
        input_topic=STAGE.input,
        input_type=SegmentationDone,
        output_topic=STAGE.output,
        handler=core.handle,
        stateful=STAGE.stateful,
    )


def main() -> int:
    settings = Settings()
    if settings.results.nice:
        os.nice(settings.results.nice)  # after the alert: yield the CPU to the alert's path
    return serve(build, settings)


if __name__ == "__main__":
    sys.exit(main())
