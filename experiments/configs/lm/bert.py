"""Encoder pretraining (BERT family) on the offline corpus: the GPT config with an encoder.

  python -m experiments.main train --config experiments/configs/lm/bert.py:size=demo \
      --workdir runs/bert-demo
objective=mlm: masked LM with dynamic masking (RoBERTa: a new mask every step, no next-sentence
prediction), 15% of tokens, 80/10/10. objective=spanbert: the same budget in contiguous spans,
lengths ~ Geometric(0.2) clipped at 10. The model is BERT's block (post-norm, LayerNorm on the
embeddings, erf GELU, bidirectional attention inside each document of a packed window); sizes
and data as in gpt.py. Override anything, e.g. --config.masking.rate=0.3.

positions=rope (default) or learned (BERT's own absolute embeddings). Rotary positions are the
default because learned ones keep a small masked LM on the unigram plateau for hundreds of steps
longer. Measured 2026-11-24 on one CPU core each (size=demo, corpus austen+kjv+brown,
--config.data.seq_len=128 --config.train.global_batch_size=32 --config.optim.learning_rate=1e-3
--config.optim.warmup_steps=150 --config.train.steps=2200 --config.masking.rate=0.3
--config.data.val_fraction=0.2): eval nats per masked token at steps 275 / 550 were 5.24 / 4.38
with rope and 5.94 / 5.88 with learned positions; the rope run went on to 3.53 at step 1,650
(docs/encoders.md, transfer learning on Brown genres).

sentence_objective=nsp|sop|none (default none, RoBERTa): BERT's next-sentence prediction or
ALBERT's sentence-order prediction on [CLS] A [SEP] B [SEP] pairs with token types, a pooled
[CLS] head, loss = MLM + sentence loss (lm/objectives/sentence_pairs.py); e.g.
  python -m experiments.main train \
      --config experiments/configs/lm/bert.py:size=demo,sentence_objective=sop --workdir runs/albert-sop
Measured 2026-11-24 with rotary positions, size=small (4 layers, width 128, 128-token pairs, batch
16), --config.data.val_fraction=0.05 --config.train.steps=2000, one core each (2.2 steps/s alone,
so ~15 min; these shared their first half with the test suite): nsp learns, sentence accuracy 0.778
/ 0.753 / 0.765 / 0.781 at steps 500 / 1,000 / 1,500 / 2,000 (the last on all 2,495 validation
pairs; chance 0.5, sd 0.010), MLM eval 3.72 nats; sop is harder and only starts at the end: 0.48 /
0.49 / 0.49 / 0.529 (1,841 pairs, sd 0.012), MLM eval 3.50. With learned positions (2026-11-23,
225-400 steps on shared cores) both were at chance: nsp 0.541, sop 0.511.
"""
import ml_collections

from core.config import check_choice, parse_arg
from experiments.configs.lm import gpt

OBJECTIVES = {
    "mlm": {"rate": 0.15, "span_p": 0.0, "max_span": 10},
    "spanbert": {"rate": 0.15, "span_p": 0.2, "max_span": 10},
}
SENTENCE_OBJECTIVES = ("none", "nsp", "sop")
POSITIONS = ("rope", "learned")  # the first is the default


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    args = parse_arg(arg, size="demo", objective="mlm", corpus="austen+kjv+brown",
                     sentence_objective="none", positions=POSITIONS[0])
    check_choice("objective", args.objective, OBJECTIVES)
    check_choice("sentence_objective", args.sentence_objective, SENTENCE_OBJECTIVES)
    check_choice("positions", args.positions, POSITIONS)
    config = gpt.get_config(f"size={args.size},style=bert-base,corpus={args.corpus}")
    config.model.pos_emb = args.positions
    config.task = "masked_lm"
    config.model.type_vocab_size = 0  # packed single-segment windows: no sentence-pair input
    config.masking = ml_collections.ConfigDict(OBJECTIVES[args.objective])
    # none: packed windows (RoBERTa); nsp / sop: sentence pairs with A/B token types (BERT, ALBERT)
    config.sentence = ml_collections.ConfigDict(
        {"objective": args.sentence_objective, "dupe_factor": 5, "short_seq_prob": 0.1})
    if args.sentence_objective != "none":
        config.model.type_vocab_size = 2
    return config
