"""Segmentation latency and accuracy: 300-slice 512² chest CT and head CT phantoms on this
machine's CPU backend. Prints seconds per series for the algorithms (the task), for the
whole segmentation handler (task + compact masks: what stands before the alert) and for the
results stage's build after it (DICOM SEG + SR + overlay PNGs), with lung Dice, nodule
sensitivity and false positives, and haemorrhage volume error.

Where a GPU answers, the same volumes run on it in the same run, side by side: per task the
algorithms (upload + task + one download per mask) and the whole handler
(``gpu_seconds_per_series``), ``gpu_speedup_vs_cpu`` for both, and parity with the CPU (the
smallest Dice between a GPU mask and its CPU mask, and whether the findings are the same). A
task the device cannot run is reported as failed and, through the handler, redone on the CPU
(``gpu_fallbacks``). Without a GPU it prints "no GPU".
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import scipy.ndimage as ndi

from benchmarks.common import emit, parse_args
from services.preprocess.core import PreprocessCore
from services.results.core import ResultsCore
from services.segmentation import tasks
from services.segmentation.core import SegmentationCore
from shared.config import PreprocessSettings
from shared.dicom import phantom
from shared.evaluation.metrics import finding_differences
from shared.imaging.backend import FALLBACK_CAUSES, Backend, DeviceRunner, select_backend
from shared.imaging.packed import unpack_volume
from shared.runtime.stage import Context
from shared.security.envelope import Keyring
from shared.storage import BlobStore, LocalDirBackend
from tests.pipeline import files, series_ready


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def same_findings(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> bool:
    """Same findings in the same order, numbers within 0.1 % (or 0.01 absolute), nested
    records field by field (:func:`~shared.evaluation.metrics.finding_differences`)."""
    return not finding_differences(got, want)


def on_device(
    gpu: Backend, fn: Any, vol: np.ndarray, geo: tasks.Geometry
) -> tuple[float, dict[str, np.ndarray], list[dict[str, Any]]]:
    """Upload + task + one download per mask (the segmentation core's device part), timed."""
    t0 = time.perf_counter()
    res = fn(gpu.upload(vol), geo)
    masks = {k: gpu.download(v, why="mask").astype(bool) for k, v in res.masks.items()}
    seconds = time.perf_counter() - t0
    gpu.free()
    return seconds, masks, res.findings


def against_cpu(
    gpu: Backend, fn: Any, vol: np.ndarray, geo: tasks.Geometry, cpu: Any, quick: bool
) -> tuple[float, float, bool]:
    """The task on the device after a warm-up run (kernels compile on first use), best of
    one (quick) or two runs: (seconds, lowest mask Dice against the CPU's masks, whether the
    findings are the CPU's)."""
    on_device(gpu, fn, vol, geo)
    runs = [on_device(gpu, fn, vol, geo) for _ in range(1 if quick else 2)]
    seconds, masks, findings = min(runs, key=lambda r: r[0])
    low = min(dice(masks[k], np.asarray(cpu.masks[k], bool)) for k in masks)
    return seconds, low, same_findings(findings, cpu.findings)


def gpu_figures(
    gpu: Backend,
    store: BlobStore,
    ctx: Context,
    volumes: dict[str, Any],
    cpu: dict[str, Any],
    quick: bool,
) -> tuple[dict[str, Any], list[str]]:
    runner = DeviceRunner(gpu, stage="segmentation")
    core = SegmentationCore(store, gpu, runner=runner)
    figures: dict[str, Any] = {"gpu": gpu.device}
    per_series: dict[str, float] = {}
    speedup: dict[str, float] = {}
    lines = [f"  gpu ({gpu.device}), same run:"]
    for name, vp in volumes.items():
        c_task, c_all, c_res, _done, _ph = cpu[name]
        vol = unpack_volume(store.get(vp.volume)).astype(np.float32)
        geo = tasks.Geometry(vp.spacing_mm, vp.origin_mm, vp.direction)
        fn = getattr(tasks, name)
        try:
            g_task, low, same = against_cpu(gpu, fn, vol, geo, c_res, quick)
            figures[f"gpu_seconds_{name}"] = round(g_task, 3)
            figures[f"gpu_speedup_{name}_vs_cpu"] = round(c_task / g_task, 2)
            figures[f"gpu_min_mask_dice_vs_cpu_{name}"] = round(low, 5)
            figures[f"gpu_same_findings_{name}"] = same
            task_line = f"{g_task:.2f} s algorithms ({c_task / g_task:.1f}x cpu), min mask Dice vs cpu {low:.5f}, same findings: {same}"
        except Exception as exc:  # the figure says why; the handler below falls back
            figures[f"gpu_seconds_{name}"] = f"failed: {type(exc).__name__}"
            task_line = f"algorithms failed on the device ({type(exc).__name__}: {str(exc)[:80]})"
        core.handle(vp, ctx)  # warm
        t0 = time.perf_counter()
        core.handle(vp, ctx)
        g_all = time.perf_counter() - t0
        per_series[name] = round(g_all, 3)
        speedup[name] = round(c_all / g_all, 2)
        lines.append(
            f"    {name}: {task_line}; {g_all:.2f} s with outputs ({c_all / g_all:.1f}x cpu)"
        )
    fell_back = sum(runner.count(c) for c in FALLBACK_CAUSES)
    figures.update(
        gpu_seconds_per_series=per_series, gpu_speedup_vs_cpu=speedup, gpu_fallbacks=fell_back
    )
    if fell_back:
        lines.append(
            f"    WARNING: {fell_back} handler record(s) were redone on the cpu "
            f"({ {c: runner.count(c) for c in FALLBACK_CAUSES if runner.count(c)} })"
        )
    return figures, lines


def realistic_chest(quick: bool, gpu: Backend | None) -> tuple[dict[str, Any], list[str]]:
    """The chest task on the realistic procedural anatomy (``shared/phantoms/chest.py``:
    vessel trees, airways, heart, ribs, table, noise; seed 7, 300 slices of 1 mm at 512²):
    the cartoon phantom above has a dozen candidates, real anatomy a few hundred, and the
    task's time is mostly theirs. Seconds of the task on the CPU (best of two: the first one
    warms the imports) and, where a GPU answers, on it (``against_cpu``: upload + task + one
    download per mask after a warm-up) with its parity against the CPU."""
    from shared.phantoms.chest import chest_case

    case = chest_case(7, size=256 if quick else 512, slices=60 if quick else 300, thickness_mm=1.0)
    vol = case.hu.astype(np.float32)
    geo = tasks.Geometry(case.spacing, case.origin, (1, 0, 0, 0, 1, 0, 0, 0, 1))
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        res = tasks.chest_ct(vol, geo)
        best = min(best, time.perf_counter() - t0)
    shape = "x".join(str(v) for v in vol.shape)
    figures: dict[str, Any] = {
        "seconds_chest_ct_realistic": round(best, 2),
        "realistic_chest_shape": list(vol.shape),
    }
    lines = [
        f"  chest CT, realistic anatomy ({shape}, shared/phantoms/chest.py, "
        f"{len(case.lesions)} lesions): {best:.2f} s algorithms, {len(res.findings)} findings"
    ]
    if gpu is not None:
        try:
            g_s, low, same = against_cpu(gpu, tasks.chest_ct, vol, geo, res, quick)
            figures.update(
                gpu_seconds_chest_ct_realistic=round(g_s, 3),
                gpu_speedup_chest_ct_realistic_vs_cpu=round(best / g_s, 2),
                gpu_min_mask_dice_vs_cpu_chest_ct_realistic=round(low, 5),
                gpu_same_findings_chest_ct_realistic=same,
            )
            lines.append(
                f"    on the gpu: {g_s:.2f} s ({best / g_s:.1f}x cpu), min mask Dice vs cpu "
                f"{low:.5f}, same findings: {same}"
            )
        except Exception as exc:  # the figure says why
            figures["gpu_seconds_chest_ct_realistic"] = f"failed: {type(exc).__name__}"
            lines.append(f"    on the gpu: failed ({type(exc).__name__}: {str(exc)[:80]})")
    return figures, lines


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
        paperwork: dict[str, tuple[float, int]] = {}
        for name, ph in (("chest_ct", chest), ("head_ct", head)):
            vp = pre.handle(series_ready(files(ph.files), store, ring), ctx)
            vol = unpack_volume(store.get(vp.volume)).astype(np.float32)
            geo = tasks.Geometry(vp.spacing_mm, vp.origin_mm, vp.direction)
            t0 = time.perf_counter()
            res = getattr(tasks, name)(vol, geo)
            task_s = time.perf_counter() - t0
            seg.handle(vp, ctx)  # warm (imports, caches), as the gpu handler is below
            t0 = time.perf_counter()
            done = seg.handle(vp, ctx)
            handler_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            built = ResultsCore(store).build(done)
            paperwork[name] = (time.perf_counter() - t0, built.seg_frames)
            results[name] = (task_s, handler_s, res, done, ph)
            volumes[name] = vp
        gpu = select_backend("auto")
        if gpu.name == "gpu":
            g_figures, g_lines = gpu_figures(gpu, store, ctx, volumes, results, args.quick)
        else:
            g_figures = {"gpu": "no GPU"}
            g_lines = ["  gpu: no GPU (CuPy missing or no CUDA device answers): cpu figures only"]
        r_figures, r_lines = realistic_chest(args.quick, gpu if gpu.name == "gpu" else None)
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
        "seconds_chest_ct_results": round(paperwork["chest_ct"][0], 2),
        "seconds_head_ct_results": round(paperwork["head_ct"][0], 2),
        "seg_frames_chest_ct": paperwork["chest_ct"][1],
        **r_figures,
        "seg_frames_head_ct": paperwork["head_ct"][1],
        "lung_dice": round(lung_dice, 4),
        "nodule_sensitivity": round(hit / max(n, 1), 3),
        "nodule_false_positives": len(reported) - hit,
        "haemorrhage_volume_error": round(bleed_err, 3),
        **g_figures,
    }
    emit(
        figures,
        args.json,
        [
            f"segmentation: {slices}-slice 512² phantoms, cpu",
            f"  chest CT: {c_task:.2f} s algorithms, {c_all:.2f} s with masks (before the alert); lung Dice {lung_dice:.4f}; nodules {hit}/{n} found, {len(reported) - hit} false positive(s)",
            *r_lines,
            f"  head CT:  {h_task:.2f} s algorithms, {h_all:.2f} s with masks; haemorrhage volume error {bleed_err * 100:.1f} %",
            f"  results stage after the alert (SEG + SR + PNGs): chest {paperwork['chest_ct'][0]:.2f} s ({paperwork['chest_ct'][1]} SEG frames), head {paperwork['head_ct'][0]:.2f} s ({paperwork['head_ct'][1]} SEG frames)",
            *g_lines,
        ],
        args.json_out,
    )


if __name__ == "__main__":
    main()
