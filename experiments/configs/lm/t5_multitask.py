"""T5's text-to-text multitask mixture on one encoder-decoder (lm/objectives/text_to_text.py).

  python -m experiments.main train --config experiments/configs/lm/t5_multitask.py:size=demo \
      --workdir runs/t5-multitask
  python -m experiments.main sample --workdir runs/t5-multitask \
      --prompt "sst2 sentence: a gripping, funny and moving film"
Tasks, each with its prefix: "summarize: " (an extractive proxy built from the LM corpus: 4
consecutive sentences -> the ROUGE-1 oracle sentence; no summarization corpus is offline),
"question: ... context: ..." (BoolQ), "sst2 sentence: " (SST-2; stands in for "translate ...", as
no parallel corpus is offline) and T5's span corruption on the corpus. BoolQ and SST-2 are the
evaluation package's validation splits cut into train/test folds (test_fraction 0.2). Mixing is
examples-proportional with the cap `mixing_cap` (T5's K). After training, greedy decoding gives
per-task exact match on the test folds (<workdir>/exact_match.json), beside the majority-class and
lead-sentence baselines. The model is t5.py's (T5.1.1 shape); sizes tiny (tests) and demo
(3 + 3 layers, width 256, inputs 192 / targets 48 tokens, batch 16).
"""
import ml_collections

from core.config import parse_arg
from experiments.configs.lm import t5

LENGTHS = {"tiny": (64, 24), "demo": (192, 48)}  # inputs_len, targets_len


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    args = parse_arg(arg, size="demo", corpus="austen+kjv+brown",
                     tasks="summarize+boolq+sst2+span_corruption")
    config = t5.get_config(f"size={args.size},corpus={args.corpus}")
    inputs_len, targets_len = LENGTHS[args.size]
    config.task = "text_to_text"
    config.model.max_len = max(config.model.max_len, inputs_len, targets_len)
    config.text_to_text = ml_collections.ConfigDict({
        "tasks": args.tasks,       # "+"-joined: summarize, boolq, sst2, span_corruption
        "inputs_len": inputs_len,
        "targets_len": targets_len,
        "mixing_cap": 3000,       # T5's K: no task counts more than this many examples
        "num_sentinels": 100,     # span corruption's <extra_id_k>, at the top of the vocabulary
        "test_fraction": 0.2,     # BoolQ / SST-2 test folds (of the package's validation split)
        "split_seed": 0,
        "eval_examples": 200,     # greedy-decoded test examples per task (0: all)
    })
    del config.span_corruption
    return config
