"""CPU/GPU parity of the findings on the realistic evaluation set (issue 12's "zero differences
in findings between CPU and GPU"): the quality benchmark's chest and head cases
(``benchmarks/quality.py``'s plans, the same seeds), each analysed by the same task on the CPU
(worker processes: they generate the case, apply the modality's chain and run the task) and on
the GPU (this process: one upload, the task, one download per mask), then compared:

* findings: the same types and labels in the same order, numbers within 0.1 % (or 0.01
  absolute), nested records field by field (``shared.evaluation.metrics.finding_differences``,
  as ``benchmarks/segmentation.py`` and ``pytest -m gpu`` judge them);
* masks: the lowest Dice of any mask against the CPU's.

Prints one line per case and a summary (cases compared, cases with differing findings, the
lowest mask Dice, GPU and CPU seconds per case). ``--budget-s`` stops starting cases after that
many seconds (the cases compared are reported; the rest are named as not run). Without a GPU it
prints "no GPU" and exits 0.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np


def _cpu_case(body: str, plan: dict[str, Any]) -> dict[str, Any]:
    """Worker: the case, its prepared volume and the CPU's result (masks bit-packed)."""
    from benchmarks import quality
    from services.segmentation import tasks

    t0 = time.perf_counter()
    if body == "chest":
        case = quality.chest_phantom(plan)
        hu, spacing, origin = case.hu, case.spacing, case.origin
    else:
        c = quality.head_phantom(plan)
        hu, spacing, origin = c.hu, c.spacing, (0.0, 0.0, 0.0)
    vol = quality.prepared(hu, spacing, body)
    generate = time.perf_counter() - t0
    geo = tasks.Geometry(spacing, origin, quality.IDENTITY)
    t0 = time.perf_counter()
    res = (tasks.chest_ct if body == "chest" else tasks.head_ct)(vol, geo)
    seconds = time.perf_counter() - t0
    return {
        "body": body,
        "plan": plan,
        "vol": vol,
        "spacing": spacing,
        "origin": origin,
        "findings": res.findings,
        "masks": {k: (np.packbits(np.asarray(v, bool)), np.shape(v)) for k, v in res.masks.items()},
        "cpu_seconds": seconds,
        "generate_seconds": generate,
    }


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--chest", type=int, default=20, help="chest cases (quality's plans)")
    ap.add_argument("--head", type=int, default=20, help="head cases (quality's plans)")
    ap.add_argument("--seed", type=int, default=30000, help="first seed (quality's default)")
    ap.add_argument("--skip", type=int, default=0, help="leave out the first N planned cases")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--budget-s", type=float, default=1e9, help="start no case after this")
    ap.add_argument("--json-out", help="also write the figures as JSON to this file")
    ap.add_argument(
        "--strict-stand-in",
        action="store_true",
        help="the strict CuPy stand-in (tests/fake_cupy.py) in place of a GPU: the same "
        "comparison where there is no GPU (it refuses what CuPy refuses)",
    )
    args = ap.parse_args()

    from benchmarks import quality

    plans = [("chest", p) for p in quality.chest_cases(args.chest, args.seed)]
    plans += [("head", p) for p in quality.head_cases(args.head, args.seed)]
    plans = plans[args.skip :]  # the rest of a run that stopped at its budget
    # the workers: spawned before CUDA starts here, one BLAS/OpenMP thread each
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    pool = ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn"))
    start = time.perf_counter()
    pending: dict[Future[dict[str, Any]], tuple[str, dict[str, Any]]] = {}
    queue = list(plans)

    def top_up() -> None:
        while queue and len(pending) < args.workers + 1:
            if time.perf_counter() - start > args.budget_s:
                return
            body, plan = queue.pop(0)
            pending[pool.submit(_cpu_case, body, plan)] = (body, plan)

    from services.segmentation import tasks
    from shared.evaluation.metrics import finding_differences
    from shared.imaging.backend import select_backend

    if args.strict_stand_in:
        import pytest

        from tests import fake_cupy

        stand_in = fake_cupy.make()
        fake_cupy.install(pytest.MonkeyPatch(), stand_in)
        gpu = select_backend("gpu", cupy_module=stand_in)
    else:
        gpu = select_backend("auto")
    if gpu.name != "gpu":
        pool.shutdown(cancel_futures=True)
        print("gpu parity: no GPU (CuPy missing or no CUDA device answers)")
        return 0
    rows: list[dict[str, Any]] = []
    top_up()
    while pending:
        done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
        for fut in done:
            body, plan = pending.pop(fut)
            name = f"{body}-{plan['seed']}-{plan['size']}-{plan['thickness_mm']}" + (
                "-normal" if plan["normal"] else ""
            )
            try:
                c = fut.result()
            except Exception as exc:  # the case itself failed on the CPU: said, not hidden
                rows.append({"case": name, "error": f"cpu: {type(exc).__name__}: {exc}"[:200]})
                print(f"  {name}: CPU FAILED {type(exc).__name__}: {exc}"[:200], flush=True)
                continue
            geo = tasks.Geometry(c["spacing"], c["origin"], quality.IDENTITY)
            fn = tasks.chest_ct if body == "chest" else tasks.head_ct
            try:
                t0 = time.perf_counter()
                res = fn(gpu.upload(c["vol"]), geo)
                masks = {k: gpu.download(v, why="mask").astype(bool) for k, v in res.masks.items()}
                g_seconds = time.perf_counter() - t0
                gpu.free()
            except Exception as exc:
                rows.append({"case": name, "error": f"gpu: {type(exc).__name__}: {exc}"[:200]})
                print(f"  {name}: GPU FAILED {type(exc).__name__}: {exc}"[:200], flush=True)
                continue
            low = 1.0
            for k, (bits, shape) in c["masks"].items():
                ref = np.unpackbits(bits, count=int(np.prod(shape))).reshape(shape).astype(bool)
                low = min(low, _dice(masks[k], ref) if k in masks else 0.0)
            if set(masks) != set(c["masks"]):
                low = 0.0
            diff = finding_differences(res.findings, c["findings"])
            rows.append(
                {
                    "case": name,
                    "findings": len(c["findings"]),
                    "same_findings": not diff,
                    "differences": diff,
                    "min_mask_dice": round(low, 5),
                    "gpu_seconds": round(g_seconds, 3),
                    "cpu_seconds": round(c["cpu_seconds"], 3),
                }
            )
            print(
                f"  {name}: {len(c['findings'])} findings, same: {not diff}, min mask Dice "
                f"{low:.5f}, gpu {g_seconds:.2f} s, cpu {c['cpu_seconds']:.2f} s"
                + ("".join(f"\n      {d}" for d in diff[:6])),
                flush=True,
            )
        top_up()
    pool.shutdown(cancel_futures=True)
    compared = [r for r in rows if "error" not in r]
    not_run = len(plans) - len(rows)
    figures = {
        "cases_planned": len(plans),
        "cases_compared": len(compared),
        "cases_not_run": not_run,
        "cases_failed": len(rows) - len(compared),
        "cases_with_different_findings": sum(not r["same_findings"] for r in compared),
        "min_mask_dice": min((r["min_mask_dice"] for r in compared), default=None),
        "gpu_seconds_median": round(float(np.median([r["gpu_seconds"] for r in compared])), 3)
        if compared
        else None,
        "cpu_seconds_median": round(float(np.median([r["cpu_seconds"] for r in compared])), 3)
        if compared
        else None,
        "rows": rows,
    }
    print(
        f"gpu parity on the realistic set: {figures['cases_compared']} of {len(plans)} cases "
        f"compared ({not_run} not run in the budget, {figures['cases_failed']} failed), "
        f"{figures['cases_with_different_findings']} with different findings, lowest mask Dice "
        f"{figures['min_mask_dice']}, median gpu {figures['gpu_seconds_median']} s vs cpu "
        f"{figures['cpu_seconds_median']} s per case on one cpu core (algorithms only)"
    )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(figures, indent=1, default=str) + "\n")
    bad = figures["cases_failed"] or figures["cases_with_different_findings"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
