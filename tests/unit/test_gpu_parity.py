"""``benchmarks/gpu_parity.py``, the CPU/GPU comparison on the realistic set that ran on a real
H200 (40 of 40 cases the same), run here on the strict CuPy stand-in: a realistic head case
generated and analysed on the CPU in a worker process, then on the stand-in's device arrays,
and compared finding by finding."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_parity_benchmark_compares_a_realistic_case_on_the_strict_stand_in(
    tmp_path: Path,
) -> None:
    out = tmp_path / "parity.json"
    cmd = [sys.executable, "benchmarks/gpu_parity.py", "--chest", "0", "--head", "1"]
    cmd += ["--workers", "1", "--strict-stand-in", "--json-out", str(out)]
    res = subprocess.run(
        cmd,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert figures["cases_compared"] == 1 and figures["cases_failed"] == 0
    assert figures["cases_with_different_findings"] == 0
    (row,) = figures["rows"]
    assert row["case"].startswith("head-30000") and row["findings"] >= 2  # brain, bleed, ...
    assert row["min_mask_dice"] == 1.0
