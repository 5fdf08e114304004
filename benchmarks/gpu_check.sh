#!/usr/bin/env bash
# The GPU checks of issue 12 in one go, for a session that is lent a GPU machine (device tool).
#
# Here, first (needs the registries; puts the wheels the device image lacks in .whl/):
#     benchmarks/gpu_wheels.sh
# Then one device call, carrying the wheels (about 28 MB of the 64 MiB a call may carry):
#     run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
# It prints the environment, runs `pytest -m gpu` (real-CuPy parity of every op, block, task
# and core against the CPU, the real out-of-memory fallback), then both benchmarks with CPU
# and GPU figures side by side (gpu_seconds_per_series, gpu_speedup_vs_cpu, parity). Logs and
# JSON figures go to $OUT (the device tool brings them back). benchmarks/gpu_parity.py compares
# CPU and GPU findings on the realistic evaluation set meanwhile (PARITY_BUDGET_S). QUICK=1 runs the benchmarks'
# smaller variants (60 slices) when the full 300-slice ones do not fit the time left.
#
# Locally (no GPU) `PY=.venv/bin/python QUICK=1 bash benchmarks/gpu_check.sh` checks the script
# itself: the gpu tests are skipped and the benchmarks say "no GPU".
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-python3}
OUT=${OUT:-/tmp/radstream-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
quick=()
[ "${QUICK:-0}" = 1 ] && quick=(--quick)
status=0

echo "== environment"
"$PY" - <<'EOF' 2>&1 | tee "$OUT/environment.txt"
import platform
import numpy, scipy
print("python", platform.python_version(), "numpy", numpy.__version__, "scipy", scipy.__version__)
try:
    import cupy
    ok = cupy.cuda.is_available()
    print("cupy", cupy.__version__, "cuda available:", ok)
    if ok:
        props = cupy.cuda.runtime.getDeviceProperties(0)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        free, total = cupy.cuda.runtime.memGetInfo()
        print("device:", name, f"{total / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free")
except Exception as exc:
    print("cupy unusable:", type(exc).__name__, exc)
EOF

# CPU/GPU parity of the findings on the realistic evaluation set (quality.py's cases), in the
# background while pytest runs (neither is timed), over before the benchmarks start: it starts
# no case after PARITY_BUDGET_S seconds (default 170)
cases=(--chest 20 --head 20)
[ "${QUICK:-0}" = 1 ] && cases=(--chest 2 --head 2)
echo "== benchmarks/gpu_parity.py ${cases[*]} --budget-s ${PARITY_BUDGET_S:-170} (in the background)"
"$PY" benchmarks/gpu_parity.py "${cases[@]}" --budget-s "${PARITY_BUDGET_S:-170}" \
  --json-out "$OUT/gpu_parity.json" >"$OUT/gpu_parity.txt" 2>&1 &
parity=$!

echo "== pytest -m gpu (real CuPy against the CPU)"
# the image's scikit-image predates its NumPy 2.5 (pyproject pins NumPy 2.4): that one
# deprecation, raised inside skimage's reconstruction, is not an error of ours there
"$PY" -m pytest -m gpu -q -p no:cacheprovider -rfEsxX tests/unit/test_device_parity.py \
  -W "ignore:Setting the shape on a NumPy array:DeprecationWarning" \
  2>&1 | tee "$OUT/pytest-gpu.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

echo "== benchmarks/gpu_parity.py (waiting for it)"
wait "$parity" || status=1
cat "$OUT/gpu_parity.txt"

for bench in preprocess segmentation; do
  echo "== benchmarks/$bench.py ${quick[*]:-}"
  "$PY" "benchmarks/$bench.py" "${quick[@]}" --json-out "$OUT/$bench.json" 2>&1 | tee "$OUT/$bench.txt"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
done

echo "== figures (also in $OUT)"
cat "$OUT/preprocess.txt" "$OUT/segmentation.txt" 2>/dev/null
tail -1 "$OUT/gpu_parity.txt" 2>/dev/null
exit "$status"
