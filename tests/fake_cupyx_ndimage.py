"""``cupyx.scipy.ndimage`` stand-in: SciPy does the arithmetic, CuPy's rules decide what is
accepted and what comes back.

Read from CuPy **v14.2.0** (tag commit dc1552a32f5489bdf6a5a721dfd952a92d47d934),
``cupyx/scipy/ndimage/_util.py``, ``_filters.py``, ``_filters_core.py``, ``_morphology.py``,
``_measurements.py``, ``_interpolation.py``, ``_distance_transform.py``. Each rule below names
the function in that source it comes from.

Arrays
  * Inputs, ``structure``/``footprint``/``mask``/``weights``/``coordinates`` arrays, ``labels``
    and ``output`` arrays must be device arrays: CuPy's kernels refuse host arrays
    (``TypeError: Unsupported type <class 'numpy.ndarray'>``). Exceptions kept from CuPy:
    ``label(structure=...)`` takes a host or device array (it is read on the host; a device
    structure is downloaded); binary morphology takes a ``tuple``/``int``/``list`` structure
    (a box of that shape). ``generate_binary_structure`` returns a *device* array.
  * ``output=``: a device array (written in place), a dtype, or ``None``. A host ``ndarray`` is
    refused (filters, label). Binary morphology (``_binary_erosion``) *ignores* any ``output``
    that is not a device array and returns a new ``bool`` array: an ``output=`` dtype or host
    array there silently does nothing, so the shim does the same.

Filters (``gaussian_filter``, ``uniform_filter``, ``median_filter``, ``minimum_filter``,
``maximum_filter``, ``laplace``)
  * ``mode`` must be one of reflect, constant, nearest, mirror, wrap, grid-mirror, grid-wrap,
    grid-reflect (``_util._check_mode``: ``RuntimeError``; note: not ``grid-constant``).
  * ``median_filter``/``minimum_filter``/``maximum_filter`` with a NaN ``cval``:
    ``NotImplementedError`` (``_rank_filter``, ``_min_or_max_filter``).
  * a non-finite ``cval`` with ``mode='constant'`` and an integer output:
    ``NotImplementedError`` (``_util._check_cval``).

Interpolation (``zoom``, ``map_coordinates``)
  * ``order`` 0..5 (``ValueError``), ``order=None`` warns; ``mode`` one of constant,
    grid-constant, nearest, mirror, reflect, grid-mirror, wrap, grid-wrap, opencv,
    _opencv_edge (``_check_parameter``: ``ValueError``); ``zoom(grid_mode=True)`` with
    ``constant``/``wrap`` warns (``UserWarning``). ``map_coordinates`` coordinates must be a
    real-valued device array (``TypeError``).

Binary morphology (``binary_erosion``, ``binary_dilation``, ``binary_opening``,
``binary_closing``)
  * ``iterations`` must be an integer (``TypeError``). **``iterations != 1`` (including
    ``< 1``, "until stable") with ``brute_force=False`` (the default) raises
    ``NotImplementedError: only brute_force iteration has been implemented``** whenever the
    structure's centre is true (always for ``None``, a tuple, or a full box) —
    ``_binary_erosion``; opening/closing pass ``iterations`` on, so they raise too. Repeat
    the call with ``iterations=1`` or pass ``brute_force=True`` (which synchronises every
    iteration).
  * ``structure.ndim`` must equal the number of axes (``RuntimeError``); ``mask`` must have
    the input's shape (``RuntimeError``); complex input is refused (``TypeError``).
  * ``binary_fill_holes`` with ``origin=0`` over all axes uses ``label`` on the padded
    complement: a given ``structure`` must then be 3 wide on every axis (``ValueError``).

Measurements
  * ``label``: input must be a device array (``TypeError: input must be cupy.ndarray``);
    structure of equal rank (``RuntimeError``) and 3 wide per axis (``ValueError``); returns
    ``(device int32 labels, Python int)``, or only the int when ``output`` is a device array.
    Synchronises (the label count).
  * ``find_objects``: integer or boolean input (``TypeError`` otherwise); returns a host list of
    tuples of slices (``None`` for missing labels) after one download of the boxes.
  * ``sum_labels``/``sum``/``center_of_mass``: ``labels`` must be a device array
    (``TypeError: label must be cupy.ndarray``); ``index`` must be a device array or a Python
    ``int`` — a list, a tuple or a NumPy integer raises ``TypeError: index must be
    cupy.ndarray or a scalar int`` (so ``center_of_mass(x, labels, [1, 2])`` fails on CuPy).
    Inputs whose dtype is not int32/uint32/uint64/float16/float32/float64 (e.g. **bool**,
    uint8, int16, int64) emit ``cupy._util.PerformanceWarning``. Results are **device**
    arrays: ``sum`` a 0-d array, ``center_of_mass`` a tuple of 0-d device arrays (one list
    entry per index for an index array). No floating-point warnings (empty mask: NaN).
  * ``mean``: ``index`` a device array or any scalar, the same dtype warning; device result.
  * ``minimum``/``maximum``: ``index`` may be a list (converted); device results.

Distance transform (``distance_transform_edt``)
  * 2D and 3D only (``NotImplementedError``); ``distances``/``indices`` outputs must be device
    arrays; returns device arrays (float64 distances, int32 indices).

Grey morphology (``grey_erosion``/``grey_dilation``/``grey_opening``/``grey_closing``): as the
  min/max filters (CuPy implements them with the same kernel); footprint a device array.

Anything else is missing on purpose: a new use adds its CuPy rules here first.
"""

from __future__ import annotations

import math
import numbers
import operator
import types
import warnings
from typing import Any

import numpy as np
import scipy.ndimage as sndi

from tests.fake_cupy import DeviceArray, PerformanceWarning, _State, _unsupported

FILTER_MODES = (
    "reflect",
    "constant",
    "nearest",
    "mirror",
    "wrap",
    "grid-mirror",
    "grid-wrap",
    "grid-reflect",
)
INTERP_MODES = (
    "constant",
    "grid-constant",
    "nearest",
    "mirror",
    "reflect",
    "grid-mirror",
    "wrap",
    "grid-wrap",
    "opencv",
    "_opencv_edge",
)
FAST_SUM_DTYPES = tuple(
    np.dtype(t) for t in ("int32", "float16", "float32", "float64", "uint32", "uint64")
)


def make(cp: types.ModuleType) -> types.ModuleType:
    state: _State = cp._state  # type: ignore[attr-defined]
    mod = types.ModuleType("cupyx.scipy.ndimage")

    def enter(name: str) -> None:
        state.faults.check(f"ndimage.{name}")
        state.ndi_calls.append(name)

    def dev(x: Any, what: str = "input") -> np.ndarray:
        if isinstance(x, DeviceArray):
            return x._a
        if what == "input":
            raise TypeError("input must be cupy.ndarray")
        raise _unsupported(x)

    def opt_dev(x: Any, what: str) -> np.ndarray | None:
        return None if x is None else dev(x, what)

    def out_of(result: np.ndarray, output: Any) -> Any:
        """Filters' and label's ``output=``: a device array, a dtype, or None."""
        if output is None:
            return DeviceArray(result, state)
        if isinstance(output, DeviceArray):
            if output.shape != result.shape:
                raise RuntimeError("output shape not correct")
            output._a[...] = result
            return output
        if isinstance(output, np.ndarray):
            raise _unsupported(output)
        return DeviceArray(result.astype(np.dtype(output)), state)

    def check_modes(mode: Any) -> None:
        for m in [mode] if isinstance(mode, str) else list(mode):
            if m not in FILTER_MODES:
                raise RuntimeError(f"boundary mode not supported (actual: {m})")

    def check_cval(mode: Any, cval: float, dtype: Any) -> None:
        modes = [mode] if isinstance(mode, str) else list(mode)
        if "constant" in modes and np.dtype(dtype).kind in "iu" and not np.isfinite(cval):
            raise NotImplementedError(
                "Non-finite cval is not supported for outputs with integer dtype."
            )

    # ---- filters ----------------------------------------------------------------------------
    def _filter(name: str, nan_cval: bool = False) -> Any:
        fn = getattr(sndi, name)

        def f(
            input: Any,
            *args: Any,
            output: Any = None,
            mode: Any = "reflect",
            cval: float = 0.0,
            **kw: Any,
        ) -> Any:
            enter(name)
            a = dev(input)
            check_modes(mode)
            if nan_cval and math.isnan(cval):
                raise NotImplementedError("NaN cval is unsupported")
            check_cval(
                mode,
                cval,
                a.dtype
                if output is None or isinstance(output, DeviceArray | np.ndarray)
                else output,
            )
            if "footprint" in kw and kw["footprint"] is not None:
                kw["footprint"] = dev(kw["footprint"], "footprint")
            with np.errstate(all="ignore"):
                r = fn(a, *args, mode=mode, cval=cval, **kw)
            return out_of(np.asarray(r), output)

        f.__name__ = name
        return f

    mod.gaussian_filter = _filter("gaussian_filter")  # type: ignore[attr-defined]
    mod.uniform_filter = _filter("uniform_filter")  # type: ignore[attr-defined]
    mod.median_filter = _filter("median_filter", nan_cval=True)  # type: ignore[attr-defined]
    mod.minimum_filter = _filter("minimum_filter", nan_cval=True)  # type: ignore[attr-defined]
    mod.maximum_filter = _filter("maximum_filter", nan_cval=True)  # type: ignore[attr-defined]
    mod.laplace = _filter("laplace")  # type: ignore[attr-defined]
    # grey morphology: cupyx/scipy/ndimage/_morphology.py runs them through the same
    # _min_or_max_filter as minimum/maximum_filter (size, footprint or structure; NaN cval not)
    for grey in ("grey_erosion", "grey_dilation", "grey_opening", "grey_closing"):
        setattr(mod, grey, _filter(grey, nan_cval=True))

    # ---- interpolation ----------------------------------------------------------------------
    def check_parameter(func: str, order: Any, mode: str) -> None:
        if order is None:
            warnings.warn(
                f"Currently the default order of {func} is 1. In a future release this may "
                "change to 3 to match scipy.ndimage ",
                stacklevel=3,
            )
        elif order < 0 or 5 < order:
            raise ValueError("spline order is not supported")
        if mode not in INTERP_MODES:
            raise ValueError(f"boundary mode ({mode}) is not supported")

    def zoom(
        input: Any,
        zoom: Any,
        output: Any = None,
        order: int = 3,
        mode: str = "constant",
        cval: float = 0.0,
        prefilter: bool = True,
        *,
        grid_mode: bool = False,
    ) -> Any:
        enter("zoom")
        a = dev(input)
        check_parameter("zoom", order, mode)
        if grid_mode and mode in ("constant", "wrap"):
            suggest = {"constant": "grid-constant", "wrap": "grid-wrap"}[mode]
            warnings.warn(
                f"It is recommended to use mode = {suggest} instead of {mode} when grid_mode "
                "is True.",
                stacklevel=2,
            )
        r = sndi.zoom(
            a, zoom, order=order, mode=mode, cval=cval, prefilter=prefilter, grid_mode=grid_mode
        )
        return out_of(np.asarray(r), output)

    def map_coordinates(
        input: Any,
        coordinates: Any,
        output: Any = None,
        order: int = 3,
        mode: str = "constant",
        cval: float = 0.0,
        prefilter: bool = True,
    ) -> Any:
        enter("map_coordinates")
        a = dev(input)
        check_parameter("map_coordinates", order, mode)
        c = dev(coordinates, "coordinates")
        if c.dtype.kind not in "fiu":
            raise TypeError("coordinates should have floating point dtype")
        r = sndi.map_coordinates(a, c, order=order, mode=mode, cval=cval, prefilter=prefilter)
        return out_of(np.asarray(r), output)

    mod.zoom = zoom  # type: ignore[attr-defined]
    mod.map_coordinates = map_coordinates  # type: ignore[attr-defined]

    # ---- binary morphology ------------------------------------------------------------------
    def generate_binary_structure(rank: int, connectivity: int) -> DeviceArray:
        return DeviceArray(sndi.generate_binary_structure(rank, connectivity), state)

    def prep_structure(structure: Any, ndim: int) -> tuple[np.ndarray, bool]:
        """(structure as a host bool array, centre is true) as _prep_structure/_binary_erosion."""
        if structure is None:
            return sndi.generate_binary_structure(ndim, 1), True
        if isinstance(structure, int):
            structure = (structure,) * ndim
        elif isinstance(structure, list):
            structure = tuple(structure)
        if isinstance(structure, tuple):
            if len(structure) == 0:
                raise RuntimeError("structure must not be empty")
            return np.ones(structure, bool), True
        s = dev(structure, "structure").astype(bool)
        if s.ndim != ndim:
            raise RuntimeError("structure and input must have same dimensionality")
        if s.size < 1:
            raise RuntimeError("structure must not be empty")
        if s.all():
            return s, True
        return s, bool(s[tuple(n // 2 for n in s.shape)])

    def binary(name: str) -> Any:
        fn = getattr(sndi, name)

        def f(
            input: Any,
            structure: Any = None,
            iterations: int = 1,
            mask: Any = None,
            output: Any = None,
            border_value: int = 0,
            origin: Any = 0,
            brute_force: bool = False,
            **kw: Any,
        ) -> Any:
            enter(name)
            a = dev(input)
            if a.dtype.kind == "c":
                raise TypeError("Complex type not supported")
            try:
                iterations = operator.index(iterations)
            except TypeError:
                raise TypeError("iterations parameter should be an integer") from None
            s, centre = prep_structure(structure, a.ndim)
            m = opt_dev(mask, "mask")
            if m is not None and m.shape != a.shape:
                raise RuntimeError("mask and input must have equal sizes")
            if iterations != 1 and centre and not brute_force:
                raise NotImplementedError("only brute_force iteration has been implemented")
            r = fn(
                a,
                structure=s,
                iterations=iterations,
                mask=m,
                border_value=border_value,
                origin=origin,
                brute_force=brute_force,
                **kw,
            )
            if isinstance(output, DeviceArray):  # anything else is ignored: a new bool array
                output._a[...] = r
                return output
            return DeviceArray(np.asarray(r, bool), state)

        f.__name__ = name
        return f

    def composite(name: str) -> Any:
        """opening/closing: no ``mask``/``border_value`` of their own in SciPy's order; CuPy
        passes ``iterations`` and ``brute_force`` on to erosion and dilation."""
        fn = getattr(sndi, name)

        def f(
            input: Any,
            structure: Any = None,
            iterations: int = 1,
            output: Any = None,
            origin: Any = 0,
            mask: Any = None,
            border_value: int = 0,
            brute_force: bool = False,
        ) -> Any:
            enter(name)
            a = dev(input)
            try:
                iterations = operator.index(iterations)
            except TypeError:
                raise TypeError("iterations parameter should be an integer") from None
            s, centre = prep_structure(structure, a.ndim)
            m = opt_dev(mask, "mask")
            if iterations != 1 and centre and not brute_force:
                raise NotImplementedError("only brute_force iteration has been implemented")
            r = fn(
                a,
                structure=s,
                iterations=iterations,
                origin=origin,
                mask=m,
                border_value=border_value,
                brute_force=brute_force,
            )
            if isinstance(output, DeviceArray):
                output._a[...] = r
                return output
            return DeviceArray(np.asarray(r, bool), state)

        f.__name__ = name
        return f

    def binary_fill_holes(
        input: Any, structure: Any = None, output: Any = None, origin: Any = 0
    ) -> Any:
        enter("binary_fill_holes")
        a = dev(input)
        s = None
        if structure is not None:
            if isinstance(structure, DeviceArray):
                state.transfers.syncs.append("binary_fill_holes structure")
            s = np.asarray(structure._a if isinstance(structure, DeviceArray) else structure, bool)
            if s.ndim != a.ndim:
                raise RuntimeError("structure and input must have equal rank")
            if any(n != 3 for n in s.shape) and origin == 0:
                raise ValueError("structure dimensions must be equal to 3")
        if origin != 0:
            warnings.warn(
                "It is recommended to keep the default origin=0 so that a faster "
                "non-iterative algorithm can be used.",
                stacklevel=2,
            )
        state.transfers.syncs.append("binary_fill_holes label count")
        r = sndi.binary_fill_holes(a, structure=s, origin=origin)
        if isinstance(output, DeviceArray):
            output._a[...] = r
            return output
        return DeviceArray(np.asarray(r, bool), state)

    mod.generate_binary_structure = generate_binary_structure  # type: ignore[attr-defined]
    mod.binary_erosion = binary("binary_erosion")  # type: ignore[attr-defined]
    mod.binary_dilation = binary("binary_dilation")  # type: ignore[attr-defined]
    mod.binary_opening = composite("binary_opening")  # type: ignore[attr-defined]
    mod.binary_closing = composite("binary_closing")  # type: ignore[attr-defined]
    mod.binary_fill_holes = binary_fill_holes  # type: ignore[attr-defined]

    # ---- measurements -----------------------------------------------------------------------
    def label(input: Any, structure: Any = None, output: Any = None) -> Any:
        enter("label")
        if not isinstance(input, DeviceArray):
            raise TypeError("input must be cupy.ndarray")
        a = input._a
        if a.dtype.char in "FD":
            raise TypeError("Complex type not supported")
        if structure is None:
            s = sndi.generate_binary_structure(a.ndim, 1)
        else:
            if isinstance(structure, DeviceArray):
                state.transfers.syncs.append("label structure")
                structure = structure._a
            s = np.array(structure, dtype=bool)
        if s.ndim != a.ndim:
            raise RuntimeError("structure and input must have equal rank")
        if any(n != 3 for n in s.shape):
            raise ValueError("structure dimensions must be equal to 3")
        if isinstance(output, np.ndarray):
            raise TypeError(f"Cannot interpret {type(output)} as a data type")
        state.transfers.syncs.append("label count")
        labels, n = sndi.label(a, structure=s)
        if isinstance(output, DeviceArray):
            if output.shape != a.shape:
                raise ValueError("output shape not correct")
            output._a[...] = labels
            return int(n)
        dtype = np.int32 if output is None else np.dtype(output)
        return DeviceArray(labels.astype(dtype), state), int(n)

    def find_objects(input: Any, max_label: int = 0) -> list[tuple[slice, ...] | None]:
        enter("find_objects")
        a = dev(input)
        if a.dtype.kind not in "bui":
            raise TypeError(f"Input dtype {a.dtype.name} cannot be interpreted as an integer")
        state.transfers.syncs.append("find_objects boxes")
        arr = a.astype(np.int64) if a.dtype == np.bool_ else a
        return list(sndi.find_objects(arr, max_label=max_label))

    def check_index(index: Any) -> Any:
        if index is None or isinstance(index, int):
            return index
        if isinstance(index, DeviceArray):
            return index._a
        raise TypeError("index must be cupy.ndarray or a scalar int")

    def warn_dtype(func: str, dtype: np.dtype[Any]) -> None:
        if dtype not in FAST_SUM_DTYPES:
            warnings.warn(
                f"Using the slower implementation as cupyx.scipy.ndimage.{func} supports "
                "int32, float16, float32, float64, uint32, uint64 as data types for the fast "
                "implmentation",
                PerformanceWarning,
                stacklevel=3,
            )

    def sum_labels(input: Any, labels: Any = None, index: Any = None) -> DeviceArray:
        enter("sum_labels")
        if not isinstance(input, DeviceArray):
            raise TypeError("input must be cupy.ndarray")
        a = input._a
        if a.dtype.kind == "c":
            raise TypeError("cupyx.scipy.ndimage.sum does not support complex")
        warn_dtype("sum", a.dtype)
        if labels is None:
            return DeviceArray(np.asarray(a.sum()), state)
        if not isinstance(labels, DeviceArray):
            raise TypeError("label must be cupy.ndarray")
        idx = check_index(index)
        lab = labels._a
        if idx is None:
            return DeviceArray(np.asarray(a[lab != 0].sum()), state)
        if isinstance(idx, int):
            return DeviceArray(np.asarray(a[lab == idx].sum()), state)
        return DeviceArray(np.asarray(sndi.sum_labels(a, lab, idx), np.float64), state)

    def center_of_mass(input: Any, labels: Any = None, index: Any = None) -> Any:
        enter("center_of_mass")
        if not isinstance(input, DeviceArray):
            raise TypeError("input must be cupy.ndarray")
        a = input._a
        if a.dtype.kind == "c":
            raise TypeError("cupyx.scipy.ndimage.sum does not support complex")
        warn_dtype("sum", a.dtype)
        if labels is not None and not isinstance(labels, DeviceArray):
            raise TypeError("label must be cupy.ndarray")
        idx = check_index(index) if labels is not None else index
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # device kernels: NaN, no warning
            if labels is None:
                r: Any = sndi.center_of_mass(a)
            else:
                r = sndi.center_of_mass(a, labels._a, idx)
        if isinstance(r, tuple):
            return tuple(DeviceArray(np.asarray(v, np.float64), state) for v in r)
        return [DeviceArray(np.asarray(v, np.float64), state) for v in r]

    def mean(input: Any, labels: Any = None, index: Any = None) -> DeviceArray:
        enter("mean")
        if not isinstance(input, DeviceArray):
            raise TypeError("input must be cupy.ndarray")
        warn_dtype("mean", input._a.dtype)
        if labels is not None and not isinstance(labels, DeviceArray):
            raise TypeError("label must be cupy.ndarray")
        if index is not None and not isinstance(index, DeviceArray | numbers.Number):
            raise TypeError("index must be cupy.ndarray or a scalar int")
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            r = sndi.mean(
                input._a,
                None if labels is None else labels._a,
                index._a if isinstance(index, DeviceArray) else index,
            )
        return DeviceArray(np.asarray(r, np.float64), state)

    def select(name: str) -> Any:
        fn = getattr(sndi, name)

        def f(input: Any, labels: Any = None, index: Any = None) -> DeviceArray:
            enter(name)
            a = dev(input)
            lab = opt_dev(labels, "labels")
            idx = index._a if isinstance(index, DeviceArray) else index
            return DeviceArray(np.asarray(fn(a, lab, idx)), state)

        f.__name__ = name
        return f

    mod.label = label  # type: ignore[attr-defined]
    mod.find_objects = find_objects  # type: ignore[attr-defined]
    mod.sum_labels = sum_labels  # type: ignore[attr-defined]
    mod.sum = sum_labels  # type: ignore[attr-defined]
    mod.center_of_mass = center_of_mass  # type: ignore[attr-defined]
    mod.mean = mean  # type: ignore[attr-defined]
    mod.minimum = select("minimum")  # type: ignore[attr-defined]
    mod.maximum = select("maximum")  # type: ignore[attr-defined]

    # ---- distance transform -----------------------------------------------------------------
    def distance_transform_edt(
        image: Any,
        sampling: Any = None,
        return_distances: bool = True,
        return_indices: bool = False,
        distances: Any = None,
        indices: Any = None,
        *,
        block_params: Any = None,
        float64_distances: bool = True,
    ) -> Any:
        enter("distance_transform_edt")
        a = dev(image)
        if a.ndim not in (2, 3):
            raise NotImplementedError("Only 2D and 3D distance transforms are supported.")
        for out in (distances, indices):
            if out is not None and not isinstance(out, DeviceArray):
                raise _unsupported(out)
        r = sndi.distance_transform_edt(
            a, sampling=sampling, return_distances=return_distances, return_indices=return_indices
        )
        parts = list(r) if isinstance(r, tuple) else [r]
        outs: list[DeviceArray] = []
        if return_distances:
            d = np.asarray(parts.pop(0), np.float64 if float64_distances else np.float32)
            if distances is not None:
                distances._a[...] = d
            outs.append(distances if distances is not None else DeviceArray(d, state))
        if return_indices:
            i = np.asarray(parts.pop(0), np.int32)
            if indices is not None:
                indices._a[...] = i
            outs.append(indices if indices is not None else DeviceArray(i, state))
        return outs[0] if len(outs) == 1 else tuple(outs)

    mod.distance_transform_edt = distance_transform_edt  # type: ignore[attr-defined]
    return mod
