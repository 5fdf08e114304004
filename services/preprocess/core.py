"""Preprocess's core: SeriesReady → decoded, calibrated, processed volume → VolumePrepared.

Decode every instance (threads: the JPEG/JPEG 2000 decoders release the GIL), sort and check
the geometry, calibrate to Hounsfield units, upload the compact int16 volume to the device
(no float64 ever crosses the bus), run the chain configured for the modality/body part,
compute drift statistics, download, compress (zstd) and store the result encrypted.

The device part (upload → chain → statistics → back to int16 for CT → two downloads: the
volume and the statistics) runs under a :class:`~shared.imaging.backend.DeviceRunner`: a GPU
failure that is not bad input redoes it on the CPU (``backend`` in the output says which ran).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import numpy as np
from prometheus_client import CollectorRegistry, Gauge

from shared.config import PreprocessSettings
from shared.imaging import ops
from shared.imaging.backend import Backend, DeviceRunner, device_failure_cause, download
from shared.imaging.errors import ImagingError
from shared.imaging.packed import pack_volume
from shared.imaging.volume import Assembled, Slice, Volume, VoxelBudget, assemble, decode
from shared.runtime.errors import PoisonError
from shared.runtime.stage import Context
from shared.schemas import InstanceRef, SeriesReady, VolumePrepared
from shared.storage import BlobError, BlobStore
from shared.topology import VOLUMES

Step = dict[str, Any]
log = logging.getLogger("radstream.preprocess")

# Default chains, chosen for the segmentation tasks and for latency: in-plane denoising only
# (segmentation measures in physical units, so no resampling is needed on the hot path).
DEFAULT_CHAINS: dict[str, list[Step]] = {
    "CT:CHEST": [{"op": "gaussian", "sigma": [0.0, 0.7, 0.7]}],
    "CT:HEAD": [{"op": "gaussian", "sigma": [0.0, 0.8, 0.8]}],
    "CT": [{"op": "gaussian", "sigma": [0.0, 0.7, 0.7]}],
    "MR": [{"op": "gaussian", "sigma": [0.0, 0.6, 0.6]}],
    "DX": [{"op": "gaussian", "sigma": [0.0, 1.0, 1.0]}],
    "CR": [{"op": "gaussian", "sigma": [0.0, 1.0, 1.0]}],
    "*": [],
}
STAT_QS = (1, 5, 25, 50, 75, 95, 99)


def chain_for(modality: str, body_part: str | None, chains: dict[str, list[Step]]) -> list[Step]:
    for key in (f"{modality}:{body_part or ''}", modality, "*"):
        if key in chains:
            return chains[key]
    return []


def _in_plane(step: Step) -> bool:
    """True when a step never mixes slices (so it can run slab by slab, in threads)."""
    if step["op"] in ("gaussian",):
        sigma = step.get("sigma", 0)
        return isinstance(sigma, list) and float(sigma[0]) == 0.0
    if step["op"] in ("median", "mean"):
        size = step.get("size", 1)
        return isinstance(size, list) and int(size[0]) == 1
    return step["op"] in ("window",)


def apply_step(
    image: Any, step: Step, spacing: tuple[float, float, float]
) -> tuple[Any, tuple[float, float, float]]:
    op = step["op"]
    if op == "gaussian":
        return ops.gaussian(image, sigma=step["sigma"]), spacing
    if op == "median":
        return ops.median(image, size=step["size"]), spacing
    if op == "mean":
        return ops.mean(image, size=step["size"]), spacing
    if op == "window":
        center, width = (
            ops.WINDOWS[step["preset"]] if "preset" in step else (step["center"], step["width"])
        )
        return ops.window(image, center=center, width=width), spacing
    if op == "equalize":
        return ops.equalize_histogram(image, bins=int(step.get("bins", 256))), spacing
    if op == "log":
        return ops.log_transform(image), spacing
    if op == "normalize":
        return ops.normalize(image, method=str(step.get("method", "zscore"))), spacing
    if op == "resample":
        return ops.resample(
            image, spacing=spacing, target=step["target"], order=int(step.get("order", 1))
        )
    raise ValueError(f"unknown preprocessing step {op!r}")


def _slabwise(
    fn: Callable[[Any], Any],
    image: np.ndarray,
    threads: int,
    dtype: Any = None,
    chunk: int | None = None,
) -> np.ndarray:
    """``fn`` slab by slab along axis 0 in ``threads`` threads: ``threads`` slabs, or slabs of
    ``chunk`` slices (small enough to stay in cache between the steps of a fused ``fn``)."""
    if (threads <= 1 and chunk is None) or image.shape[0] < 2 * max(threads, 1):
        return np.asarray(fn(image))
    n = threads if chunk is None else max(threads, -(-image.shape[0] // chunk))
    bounds = np.linspace(0, image.shape[0], n + 1).astype(int)
    out = np.empty(image.shape, dtype or image.dtype)

    def run(i: int) -> None:
        out[bounds[i] : bounds[i + 1]] = fn(image[bounds[i] : bounds[i + 1]])

    if threads <= 1:
        for i in range(n):
            run(i)
        return out
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(run, range(n)))
    return out


class PreprocessMetrics:
    def __init__(self, registry: CollectorRegistry, backend: Backend) -> None:
        info = Gauge(
            "radstream_backend_info",
            "Array backend in use (1 = active)",
            ["stage", "backend"],
            registry=registry,
        )
        info.labels("preprocess", backend.name).set(1)
        self.gpu_memory = Gauge(
            "radstream_gpu_memory_bytes",
            "Device memory held by the CuPy pool",
            ["stage"],
            registry=registry,
        )
        self.hu = Gauge(
            "radstream_image_intensity",
            "Last volume's intensity percentile per modality (HU for CT)",
            ["modality", "q"],
            registry=registry,
        )
        self.noise = Gauge(
            "radstream_image_noise",
            "Last volume's noise estimate per modality",
            ["modality"],
            registry=registry,
        )
        self.voxels = Gauge(
            "radstream_volume_voxels", "Voxels of the last volume", ["stage"], registry=registry
        )


@dataclass
class PreprocessCore:
    store: BlobStore
    backend: Backend
    settings: PreprocessSettings
    metrics: PreprocessMetrics | None = None
    chains: dict[str, list[Step]] = field(default_factory=lambda: dict(DEFAULT_CHAINS))
    runner: DeviceRunner | None = None  # main.py passes one on the service's registry

    def __post_init__(self) -> None:
        if self.settings.chains:
            self.chains.update(json.loads(self.settings.chains))
        self._runner = self.runner or DeviceRunner(self.backend, stage="preprocess")

    # ---- GPU warm-up ----------------------------------------------------------------------
    def warm_up(self) -> list[tuple[Any, ...]]:
        """Compile the kernels of every configured chain for the configured in-plane shapes."""
        warmed: list[tuple[Any, ...]] = []
        if self.backend.name != "gpu":
            return warmed
        for shape_text in self.settings.warmup_shapes.split(","):
            rows, cols = (int(v) for v in shape_text.lower().split("x"))
            for chain in self.chains.values():
                for step in chain:
                    key = (rows, cols, json.dumps(step, sort_keys=True))

                    def run(step: Step = step, rows: int = rows, cols: int = cols) -> None:
                        img = self.backend.upload(np.zeros((4, rows, cols), np.int16)).astype(
                            self.backend.xp.float32
                        )
                        apply_step(img, step, (1.0, 1.0, 1.0))

                    try:
                        if self.backend.warm_up(key, run):
                            warmed.append(key)
                    except Exception as exc:
                        cause = device_failure_cause(exc)
                        if cause is None:
                            raise
                        # the records that need this step will be redone on the cpu
                        log.warning("preprocess: warm-up of a chain step failed (%s)", cause)
        self.backend.free()
        return warmed

    # ---- handler --------------------------------------------------------------------------
    def handle(self, msg: SeriesReady, ctx: Context) -> VolumePrepared:
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        declared = msg.rows * msg.columns * len(msg.instances)
        if declared > self.settings.max_voxels:  # before a byte is fetched or decoded
            raise ImagingError(
                "volume_too_large", f"{declared} voxels declared exceed the configured cap"
            )
        one = partial(
            decode,
            max_voxels=self.settings.max_voxels,
            max_frame_pixels=self.settings.max_frame_pixels,
            shape=(msg.rows, msg.columns) if msg.rows > 0 and msg.columns > 0 else None,
            budget=VoxelBudget(self.settings.max_voxels),
        )

        def fetched_and_decoded(ref: InstanceRef) -> Slice:
            # read, decrypt and decode in the same thread: the blob store's reads and the AEAD
            # overlap the decoders (and each instance's bytes are dropped once decoded)
            try:
                data = self.store.get(ref.blob)
            except BlobError as exc:
                raise PoisonError(
                    exc.reason, "a referenced instance is missing or corrupt in the blob store"
                ) from None
            return one(data)

        with ThreadPoolExecutor(max(1, self.settings.threads)) as pool:
            slices: list[Slice] = list(pool.map(fetched_and_decoded, msg.instances))
        timings["decode"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        volume, asm = self._calibrated(msg, slices)
        del slices
        timings["calibrate"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        chain = chain_for(msg.modality, msg.body_part, self.chains)
        is_ct = msg.modality == "CT"
        out, spacing, stats, used = self._runner.run(
            lambda be: self._run_chain(volume, chain, be, is_ct)
        )
        timings["chain"] = time.perf_counter() - t2

        t3 = time.perf_counter()
        ref = self.store.put(
            pack_volume(out, self.settings.compression_level, self.settings.threads), VOLUMES
        )
        timings["store"] = time.perf_counter() - t3
        timings["total"] = time.perf_counter() - t0
        if self.metrics is not None:
            for q in STAT_QS:
                self.metrics.hu.labels(msg.modality, f"p{q}").set(stats[f"p{q}"])
            self.metrics.noise.labels(msg.modality).set(stats["noise"])
            self.metrics.voxels.labels("preprocess").set(out.size)
            self.metrics.gpu_memory.labels("preprocess").set(self.backend.memory_in_use())
        self.backend.free()
        return VolumePrepared(
            study_instance_uid=msg.study_instance_uid,
            series_instance_uid=msg.series_instance_uid,
            revision=msg.revision,
            modality=msg.modality,
            body_part=msg.body_part,
            volume=ref,
            dtype="int16" if is_ct else "float32",
            shape=tuple(int(v) for v in out.shape),  # type: ignore[arg-type]
            spacing_mm=tuple(float(v) for v in spacing),  # type: ignore[arg-type]
            origin_mm=volume.origin,
            direction=volume.direction,  # type: ignore[arg-type]
            source_instances=[msg.instances[i] for i in asm.order],
            excluded_instances=[msg.instances[i].sop_instance_uid for i in asm.excluded],
            backend=used,
            chain=chain,
            timings_s={k: round(v, 4) for k, v in timings.items()},
            stats=stats,
            acquired_at=msg.acquired_at,
            last_published_at=msg.last_published_at,
        )

    def _calibrated(self, msg: SeriesReady, slices: list[Slice]) -> tuple[Volume, Assembled]:
        asm = assemble(slices)
        ordered, spacing, origin, direction = asm.slices, asm.spacing, asm.origin, asm.direction
        first = ordered[0]
        planes: list[tuple[np.ndarray, float, float]]  # (stored plane, slope, intercept)
        if first.stored.ndim == 3:  # one multi-frame instance
            if first.stored.size > self.settings.max_voxels:
                raise ImagingError(
                    "volume_too_large", f"{first.stored.size} voxels exceed the configured cap"
                )
            geo = first.frames
            if asm.frames is not None and geo is not None:  # enhanced: per-frame rescale
                stored = first.stored[asm.frames]  # volume order (along the normal)
                planes = [
                    (stored[z], float(geo.slopes[i]), float(geo.intercepts[i]))
                    for z, i in enumerate(asm.frames)
                ]
            else:
                stored = first.stored
                planes = [(plane, first.slope, first.intercept) for plane in stored]
        else:
            voxels = len(ordered) * first.stored.size
            if voxels > self.settings.max_voxels:
                raise ImagingError("volume_too_large", f"{voxels} voxels exceed the configured cap")
            stored = np.empty((len(ordered), *first.stored.shape), first.stored.dtype)
            for i, s in enumerate(ordered):
                stored[i] = s.stored
            planes = [(stored[i], s.slope, s.intercept) for i, s in enumerate(ordered)]
        slopes = list({(slope, intercept) for _, slope, intercept in planes})
        if len(slopes) == 1:
            slope, intercept = slopes[0]
            if slope == 1.0 and float(intercept).is_integer() and stored.dtype.kind in "iu":
                # exact in int16 for CT's range: the device gets 2 bytes/voxel, not 8
                data = np.empty(stored.shape, np.int16)
                offset = int(intercept)

                def calibrate(i: int) -> None:
                    np.clip(
                        stored[i].astype(np.int32) + offset,
                        -32768,
                        32767,
                        out=data[i],
                        casting="unsafe",
                    )

                with ThreadPoolExecutor(max(1, self.settings.threads)) as pool:
                    list(pool.map(calibrate, range(stored.shape[0])))
            else:
                data = ops.rescale(stored, slope=slope, intercept=intercept)
        else:  # per-slice (per-frame) rescale
            data = np.stack([ops.rescale(p, slope=sl, intercept=ic) for p, sl, ic in planes])
        return Volume(data, spacing, origin, direction, msg.modality), asm

    def _run_chain(
        self, volume: Volume, chain: list[Step], be: Backend, is_ct: bool
    ) -> tuple[np.ndarray, tuple[float, float, float], dict[str, float], Literal["cpu", "gpu"]]:
        """(host volume: int16 for CT, else float32; spacing; statistics; backend used)."""
        spacing = volume.spacing
        if be.name == "gpu":
            xp = be.xp
            img = be.upload(volume.data).astype(xp.float32)  # int16 over the bus
            for step in chain:
                img, spacing = apply_step(img, step, spacing)
            if is_ct:  # back to int16 on the device: half the bytes come back
                img = xp.rint(img).clip(-32768, 32767).astype(xp.int16)
            stats = _stats(img, volume.modality)  # of the volume as stored (int16 for CT)
            host = be.download(img, why="volume")
            del img
            return (host if is_ct else host.astype(np.float32, copy=False)), spacing, stats, be.name
        # CPU: in-plane steps run fused, slab by slab, in threads (SciPy releases the GIL)
        planar = [st for st in chain if _in_plane(st)]
        head = planar if len(planar) == len(chain) else []
        if is_ct and len(head) == len(chain):
            # the whole chain is in-plane: one pass per slab, int16 → float32 → steps → int16
            # while the slab is in cache; the statistics of the int16 volume (as on the device)
            def to_int16(slab: np.ndarray) -> np.ndarray:
                img = slab.astype(np.float32)
                for step in head:
                    img = apply_step(img, step, spacing)[0]
                np.rint(img, out=img)
                np.clip(img, -32768, 32767, out=img)
                return img.astype(np.int16)

            out = _slabwise(to_int16, volume.data, self.settings.threads, np.int16, chunk=4)
            return out, spacing, _stats(out, volume.modality), be.name

        def fused(slab: np.ndarray) -> np.ndarray:
            out = slab.astype(np.float32)
            for step in head:
                out = apply_step(out, step, spacing)[0]
            return np.asarray(out)

        img = _slabwise(fused, volume.data, self.settings.threads, np.float32)
        for step in chain[len(head) :]:
            img, spacing = apply_step(img, step, spacing)
        stats = _stats(img, volume.modality)
        if is_ct:
            out = _slabwise(
                lambda a: np.rint(a).clip(-32768, 32767).astype(np.int16),
                img,
                self.settings.threads,
                np.int16,
            )
        else:
            out = img.astype(np.float32, copy=False)
        return out, spacing, stats, be.name


def _stats(img: Any, modality: str) -> dict[str, float]:
    """Drift statistics on every 4th slice (a drift monitor needs no more), computed where the
    image is and downloaded once (percentiles, mean, sd, noise)."""
    xp, _ = ops.namespace(img)
    full = img
    img = img[::4] if img.ndim == 3 and img.shape[0] >= 8 else img
    if modality == "CT":
        qs = ops.histogram_percentiles(img, STAT_QS)
    else:
        sample = img.ravel()[:: max(1, img.size // 2_000_000)]
        qs = xp.percentile(sample, list(STAT_QS)).astype(xp.float64)
    rest = xp.stack([img.mean(), img.std()]).astype(xp.float64)
    noise = xp.reshape(ops.noise_sigma(full), (1,))
    values = [float(v) for v in download(xp.concatenate([qs, rest, noise]), why="stats")]
    n = len(STAT_QS)
    stats = {f"p{q}": round(v, 2) for q, v in zip(STAT_QS, values[:n], strict=True)}
    stats["mean"] = round(values[n], 3)
    stats["sd"] = round(values[n + 1], 3)
    stats["noise"] = round(values[n + 2], 3)
    return stats
