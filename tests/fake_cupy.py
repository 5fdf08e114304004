"""A NumPy-backed stand-in for the ``cupy`` module, so the GPU branch's glue (selection,
uploads, downloads, warm-up, memory-pool limits, fallbacks) runs where no GPU exists.

Device arrays are a distinct ndarray subclass, so dispatch by array type is exercised too.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import numpy as np
import scipy.ndimage


class DeviceArray(np.ndarray):
    """Stands for ``cupy.ndarray``."""


class _Pool:
    def __init__(self) -> None:
        self.limit: int | None = None
        self.freed = 0

    def set_limit(self, size: int) -> None:
        self.limit = size

    def used_bytes(self) -> int:
        return 1234

    def free_all_blocks(self) -> None:
        self.freed += 1


def make(available: bool = True, allocation_fails: bool = False) -> types.ModuleType:
    cp = types.ModuleType("cupy")
    pool, pinned = _Pool(), _Pool()
    cp.ndarray = DeviceArray  # type: ignore[attr-defined]
    cp.float32 = np.float32  # type: ignore[attr-defined]
    cp.uploads = []  # type: ignore[attr-defined]

    def asarray(a: Any, dtype: Any = None) -> DeviceArray:
        arr = np.asarray(a, dtype=dtype)
        cp.uploads.append(arr.dtype)  # type: ignore[attr-defined]
        return arr.view(DeviceArray)

    def zeros(shape: Any, dtype: Any = float) -> DeviceArray:
        if allocation_fails:
            raise RuntimeError("cudaErrorNoDevice")
        return np.zeros(shape, dtype).view(DeviceArray)

    cp.asarray = asarray  # type: ignore[attr-defined]
    cp.zeros = zeros  # type: ignore[attr-defined]
    cp.asnumpy = lambda a: np.asarray(a).view(np.ndarray)  # type: ignore[attr-defined]
    for name in (
        "clip",
        "histogram",
        "cumsum",
        "interp",
        "log1p",
        "median",
        "abs",
        "percentile",
        "searchsorted",
        "float64",
    ):
        setattr(cp, name, getattr(np, name))
    cp.get_default_memory_pool = lambda: pool  # type: ignore[attr-defined]
    cp.get_default_pinned_memory_pool = lambda: pinned  # type: ignore[attr-defined]
    cuda = types.SimpleNamespace(
        is_available=lambda: available,
        get_current_stream=lambda: types.SimpleNamespace(synchronize=lambda: None),
        Device=lambda: types.SimpleNamespace(id=0),
    )
    cp.cuda = cuda  # type: ignore[attr-defined]
    return cp


def _device_ndimage(cp: types.ModuleType) -> types.ModuleType:
    """``cupyx.scipy.ndimage`` stand-in: SciPy's filters, results as device arrays, calls
    recorded (so a test sees that device arrays were dispatched here)."""
    mod = types.ModuleType("cupyx.scipy.ndimage")
    cp.ndi_calls = []  # type: ignore[attr-defined]
    for name in ("gaussian_filter", "median_filter", "uniform_filter", "zoom", "laplace"):
        fn = getattr(scipy.ndimage, name)

        def wrapped(*args: Any, _fn: Any = fn, _name: str = name, **kw: Any) -> DeviceArray:
            cp.ndi_calls.append(_name)  # type: ignore[attr-defined]
            return np.asarray(_fn(*args, **kw)).view(DeviceArray)

        setattr(mod, name, wrapped)
    return mod


def install(monkeypatch: Any, cp: types.ModuleType) -> None:
    """Put the stand-in and its ``cupyx.scipy.ndimage`` in sys.modules."""
    cupyx = types.ModuleType("cupyx")
    cupyx_scipy = types.ModuleType("cupyx.scipy")
    monkeypatch.setitem(sys.modules, "cupy", cp)
    monkeypatch.setitem(sys.modules, "cupyx", cupyx)
    monkeypatch.setitem(sys.modules, "cupyx.scipy", cupyx_scipy)
    monkeypatch.setitem(sys.modules, "cupyx.scipy.ndimage", _device_ndimage(cp))
