#!/usr/bin/env bash
# Run HERE (a development machine with the package registries), before benchmarks/gpu_check.sh
# runs on a lent GPU machine: downloads into .whl/ the wheels that machine's image lacks
# (CPython 3.12, x86-64, manylinux), at this checkout's versions (pyproject.toml pins, the
# venv's versions for their dependencies), and keeps .whl/ out of git. The device tool then
# carries .whl (name it in `carry`). See /work/.library/device/README.md and KINDS.md: the image
# has CuPy, NumPy, SciPy, scikit-image, Pillow, prometheus-client, aiohttp, PyYAML, rich, typer,
# psutil, onnxruntime, pytest-timeout; it lacks the ones below.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
PACKAGES=(
  pydantic pydantic_core pydantic-settings python-dotenv annotated-types typing-inspection
  pydicom highdicom pyjpegls pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle
  zstandard cryptography cffi pycparser aiokafka async-timeout typing_extensions
  pytest pluggy pytest-asyncio pytest-timeout pynetdicom
)

exclude="$(git rev-parse --git-common-dir)/info/exclude"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
rm -rf .whl && mkdir -p .whl

platforms=()
for tag in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 \
  manylinux_2_27 manylinux_2_26 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done

for name in "${PACKAGES[@]}"; do
  version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d .whl "$name==$version"
done
ls -l .whl
du -sh .whl  # the working tree and carried paths travel within 64 MiB
