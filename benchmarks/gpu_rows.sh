#!/usr/bin/env bash
# The GPU rows of docs/performance.md in one pass on one NVIDIA GPU: cuDNN attention against
# XLA's (tests), then GPT-2 124M and a 1.1B LLaMA-style model trained in JAX, PyTorch eager and
# torch.compile side by side (benchmarks/train_throughput.py). Each step has its own time limit,
# cut to what is left of GPU_ROWS_DEADLINE; a failed step does not stop the next, and the exit
# status counts the failures. JSONs and a log go to $OUT (default benchmarks/results).
#
#     bash benchmarks/gpu_rows.sh            # on a machine with jax[cuda] and torch
# Wheels in $GPU_ROWS_WHEELS (default .whl), if any, are installed first into /tmp/site: the
# lent machines' image has jax and torch but not our pinned flax, optax and ml-collections.
# GPU_ROWS_BUDGET (seconds, default 400): no optional variant starts past it.
# GPU_ROWS_ONLY (names, space-separated): run only these steps, to spend a short lease on them.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
BUDGET=${GPU_ROWS_BUDGET:-400}
DEADLINE=${GPU_ROWS_DEADLINE:-560}
WHEELS=${GPU_ROWS_WHEELS:-.whl}
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}. PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
mkdir -p "$OUT"
LOG="$OUT/gpu_rows.log"
FAILED=0

if compgen -G "$WHEELS/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi

ONLY=${GPU_ROWS_ONLY:-}
wanted() { [ -z "$ONLY" ] || [[ " $ONLY " == *" $1 "* ]]; }  # name

step() {  # name, limit in seconds, command...
  local name=$1 limit=$2; shift 2
  wanted "$name" || return 0
  local left=$((DEADLINE - SECONDS))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 30 ]; then
    echo "=== $name skipped: ${left}s left before the deadline" | tee -a "$LOG"
    FAILED=$((FAILED + 1)); return 1
  fi
  echo "=== $name (t=${SECONDS}s, limit ${limit}s)" | tee -a "$LOG"
  timeout -k 15 "$limit" "$@" >>"$LOG" 2>&1
  local status=$?
  echo "=== $name: exit $status (t=${SECONDS}s)" | tee -a "$LOG"
  [ "$status" -eq 0 ] || FAILED=$((FAILED + 1))
  return "$status"
}

bench() {  # name, limit, train_throughput arguments...
  local name=$1 limit=$2; shift 2
  wanted "$name" || return 0
  rm -f "$OUT/$name.json"  # never mistake an earlier run's result for this one's
  step "$name" "$limit" python3 -m benchmarks.train_throughput --dtype bfloat16 \
    --attention cudnn --loss-chunk 8192 --out "$OUT/$name.json" "$@" || return
  python3 -c "import json, sys; r = json.load(open(sys.argv[1]))
print({k: round(r[k]['mfu'], 3) for k in ('jax', 'torch', 'torch_compile') if k in r},
      {k: round(v, 3) for k, v in r.items() if k.startswith('jax_over')})" "$OUT/$name.json" \
    | tee -a "$LOG"
}

nvidia-smi -L | tee -a "$LOG"
python3 -c "import jax, flax, optax, torch; print('jax', jax.__version__, jax.devices(),
'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__)" 2>&1 \
  | tee -a "$LOG"

step cudnn_tests 150 env JAX_PLATFORMS=cuda python3 -m pytest -q -p no:cacheprovider \
  tests/test_efficient_attention.py -k on_a_gpu -rs
bench gpu_gpt2_124m_bf16_b64 240 --size gpt2_124m --seq 1024 --batch 64 --vocab 50304
# B4: three 1.1B models with AdamW and two allocators that keep what they took share the GPU
bench gpu_llama_1b_bf16_b4 240 --size llama_1b --seq 2048 --batch 4 --vocab 32000

# Optional variants, JAX alone, while time is left: what each preset choice buys. GPT-2 at B128
# runs without the PyTorch arms: beside JAX's 60-70 GiB pool, eager's float32 logits (25 GiB at once)
# do not fit in 140 GiB.
variant() {
  wanted "$1" || return 0
  if [ "$SECONDS" -ge "$BUDGET" ]; then
    echo "=== $1 skipped: past ${BUDGET}s" | tee -a "$LOG"; return
  fi
  bench "$@" --no-torch
}
variant gpu_gpt2_124m_bf16_b128 120 --size gpt2_124m --seq 1024 --batch 128 --vocab 50304
variant gpu_gpt2_124m_bf16_b128_chunk16384 120 --size gpt2_124m --seq 1024 --batch 128 \
  --vocab 50304 --loss-chunk 16384
XLA_FLAGS=--xla_gpu_enable_triton_gemm=true variant gpu_gpt2_124m_bf16_b128_triton_gemm 120 \
  --size gpt2_124m --seq 1024 --batch 128 --vocab 50304
variant gpu_gpt2_124m_bf16_b64_full_logits 120 --size gpt2_124m --seq 1024 --batch 64 \
  --vocab 50304 --loss-chunk 0
variant gpu_gpt2_124m_bf16_b64_dpa_attention 120 --size gpt2_124m --seq 1024 --batch 64 \
  --vocab 50304 --attention dot_product_attention
variant gpu_llama_1b_bf16_b8 150 --size llama_1b --seq 2048 --batch 8 --vocab 32000
echo "done at ${SECONDS}s, $FAILED step(s) failed or skipped" | tee -a "$LOG"
exit "$FAILED"
