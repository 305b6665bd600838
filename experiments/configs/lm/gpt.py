"""Transformer-only GPT/LLaMA pretraining on the offline corpus (Austen + KJV + Brown).

Run the demo model (what `make demo` trains):
  python -m experiments.main train --config experiments/configs/lm/gpt.py:size=demo \
      --workdir runs/gpt-demo
Sizes: tiny (tests, seconds), demo (2 CPU cores, ~10 min; README gives the bits/byte it reaches
against the xz baseline), small (the ablation sweep's model, ~2-3 min each), bench (the throughput benchmark's model: 6 layers, width 384), gpt2_124m
(GPT-2 small, for accelerators). style=gpt2 (learned positions, LayerNorm, GELU, tied),
style=rope_swiglu (GPT-2 with rotary positions and SwiGLU at the same parameter count: the
ablation's best, what `make demo` trains) or style=llama (rotary, RMSNorm, SwiGLU, grouped-query
attention, untied).
platform=cpu (the default: float32, scanned layers, document masking, the loss by chunks of
4,096 rows, what tests and the demo want) or platform=gpu|tpu: bfloat16 compute with float32
parameters, layers unrolled, the loss by chunks of 8,192 rows, cuDNN flash attention (gpu) or
jax.nn.dot_product_attention (tpu), causal attention across the window unless
--config.data.document_masking=true (docs/performance.md says what each costs).
Override anything, e.g. --config.train.steps=100 --config.mesh.ici.fsdp=2.

The ablation sweep (get_sweep below: positions x norm x MLP, 8 members, docs/experiments.md):
  python -m experiments.sweep --config experiments/configs/lm/gpt.py:size=small \
      --workdir runs/ablation
"""
import dataclasses

import ml_collections

from core.config import check_choice, distributed_config, parse_arg
from core.engine import train_config
from core.mesh import DEFAULT_RULES, mesh_config
from core.optim import optim_config
from experiments.sweep import axis, product, zipped
from lm.models import transformer as model_lib
from lm.models.lora import lora_config

SIZES = {
    # name: (layers, width, heads, seq_len, vocab, batch, steps, learning rate)
    "tiny": (2, 64, 4, 64, 512, 16, 50, 3e-3),
    "demo": (4, 256, 4, 256, 4096, 16, 450, 2e-3),
    "small": (4, 128, 4, 128, 2048, 16, 400, 3e-3),
    "bench": (6, 384, 6, 256, 8192, 16, 2000, 1e-3),
    "gpt2_124m": (12, 768, 12, 1024, 50304, 512, 20000, 6e-4),
}

# What a first run on each platform should use. Everywhere the loss by chunks of rows (no
# B x T x V logits; 6% faster on the CPU bench, docs/performance.md). On accelerators: bf16
# matmuls, no layer scan (-34% tokens/s on the H100), no dense document mask, chunks of 8,192
# rows; cuDNN's flash attention on GPUs.
_ACCELERATOR = {"dtype": "bfloat16", "param_dtype": "float32", "scan_layers": False,
                "loss_chunk": 8192}
PLATFORMS = {"cpu": {"model": {"loss_chunk": 4096}, "document_masking": True},
             "gpu": {"model": {**_ACCELERATOR, "attention_impl": "cudnn"},
                     "document_masking": False},
             "tpu": {"model": {**_ACCELERATOR, "attention_impl": "dot_product_attention"},
                     "document_masking": False}}


def swiglu_width(width: int) -> int:
    """SwiGLU's hidden width at GELU's parameter count: three matrices to GELU's two of 4 x width,
    so 2/3 of 4 x width, rounded to a multiple of 8."""
    return 8 * round(4 * width * 2 / 3 / 8)


# A style is any transformer preset (its fields at this size), or a recipe: style -> (preset,
# its fields replaced for a width).
RECIPES = {
    # the ablation's best (docs/experiments.md): rotary positions + SwiGLU, -0.30 nats
    "rope_swiglu": ("gpt2", lambda width: {"pos_emb": "rope", "mlp": "swiglu",
                                           "d_ff": swiglu_width(width)})}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    args = parse_arg(arg, size="demo", style="gpt2", corpus="austen+kjv+brown", platform="cpu")
    check_choice("size", args.size, SIZES)
    check_choice("platform", args.platform, PLATFORMS)
    check_choice("style", args.style, {**model_lib.PRESETS, **RECIPES})
    layers, width, heads, seq_len, vocab, batch, steps, lr = SIZES[args.size]
    preset, fields = RECIPES.get(args.style, (args.style, lambda width: {}))
    model = model_lib.preset(preset, vocab_size=vocab, num_layers=layers, d_model=width,
                             num_heads=heads, max_len=max(seq_len, 256), **fields(width),
                             **PLATFORMS[args.platform]["model"])
    config = ml_collections.ConfigDict()
    config.task = "causal_lm"
    config.model = dataclasses.asdict(model)
    # 0: take the trained tokenizer's vocabulary size (the model is built after the tokenizer).
    config.model.vocab_size = vocab if args.size == "gpt2_124m" else 0
    config.data = ml_collections.ConfigDict({
        "corpus": args.corpus,
        "text_column": "text",
        "val_fraction": 0.1,
        "split_seed": 0,
        "seq_len": seq_len,
        # True: attention and positions restart at each document inside a packed window.
        "document_masking": PLATFORMS[args.platform]["document_masking"],
        "cache_dir": "",
        # The token store (lm/data/token_store.py): tokenizing processes (0: one per core), text
        # per shard (a killed build resumes from its last shard), batches read ahead of the step.
        "workers": 0,
        "shard_mb": 256.0,
        "prefetch": 2,
        "tokenizer": {"path": "", "kind": "bpe", "vocab_size": vocab,
                      "max_train_chars": 20_000_000},
    })
    config.train = train_config(steps=steps, global_batch_size=batch,
                                log_every=max(1, min(50, steps // 10)),
                                eval_every=max(1, steps // 3), eval_batches=20,
                                checkpoint_every=max(1, steps // 5))
    config.optim = optim_config(learning_rate=lr, warmup_steps=max(1, min(200, steps // 10)))
    config.mesh = mesh_config()
    # rank > 0: train LoRA adapters on the frozen model (docs/post-training.md)
    config.lora = lora_config()
    config.sharding_rules = DEFAULT_RULES
    config.distributed = distributed_config()
    return config


def get_sweep(arg: str = "") -> list[dict]:
    """The architecture ablation: learned vs rotary positions, LayerNorm vs RMSNorm, GELU vs SwiGLU.

    SwiGLU's width is swiglu_width's, so every member has the same parameter count within 1%."""
    width = get_config(arg).model.d_model
    gelu_ff, swiglu_ff = 4 * width, swiglu_width(width)
    return product(axis("model.pos_emb", ["learned", "rope"]),
                   axis("model.norm", ["layernorm", "rmsnorm"]),
                   zipped(axis("model.mlp", ["gelu", "swiglu"]),
                          axis("model.d_ff", [gelu_ff, swiglu_ff])))
