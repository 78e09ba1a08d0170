#!/usr/bin/env bash
# Native checks that need no GPU (run by `make test`, so by .ci/run):
#   1. ctest: the shared tile maths and the CPU kernels against naive loops (CMakeLists.txt), plus an
#      nvcc compile of the CUDA kernels when nvcc exists;
#   2. the CUDA extension compiled AND linked by setup.py (MOSE_BUILD_CUDA=1) in a cached virtual
#      environment with a CUDA build of torch, into a temporary folder (never the repo's in-place
#      libraries), then loaded by that torch (no GPU needed) and checked for CUDA kernels of every op.
# Any compile, link or test error fails the script. Environment:
#   PYTHON            interpreter whose torch provides the c10 headers for ctest (default .venv/bin/python)
#   MAX_JOBS          parallel compile jobs (default 2)
#   TORCH_CUDA_SPEC   the CUDA torch of the cached venv (default torch==2.14.1, the wheel on local disk)
#   MOSE_SKIP_CUDA_CHECK=1  skip step 2 (machines without nvcc skip it with a message anyway)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
JOBS=${MAX_JOBS:-2}
TORCH_CUDA_SPEC=${TORCH_CUDA_SPEC:-torch==2.14.1}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mose-native.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
start=$SECONDS

echo "== native check 1/2: ctest"
generator=()
if command -v ninja >/dev/null; then generator=(-G Ninja); fi
cmake -S "$ROOT" -B "$WORK/cmake" "${generator[@]}" -DMOSE_PYTHON="$PYTHON" >"$WORK/cmake.log" \
  || { cat "$WORK/cmake.log"; exit 1; }
cmake --build "$WORK/cmake" -j "$JOBS"
ctest --test-dir "$WORK/cmake" --output-on-failure
echo "ctest done after $((SECONDS - start)) s"

if [[ "${MOSE_SKIP_CUDA_CHECK:-0}" == 1 ]]; then
  echo "== native check 2/2 skipped (MOSE_SKIP_CUDA_CHECK=1)"
  exit 0
fi
if ! command -v nvcc >/dev/null; then
  echo "== native check 2/2 skipped: nvcc not found, the CUDA extension cannot be compiled here"
  exit 0
fi

echo "== native check 2/2: CUDA extension compile + link ($TORCH_CUDA_SPEC)"
VENV=${XDG_CACHE_HOME:-$HOME/.cache}/mose_kernels/venv-cuda
if [[ ! -f "$VENV/.mose-complete" ]]; then
  echo "creating the cached CUDA venv at $VENV (once; ~5 GB)"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q "$TORCH_CUDA_SPEC" numpy setuptools wheel ninja
  touch "$VENV/.mose-complete"
fi
# The toolkit root (nvcc may be a wrapper script elsewhere); cuBLAS/cuSPARSE headers, which ATen's CUDA
# headers include, come from the nvidia wheels of the CUDA torch.
if [[ -z "${CUDA_HOME:-}" ]]; then
  CUDA_HOME=$(nvcc --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=\(.*\)\/bin\/\.\.$/\1/p' | head -1)
  export CUDA_HOME
fi
echo "CUDA_HOME=$CUDA_HOME"
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
CUDA_INCLUDE=$(ls -d "$SITE"/nvidia/cu*/include 2>/dev/null | head -1 || true)
export CPATH="${CUDA_INCLUDE}${CPATH:+:$CPATH}"
export PATH="$VENV/bin:$PATH"
MOSE_BUILD_CUDA=1 MAX_JOBS=$JOBS "$VENV/bin/python" setup.py -q build_ext \
  --build-lib "$WORK/lib" --build-temp "$WORK/tmp"
"$VENV/bin/python" - "$WORK/lib" <<'PY'
import glob
import sys

import torch

lib = sys.argv[1]
for name in ("_C", "_C_cuda"):
    paths = glob.glob(f"{lib}/mose_kernels/{name}.*")
    if len(paths) != 1:
        sys.exit(f"expected one built library mose_kernels/{name}.* under {lib}, found {paths}")
    torch.ops.load_library(paths[0])  # dlopen with RTLD_NOW: every symbol must resolve
missing = [
    f"{op}[{key}]"
    for op in ("wy_factor", "householder_fwd", "householder_fwd_", "project", "reflect_update")
    for key in ("CPU", "CUDA")
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"mose::{op}", key)
]
if missing:
    sys.exit(f"ops without kernels after loading the extensions: {missing}")
print(f"CUDA extension built, linked and loaded with torch {torch.__version__}: all mose ops have CUDA kernels")
PY
echo "native checks passed after $((SECONDS - start)) s"
