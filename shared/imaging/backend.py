"""Choosing and driving the array backend: CuPy on a GPU, NumPy/SciPy without one.

``select_backend("auto"|"gpu"|"cpu")`` decides once at start-up: ``auto`` takes the GPU when
CuPy imports *and* a device answers (CuPy imports without a GPU, but every allocation then
fails), ``gpu`` insists (raises if none), ``cpu`` never tries. The choice is logged and
exported as a metric by the service.

Array functions (``shared.imaging.ops``) do not take a backend: like cuCIM, they work on
whatever array they are given, finding its module with :func:`namespace`.

Two rules of the device path live here:

* **Device → host copies are explicit and counted**: :func:`download` (and
  :meth:`Backend.download`) is the one way a result leaves the device; each call names why,
  and :func:`count_downloads` lets a core or a test see how many a record made. A real CuPy
  and the CI stand-in are counted alike (the count is ours, not CuPy's).
* **A device failure is never a dead letter**: :class:`DeviceRunner` runs a record's device
  work; when it fails for a reason that is not the input (out of memory, a CUDA error, a
  ``cupyx`` call CuPy does not implement, an implicit host conversion, anything else the CPU
  path does not share) the record is redone on the CPU backend, counted in
  ``radstream_gpu_fallbacks_total{stage,reason}`` and logged once per cause. Out of memory
  first frees the pools and retries once on the device. Bad input (a
  :class:`~shared.runtime.errors.StageError`: poison or retriable) passes through unchanged,
  so it dead-letters (or is retried) with its usual reason.
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, TypeVar

import numpy as np
import scipy.ndimage as scipy_ndi
from prometheus_client import CollectorRegistry, Counter

from shared.runtime.errors import StageError

log = logging.getLogger("radstream.imaging")
T = TypeVar("T")

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
class TransferLog:
    """The explicit device → host copies made while it was open: (why, bytes) each."""

    downloads: list[tuple[str, int]] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.downloads)

    @property
    def bytes(self) -> int:
        return sum(n for _, n in self.downloads)


_transfer_log: ContextVar[TransferLog | None] = ContextVar("radstream_transfer_log", default=None)


@contextmanager
def count_downloads() -> Iterator[TransferLog]:
    """Record every :func:`download` in this context (this thread or task only)."""
    record = TransferLog()
    token = _transfer_log.set(record)
    try:
        yield record
    finally:
        _transfer_log.reset(token)


def download(arr: Any, *, why: str) -> np.ndarray:
    """The one way a device array becomes a host array: a synchronising copy, counted under
    ``why`` in the open :func:`count_downloads` logs. Host arrays (and NumPy scalars) pass
    through uncounted, so array code calls it without knowing where it runs."""
    xp, _ = namespace(arr)
    if xp is np:
        return np.asarray(arr)
    host: np.ndarray = arr.get()
    record = _transfer_log.get()
    if record is not None:
        record.downloads.append((why, int(host.nbytes)))
    return host


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

    def download(self, arr: Any, *, why: str = "result") -> np.ndarray:
        """Device → host (explicit, counted: see :func:`download`); host arrays pass through."""
        return download(arr, why=why)

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


# ---- device failures: redo on the CPU, never a dead letter ---------------------------------

FALLBACK_CAUSES = ("out_of_memory", "cuda_error", "not_implemented", "host_conversion", "other")
_CUPY_MODULES = ("cupy", "cupyx", "cupy_backends")
_CUDA_ERROR_MEMORY_ALLOCATION = 2  # cudaErrorMemoryAllocation


def _from_cupy(exc: BaseException) -> bool:
    return any((cls.__module__ or "").split(".")[0] in _CUPY_MODULES for cls in type(exc).__mro__)


def device_failure_cause(exc: BaseException) -> str | None:
    """Why device work failed, as a bounded label; ``None`` when it is not the device's doing
    (a :class:`StageError`: bad input or a dependency, handled as on the CPU)."""
    if isinstance(exc, StageError):
        return None
    if isinstance(exc, MemoryError) or (
        type(exc).__name__ == "CUDARuntimeError"
        and getattr(exc, "status", None) == _CUDA_ERROR_MEMORY_ALLOCATION
    ):
        return "out_of_memory"  # cupy.cuda.memory.OutOfMemoryError is a MemoryError
    if isinstance(exc, NotImplementedError):
        return "not_implemented"  # e.g. a cupyx.scipy.ndimage argument CuPy lacks
    if isinstance(exc, TypeError) and "Implicit conversion to a NumPy array" in str(exc):
        return "host_conversion"
    if _from_cupy(exc):
        return "cuda_error"  # CUDARuntimeError, CUDADriverError, CompileException, cuBLAS...
    return "other"  # anything else only the device path raised: the CPU path decides


_OWN_CODE = tuple(
    str(Path(__file__).resolve().parents[2] / d) + os.sep for d in ("shared", "services")
)


def _where(exc: BaseException) -> str:
    """``path:line`` of the innermost frame in the project's own code (the call that reached
    into CuPy), else of the innermost frame. Never the message: it might quote data."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "?"
    for frame in reversed(frames):
        if frame.filename.startswith(_OWN_CODE):
            root = Path(__file__).resolve().parents[2]
            return f"{Path(frame.filename).relative_to(root)}:{frame.lineno}"
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno}"


@dataclass(frozen=True)
class _Failure:
    cause: str
    where: str
    kind: str


class DeviceRunner:
    """Runs one record's device work, ``work(backend) -> host result``, with the CPU as the
    fallback. ``work`` uploads, computes and downloads itself, so a redo on the CPU is the same
    function given the CPU backend (arrays stay on the host there).

    On a CPU backend it simply calls ``work``. On a GPU backend a failure that
    :func:`device_failure_cause` attributes to the device frees the device's memory pools,
    retries once on the device if it was out of memory, and otherwise (or if that fails too)
    redoes the record on the CPU, increments ``radstream_gpu_fallbacks_total{stage,reason}``
    and logs a warning the first time each cause is seen (type and place only, no message).
    """

    def __init__(
        self,
        backend: Backend,
        *,
        stage: str,
        registry: CollectorRegistry | None = None,
        cpu: Backend | None = None,
    ) -> None:
        self.backend = backend
        self.stage = stage
        self.cpu = cpu if cpu is not None else _cpu()
        self.fallbacks = Counter(
            "radstream_gpu_fallbacks_total",
            "Records whose device work failed and was redone on the CPU, by cause",
            ["stage", "reason"],
            registry=registry if registry is not None else CollectorRegistry(),
        )
        for cause in FALLBACK_CAUSES:
            self.fallbacks.labels(stage, cause)  # every series exists from the start (0)
        self._logged: set[str] = set()
        self._lock = threading.Lock()

    def count(self, cause: str) -> float:
        """This runner's fallbacks for ``cause`` so far."""
        return float(self.fallbacks.labels(self.stage, cause)._value.get())

    def run(self, work: Callable[[Backend], T]) -> T:
        if self.backend.name != "gpu":
            return work(self.backend)
        outcome = self._attempt(work)
        if isinstance(outcome, _Failure) and outcome.cause == "out_of_memory":
            self._release()
            outcome = self._attempt(work)
            if not isinstance(outcome, _Failure):
                log.info("%s: device out of memory; pools freed, the retry succeeded", self.stage)
        if not isinstance(outcome, _Failure):
            return outcome
        self._release()
        self.fallbacks.labels(self.stage, outcome.cause).inc()
        with self._lock:
            first = outcome.cause not in self._logged
            self._logged.add(outcome.cause)
        if first:
            log.warning(
                "%s: device work failed (%s: %s at %s); the record is redone on the cpu. "
                "Further %s failures are only counted in radstream_gpu_fallbacks_total",
                self.stage,
                outcome.cause,
                outcome.kind,
                outcome.where,
                outcome.cause,
            )
        return work(self.cpu)

    def _attempt(self, work: Callable[[Backend], T]) -> T | _Failure:
        """``work``'s result, or what its device failure was. The exception itself is not
        kept: its frames hold device arrays, which must go before the pools are freed."""
        try:
            return work(self.backend)
        except Exception as exc:  # classified; re-raised when not the device's
            cause = device_failure_cause(exc)
            if cause is None:
                raise
            return _Failure(cause, _where(exc), type(exc).__name__)

    def _release(self) -> None:
        gc.collect()  # arrays held by the failed attempt's frames (cycles), then the pools
        self.backend.free()
