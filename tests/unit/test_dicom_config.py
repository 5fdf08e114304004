"""pydicom is configured once per process, never per call: handler threads judge hostile
input the same whatever another thread does with the (process-global) warning filters, and
nothing a DICOM library says reaches a service's log with a value in it."""

from __future__ import annotations

import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest

from shared.dicom.safe import InvalidInstance, Limits, inspect_instance
from shared.imaging.volume import decode
from shared.runtime.errors import PoisonError
from tests.dicom_cases import bad_inputs, real_file
from tests.helpers import REPO

LIMITS = Limits(max_bytes=1024 * 1024)  # as the ingest tests configure it ("oversized")
THREADS = 4
ROUNDS = 25
GOOD = ("CT_small.dcm", "MR_small_implicit.dcm", "MR_small_RLE.dcm")


def _reason(data: bytes) -> str:
    try:
        inspect_instance(data, LIMITS)
    except InvalidInstance as exc:
        return exc.reason
    return "ok"


def test_reasons_hold_in_threads_while_the_main_thread_flips_warning_filters(
    tmp_path: Path,
) -> None:
    cases = {name: (data, reason) for name, (data, reason) in bad_inputs(tmp_path).items()}
    cases.update({name: (real_file(name), "ok") for name in GOOD})
    wrong: list[tuple[str, str, str]] = []
    errors: list[BaseException] = []
    done = threading.Event()
    start = threading.Barrier(THREADS + 1)

    def judge() -> None:
        try:
            start.wait()
            for _ in range(ROUNDS):
                for name, (data, expected) in cases.items():
                    got = _reason(data)
                    if got != expected:
                        wrong.append((name, expected, got))
        except BaseException as exc:  # a warning raised as an error is a failure too
            errors.append(exc)

    threads = [threading.Thread(target=judge, name=f"handler-{i}") for i in range(THREADS)]
    for t in threads:
        t.start()
    flips = 0
    start.wait()
    while any(t.is_alive() for t in threads):
        # what pytest (filterwarnings = error) and test code do between and inside tests
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            warnings.filterwarnings("error", category=UserWarning)
            flips += 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flips += 1
    done.set()
    for t in threads:
        t.join()
    assert errors == []
    assert wrong == [], f"{len(wrong)} wrong reasons, e.g. {wrong[:5]}"
    assert flips > 100, "the filters did not change while the threads judged"


def test_import_configures_pydicom_so_hostile_values_never_warn() -> None:
    """A fresh interpreter with warnings as errors: importing shared.dicom is enough."""
    code = (
        "import pydicom.config as c, shared.dicom.safe as s, tests.dicom_cases as d, pathlib, "
        "tempfile\n"
        "assert c.settings.reading_validation_mode == c.IGNORE\n"
        "assert c.settings.writing_validation_mode == c.IGNORE\n"
        "cases = d.bad_inputs(pathlib.Path(tempfile.mkdtemp()))\n"
        "data, reason = cases['uid_with_path_characters']\n"
        "try:\n    s.inspect_instance(data)\nexcept s.InvalidInstance as e:\n"
        "    print(e.reason)\n"
    )
    res = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "invalid_uid"


def test_service_logs_keep_that_pydicom_spoke_but_not_what(tmp_path: Path) -> None:
    """configure_process() in a service: pydicom's warning about a value (here a Specific
    Character Set that holds a name) is logged as withheld text; so are highdicom's records
    and raw warnings."""
    import io

    import pydicom

    ds = pydicom.dcmread(io.BytesIO(real_file("CT_small.dcm")))
    ds.SpecificCharacterSet = "DOE^JOHN"
    path = tmp_path / "charset.dcm"
    with pytest.warns(UserWarning, match="Unknown encoding"):  # pydicom says so on writing
        ds.save_as(path)
    code = (
        "import logging, warnings, pydicom\n"
        "from shared.runtime.service import configure_process\n"
        "configure_process()\n"
        f"ds = pydicom.dcmread({str(path)!r})\n"
        "str(ds.PatientName)\n"
        "logging.getLogger('highdicom.seg').warning('copied %s', 'DOE^JOHN')\n"
        "warnings.warn('value DOE^JOHN is odd')\n"
        "logging.getLogger('radstream.test').info('ours stays readable')\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert "DOE" not in res.stderr
    lines = res.stderr.splitlines()
    assert sum('"logger": "pydicom"' in line for line in lines) >= 1, res.stderr
    assert any('"logger": "highdicom.seg"' in line and "withheld" in line for line in lines)
    assert any("UserWarning at <string>" in line for line in lines), res.stderr
    assert any("ours stays readable" in line for line in lines)


def test_a_decoder_panic_is_a_poison_input_not_a_crash() -> None:
    """pylibjpeg-rle panics (pyo3 PanicException, a BaseException) on this corrupt RLE
    stream; the stage must dead-letter it, not die."""
    base = real_file("MR_small_RLE.dcm")
    at = base.rfind(b"\xe0\x7f\x10\x00")
    corrupt = bytearray(base)
    corrupt[at + 140] = 137
    assert _reason(bytes(corrupt)) == "ok"  # the header is fine; the stream is not
    with pytest.raises(PoisonError) as info:
        decode(bytes(corrupt))
    assert info.value.reason == "undecodable"
