"""The scaling-law study: LLaMA-style decoders sized by one knob, trained to a token budget.

One member:
  python -m experiments.main train --config experiments/configs/lm/scaling.py:width=64,tokens=1e6 \
      --workdir runs/scaling/one
The study (get_sweep: an IsoFLOP grid of 20 members, ~55 min on 2 busy CPU cores), then the fit:
  python -m experiments.sweep --config experiments/configs/lm/scaling.py --workdir runs/scaling
  python -m experiments.scaling.study --sweep runs/scaling --out experiments/results/scaling_cpu

Size rule (width is the knob, a multiple of 8): d_model = width, layers = max(1, width // 32),
heads = max(1, width // 16), SwiGLU width 8/3 d rounded up to a multiple of 16; a 512-piece BPE
keeps the vocabulary tables from dominating the smallest models. Parameters run from 20 k (width
16; 3.4 k without the embedding tables) to 2.9 M (width 192; 2.7 M). The study's grid uses widths
16 to 128: docs/scaling.md has its fit. The token budget sets the steps at 16 x 128 tokens a step, and the
cosine schedule decays over exactly that horizon (Chinchilla's point: a schedule longer than the
run overstates the loss of short runs). Learning rate 3e-3 at width 128, scaled by
sqrt(128 / width). The loss is the validation loss in nats per token (whole validation split).
"""
import dataclasses
import math

import ml_collections

from core.config import ConfigError, parse_arg
from experiments.configs.lm import gpt
from lm.models import param_tree
from lm.models import transformer as model_lib

SEQ_LEN, BATCH, VOCAB = 128, 16, 512
WIDTHS = (16, 24, 32, 48, 64, 96, 128, 160, 192)
# Compute budgets (training FLOPs) of the IsoFLOP grid.
BUDGETS = (1e11, 3e11, 1e12, 3e12)
# Members train at most this many tokens (about two passes over the corpus' training split), and
# at least this many per parameter, so every budget's members bracket its optimum.
MAX_TOKENS, MIN_TOKENS_PER_PARAM, MAX_TOKENS_PER_PARAM = 9e6, 0.25, 1000.0


def model_config(width: int) -> model_lib.TransformerConfig:
    if width <= 0 or width % 8:
        raise ConfigError(f"width must be a positive multiple of 8, got {width}")
    heads = max(1, width // 16)
    return model_lib.preset("llama", vocab_size=VOCAB, num_layers=max(1, width // 32),
                            d_model=width, num_heads=heads, num_kv_heads=heads,
                            d_ff=16 * math.ceil(8 * width / 3 / 16), max_len=SEQ_LEN)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    args = parse_arg(arg, width=64, tokens=1e6, corpus="austen+kjv+brown")
    steps = max(1, round(args.tokens / (BATCH * SEQ_LEN)))
    model = model_config(args.width)
    config = gpt.get_config(f"size=tiny,corpus={args.corpus}")
    config.model = ml_collections.ConfigDict({**dataclasses.asdict(model), "vocab_size": 0})
    config.data.seq_len = SEQ_LEN
    config.data.tokenizer.vocab_size = VOCAB
    config.train.global_batch_size = BATCH
    config.train.steps = steps
    config.train.log_every = max(1, steps // 20)
    config.train.eval_every = 0          # one evaluation, on the whole validation split, at the end
    config.train.checkpoint_every = max(1, steps // 4)
    config.optim.learning_rate = 3e-3 * math.sqrt(128 / args.width)
    config.optim.warmup_steps = max(1, min(100, steps // 10))
    return config


def flops_per_token(width: int) -> float:
    return param_tree.flops_per_token(model_config(width), SEQ_LEN)


def get_sweep(arg: str = "") -> list[dict]:
    """The IsoFLOP grid: at each compute budget, every width whose token count stays within
    MAX_TOKENS (two passes over the corpus) and between MIN and MAX tokens per parameter."""
    members = []
    for budget in BUDGETS:
        for width in WIDTHS:
            tokens = budget / flops_per_token(width)
            params = param_tree.num_params(model_config(width))
            if tokens <= MAX_TOKENS and MIN_TOKENS_PER_PARAM <= tokens / params <= MAX_TOKENS_PER_PARAM:
                members.append({"arg.width": width, "arg.tokens": float(f"{tokens:.4g}")})
    return members
