"""The masked-LM objective (BERT, RoBERTa, SpanBERT; with `sentence.objective` nsp or sop, BERT's
and ALBERT's sentence-pair tasks). The masking and the task live in lm/objectives/masking.py.
"""
from __future__ import annotations

from lm.models import transformer as model_lib
from lm.objectives import sentence_pairs
from lm.objectives.masking import MaskedLMTask

CONFIG_RANGES = {"masking": {"rate": "(0, 1)", "span_p": "[0, 1)", "max_span": ">= 1"},
                 "sentence": {"dupe_factor": ">= 1", "short_seq_prob": "[0, 1]"}}


def build_task(config, vocab_size: int):
    """[MASK] is the first id past the tokenizer's vocabulary; with `sentence.objective` nsp or
    sop the pairs task (lm/objectives/sentence_pairs.py) adds its sentence head."""
    model_cfg = model_lib.config_from(config, model_lib.padded_vocab(vocab_size, 1))
    if config.get("sentence") and config.sentence.objective != "none":
        return sentence_pairs.build_task(config, model_cfg, vocab_size)
    masking = config.masking
    return MaskedLMTask(model_cfg, config.data.seq_len, vocab_size, masking.rate, masking.span_p,
                        masking.max_span)
