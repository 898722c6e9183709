#!/usr/bin/env bash
# The GPU check, in one prepared script (about 5 minutes on an H200): install zeta from a
# prebuilt abi3 wheel (no Rust toolchain needed), run the CUDA tests, time the kernel tuning
# variants, the benchmark against SDPA (with the fastest variant), and compute-sanitizer
# (memcheck, racecheck) on small inputs.
#
# Usage, from the repository root on the GPU machine:
#   bash benches/gpu_check.sh [wheel dir, default .whl] [output dir, default benches/results]
# Build the wheel first where Rust is: maturin build --release -o .whl
set -u
WHL=${1:-.whl}
RES=${2:-benches/results}
mkdir -p "$RES"
SITE=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHL"/zeta_attention-*.whl || exit 1
export PYTHONPATH=$SITE
log() { echo "== $*"; }
rc=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import zeta, json; print(json.dumps(zeta.backends()))"

log "CUDA tests"
timeout 120 python3 -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py > "$RES/gpu-tests.txt" 2>&1
tail -3 "$RES/gpu-tests.txt"
grep -q " passed" "$RES/gpu-tests.txt" && ! grep -qE "[0-9]+ (failed|error)" "$RES/gpu-tests.txt" || rc=1

log "kernel variants (the fastest sets the benchmark's kernel settings)"
timeout 150 python3 benches/gpu_variants.py --out "$RES" 2>&1 | tail -8
[ -f "$RES/best-variant.env" ] && . "$RES/best-variant.env" && rm -f "$RES/best-variant.env"

log "benchmark"
timeout 200 python3 benches/gpu_bench.py --out "$RES" --budget-s 120 || rc=1

if command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    log "compute-sanitizer $tool"
    timeout 70 compute-sanitizer --tool $tool --error-exitcode 3 python3 benches/gpu_sanitize.py 2>&1 | tail -8 | tee "$RES/gpu-sanitizer-$tool.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
  done
fi
exit $rc
