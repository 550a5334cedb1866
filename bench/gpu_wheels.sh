#!/usr/bin/env bash
# Build the wheel folder that bench/gpu_check.sh installs on a GPU machine with no package
# index (its image has torch, timm, numpy, pyyaml, pyarrow, pillow, pytest, but neither sam2
# nor pycocotools, which refseg.core.rle needs for the instances' RLE).
#
#   bash bench/gpu_wheels.sh [DIR]        # default DIR: .whl (git-ignored), under 1 MiB
#
# sam2 1.1.0 is built as a pure-Python wheel (SAM2_BUILD_CUDA=0: no CUDA extension; refseg
# keeps hole filling off) against the torch of this venv; its own needs that the GPU image
# lacks travel beside it, at the versions this venv has. All are py3-none-any, so they
# install on the GPU machine's Python 3.12 too. pycocotools has a C extension: its binary
# wheel for that Python (GPU_PYTHON, default 3.12; manylinux x86-64) is downloaded. refseg
# itself is not a wheel: the check runs from the repository copy (see gpu_check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PY=${PYTHON:-.venv/bin/python}
GPU_PYTHON=${GPU_PYTHON:-3.12}
[ -x "$PY" ] || { echo "gpu_wheels: no Python at $PY (set PYTHON=...)" >&2; exit 1; }
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }

rm -rf "$DIR"
mkdir -p "$DIR"
SAM2_BUILD_CUDA=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DIR" \
    "sam2==$(version sam2)"
"$PY" -m pip wheel -q --no-deps -w "$DIR" \
    "hydra-core==$(version hydra-core)" \
    "omegaconf==$(version omegaconf)" \
    "antlr4-python3-runtime==$(version antlr4-python3-runtime)" \
    "iopath==$(version iopath)"
"$PY" -m pip download -q --no-deps --only-binary=:all: --implementation cp \
    --python-version "$GPU_PYTHON" --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d "$DIR" \
    "pycocotools==$(version pycocotools)"
for w in "$DIR"/*.whl; do
    case "$w" in
        *-py3-none-any.whl | *-py2.py3-none-any.whl | */pycocotools-*manylinux*.whl) ;;
        *) echo "gpu_wheels: $w is not a pure-Python wheel; it may not install there" >&2; exit 1 ;;
    esac
done
ls -l "$DIR"
du -sh "$DIR"
