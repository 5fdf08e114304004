"""Choosing and driving the array backend: CuPy on a GPU, NumPy/SciPy without one.

``select_backend("auto"|"gpu"|"cpu")`` decides once at start-up: ``auto`` takes the GPU when
CuPy imports *and* a device answers (CuPy imports without a GPU, but every allocation then
fails), ``gpu`` insists (raises if none), ``cpu`` never tries. The choice is logged and
exported as a metric by the service.

Array functions (``shared.imaging.ops``) do not take a backend: like cuCIM, they work on
whatever array they are given, finding its module with :func:`namespace`.
"""

from __future__ import annotations

import importlib
import logging
import sys
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Literal

import numpy as np
import scipy.ndimage as scipy_ndi

log = logging.getLogger("radstream.imaging")

DeviceMode = Literal["auto", "gpu", "cpu"]


class BackendUnavailable(RuntimeError):
    """``gpu`` was required but no CUDA device answers."""


def namespace(arr: Any) -> tuple[ModuleType, ModuleType]:
    """(array module, ndimage module) for ``arr``: cupy/cupyx for device arrays, else numpy."""
    cp = sys.modules.get("cupy")
    if cp is not None and isinstance(arr, cp.ndarray) and type(arr) is not np.ndarray:
        return cp, importlib.import_module("cupyx.scipy.ndimage")
    return np, scipy_ndi


@dataclass
class Backend:
    name: Literal["cpu", "gpu"]
    xp: ModuleType
    ndi: ModuleType
    device: str = "cpu"
    _warm: set[tuple[Any, ...]] = field(default_factory=set)

    def upload(self, host: np.ndarray) -> Any:
        """Host → device. Callers upload compact dtypes (int16), convert on the device."""
        return host if self.name == "cpu" else self.xp.asarray(host)

    def download(self, arr: Any) -> np.ndarray:
        if self.name == "cpu":
            return np.asarray(arr)
        return np.asarray(self.xp.asnumpy(arr))

    def synchronize(self) -> None:
        if self.name == "gpu":
            self.xp.cuda.get_current_stream().synchronize()

    def memory_in_use(self) -> int:
        if self.name == "cpu":
            return 0
        return int(self.xp.get_default_memory_pool().used_bytes())

    def free(self) -> None:
        """Return cached device memory after a series (the pool keeps blocks otherwise)."""
        if self.name == "gpu":
            self.xp.get_default_memory_pool().free_all_blocks()
            self.xp.get_default_pinned_memory_pool().free_all_blocks()

    def warm_up(self, key: tuple[Any, ...], run: Any) -> bool:
        """Run ``run()`` once per distinct ``key`` (shape, op, parameters): CuPy compiles a
        kernel per such combination, so the first real series does not pay for it."""
        if key in self._warm:
            return False
        run()
        self.synchronize()
        self._warm.add(key)
        return True


def _cpu() -> Backend:
    return Backend("cpu", np, scipy_ndi)


def select_backend(
    mode: DeviceMode = "auto",
    *,
    memory_limit_bytes: int | None = None,
    cupy_module: ModuleType | None = None,
) -> Backend:
    """Pick the backend. ``cupy_module`` lets tests inject a stand-in for ``cupy``."""
    if mode == "cpu":
        log.info("array backend: cpu (RADSTREAM_DEVICE=cpu)")
        return _cpu()
    try:
        cp = cupy_module if cupy_module is not None else importlib.import_module("cupy")
        ok = bool(cp.cuda.is_available())
    except Exception as exc:  # noqa: BLE001 - import errors, CUDA driver errors: no GPU
        if mode == "gpu":
            raise BackendUnavailable(
                f"RADSTREAM_DEVICE=gpu but CuPy is unusable ({type(exc).__name__})"
            ) from None
        log.info("array backend: cpu (CuPy unusable: %s)", type(exc).__name__)
        return _cpu()
    if not ok:
        if mode == "gpu":
            raise BackendUnavailable("RADSTREAM_DEVICE=gpu but no CUDA device answers")
        log.info("array backend: cpu (CuPy installed, no CUDA device)")
        return _cpu()
    try:
        # a real allocation: is_available() can be true while the driver refuses work
        cp.zeros((1,), dtype=cp.float32).sum()
    except Exception as exc:  # noqa: BLE001
        if mode == "gpu":
            raise BackendUnavailable(
                f"CUDA device does not answer ({type(exc).__name__})"
            ) from None
        log.warning("array backend: cpu (CUDA allocation failed: %s)", type(exc).__name__)
        return _cpu()
    if memory_limit_bytes:
        cp.get_default_memory_pool().set_limit(size=memory_limit_bytes)
    ndi = importlib.import_module("cupyx.scipy.ndimage")
    device = f"cuda:{cp.cuda.Device().id}" if hasattr(cp.cuda, "Device") else "cuda"
    log.info("array backend: gpu (%s)", device)
    return Backend("gpu", cp, ndi, device)
