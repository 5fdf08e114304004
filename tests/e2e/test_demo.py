"""`radstream demo` (what `make demo` runs) on a fresh stack home: alerts printed, a report
with pictures a person can open, the stack left running (then stopped here)."""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_demo_prints_alerts_and_writes_a_report_with_pictures(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADSTREAM_")}
    env.update(
        RADSTREAM_HOME=str(tmp_path / "stack"),
        RADSTREAM_STACK_PORTS="auto",  # every port free, beside any other stack
        COLUMNS="200",
    )
    cli = str(REPO / ".venv" / "bin" / "radstream")
    out = tmp_path / "report"
    try:
        res = subprocess.run(
            [cli, "demo", "--out", str(out), "--wait", "240"],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        text = res.stdout
        assert (
            text.count("CRITICAL") == 1 and text.count("HIGH") == 1 and text.count("MEDIUM") == 1
        ), text[-3000:]
        assert "storescu → gateway" in text and "sent" in text
        report = (out / "report.html").read_text()
        assert "haemorrhage" in report and "nodule" in report and "no alert" in report
        # the results stage's paperwork, after the alerts: SEG and SR per CT study, in the PACS
        for study in ("chest", "head", "normal"):
            for obj in ("seg", "sr"):
                assert (out / f"{study}-{obj}.dcm").read_bytes()[128:132] == b"DICM", study
        assert report.count("PACS: delivered") == 3, report[-2000:]
        pngs = sorted(out.glob("*.png"))
        assert len(pngs) >= 3
        for png in pngs:
            assert png.name in report
            img = np.asarray(Image.open(io.BytesIO(png.read_bytes())))
            assert (
                img.ndim == 3 and img.shape[0] >= 128 and img.std() > 10
            )  # a real picture, not blank
        status = subprocess.run(
            [cli, "stack", "status", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert '"running": true' in status.stdout  # the demo leaves the stack running
    finally:
        subprocess.run(
            [cli, "stack", "down"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
