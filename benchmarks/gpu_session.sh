#!/usr/bin/env bash
# One lent-GPU session in one call: install, the CUDA-only tests, then the GPU benchmarks,
# each step under its own timeout so a hang costs one step, not the lease. Everything
# (logs, result tables) lands under $OUT; the last lines printed are a short summary.
#
#   run(command="bash benchmarks/gpu_session.sh", timeout_s=540)     # the device tool
#   STEPS="tests seamless" bash benchmarks/gpu_session.sh            # a subset
#
# The device image has torch 2.11 + CUDA and Triton but no network: the package goes in
# without dependencies; expecttest (needed by torch's TestCase) comes from .whl/ when the
# checkout carries it there.
set -u
OUT=${OUT:-/tmp/gpu_session_out}
mkdir -p "$OUT"
PY=${PY:-python3}
STEPS=${STEPS:-"tests seamless decode_gemv"}
summary=()

step() {  # step NAME SECONDS COMMAND...
    local name=$1 secs=$2
    shift 2
    local t0=$SECONDS
    timeout "$secs" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    summary+=("$name: rc=$rc in $((SECONDS - t0)) s")
    tail -5 "$OUT/$name.log"
}

$PY -m pip install --no-deps --no-build-isolation --no-index -e . > "$OUT/install.log" 2>&1
for whl in .whl/*.whl; do
    [ -f "$whl" ] && $PY -m pip install --no-deps --no-index "$whl" >> "$OUT/install.log" 2>&1
done
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
$PY -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)" \
    >> "$OUT/gpu.txt" 2>&1

for s in $STEPS; do
    case $s in
        tests)  # the tests that skip without CUDA (7 selected on CPU, 6 of them skipped)
            step tests 240 $PY -m pytest -q -rs -p no:cacheprovider tests \
                -k "cuda or Triton or speech_encoder" ;;
        seamless)  # the published large shapes, bf16, per stage and end to end
            step seamless 300 $PY -m benchmarks.bench_seamless --device cuda --size large \
                --dtype bfloat16 --repeats 3 ;;
        decode_gemv)  # CPU-only pass: on the GPU box's CPU, for a second machine's numbers
            step decode_gemv 120 $PY -m benchmarks.bench_decode_gemv --rows 1 4 --repeats 10 ;;
    esac
done
cp -r benchmarks/results "$OUT/results" 2>/dev/null
cat "$OUT/gpu.txt"
printf '%s\n' "${summary[@]}"
