"""A strict stand-in for CuPy (``cupy`` and ``cupyx.scipy.ndimage``) on machines without a GPU.

Read from CuPy's own source, tag **v14.2.0** (commit dc1552a32f5489bdf6a5a721dfd952a92d47d934,
the version seen on the project's H200): ``cupy/_core/core.pyx`` (the ndarray protocols),
``cupy/_core/_routines_indexing.pyx`` (indexing and assignment), ``cupy/_core/_kernel.pyx``
(what a kernel accepts), ``cupy/__init__.py`` (the namespace) and
``cupyx/scipy/ndimage/*.py`` (the rules in :mod:`ndimage` below). The old stand-in subclassed
``numpy.ndarray`` and so allowed exactly what CuPy forbids; on a real GPU the project then
crashed in ``ops.normalize`` (implicit conversion) and in head CT
(``binary_dilation(iterations=2)``).

Device arrays (:class:`DeviceArray`) hold a NumPy array but are *not* an ndarray subclass, and
they follow ``cupy.ndarray``'s protocols:

* ``__array__`` raises ``TypeError: Implicit conversion to a NumPy array is not allowed...``
  (so ``np.asarray(dev)``, ``np.float32(dev)``, ``np_array[dev]``... fail as on a GPU); there is
  no buffer protocol, no ``__array_interface__`` and **no ``__index__``** (a 0-d device array is
  not a Python index: ``range(dev)``, ``list[dev]``, ``slice(dev, ...)`` fail, as in CuPy);
* ``float()``/``int()``/``complex()``/``bool()``/``.item()`` of a size-1 array work (a
  synchronising device→host copy): counted in ``transfers.scalars``; ``bool()`` of a larger
  array raises ``ValueError``, of an empty one warns (``DeprecationWarning``) and is ``False``;
* ``.get()``, ``cupy.asnumpy``, ``.tolist()``, ``.tobytes()``, ``repr``/``str``/``format`` are
  downloads: counted in ``transfers.downloads``;
* arithmetic and comparisons accept device arrays, Python and NumPy scalars; a
  ``numpy.ndarray`` operand raises ``TypeError: Unsupported type <class 'numpy.ndarray'>``
  (CuPy's kernels refuse host arrays; a 0-d one is only accepted by comparisons), also when the
  NumPy array is on the left (``__array_ufunc__``);
* NumPy functions on device arrays dispatch to the stand-in's namespace
  (``__array_function__``/``__array_ufunc__``, as CuPy does); a function CuPy lacks is missing
  here too (``TypeError: no implementation found``);
* indexing accepts device arrays, lists and NumPy integer/boolean arrays (uploaded); an integer
  index gives a 0-d *device* array, not a scalar; a boolean-mask index is a data-dependent shape
  (counted in ``transfers.syncs``); assigning a non-scalar NumPy array through basic slicing
  raises ``ValueError: non-scalar numpy.ndarray cannot be used for fill`` (CuPy refuses
  host arrays there; with an advanced index it converts them);
* reductions return 0-d device arrays (never NumPy scalars); no floating-point warnings
  (device kernels do not warn); ``sort``/``argsort`` are always stable and refuse a ``kind``
  other than None/'stable' (NumPy's default is not stable: ties may differ from the CPU).

The ``cupy`` namespace here is the subset the project uses (grep ``xp.`` in shared/ and
services/), every name checked to exist in CuPy 14.2's ``cupy/__init__.py``; a NumPy function
that CuPy lacks (e.g. ``nanpercentile``) is missing here too. ``cupy.asarray(host)`` is an upload
(counted in ``uploads``), ``cupy.cuda`` has ``is_available``, ``Device``, streams,
``runtime.CUDARuntimeError`` and ``memory.OutOfMemoryError`` (CuPy's classes and modules), the
memory pools count ``free_all_blocks``.

Faults are injected with :meth:`Faults.add` at named points (``"cupy.asarray"`` for uploads,
``"cupy.<name>"``, ``"ndimage.<name>"``, ``"download"``), so tests can make a device fail where
they choose.
"""

from __future__ import annotations

import operator
import sys
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

CUPY_VERSION_READ = "14.2.0"

_IMPLICIT = (
    "Implicit conversion to a NumPy array is not allowed. "
    "Please use `.get()` to construct a NumPy array explicitly."
)


# ---- errors with CuPy's names and modules (backend.py classifies them by these) -------------
class CUDARuntimeError(RuntimeError):
    """``cupy_backends.cuda.api.runtime.CUDARuntimeError(status)``."""

    _NAMES = {
        2: "cudaErrorMemoryAllocation",
        100: "cudaErrorNoDevice",
        700: "cudaErrorIllegalAddress",
    }

    def __init__(self, status: int) -> None:
        self.status = status
        name = self._NAMES.get(status, f"cudaError{status}")
        super().__init__(f"{name}: stand-in CUDA error")


CUDARuntimeError.__module__ = "cupy_backends.cuda.api.runtime"


class OutOfMemoryError(MemoryError):
    """``cupy.cuda.memory.OutOfMemoryError(size, total, limit=0)``."""

    def __init__(self, size: int, total: int, limit: int = 0) -> None:
        super().__init__(
            f"Out of memory allocating {size:,} bytes (allocated so far: {total:,} bytes"
            + (f", limit set to: {limit:,} bytes)." if limit else ").")
        )


OutOfMemoryError.__module__ = "cupy.cuda.memory"


class PerformanceWarning(RuntimeWarning):
    """``cupy._util.PerformanceWarning``."""


PerformanceWarning.__module__ = "cupy._util"


# ---- bookkeeping --------------------------------------------------------------------------
@dataclass
class Transfers:
    """Every device→host copy the code asked for, by kind."""

    downloads: list[str] = field(default_factory=list)  # .get(), asnumpy, tolist, repr...
    scalars: list[str] = field(default_factory=list)  # float/int/bool/complex/item
    syncs: list[str] = field(default_factory=list)  # data-dependent shapes, label counts...

    def clear(self) -> None:
        self.downloads.clear()
        self.scalars.clear()
        self.syncs.clear()


@dataclass
class Faults:
    """Exceptions to raise at named points, each ``times`` times."""

    planned: dict[str, list[BaseException]] = field(default_factory=dict)
    fired: list[str] = field(default_factory=list)

    def add(self, point: str, exc: BaseException, times: int = 1) -> None:
        self.planned.setdefault(point, []).extend([exc] * times)

    def check(self, point: str) -> None:
        pending = self.planned.get(point)
        if pending:
            self.fired.append(point)
            raise pending.pop(0)


class _State:
    """One stand-in module's counters (``make()`` builds a fresh one per test)."""

    def __init__(self) -> None:
        self.transfers = Transfers()
        self.faults = Faults()
        self.uploads: list[Any] = []
        self.ndi_calls: list[str] = []


_current = _State()  # the state of the module last made; arrays keep their own reference


# ---- the device array ---------------------------------------------------------------------
def _unsupported(x: Any) -> TypeError:
    return TypeError(f"Unsupported type {type(x)}")


def _unwrap(x: Any) -> Any:
    """Arguments of a device routine: device arrays in, host arrays refused."""
    if isinstance(x, DeviceArray):
        return x._a
    if isinstance(x, np.ndarray):
        raise _unsupported(x)
    if isinstance(x, list | tuple):
        return type(x)(_unwrap(v) for v in x)
    return x


def _wrap(r: Any, state: _State) -> Any:
    if isinstance(r, np.ndarray):
        return DeviceArray(r, state)
    if isinstance(r, np.generic):
        return DeviceArray(np.asarray(r), state)
    if isinstance(r, tuple):
        return tuple(_wrap(v, state) for v in r)
    if isinstance(r, list):
        return [_wrap(v, state) for v in r]
    return r


def _unwrap_index(key: Any, state: _State) -> tuple[Any, bool, bool]:
    """(NumPy key, has an advanced index, has a boolean mask). Host index arrays are uploaded
    (allowed); a device array inside a slice is refused (CuPy arrays have no ``__index__``)."""
    items = key if isinstance(key, tuple) else (key,)
    out: list[Any] = []
    adv = mask = False
    for k in items:
        if isinstance(k, DeviceArray):
            adv = True
            mask = mask or k.dtype == np.bool_
            out.append(k._a)
        elif isinstance(k, np.ndarray | list):
            arr = np.asarray(k)
            if arr.dtype.kind not in "biu" and arr.size:
                raise IndexError(
                    "arrays used as indices must be of integer or boolean type "
                    f"(actual: {arr.dtype.type})"
                )
            state.uploads.append(arr.dtype)
            adv = True
            mask = mask or arr.dtype == np.bool_
            out.append(arr)
        elif isinstance(k, slice):
            for part in (k.start, k.stop, k.step):
                if isinstance(part, DeviceArray):
                    raise TypeError(
                        "slice indices must be integers or None or have an __index__ method"
                    )
            out.append(k)
        else:
            out.append(k)
    return (tuple(out) if isinstance(key, tuple) else out[0]), adv, mask


def _operand(x: Any, comparison: bool = False) -> Any:
    if isinstance(x, DeviceArray):
        return x._a
    if isinstance(x, np.ndarray):
        if comparison and x.ndim == 0:
            return x.item()
        raise _unsupported(x)
    if isinstance(x, bool | int | float | complex | np.generic):
        return x
    raise _unsupported(x)


class DeviceArray:
    """Stands for ``cupy.ndarray``: a NumPy array behind CuPy's rules (not a subclass)."""

    __slots__ = ("_a", "_s")
    __array_priority__ = 100.0
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, a: np.ndarray, state: _State | None = None) -> None:
        self._a = a
        self._s = state if state is not None else _current

    # -- protocols CuPy refuses --
    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        raise TypeError(_IMPLICIT)

    # -- explicit and scalar transfers --
    def get(
        self, stream: Any = None, order: str = "C", out: Any = None, blocking: bool = True
    ) -> np.ndarray:
        self._s.faults.check("download")
        self._s.transfers.downloads.append("get")
        host = np.array(self._a, order=order, copy=True)
        if out is not None:
            out[...] = host
            return out  # type: ignore[no-any-return]
        return host

    def set(self, arr: np.ndarray, stream: Any = None) -> None:
        self._s.uploads.append(np.asarray(arr).dtype)
        self._a[...] = arr

    def tolist(self) -> Any:
        self._s.transfers.downloads.append("tolist")
        return self._a.tolist()

    def tobytes(self, order: str = "C") -> bytes:
        self._s.transfers.downloads.append("tobytes")
        return self._a.tobytes(order)

    def item(self) -> Any:
        if self._a.size != 1:
            raise ValueError("can only convert an array of size 1 to a Python scalar")
        self._s.transfers.scalars.append("item")
        return self._a.item()

    def _scalar(self, kind: str, conv: Callable[[Any], Any]) -> Any:
        self._s.transfers.scalars.append(kind)
        return conv(self._a)  # NumPy's rules for size-1 / ndim>0 arrays, as CuPy's .get()

    def __int__(self) -> int:
        return self._scalar("int", int)  # type: ignore[no-any-return]

    def __float__(self) -> float:
        return self._scalar("float", float)  # type: ignore[no-any-return]

    def __complex__(self) -> complex:
        return self._scalar("complex", complex)  # type: ignore[no-any-return]

    def __bool__(self) -> bool:
        if self._a.size == 0:
            warnings.warn(
                "The truth value of an empty array is ambiguous. Returning False, but in "
                "future this will result in an error. Use `array.size > 0` to check that an "
                "array is not empty.",
                DeprecationWarning,
                stacklevel=2,
            )
            return False
        if self._a.size == 1:
            return self._scalar("bool", bool)  # type: ignore[no-any-return]
        raise ValueError(
            "The truth value of an array with more than one element is ambiguous. "
            "Use a.any() or a.all()"
        )

    def __repr__(self) -> str:
        self._s.transfers.downloads.append("repr")
        return repr(self._a).replace("array(", "DeviceArray(", 1)

    def __str__(self) -> str:
        self._s.transfers.downloads.append("str")
        return str(self._a)

    def __format__(self, spec: str) -> str:
        self._s.transfers.downloads.append("format")
        return format(self._a, spec)

    # -- attributes --
    @property
    def shape(self) -> tuple[int, ...]:
        return self._a.shape

    @shape.setter
    def shape(self, value: tuple[int, ...]) -> None:
        self._a.shape = value

    @property
    def dtype(self) -> np.dtype[Any]:
        return self._a.dtype

    @property
    def ndim(self) -> int:
        return self._a.ndim

    @property
    def size(self) -> int:
        return self._a.size

    @property
    def nbytes(self) -> int:
        return self._a.nbytes

    @property
    def itemsize(self) -> int:
        return self._a.itemsize

    @property
    def strides(self) -> tuple[int, ...]:
        return self._a.strides

    @property
    def flags(self) -> Any:
        return self._a.flags

    @property
    def T(self) -> DeviceArray:
        return DeviceArray(self._a.T, self._s)

    @property
    def real(self) -> DeviceArray:
        return DeviceArray(self._a.real, self._s)

    @property
    def imag(self) -> DeviceArray:
        return DeviceArray(self._a.imag, self._s)

    # -- ndarray methods CuPy has (core.pyx, v14.2) --
    _METHODS = frozenset(
        "all any argmax argmin argpartition argsort astype clip compress conj conjugate copy "
        "cumprod cumsum diagonal dot flatten max mean min nonzero partition prod ptp put ravel "
        "repeat reshape round searchsorted sort squeeze std sum swapaxes take trace transpose "
        "var view choose byteswap".split()
    )

    def __getattr__(self, name: str) -> Any:
        if name not in DeviceArray._METHODS:
            raise AttributeError(f"'cupy.ndarray' object has no attribute '{name}'")
        fn = getattr(self._a, name)
        state = self._s

        def method(*args: Any, **kw: Any) -> Any:
            if (
                name == "view"
                and args
                and isinstance(args[0], type)
                and not (issubclass(args[0], np.generic))
            ):
                raise TypeError("cupy.ndarray.view does not take an array type")
            if name == "nonzero":
                state.transfers.syncs.append("nonzero")
            if name in ("argsort", "sort"):
                kw = _stable_sort_kind(kw)
            with np.errstate(all="ignore"):
                return _wrap(fn(*_unwrap(args), **{k: _unwrap(v) for k, v in kw.items()}), state)

        return method

    def fill(self, value: Any) -> None:
        if isinstance(value, DeviceArray):
            if value.shape != ():
                raise ValueError("non-scalar cupy.ndarray cannot be used for fill")
            value = value._a[()]
        elif np.asarray(value).shape != ():
            raise ValueError("non-scalar numpy.ndarray cannot be used for fill")
        self._a.fill(value)

    def __copy__(self) -> DeviceArray:
        return DeviceArray(self._a.copy(), self._s)

    def __deepcopy__(self, memo: Any) -> DeviceArray:
        return self.__copy__()

    # -- sequence protocol --
    def __len__(self) -> int:
        if self._a.ndim == 0:
            raise TypeError("len() of unsized object")
        return len(self._a)

    def __iter__(self) -> Iterator[DeviceArray]:
        if self._a.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(self._a.shape[0]))

    def __getitem__(self, key: Any) -> DeviceArray:
        np_key, _adv, mask = _unwrap_index(key, self._s)
        if mask:
            self._s.transfers.syncs.append("boolean mask index")
        r = self._a[np_key]
        if isinstance(r, np.generic):  # an integer index: CuPy gives a 0-d view
            r = self._a[(*(np_key if isinstance(np_key, tuple) else (np_key,)), Ellipsis)]
            if isinstance(r, np.generic):
                r = np.asarray(r)
        return DeviceArray(r, self._s)

    def __setitem__(self, key: Any, value: Any) -> None:
        np_key, adv, _ = _unwrap_index(key, self._s)
        if isinstance(value, DeviceArray):
            v: Any = value._a
        elif isinstance(value, np.ndarray | list | tuple):
            arr = np.asarray(value)
            if arr.shape != () and not adv:
                # basic slicing: CuPy fills with a scalar and refuses host arrays
                raise ValueError("non-scalar numpy.ndarray cannot be used for fill")
            self._s.uploads.append(arr.dtype)
            v = arr
        else:
            v = value
        self._a[np_key] = v

    # -- NumPy interoperability, as cupy.ndarray --
    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        cp = sys.modules.get("cupy")
        fn = getattr(cp, ufunc.__name__, None) if cp is not None else None
        if fn is None or method != "__call__":
            return NotImplemented
        for x in inputs:
            if not isinstance(
                x, DeviceArray | np.ndarray | bool | int | float | complex | np.generic
            ):
                return NotImplemented
        if ufunc.__name__ in (
            "greater",
            "greater_equal",
            "less",
            "less_equal",
            "equal",
            "not_equal",
        ):
            inputs = tuple(
                x.item() if isinstance(x, np.ndarray) and x.ndim == 0 else x for x in inputs
            )
        if "out" in kwargs:
            (out,) = kwargs.pop("out")
            kwargs["out"] = out
        return fn(*inputs, **kwargs)

    def __array_function__(self, func: Any, types_: Any, args: Any, kwargs: Any) -> Any:
        cp = sys.modules.get("cupy")
        if func.__module__ != "numpy" or cp is None:
            return NotImplemented
        fn = getattr(cp, func.__name__, None)
        if fn is None or fn is func:
            return NotImplemented
        if not all(issubclass(t, DeviceArray | np.ndarray) for t in types_):
            return NotImplemented
        return fn(*args, **kwargs)

    # -- arithmetic --
    def _binary(self, other: Any, op: Callable[[Any, Any], Any], comparison: bool = False) -> Any:
        o = _operand(other, comparison)
        with np.errstate(all="ignore"):
            return _wrap(op(self._a, o), self._s)

    def _inplace(self, other: Any, op: Callable[[Any, Any], Any]) -> DeviceArray:
        o = _operand(other)
        with np.errstate(all="ignore"):
            op(self._a, o)
        return self

    def __neg__(self) -> DeviceArray:
        return DeviceArray(-self._a, self._s)

    def __pos__(self) -> DeviceArray:
        return DeviceArray(+self._a, self._s)

    def __abs__(self) -> DeviceArray:
        return DeviceArray(abs(self._a), self._s)

    def __invert__(self) -> DeviceArray:
        return DeviceArray(~self._a, self._s)


def _binop(name: str, comparison: bool = False) -> None:
    op = getattr(operator, name)
    rop_name = name.strip("_")

    def fwd(self: DeviceArray, other: Any) -> Any:
        return self._binary(other, op, comparison)

    setattr(DeviceArray, f"__{rop_name}__", fwd)
    if not comparison:

        def rev(self: DeviceArray, other: Any) -> Any:
            return self._binary(other, lambda a, b: op(b, a))

        setattr(DeviceArray, f"__r{rop_name}__", rev)
        iop = getattr(operator, f"i{rop_name}")

        def inplace(self: DeviceArray, other: Any) -> DeviceArray:
            return self._inplace(other, iop)

        setattr(DeviceArray, f"__i{rop_name}__", inplace)


for _name in (
    "add",
    "sub",
    "mul",
    "truediv",
    "floordiv",
    "mod",
    "pow",
    "and_",
    "or_",
    "xor",
    "lshift",
    "rshift",
    "matmul",
):
    _binop(_name)
for _name in ("eq", "ne", "lt", "le", "gt", "ge"):
    _binop(_name, comparison=True)


# ---- the cupy namespace -------------------------------------------------------------------
# Every name below exists in CuPy 14.2's cupy/__init__.py (checked against the tag).
_FUNCTIONS = (
    "abs absolute add all allclose any arange argmax argmin argsort argwhere around "
    "array_equal bincount bitwise_and bitwise_or bitwise_xor broadcast_arrays broadcast_to "
    "ceil clip concatenate count_nonzero cumsum diff divide empty empty_like equal exp "
    "expand_dims flatnonzero flip floor full full_like greater greater_equal histogram hypot "
    "interp invert isclose isfinite isin isnan less less_equal lexsort linspace log log1p "
    "logical_and logical_not logical_or maximum mean median minimum moveaxis multiply "
    "negative nonzero not_equal ones ones_like outer pad percentile power prod ravel repeat "
    "reshape rint round searchsorted sign sort sqrt square squeeze stack std subtract sum "
    "swapaxes take tile transpose true_divide unique unravel_index where zeros zeros_like"
).split()
_RETURN_0D = {"allclose", "array_equal", "count_nonzero"}  # NumPy: Python scalars; CuPy: 0-d
# CuPy's *_like read only the prototype's shape, dtype and layout: a host prototype is fine
_META_ONLY = {"zeros_like", "empty_like", "ones_like", "full_like"}
_SYNCING = {"argwhere", "nonzero", "flatnonzero", "unique"}  # data-dependent output shapes
_DTYPES = (
    "bool_ int8 int16 int32 int64 uint8 uint16 uint32 uint64 intp uintp float16 float32 "
    "float64 complex64 complex128 dtype iinfo finfo promote_types result_type can_cast "
    "ndim shape isscalar newaxis pi inf nan"
).split()


def _stable_sort_kind(kw: dict[str, Any]) -> dict[str, Any]:
    """CuPy sorts are always stable (``_check_kind_sort``: only None or 'stable'), NumPy's
    default is not: ties come out in CuPy's order here, as on a GPU."""
    kind = kw.get("kind")
    if kind is not None and kind != "stable":
        raise ValueError("kind can only be None or 'stable'")
    return {**kw, "kind": "stable"}


def _namespace_function(cp: types.ModuleType, state: _State, name: str) -> Callable[..., Any]:
    np_fn = getattr(np, name)

    def fn(*args: Any, **kw: Any) -> Any:
        state.faults.check(f"cupy.{name}")
        if name in _SYNCING:
            state.transfers.syncs.append(name)
        if name == "where" and len(args) == 1:
            state.transfers.syncs.append("where")
        if name in ("argsort", "sort"):
            kw = _stable_sort_kind(kw)
        if name == "histogram":
            if not args or not isinstance(args[0], DeviceArray):
                raise ValueError("x must be a cupy.ndarray")
            bins = kw.get("bins", args[1] if len(args) > 1 else 10)
            if isinstance(bins, str):
                raise NotImplementedError(f"string bins ({bins!r}) is not supported")
        if name in _META_ONLY and args and isinstance(args[0], np.ndarray):
            # CuPy reads the host prototype's shape, dtype and layout only: no transfer
            args = (DeviceArray(args[0], state), *args[1:])
        with np.errstate(all="ignore"):
            r = np_fn(*_unwrap(args), **{k: _unwrap(v) for k, v in kw.items()})
        if name in _RETURN_0D:
            r = np.asarray(r)
        return _wrap(r, state)

    fn.__name__ = name
    fn.__qualname__ = f"cupy.{name}"
    return fn


def _contains_device(a: Any) -> bool:
    if isinstance(a, DeviceArray):
        return True
    return isinstance(a, list | tuple) and any(_contains_device(v) for v in a)


def _contains_host(a: Any) -> bool:
    if isinstance(a, list | tuple):
        return any(_contains_host(v) for v in a)
    return not isinstance(a, DeviceArray)


def _unwrap_nested(a: Any) -> Any:
    if isinstance(a, DeviceArray):
        return a._a
    if isinstance(a, list | tuple):
        return [_unwrap_nested(v) for v in a]
    return a


def _asarray(state: _State) -> Callable[..., Any]:
    def asarray(
        a: Any, dtype: Any = None, order: Any = None, *, blocking: bool = False
    ) -> DeviceArray:
        if isinstance(a, DeviceArray):
            return a if dtype is None or a.dtype == dtype else a.astype(dtype)
        state.faults.check("cupy.asarray")
        on_device = _contains_device(a)  # cupy.array([dev, dev]) stacks on the device
        host = np.array(_unwrap_nested(a), dtype=dtype, order=order or "K", copy=True)
        if not on_device or _contains_host(a):
            state.uploads.append(host.dtype)
        return DeviceArray(host, state)

    return asarray


def _asnumpy(state: _State) -> Callable[..., Any]:
    def asnumpy(
        a: Any, stream: Any = None, order: str = "C", out: Any = None, *, blocking: bool = True
    ) -> np.ndarray:
        if isinstance(a, DeviceArray):
            return a.get(order=order, out=out)
        return np.asarray(a, order=order)

    return asnumpy


class _Grid:
    def __init__(self, grid: Any, state: _State) -> None:
        self._grid, self._s = grid, state

    def __getitem__(self, key: Any) -> Any:
        return _wrap(self._grid[key], self._s)


class _Pool:
    def __init__(self) -> None:
        self.limit: int | None = None
        self.freed = 0

    def set_limit(self, size: int | None = None, fraction: float | None = None) -> None:
        self.limit = size

    def get_limit(self) -> int:
        return self.limit or 0

    def used_bytes(self) -> int:
        return 1234

    def total_bytes(self) -> int:
        return 1234

    def n_free_blocks(self) -> int:
        return 0

    def free_all_blocks(self) -> None:
        self.freed += 1


def make(available: bool = True, allocation_fails: bool = False) -> types.ModuleType:
    """A fresh ``cupy`` stand-in (its own counters, pools and faults)."""
    global _current
    state = _State()
    _current = state
    cp = types.ModuleType("cupy")
    cp.__version__ = CUPY_VERSION_READ  # type: ignore[attr-defined]
    cp.ndarray = DeviceArray  # type: ignore[attr-defined]
    cp.transfers = state.transfers  # type: ignore[attr-defined]
    cp.faults = state.faults  # type: ignore[attr-defined]
    cp.uploads = state.uploads  # type: ignore[attr-defined]
    cp.ndi_calls = state.ndi_calls  # type: ignore[attr-defined]
    cp._state = state  # type: ignore[attr-defined]
    for name in _FUNCTIONS:
        setattr(cp, name, _namespace_function(cp, state, name))
    for name in _DTYPES:
        setattr(cp, name, getattr(np, name))
    asarray = _asarray(state)
    cp.asarray = asarray  # type: ignore[attr-defined]
    cp.array = asarray  # type: ignore[attr-defined]
    cp.asnumpy = _asnumpy(state)  # type: ignore[attr-defined]
    cp.ogrid = _Grid(np.ogrid, state)  # type: ignore[attr-defined]
    cp.mgrid = _Grid(np.mgrid, state)  # type: ignore[attr-defined]
    cp.get_array_module = lambda *a: (  # type: ignore[attr-defined]
        cp if any(isinstance(x, DeviceArray) for x in a) else np
    )
    zeros = cp.zeros  # type: ignore[attr-defined]

    def checked_zeros(*args: Any, **kw: Any) -> Any:
        if allocation_fails:
            raise CUDARuntimeError(100)
        return zeros(*args, **kw)

    cp.zeros = checked_zeros  # type: ignore[attr-defined]
    pool, pinned = _Pool(), _Pool()
    cp.get_default_memory_pool = lambda: pool  # type: ignore[attr-defined]
    cp.get_default_pinned_memory_pool = lambda: pinned  # type: ignore[attr-defined]
    stream = types.SimpleNamespace(synchronize=lambda: None)
    cp.cuda = types.SimpleNamespace(  # type: ignore[attr-defined]
        is_available=lambda: available,
        get_current_stream=lambda: stream,
        Stream=lambda non_blocking=False: stream,
        Device=lambda device=None: types.SimpleNamespace(id=0, synchronize=lambda: None),
        runtime=types.SimpleNamespace(
            CUDARuntimeError=CUDARuntimeError, getDeviceCount=lambda: int(available)
        ),
        memory=types.SimpleNamespace(OutOfMemoryError=OutOfMemoryError),
    )
    cp._util = types.SimpleNamespace(PerformanceWarning=PerformanceWarning)  # type: ignore[attr-defined]
    return cp


def install(monkeypatch: Any, cp: types.ModuleType) -> None:
    """Put the stand-in and its ``cupyx.scipy.ndimage`` in sys.modules."""
    from tests import fake_cupyx_ndimage

    cupyx = types.ModuleType("cupyx")
    cupyx_scipy = types.ModuleType("cupyx.scipy")
    ndi = fake_cupyx_ndimage.make(cp)
    cupyx.scipy = cupyx_scipy  # type: ignore[attr-defined]
    cupyx_scipy.ndimage = ndi  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cupy", cp)
    monkeypatch.setitem(sys.modules, "cupyx", cupyx)
    monkeypatch.setitem(sys.modules, "cupyx.scipy", cupyx_scipy)
    monkeypatch.setitem(sys.modules, "cupyx.scipy.ndimage", ndi)


def state_of(cp: types.ModuleType) -> _State:
    return cp._state  # type: ignore[attr-defined,no-any-return]


def host(x: Any) -> Any:
    """Test helper: a DeviceArray's NumPy value (no transfer counted), anything else as is."""
    return x._a if isinstance(x, DeviceArray) else x


__all__ = [
    "CUDARuntimeError",
    "DeviceArray",
    "OutOfMemoryError",
    "PerformanceWarning",
    "Transfers",
    "host",
    "install",
    "make",
]
