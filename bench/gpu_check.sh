#!/usr/bin/env bash
# The one prepared GPU check (issue 16): under 8 minutes on one CUDA GPU.
#
#   bash bench/gpu_wheels.sh                 # here, with the venv: builds .whl (sam2 & co)
#   bash bench/gpu_check.sh [OUT_DIR]        # there, from the repository root
#   bash bench/gpu_check.sh --setup-only     # only install and import checks (no GPU needed)
#
# OUT_DIR: default $OUT, else bench/results/gpu_check. It gets gpu_check.log, tests.xml
# (the CUDA tests), gpu.json (bench/gpu.py), compile/gpu.json (the --compile variant, own
# time limit) and gpu_check.json (each step's status and seconds).
#
# The machine needs a CUDA build of torch with timm, numpy, pyyaml, pillow and pytest (the
# GPU image has them), and the wheels of bench/gpu_wheels.sh in $WHEELS (default .whl) for
# sam2 and what it needs and for pycocotools (refseg.core's RLE); Ray is not needed (the
# check imports refseg.core with ray blocked). refseg runs from this
# repository copy: where it is not installed, links refseg/{core,pipeline,jobs} to the
# folders as pyproject's package mapping does. Every missing piece stops the check with one line
# saying what is missing. Nothing else depends on this script.
set -uo pipefail
cd "$(dirname "$0")/.."
SETUP_ONLY=0
if [ "${1:-}" = "--setup-only" ]; then
    SETUP_ONLY=1
    shift
fi
OUT_DIR=${1:-${OUT:-bench/results/gpu_check}}
WHEELS=${WHEELS:-.whl}
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/refseg_gpu_site}
BUDGET_S=${BUDGET_S:-470}  # the whole check, below 8 minutes
START=$(date +%s)
mkdir -p "$OUT_DIR"
exec > >(tee -a "$OUT_DIR/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
STEPS=()

elapsed() { echo $(($(date +%s) - START)); }
die() {
    echo "gpu_check: FAILED after $(elapsed) s: $*" >&2
    record "failed: $*"
    exit 1
}
step() { echo "== $(elapsed) s: $*"; }
record() {  # gpu_check.json: the steps so far and the outcome
    "$PY" - "$OUT_DIR/gpu_check.json" "$1" "$(elapsed)" "${STEPS[@]}" <<'EOF' || true
import json, sys
path, outcome, seconds, *steps = sys.argv[1:]
rows = [dict(zip(("step", "status", "seconds"), s.split("|"))) for s in steps]
json.dump({"outcome": outcome, "seconds": int(seconds), "steps": rows}, open(path, "w"), indent=2)
EOF
}
run_step() {  # run_step NAME LIMIT_S CMD...: fails the check when CMD fails
    local name=$1 limit=$2 t0 rc
    shift 2
    t0=$(date +%s)
    step "$name (limit ${limit} s)"
    timeout "$limit" "$@"
    rc=$?
    STEPS+=("$name|rc=$rc|$(($(date +%s) - t0))")
    [ "$rc" -eq 0 ] || die "$name exited with status $rc$([ "$rc" -eq 124 ] && echo ' (time limit)')"
}
left() { echo $((BUDGET_S - $(elapsed))); }

step "the machine"
command -v "$PY" >/dev/null || die "no Python '$PY' (set PYTHON=...)"
if [ "$SETUP_ONLY" = 0 ]; then
    command -v nvidia-smi >/dev/null || die "nvidia-smi not found: this is not a CUDA machine"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
        || die "nvidia-smi cannot read the GPU"
    "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" \
        || die "torch in $PY sees no CUDA device (torch.cuda.is_available() is False)"
fi
for mod in torch timm numpy yaml PIL pytest; do
    "$PY" -c "import $mod" 2>/dev/null || die "$PY cannot import $mod: install it in the image"
done
"$PY" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"

step "sam2, its needs and pycocotools from $WHEELS"
if ! "$PY" -c "import sam2, pycocotools" 2>/dev/null; then
    ls "$WHEELS"/sam2-*.whl >/dev/null 2>&1 \
        || die "no sam2 wheel in $WHEELS: run 'bash bench/gpu_wheels.sh' on a machine with the venv and carry $WHEELS"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl \
        || die "pip could not install the wheels of $WHEELS into $SITE"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import sam2, hydra, pycocotools.mask" \
    || die "sam2 or pycocotools does not import (see above); rebuild $WHEELS"

step "refseg from this repository"
if ! "$PY" -c "import refseg.core.segmenter" 2>/dev/null; then
    # not installed: map the packages as pyproject's package-dir does, by links in this copy
    # (installs nothing into the interpreter's environment)
    echo "refseg is not installed for $PY: linking refseg/core, refseg/pipeline, refseg/jobs"
    for pair in core:refseg_core pipeline:pipeline jobs:jobs; do
        [ -e "refseg/${pair%%:*}" ] || ln -s "../${pair#*:}" "refseg/${pair%%:*}" \
            || die "cannot link refseg/${pair%%:*}"
    done
fi
"$PY" - <<'EOF' || die "refseg.core does not import without Ray (see above)"
import sys
sys.modules["ray"] = None  # the check must not need it
import refseg.core.factory, refseg.core.segmenter, refseg.core.transport  # noqa: E401,F401
print("refseg.core imports without ray")
EOF
STEPS+=("setup|ok|$(elapsed)")
if [ "$SETUP_ONLY" = 1 ]; then
    record "setup ok"
    step "setup only: done"
    exit 0
fi

run_step "CUDA tests and decoder equality on CUDA" 180 \
    "$PY" -m pytest -q -p no:cacheprovider -o addopts="" -ra -k cuda \
    --junitxml="$OUT_DIR/tests.xml" \
    tests/test_gpu_path.py tests/test_transport.py tests/test_decoder.py

[ "$(left)" -gt 120 ] || die "only $(left) s of the ${BUDGET_S} s budget left for bench/gpu.py"
run_step "bench/gpu.py at ntt (random Hiera-L, ViT-L)" "$(($(left) - 20))" \
    "$PY" bench/gpu.py --images 16 --warmup 2 --check-images 4 --profile-images 2 \
    --variants fp32 fp32-fast fp32-fast-tf32 bf16-fast --out-dir "$OUT_DIR"

# --compile last, in the time that is left: compiling Hiera-L and ViT-L can take minutes
if [ "$(left)" -gt 60 ]; then
    limit=$(left)
    t0=$(date +%s)
    step "bench/gpu.py --compile with the default decoder (limit ${limit} s)"
    timeout "$limit" "$PY" bench/gpu.py --images 8 --warmup 2 --check-images 4 \
        --profile-images 1 --variants fp32-fast-compile --out-dir "$OUT_DIR/compile"
    rc=$?
    STEPS+=("compile variant|rc=$rc|$(($(date +%s) - t0))")
    [ "$rc" -eq 0 ] || echo "gpu_check: the --compile run did not finish (rc=$rc); the rest stands"
else
    STEPS+=("compile variant|skipped: $(left) s left|0")
fi
record "ok"
step "done: $OUT_DIR"
