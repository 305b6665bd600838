#!/usr/bin/env bash
# The GPU rows of docs/performance.md in one pass on one NVIDIA GPU: cuDNN attention against
# XLA's (tests), then GPT-2 124M and a 1.1B LLaMA-style model trained in JAX, PyTorch eager and
# torch.compile side by side (benchmarks/train_throughput.py). Each step has its own time limit
# and a failure does not stop the next. JSONs and logs go to $OUT (default benchmarks/results).
#
#     bash benchmarks/gpu_rows.sh            # on a machine with jax[cuda] and torch
# Set GPU_ROWS_BUDGET (seconds, default 420) to skip the optional variants past that time.
set -u
OUT=${OUT:-benchmarks/results}
BUDGET=${GPU_ROWS_BUDGET:-420}
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}. PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
mkdir -p "$OUT"
LOG="$OUT/gpu_rows.log"

step() {  # name, limit in seconds, command...
  local name=$1 limit=$2; shift 2
  echo "=== $name (t=${SECONDS}s)" | tee -a "$LOG"
  timeout "$limit" "$@" >>"$LOG" 2>&1
  echo "=== $name: exit $? (t=${SECONDS}s)" | tee -a "$LOG"
}

bench() {  # name, limit, train_throughput arguments...
  local name=$1 limit=$2; shift 2
  step "$name" "$limit" python3 -m benchmarks.train_throughput --dtype bfloat16 \
    --attention cudnn --loss-chunk 8192 --out "$OUT/$name.json" "$@"
  [ -s "$OUT/$name.json" ] && python3 -c "import json,sys; r=json.load(open(sys.argv[1]));
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
bench gpu_llama_1b_bf16 300 --size llama_1b --seq 2048 --batch 8 --vocab 32000
# Three 1.1B models with AdamW share the GPU; if B8 did not fit beside them, B4.
[ -s "$OUT/gpu_llama_1b_bf16.json" ] || bench gpu_llama_1b_bf16_b4 240 --size llama_1b \
  --seq 2048 --batch 4 --vocab 32000

# Optional variants, JAX alone, while time is left: what each preset choice buys.
variant() {
  [ "$SECONDS" -lt "$BUDGET" ] || { echo "=== $1 skipped: past ${BUDGET}s" | tee -a "$LOG"; return; }
  bench "$@" --no-torch
}
variant gpu_gpt2_124m_bf16_b64_full_logits 120 --size gpt2_124m --seq 1024 --batch 64 \
  --vocab 50304 --loss-chunk 0
variant gpu_gpt2_124m_bf16_b64_xla_attention 120 --size gpt2_124m --seq 1024 --batch 64 \
  --vocab 50304 --attention dot_product_attention
variant gpu_gpt2_124m_bf16_b16 120 --size gpt2_124m --seq 1024 --batch 16 --vocab 50304
echo "done at ${SECONDS}s" | tee -a "$LOG"
