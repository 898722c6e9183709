#!/usr/bin/env bash
# The GPU check, in one prepared script (about 5 minutes on an H200): install zeta from a
# prebuilt abi3 wheel (no Rust toolchain needed), run the CUDA tests, compute-sanitizer
# (memcheck, racecheck) on small inputs, and the benchmark against SDPA.
#
# Usage, from the repository root on the GPU machine:
#   bash benches/gpu_check.sh [wheel dir, default .whl] [output dir, default $OUT or benches/results]
# Build the wheel first where Rust is: maturin build --release -o .whl
set -u
WHL=${1:-.whl}
RES=${2:-${OUT:-benches/results}}
mkdir -p "$RES"
SITE=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHL"/zeta_attention-*.whl || exit 1
export PYTHONPATH=$SITE
log() { echo "== $*"; }
rc=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import zeta, json; print(json.dumps(zeta.backends()))"

log "CUDA tests"
timeout 170 python3 -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -30 | tee "$RES/gpu-tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || rc=1

log "benchmark"
timeout 200 python3 benches/bench_gpu.py --out "$RES" --budget-s 150 || rc=1

if command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    log "compute-sanitizer $tool"
    timeout 70 compute-sanitizer --tool $tool --error-exitcode 3 python3 benches/gpu_sanitize.py 2>&1 | tail -8 | tee "$RES/gpu-sanitizer-$tool.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
  done
fi
exit $rc
