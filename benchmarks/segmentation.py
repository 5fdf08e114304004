"""Segmentation latency and accuracy: 300-slice 512² chest CT and head CT phantoms on this
machine's CPU backend. Prints seconds per series for the algorithms (the task) and for the
whole service handler (task + masks + DICOM SEG + overlay PNGs), with lung Dice, nodule
sensitivity and false positives, and haemorrhage volume error."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import scipy.ndimage as ndi

from benchmarks.common import emit, parse_args
from services.preprocess.core import PreprocessCore
from services.segmentation import tasks
from services.segmentation.core import SegmentationCore
from shared.config import PreprocessSettings
from shared.dicom import phantom
from shared.imaging.backend import select_backend
from shared.imaging.packed import unpack_volume
from shared.runtime.stage import Context
from shared.security.envelope import Keyring
from shared.storage import BlobStore, LocalDirBackend
from tests.pipeline import files, series_ready


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def main() -> None:
    args = parse_args(__doc__ or "")
    slices = 60 if args.quick else 300
    nodules = (5.0, 6.0, 8.0, 10.0, 12.0)
    with tempfile.TemporaryDirectory(prefix="radstream-bench-seg-") as tmp:
        ring = Keyring.generate()
        store = BlobStore(LocalDirBackend(Path(tmp) / "blobs"), ring)
        ctx = Context("bench", 0, 0, b"k", 0, None, ring)
        pre = PreprocessCore(store, select_backend("cpu"), PreprocessSettings())
        seg = SegmentationCore(store, select_backend("cpu"))
        chest = phantom.chest_ct(
            Path(tmp) / "chest", seed=7, size=512, slices=slices, thickness=1.0, nodules_mm=nodules
        )
        head = phantom.head_ct(
            Path(tmp) / "head", seed=7, size=512, slices=slices, thickness=0.6, bleed_ml=8.0
        )
        results = {}
        volumes = {}
        for name, ph in (("chest_ct", chest), ("head_ct", head)):
            vp = pre.handle(series_ready(files(ph.files), store, ring), ctx)
            vol = unpack_volume(store.get(vp.volume)).astype(np.float32)
            geo = tasks.Geometry(vp.spacing_mm, vp.origin_mm, vp.direction)
            t0 = time.perf_counter()
            res = getattr(tasks, name)(vol, geo)
            task_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            done = seg.handle(vp, ctx)
            handler_s = time.perf_counter() - t0
            results[name] = (task_s, handler_s, res, done, ph)
            volumes[name] = vp
    c_task, c_all, c_res, _c_done, _ = results["chest_ct"]
    c_done_geo = volumes["chest_ct"]
    lung_dice = min(dice(c_res.masks[s], chest.truth[s]) for s in ("lung_left", "lung_right"))
    labels, n = ndi.label(chest.truth["nodules"])
    reported = [f for f in c_res.findings if f["type"] == "nodule"]
    geo = tasks.Geometry(c_done_geo.spacing_mm, c_done_geo.origin_mm, c_done_geo.direction)
    matched: set[int] = set()
    for i in range(1, n + 1):
        truth = labels == i
        centre = np.array(geo.to_patient(tuple(np.argwhere(truth).mean(axis=0))))
        radius = (3 * truth.sum() * geo.voxel_ml * 1000 / (4 * np.pi)) ** (1 / 3)
        for k, f in enumerate(reported):
            if (
                k not in matched
                and np.linalg.norm(np.array(f["centroid_mm"]) - centre) <= radius + 3
            ):
                matched.add(k)
                break
    hit = len(matched)
    h_task, h_all, h_res, _, _ = results["head_ct"]
    bleed = [f for f in h_res.findings if f["type"] == "haemorrhage"]
    bleed_err = abs(sum(f["volume_ml"] for f in bleed) - head.bleed_ml) / head.bleed_ml
    figures = {
        "backend": "cpu",
        "slices": slices,
        "seconds_chest_ct": round(c_task, 2),
        "seconds_head_ct": round(h_task, 2),
        "seconds_chest_ct_with_outputs": round(c_all, 2),
        "seconds_head_ct_with_outputs": round(h_all, 2),
        "lung_dice": round(lung_dice, 4),
        "nodule_sensitivity": round(hit / max(n, 1), 3),
        "nodule_false_positives": len(reported) - hit,
        "haemorrhage_volume_error": round(bleed_err, 3),
    }
    emit(
        figures,
        args.json,
        [
            f"segmentation: {slices}-slice 512² phantoms, cpu",
            f"  chest CT: {c_task:.2f} s algorithms, {c_all:.2f} s with masks + SEG + PNGs; lung Dice {lung_dice:.4f}; nodules {hit}/{n} found, {len(reported) - hit} false positive(s)",
            f"  head CT:  {h_task:.2f} s algorithms, {h_all:.2f} s with outputs; haemorrhage volume error {bleed_err * 100:.1f} %",
        ],
    )


if __name__ == "__main__":
    main()
