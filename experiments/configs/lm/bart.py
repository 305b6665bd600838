"""BART / PEGASUS denoising pretraining of an encoder-decoder on the offline corpus.

  python -m experiments.main train --config experiments/configs/lm/bart.py:size=demo \\
      --workdir runs/bart-demo
  python -m experiments.main train --config experiments/configs/lm/bart.py:size=demo,objective=pegasus \\
      --workdir runs/pegasus-demo
  python -m experiments.main sample --workdir runs/bart-demo --temperature 0 \\
      --prompt "It is a truth universally <mask> that a single man in possession of a good fortune."
(experiments/main.py maps task "denoising" to lm.objectives.denoising's train/evaluate/sample.)

The objectives are lm/objectives/denoising.py's: bart = text infilling (30% of tokens in Poisson(3) spans,
one [MASK] each) + sentence permutation, the paper's final choice (token masking, deletion and
document rotation are off by default: --config.denoising.mask_rate=0.15 etc.); the decoder
rebuilds the whole original window. pegasus = gap-sentence generation (gsr 0.3, Ind-Orig
ROUGE-1 selection), targets the gap sentences; --config.denoising.mlm_rate=0.15 adds
PEGASUS-base's MLM. Sizes (layers per stack, width, window, steps) are t5.py's. The model is
BART's shape, not T5's: learned positions (shared by both stacks), GELU MLP, LayerNorm with
biases, tied input/output embedding. Unlike BART it is pre-norm (BART is post-norm with an
embedding LayerNorm), which trains more stably at these small sizes and learning rates.

Measured 2026-11-23 on 2 busy CPU cores, size=tiny (2 + 2 layers, width 64, 64-token windows),
corpus=austen, batch 16; train loss in nats per target token (30 steps: the test; 300: by hand):
  bart:    6.47 at step 1 -> 5.15 at step 30; 300 steps (2 min): 5.15 at step 25 -> 4.37 at
           step 300, eval 4.43 (whole validation split, 185,617 target tokens), accuracy 8.9%.
  pegasus: 6.47 at step 1 -> 5.09 at step 30; 300 steps (1.9 min): 5.14 at step 25 -> 4.43 at
           step 300, eval 4.44 (116,997 target tokens), accuracy 9.8%.
The demo size has not been measured yet.
"""
import dataclasses

import ml_collections

from core.config import check_choice, parse_arg
from experiments.configs.lm import t5
from lm.models import transformer as model_lib

BART_STYLE = dict(pos_emb="learned", norm="layernorm", norm_position="pre", mlp="gelu",
                  use_bias=True, tie_embeddings=True)

OBJECTIVES = {
    "bart": {"permute_sentences": True, "rotate_document": False, "mask_rate": 0.0,
             "delete_rate": 0.0, "infill_ratio": 0.3, "poisson_lambda": 3.0},
    "pegasus": {"gsr": 0.3, "mlm_rate": 0.0},
}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    args = parse_arg(arg, size="demo", corpus="austen+kjv+brown", objective="bart")
    check_choice("objective", args.objective, OBJECTIVES)
    config = t5.get_config(f"size={args.size},corpus={args.corpus}")
    del config["span_corruption"]
    config.task = "denoising"
    layers, width, heads, seq_len = t5.SIZES[args.size][:4]
    # vocab_size 0: the tokenizer's, plus [MASK]/[MASK1] and [MASK2], padded to 128.
    model = model_lib.TransformerConfig(vocab_size=0, num_layers=layers, d_model=width,
                                        num_heads=heads, max_len=max(seq_len + 1, 256),
                                        **BART_STYLE)
    config.model = dataclasses.asdict(model)
    config.denoising = ml_collections.ConfigDict({"objective": args.objective,
                                                  **OBJECTIVES[args.objective]})
    return config
