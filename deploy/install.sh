#!/bin/sh
# refseg's install steps, in the one order that works. `make setup` runs this into .venv
# (with --dev --editable) and the Dockerfile runs it into the Ray image's Python, so the two
# cannot drift apart. POSIX sh (Linux and macOS); no root, no system packages.
#
#   deploy/install.sh PIP [--dev] [--editable]
#
# PIP: the pip to install with (absolute, on PATH, or relative to the repository's top).
# --dev: also the test tools (the `dev` extra) and Meta's DINOv2 reference code (tests only).
# --editable: install refseg from this checkout in place (`pip install -e`).
set -eu
usage="usage: deploy/install.sh PIP [--dev] [--editable]"
[ $# -ge 1 ] || { echo "$usage" >&2; exit 2; }
pip="$1"
shift
dev=0
editable=0
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    --editable) editable=1 ;;
    *) echo "deploy/install.sh: unknown option $arg; $usage" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."  # the repository's top: constraints.txt and pyproject.toml

"$pip" install -q --upgrade pip
# 1. torch and torchvision first, pinned in constraints.txt (sam2's build imports torch). The
#    PyPI wheels carry their own CUDA libraries and run on CPU as well.
"$pip" install -q -c constraints.txt torch torchvision
# 2. sam2 without build isolation (its setup.py imports the torch installed above), and
#    without its optional CUDA extension, everywhere: sam2._C only fills holes in masks,
#    which refseg never calls, and building it needs an nvcc that matches torch's CUDA.
SAM2_BUILD_CUDA=0 "$pip" install -q --no-build-isolation -c constraints.txt sam2
# 3. refseg with its dependencies; constraints.txt pins the boto stack (unpinned, pip
#    backtracks for minutes) and Ray at the version of the image and cluster configs.
target=.
[ "$dev" = 1 ] && target=".[dev]"
if [ "$editable" = 1 ]; then
  "$pip" install -q -c constraints.txt -e "$target"
else
  "$pip" install -q -c constraints.txt "$target"
fi
# 4. tests only: Meta's DINOv2 reference code (a re-upload pinned to torch 2.0: no deps)
if [ "$dev" = 1 ]; then
  "$pip" install -q --no-deps dinov2==0.0.1.dev2
fi
