#!/usr/bin/env bash
# One lent-GPU session in one call: install, the CUDA-only tests, then the GPU benchmarks,
# each step under its own timeout so a hang costs one step, not the lease. Everything
# (logs, result tables) lands under $OUT; the last lines printed are a short summary.
#
#   run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=480)
#   STEPS="tests harness" bash benchmarks/gpu_session.sh   # a subset
#
# The device image has torch 2.11 + CUDA and Triton but no network: the package goes in
# without dependencies; expecttest (needed by torch's TestCase) comes from .whl/ when the
# checkout carries it there.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_session_out}
mkdir -p "$OUT"
PY=${PY:-python3}
STEPS=${STEPS:-"seamless tests"}
summary=()
stamp=$(mktemp)  # result tables newer than this are the ones this call wrote

step() {  # step NAME SECONDS COMMAND...
    local name=$1 secs=$2
    shift 2
    local t0=$SECONDS
    timeout "$secs" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    summary+=("$name: rc=$rc in $((SECONDS - t0)) s")
    tail -5 "$OUT/$name.log"
}

# The package: editable into the image's environment, else a plain install beside it.
# expecttest (torch's TestCase needs it; not in the image) from .whl/ when carried.
{
    if ls .whl/*.whl > /dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site
    fi
    $PY -m pip install --no-deps --no-build-isolation --no-index -e . \
        || $PY -m pip install --no-deps --no-build-isolation --no-index --target /tmp/site .
    $PY -c "import torch, torch_mmgen_opt, torch_mmgen_opt.passes, expecttest
print('mmgen backend registered:', 'mmgen' in torch._dynamo.list_backends())"
} > "$OUT/install.log" 2>&1
tail -2 "$OUT/install.log"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
$PY -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)" \
    >> "$OUT/gpu.txt" 2>&1

for s in $STEPS; do
    case $s in
        tests)  # tests/test_cuda.py and the CUDA tests beside the CPU ones (skipped on CPU),
            # the searchsorted-over-a-slice pass, and the CPU kernels' tests (int8 and panel
            # gemv, GemvLinear): their build against this image's torch headers
            step tests 280 $PY -m pytest -q -rs -n 8 --tb=short -p no:cacheprovider tests \
                -k "cuda or Triton or speech_encoder or Int8Gemv or TestBuild or PanelGemv or GemvLinear or GemvKernel or Searchsorted" ;;
        seamless)  # the published large shapes, bf16, per stage and end to end
            step seamless 300 $PY -m benchmarks.bench_seamless --device cuda --size large \
                --dtype bfloat16 --repeats 3 ;;
        harness)  # the main harness, Llama 7B shapes: eager against static KV + CUDA graphs
            step harness 300 $PY -m benchmarks.harness --device cuda --size 7b \
                --rows eager,static_kv --new-tokens 32 --repeats 2 --no-characterize ;;
        diag)  # throwaway diagnostics carried with the call (carry=["diag"]), one step each
            for f in diag/*.py; do
                [ -f "$f" ] && step "diag-$(basename "$f" .py)" 120 $PY "$f"
            done ;;
        decode_gemv)  # CPU-only pass: on the GPU box's CPU, for a second machine's numbers
            step decode_gemv 120 $PY -m benchmarks.bench_decode_gemv --rows 1 4 --repeats 10 ;;
    esac
done
# at most 8 files come back: the logs above and the tables this call wrote
find benchmarks/results -type f -newer "$stamp" -exec cp {} "$OUT/" \;
cat "$OUT/gpu.txt"
printf '%s\n' "${summary[@]}"
