"""T5-style encoder-decoder pretraining by span corruption on the offline corpus (Austen + KJV + Brown).

  python -m experiments.main train --config experiments/configs/lm/t5.py:size=demo \
      --workdir runs/t5-demo
  python -m experiments.main sample --workdir runs/t5-demo --temperature 0 \
      --prompt "It is a truth universally <extra_id_0>, that a single man in <extra_id_1>."
The model is T5.1.1's shape at small scale (lm/models/encoder_decoder.py): an encoder and a decoder of
`layers` pre-norm blocks each, RMSNorm, no biases, a gated MLP (SwiGLU here, GEGLU in T5.1.1),
untied output, one token embedding for both stacks, and T5's relative position bias (32 buckets,
max distance 128; bidirectional in the encoder, causal in the decoder). The objective
(lm/objectives/span_corruption.py) is T5's: 15% noise in spans of mean length 3, one sentinel per span, 100
sentinels at the top of the vocabulary; a 256-token window gives 231 encoder and 52 decoder
tokens. Sizes: tiny (tests, seconds); demo (below). Override anything, e.g.
--config.span_corruption.noise_density=0.3 --config.model.pos_emb=rope.

demo (3 + 3 layers, width 256, 8.1 M parameters, 128-token windows -> 115 encoder and 26
decoder tokens, batch 16, 240 steps), measured 2026-11-23 on 2 busy CPU cores: 6.6 min in all
(training ~0.8 steps/s, ~1,700 raw tokens/s; then the whole validation split). Loss, nats per
target token: train 5.82 at step 24 (the first logged) -> 5.16 at step 240; eval 5.53 at step 80
(20 batches) -> 5.30 at step 240 (whole split, 86,922 target tokens), accuracy 27.5%. At this
budget the model is on the unigram plateau (first 40 validation batches): sentinels and EOS
cost 0.99 nats, ordinary target tokens 6.83 against the train split's unigram entropy of 6.62.
"""
import dataclasses

import ml_collections

from core.config import check_choice, parse_arg
from experiments.configs.lm import gpt
from lm.models import transformer as model_lib

SIZES = {
    # name: (layers per stack, width, heads, seq_len, tokenizer vocab, batch, steps, lr)
    "tiny": (2, 64, 4, 64, 512, 16, 50, 3e-3),
    "demo": (3, 256, 4, 128, 4096, 16, 240, 2e-3),
}

# T5.1.1 without its dropout: pre-norm RMSNorm, no biases, gated MLP, untied, relative positions.
T5_STYLE = dict(pos_emb="relative", norm="rmsnorm", norm_position="pre", mlp="swiglu",
                use_bias=False, tie_embeddings=False, relative_buckets=32,
                relative_max_distance=128)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    args = parse_arg(arg, size="demo", corpus="austen+kjv+brown")
    check_choice("size", args.size, SIZES)
    layers, width, heads, seq_len, vocab, batch, steps, lr = SIZES[args.size]
    config = gpt.get_config(f"size={'tiny' if args.size == 'tiny' else 'demo'},"
                            f"corpus={args.corpus}")
    config.task = "span_corruption"
    # vocab_size 0: the tokenizer's, plus the sentinels, padded to a multiple of 128.
    model = model_lib.TransformerConfig(vocab_size=0, num_layers=layers, d_model=width,
                                        num_heads=heads, max_len=max(seq_len, 256), **T5_STYLE)
    config.model = dataclasses.asdict(model)
    config.data.seq_len = seq_len
    config.data.tokenizer.vocab_size = vocab
    config.span_corruption = ml_collections.ConfigDict(
        {"noise_density": 0.15, "mean_span_length": 3.0, "num_sentinels": 100})
    config.train.steps = steps
    config.train.global_batch_size = batch
    config.train.log_every = max(1, min(50, steps // 10))
    config.train.eval_every = max(1, steps // 3)
    config.train.checkpoint_every = max(1, steps // 5)
    config.optim.learning_rate = lr
    config.optim.warmup_steps = max(1, min(200, steps // 10))
    return config
