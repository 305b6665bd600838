"""Encoder pretraining (BERT family) on the offline corpus: the GPT config with an encoder.

  python -m experiments.main train --config experiments/configs/lm/bert.py:size=demo \
      --workdir runs/bert-demo
objective=mlm: masked LM with dynamic masking (RoBERTa: a new mask every step, no next-sentence
prediction), 15% of tokens, 80/10/10. objective=spanbert: the same budget in contiguous spans,
lengths ~ Geometric(0.2) clipped at 10. The model is BERT's block (post-norm, LayerNorm on the
embeddings, erf GELU, bidirectional attention inside each document of a packed window); sizes
and data as in gpt.py. Override anything, e.g. --config.masking.rate=0.3.
"""
import ml_collections

from core.config import ConfigError, parse_arg
from experiments.configs.lm import gpt

OBJECTIVES = {
    "mlm": {"rate": 0.15, "span_p": 0.0, "max_span": 10},
    "spanbert": {"rate": 0.15, "span_p": 0.2, "max_span": 10},
}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    args = parse_arg(arg, size="demo", objective="mlm", corpus="austen+kjv+brown")
    if args.objective not in OBJECTIVES:
        raise ConfigError(f"objective {args.objective!r} is not one of {sorted(OBJECTIVES)}")
    config = gpt.get_config(f"size={args.size},style=bert-base,corpus={args.corpus}")
    config.task = "masked_lm"
    config.model.type_vocab_size = 0  # packed single-segment windows: no sentence-pair input
    config.masking = ml_collections.ConfigDict(OBJECTIVES[args.objective])
    return config
