"""The CuPy stand-in is as strict as CuPy 14.2 (tests/fake_cupy.py, tests/fake_cupyx_ndimage.py):
each refusal below is one CuPy makes (its source is cited in the stand-in's docstrings), and
each allowance is one CuPy grants, counted where it copies from the device."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest

from shared.imaging.backend import count_downloads, download, namespace
from tests import fake_cupy

IMPLICIT = "Implicit conversion to a NumPy array is not allowed"


@pytest.fixture
def dev(strict_cupy: Any) -> Any:
    return strict_cupy.asarray(np.arange(12, dtype=np.float32).reshape(3, 4))


def test_device_arrays_are_not_numpy_arrays(strict_cupy: Any, dev: Any) -> None:
    assert not isinstance(dev, np.ndarray)
    assert namespace(dev)[0] is strict_cupy
    assert namespace(np.zeros(2))[0] is np


@pytest.mark.parametrize(
    "expr",
    [
        "np.asarray(dev)",
        "np.array(dev)",
        "np.float32(dev.mean())",  # ops.normalize on the H200
        "np.zeros((3, 4))[dev > 3]",
    ],
)
def test_implicit_host_conversion_is_refused(dev: Any, expr: str) -> None:
    with pytest.raises(TypeError, match=IMPLICIT):
        eval(expr)


@pytest.mark.parametrize(
    "expr",
    [
        "dev + np.ones((3, 4))",
        "np.ones((3, 4)) + dev",
        "dev[0] == np.zeros(4)",
        "dev * [1, 2, 3, 4]",
        "strict_cupy.maximum(dev, np.ones((3, 4)))",
        "np.clip(np.zeros(2), dev.min(), 1)",  # dispatched to cupy.clip, which refuses it
    ],
)
def test_host_arrays_in_device_arithmetic_are_refused(
    strict_cupy: Any, dev: Any, expr: str
) -> None:
    with pytest.raises(TypeError, match="Unsupported type"):
        eval(expr)


@pytest.mark.parametrize(
    "expr",
    ["range(dev[0, 1])", "[1, 2, 3][dev[0, 1]]", "dev[slice(dev[0, 1], 3)]", "round(dev[0, 0])"],
)
def test_a_device_scalar_is_not_a_python_index(dev: Any, expr: str) -> None:
    with pytest.raises(TypeError):
        eval(expr)


def test_scalar_conversions_work_and_are_counted(strict_cupy: Any, dev: Any) -> None:
    assert float(dev.sum()) == 66.0 and int(dev[1, 1]) == 5 and bool(dev[0, 1])
    assert dev[2, 3].item() == 11.0
    assert strict_cupy.transfers.scalars == ["float", "int", "bool", "item"]
    assert strict_cupy.transfers.downloads == []
    with pytest.raises(ValueError, match="more than one element"):
        bool(dev)
    with pytest.raises(ValueError, match="size 1"):
        dev.item()
    with pytest.warns(DeprecationWarning):
        assert not bool(dev[dev > 100])


def test_reductions_and_integer_indices_stay_on_the_device(strict_cupy: Any, dev: Any) -> None:
    for value in (dev.sum(), dev.max(), dev[1, 2], strict_cupy.count_nonzero(dev)):
        assert isinstance(value, strict_cupy.ndarray) and value.shape == ()
    assert isinstance(strict_cupy.allclose(dev, dev), strict_cupy.ndarray)
    view = dev[1, 2]
    view += 100  # a 0-d view, as in CuPy
    assert float(dev[1, 2]) == 106.0


def test_downloads_are_explicit_and_counted(strict_cupy: Any, dev: Any) -> None:
    with count_downloads() as log:
        host = download(dev, why="test")
        assert download(np.ones(3), why="host passes") is not None
    assert type(host) is np.ndarray and log.downloads == [("test", 48)]
    strict_cupy.asnumpy(dev)
    dev.get()
    assert strict_cupy.transfers.downloads == ["get", "get", "get"]


def test_assignment_from_host_arrays_follows_cupy(strict_cupy: Any, dev: Any) -> None:
    with pytest.raises(ValueError, match=r"non-scalar numpy\.ndarray"):
        dev[0] = np.zeros(4)
    dev[0] = 7  # scalars fill
    dev[np.array([1, 2])] = np.array([[1, 1, 1, 1], [2, 2, 2, 2]])  # advanced: converted
    assert int(dev[2, 0]) == 2 and int(dev[0, 3]) == 7
    mask = dev > 1
    assert dev[mask].shape == (8,) and "boolean mask index" in strict_cupy.transfers.syncs


def test_what_cupy_accepts_from_the_host_is_accepted(strict_cupy: Any, dev: Any) -> None:
    before = len(strict_cupy.uploads)
    stacked = strict_cupy.asarray([dev.sum(), dev.max()])  # device scalars: no upload
    assert stacked.shape == (2,) and len(strict_cupy.uploads) == before
    like = strict_cupy.zeros_like(np.ones((2, 3), np.int16))  # a host prototype's metadata
    assert isinstance(like, strict_cupy.ndarray) and like.dtype == np.int16
    strict_cupy.asarray([1.0, 2.0])  # host data: an upload
    assert len(strict_cupy.uploads) == before + 1


def test_numpy_functions_dispatch_and_missing_ones_are_missing(strict_cupy: Any, dev: Any) -> None:
    assert isinstance(np.argwhere(dev > 3), strict_cupy.ndarray)
    assert isinstance(np.median(dev), strict_cupy.ndarray)
    assert not hasattr(strict_cupy, "nanpercentile")  # CuPy 14.2 has none
    with pytest.raises(TypeError, match="no implementation found"):
        np.nanpercentile(dev, 5)


def test_sorts_are_stable_as_in_cupy(strict_cupy: Any) -> None:
    ties = strict_cupy.asarray(np.array([3, 1, 3, 1, 3]))
    assert strict_cupy.argsort(ties).tolist() == [1, 3, 0, 2, 4]
    with pytest.raises(ValueError, match="kind can only be None or 'stable'"):
        strict_cupy.argsort(ties, kind="quicksort")


def test_faults_fire_where_planted(strict_cupy: Any, dev: Any) -> None:
    strict_cupy.faults.add("cupy.asarray", fake_cupy.OutOfMemoryError(1 << 30, 0))
    with pytest.raises(MemoryError, match="Out of memory"):
        strict_cupy.asarray(np.zeros(3))
    strict_cupy.asarray(np.zeros(3))  # once only
    assert fake_cupy.CUDARuntimeError.__module__ == "cupy_backends.cuda.api.runtime"


# ---- cupyx.scipy.ndimage -------------------------------------------------------------------
@pytest.fixture
def ndi(strict_cupy: Any) -> Any:
    import cupyx.scipy.ndimage as ndi  # the stand-in, from sys.modules

    return ndi


@pytest.mark.parametrize(
    "call,exc,match",
    [
        ("ndi.binary_dilation(m, iterations=2)", NotImplementedError, "brute_force"),
        ("ndi.binary_erosion(m, iterations=0)", NotImplementedError, "brute_force"),
        ("ndi.binary_opening(m, iterations=3)", NotImplementedError, "brute_force"),
        ("ndi.binary_closing(m, structure=(3, 3), iterations=2)", NotImplementedError, "brute"),
        ("ndi.binary_dilation(m, structure=np.ones((3, 3), bool))", TypeError, "Unsupported"),
        ("ndi.binary_dilation(m, iterations=1.5)", TypeError, "integer"),
        ("ndi.gaussian_filter(dev, 1, mode='grid-constant')", RuntimeError, "boundary mode"),
        ("ndi.gaussian_filter(dev, 1, output=np.zeros((3, 4)))", TypeError, "Unsupported"),
        ("ndi.zoom(dev, 2, mode='edge')", ValueError, "boundary mode"),
        ("ndi.zoom(dev, 2, order=6)", ValueError, "spline order"),
        ("ndi.label(np.ones((3, 4)))", TypeError, "input must be cupy.ndarray"),
        ("ndi.label(m, structure=np.ones((5, 5)))", ValueError, "equal to 3"),
        ("ndi.find_objects(dev)", TypeError, "interpreted as an integer"),
        ("ndi.sum_labels(dev, lab, [1, 2])", TypeError, "index must be cupy.ndarray"),
        ("ndi.sum_labels(dev, lab, np.int64(1))", TypeError, "index must be cupy.ndarray"),
        ("ndi.center_of_mass(dev, lab, [1])", TypeError, "index must be cupy.ndarray"),
        ("ndi.sum_labels(dev, np.ones((3, 4), int))", TypeError, "label must be cupy.ndarray"),
        ("ndi.distance_transform_edt(dev.ravel())", NotImplementedError, "2D and 3D"),
        ("ndi.median_filter(dev, 3, cval=float('nan'))", NotImplementedError, "NaN cval"),
    ],
)
def test_ndimage_refuses_what_cupy_refuses(
    ndi: Any, dev: Any, call: str, exc: type[Exception], match: str
) -> None:
    m = dev > 4
    lab, _ = ndi.label(m)
    with pytest.raises(exc, match=match):
        eval(call, None, {"ndi": ndi, "np": np, "dev": dev, "m": m, "lab": lab})


def test_ndimage_allows_what_cupy_allows_and_returns_its_types(
    strict_cupy: Any, ndi: Any, dev: Any
) -> None:
    m = dev > 4
    assert bool(ndi.binary_dilation(m, iterations=2, brute_force=True).all())
    assert isinstance(ndi.generate_binary_structure(2, 1), strict_cupy.ndarray)
    labels, n = ndi.label(m, structure=np.ones((3, 3)))  # a host structure is fine for label
    assert isinstance(labels, strict_cupy.ndarray) and labels.dtype == np.int32 and n == 1
    assert ndi.find_objects(labels) == [(slice(1, 3), slice(0, 4))]  # host slices
    com = ndi.center_of_mass(dev * m.astype(np.float32))
    assert isinstance(com, tuple) and all(isinstance(c, strict_cupy.ndarray) for c in com)
    assert isinstance(ndi.sum_labels(dev, labels, 1), strict_cupy.ndarray)
    assert isinstance(ndi.sum_labels(dev, labels, strict_cupy.asarray([1])), strict_cupy.ndarray)
    # binary morphology ignores an output that is not a device array: a new bool array
    assert ndi.binary_erosion(m, output=np.uint8).dtype == np.bool_
    dist, idx = ndi.distance_transform_edt(m, return_indices=True)
    assert dist.dtype == np.float64 and idx.dtype == np.int32


def test_ndimage_warns_where_cupy_takes_its_slow_path(ndi: Any, dev: Any) -> None:
    with pytest.warns(fake_cupy.PerformanceWarning):
        ndi.center_of_mass(dev > 4)  # bool masses
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ndi.center_of_mass((dev > 4).astype(np.float32))
