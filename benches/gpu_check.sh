#!/usr/bin/env bash
# The GPU check, in one prepared script (5-8 minutes on an H200): install zeta from a prebuilt
# abi3 wheel (no Rust toolchain needed), run the CUDA tests, compute-sanitizer (memcheck) on
# small inputs, the kernel tuning variants (the fastest sets the benchmark's settings), the
# benchmark against SDPA, a torch-profiler table of one fwd+bwd call, and racecheck. Stages
# run in that order under one deadline: a stage starts only with time left and is cut at it.
#
# Usage, from the repository root on the GPU machine:
#   bash benches/gpu_check.sh [wheel dir, default .whl] [output dir, default benches/results]
# Environment: GPU_CHECK_SECONDS (deadline, default 450), GPU_CHECK_STAGES (default
# "tests memcheck variants bench profile racecheck"; also: host = cProfile of the host's
# side of a call, ncu = Nsight Compute sections of the forward/backward kernels, ncusrc = the
# forward kernel's ncu source view (per CUDA line, CSV), mqar =
# benches/mqar.py --full with MQAR_ARGS), GPU_BENCH_BUDGET_S (default 110), GPU_PYTEST_K
# (a pytest -k expression).
# Build the wheel first where Rust is: maturin build --release -o .whl
set -u
WHL=${1:-.whl}
RES=${2:-benches/results}
DEADLINE=$((SECONDS + ${GPU_CHECK_SECONDS:-450}))
STAGES=" ${GPU_CHECK_STAGES:-tests memcheck variants bench profile racecheck} "
mkdir -p "$RES"
SITE=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHL"/zeta_attention-*.whl || exit 1
export PYTHONPATH=$SITE PYTHONUNBUFFERED=1
log() { echo "== [$SECONDS s] $*"; }
# left N: seconds a stage may take (its own cap N, or what the deadline leaves); 0 = skip
left() { local l=$((DEADLINE - SECONDS)); [ "$l" -gt "$1" ] && l=$1; [ "$l" -lt 15 ] && l=0; echo $l; }
want() { [[ "$STAGES" == *" $1 "* ]]; }
rc=0
# output files: gpu-<what>-<gpu>-<date>.<ext>, as the JSON files the Python scripts write
TAG=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -c 'A-Za-z0-9\n' '-' | tr 'A-Z' 'a-z' | sed -E 's/-+/-/g; s/^-|-$//g')-$(date +%F)
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
python3 -c "import zeta, json, cupy, torch; print(json.dumps(zeta.backends())); print('cupy', cupy.__version__, 'torch', torch.__version__)"

if want tests && [ "$(left 170)" -gt 0 ]; then
  log "CUDA tests"
  # shellcheck disable=SC2086
  timeout "$(left 170)" python3 -m pytest -q -rfEs --tb=short -p no:cacheprovider ${GPU_PYTEST_K:+-k "$GPU_PYTEST_K"} \
    tests/test_cuda.py > "$RES/gpu-tests-$TAG.txt" 2>&1
  tail -25 "$RES/gpu-tests-$TAG.txt"
  grep -q " passed" "$RES/gpu-tests-$TAG.txt" && ! grep -qE "[0-9]+ (failed|error)" "$RES/gpu-tests-$TAG.txt" || rc=1
fi

sanitize() {
  log "compute-sanitizer $1"
  timeout "$(left "$2")" compute-sanitizer --tool "$1" --error-exitcode 3 python3 benches/gpu_sanitize.py \
    > "$RES/gpu-sanitizer-$1-$TAG.txt" 2>&1
  local s=$?
  echo "exit $s" >> "$RES/gpu-sanitizer-$1-$TAG.txt"
  tail -12 "$RES/gpu-sanitizer-$1-$TAG.txt"
  [ $s -eq 0 ] || rc=1
}
if want memcheck && command -v compute-sanitizer >/dev/null && [ "$(left 70)" -gt 0 ]; then
  sanitize memcheck 70
fi

if want variants && [ "$(left 170)" -gt 0 ]; then
  log "kernel variants (the fastest sets the benchmark's kernel settings)"
  timeout "$(left 170)" python3 benches/gpu_variants.py --out "$RES" 2>&1 | tail -30
  [ -f "$RES/best-variant.env" ] && cat "$RES/best-variant.env" && . "$RES/best-variant.env" && rm -f "$RES/best-variant.env"
fi

if want bench && [ "$(left 200)" -gt 0 ]; then
  log "benchmark"
  timeout "$(left 200)" python3 benches/gpu_bench.py --out "$RES" --budget-s "${GPU_BENCH_BUDGET_S:-110}" || rc=1
fi

if want profile && [ "$(left 45)" -gt 0 ]; then
  log "profile (fwd+bwd, N = 32k, bf16)"
  timeout "$(left 45)" python3 benches/gpu_profile.py > "$RES/gpu-profile-$TAG.txt" 2>&1
  head -40 "$RES/gpu-profile-$TAG.txt"
fi


if want host && [ "$(left 60)" -gt 0 ]; then
  log "host time of a call (cProfile, N = 4k)"
  timeout "$(left 60)" python3 benches/gpu_profile.py --host --n 4096 > "$RES/gpu-host-profile-$TAG.txt" 2>&1
  grep -E "per call|tottime|^ +[0-9]" "$RES/gpu-host-profile-$TAG.txt" | head -24
fi

if want ncu && command -v ncu >/dev/null && [ "$(left 120)" -gt 0 ]; then
  log "ncu: the forward and backward kernels (N = 32k, bf16)"
  timeout "$(left 120)" ncu --clock-control none -k 'regex:(forward|backward)_kernel' --launch-skip 2 \
    --launch-count 2 --section SpeedOfLight --section Occupancy --section LaunchStats \
    --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
    --section ComputeWorkloadAnalysis --section InstructionStats --section SourceCounters \
    python3 benches/gpu_profile.py --ncu > "$RES/gpu-ncu-$TAG.txt" 2>&1
  grep -E "Duration|Registers|Achieved Occupancy|Theoretical Occupancy|Compute \(SM\) Throughput|Memory Throughput|Executed Ipc|Issue Slots Busy" "$RES/gpu-ncu-$TAG.txt" | head -24
fi

if want ncusrc && command -v ncu >/dev/null && [ "$(left 150)" -gt 0 ]; then
  log "ncu: the forward kernel per source line (N = 32k, bf16, -lineinfo)"
  rep=$(mktemp -d)/fwd
  # compile the -lineinfo build outside ncu first (cupy caches it on disk): under ncu the
  # compile and the first calls did not reach the forward kernel within 64 s (2026-11-30)
  ZETA_CUDA_LINEINFO=1 timeout "$(left 90)" python3 benches/gpu_profile.py --ncu --n 4096
  ZETA_CUDA_LINEINFO=1 timeout "$(left 120)" ncu --clock-control none -k 'regex:forward_kernel' \
    --launch-skip 1 --launch-count 1 --section SourceCounters --section WarpStateStats \
    --import-source yes -o "$rep" python3 benches/gpu_profile.py --ncu > "$RES/gpu-ncu-source-$TAG.log" 2>&1
  echo "profile exit $?"
  for view in cuda sass; do
    timeout 60 ncu --import "$rep.ncu-rep" --page source --print-source $view --csv \
      > "$RES/gpu-ncu-source-$view-$TAG.csv" 2>> "$RES/gpu-ncu-source-$TAG.log"
    echo "source view $view: exit $?, $(wc -l < "$RES/gpu-ncu-source-$view-$TAG.csv") lines"
  done
  tail -4 "$RES/gpu-ncu-source-$TAG.log"
fi

if want mqar && [ "$(left 60)" -gt 0 ]; then
  log "mqar --full on the GPU, softmax and zeta in parallel processes, ${MQAR_ARGS:-}"
  for a in softmax zeta; do
    # shellcheck disable=SC2086
    timeout "$(left 600)" python3 benches/mqar.py --full --device cuda --attn $a ${MQAR_ARGS:-} \
      > "$RES/gpu-mqar-$a-$TAG.txt" 2>&1 &
  done
  wait
  for a in softmax zeta; do grep -vE "it/s\]|s/it\]" "$RES/gpu-mqar-$a-$TAG.txt" | tail -8; done
fi

if want racecheck && command -v compute-sanitizer >/dev/null && [ "$(left 90)" -gt 0 ]; then
  sanitize racecheck 90
fi
log "done, rc=$rc"
exit $rc
