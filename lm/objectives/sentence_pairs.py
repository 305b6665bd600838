"""BERT's next-sentence prediction (NSP) and ALBERT's sentence-order prediction (SOP), beside the
masked LM.

Pairs are built on the host, as BERT's create_pretraining_data.py builds them: each document is
split into sentences (text cut after . ! ? and closing marks, and at newlines), and sentences are
gathered into chunks of about seq_len - 3 tokens (10% of chunks get a shorter random target, as
BERT's short_seq_prob). A chunk is cut at a random sentence boundary into A and B (a one-sentence
chunk at a random token):
  nsp  50%: B is the true continuation (label 0); 50%: B is a run of sentences from a random
       point of another document of the same split (label 1), and the chunk's unused sentences
       go back to be read again, as BERT does.
  sop  A and B are always two consecutive segments of one document; 50% of pairs swap them
       (label 1). ALBERT's point: NSP's negatives differ in topic, which is easy, while SOP asks
       about discourse order.
The pair, cut back to fit (tokens dropped from the front or back of the longer side, at random),
is laid out [CLS] A [SEP] B [SEP] with token types 0 for [CLS] A [SEP] and 1 for B [SEP];
[CLS] and [SEP] are the tokenizer's BOS and EOS (lm/objectives/classification.py lays out fine-tuning pairs the
same way). data.dupe_factor copies of the train split are drawn with different seeds (BERT's
dupe_factor); masking stays dynamic, drawn in the jitted loss every step (lm/objectives/masking.py), and
never picks [CLS]/[SEP] or padding. The loss is BERT's sum of means: mean cross-entropy per masked
token + mean sentence cross-entropy per pair. With the masked-token count as the weight (the
engine divides by it), the pair sums are scaled by masked tokens / pairs of the batch, as
lm/objectives/electra.py scales its detection loss. The sentence head is BERT's pooler (dense + tanh on the
[CLS] state) and a 2-way linear classifier, under params["sentence_head"]; every other parameter
is the plain encoder tree.
"""
from __future__ import annotations

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from core.config import DataError, check_choice
from core.task import BatchField, LossSums
from lm.data import windows as data_lib
from lm.models import layers
from lm.models import transformer as model_lib
from lm.objectives.masking import MaskedLMTask, choose_positions, corrupt
from lm.objectives.window_task import positions_from_segments

OBJECTIVES = ("nsp", "sop")
_BOUNDARY = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s)|\n")


def split_sentences(text: str) -> list[str]:
    """The text cut after each sentence end (. ! ? and closing quotes/brackets before white
    space) and each newline; pieces keep their whitespace, blank ones are dropped."""
    pieces, start = [], 0
    for match in _BOUNDARY.finditer(text):
        pieces.append(text[start:match.end()])
        start = match.end()
    pieces.append(text[start:])
    return [p for p in pieces if p.strip()]


def tokenized_documents(tokenizer, texts) -> list[list[list[int]]]:
    """Each document as a list of sentences, each a list of token ids (empty ones dropped)."""
    sentences = [split_sentences(t) for t in texts]
    flat = [s for doc in sentences for s in doc]
    ids = [ids for k in range(0, len(flat), 4096) for ids in tokenizer.encode(flat[k:k + 4096])]
    docs, at = [], 0
    for doc in sentences:
        docs.append([s for s in ids[at:at + len(doc)] if s])
        at += len(doc)
    return [d for d in docs if d]


def _truncate_pair(a: list[int], b: list[int], max_tokens: int, rng) -> None:
    """BERT's truncate_seq_pair: drop from the longer side, front or back at random."""
    while len(a) + len(b) > max_tokens:
        longer = a if len(a) > len(b) else b
        del longer[0 if rng.random() < 0.5 else -1]


def document_pairs(docs: list[list[list[int]]], index: int, max_tokens: int, objective: str,
                   rng, short_seq_prob: float = 0.1) -> list[tuple[list[int], list[int], int]]:
    """(A, B, label) pairs of document `index`: label 1 = B from another document (nsp) or A and
    B swapped (sop), 0 = B follows A in the document."""
    check_choice("sentence objective", objective, OBJECTIVES, ValueError)
    if objective == "nsp" and len(docs) < 2:
        raise ValueError("next-sentence prediction draws negatives from another document: the "
                         "split needs at least 2 documents")
    document, pairs = docs[index], []
    target = max_tokens if rng.random() >= short_seq_prob else int(rng.integers(2, max_tokens + 1))
    chunk, length, i = [], 0, 0
    while i < len(document):
        chunk.append(document[i])
        length += len(document[i])
        i += 1
        if i < len(document) and length < target:
            continue
        if length >= 2:
            if len(chunk) == 1:  # one long sentence: cut it at a random token
                cut = int(rng.integers(1, len(chunk[0])))
                chunk = [chunk[0][:cut], chunk[0][cut:]]
                single = True
            else:
                single = False
            a_end = int(rng.integers(1, len(chunk)))
            a = [t for s in chunk[:a_end] for t in s]
            b = [t for s in chunk[a_end:] for t in s]
            label = int(rng.random() < 0.5)
            if label and objective == "sop":
                a, b = b, a
            elif label:  # nsp: B from a random point of another document
                other = int(rng.integers(len(docs) - 1))
                other = docs[other + (other >= index)]
                start, b = int(rng.integers(len(other))), []
                for sentence in other[start:]:
                    b += sentence
                    if len(b) >= target - len(a):
                        break
                if not single:  # the unused sentences of this chunk are read again
                    i -= len(chunk) - a_end
            _truncate_pair(a, b, max_tokens, rng)
            if a and b:
                pairs.append((a, b, label))
        chunk, length = [], 0
        target = (max_tokens if rng.random() >= short_seq_prob
                  else int(rng.integers(2, max_tokens + 1)))
    return pairs


def pair_windows(pairs, seq_len: int, cls_id: int, sep_id: int) -> data_lib.Windows:
    """[CLS] A [SEP] B [SEP] rows of seq_len tokens with token types, segment 1 on real tokens."""
    tokens = np.zeros((len(pairs), seq_len), np.int32)
    types, segments = np.zeros_like(tokens), np.zeros_like(tokens)
    for row, (a, b, _) in enumerate(pairs):
        ids = [cls_id, *a, sep_id, *b, sep_id]
        if len(ids) > seq_len:
            raise ValueError(f"a pair of {len(ids)} tokens does not fit seq_len {seq_len}")
        tokens[row, :len(ids)], segments[row, :len(ids)] = ids, 1
        types[row, len(a) + 2:len(ids)] = 1
    labels = np.array([label for _, _, label in pairs], np.int32)
    return data_lib.Windows(tokens, segments, 0, int(segments.sum()), len(pairs), labels, types)


def build_pairs(docs, seq_len: int, objective: str, seed: int, dupe_factor: int = 1,
                short_seq_prob: float = 0.1):
    """Every document's pairs, dupe_factor times with independent draws."""
    if seq_len < 5:
        raise ValueError(f"sentence pairs need seq_len >= 5 ([CLS] a [SEP] b [SEP]), got {seq_len}")
    pairs = []
    for copy in range(dupe_factor):
        rng = np.random.default_rng([seed, copy])
        for index in range(len(docs)):
            pairs += document_pairs(docs, index, seq_len - 3, objective, rng, short_seq_prob)
    if not pairs:
        raise DataError("no sentence pairs could be built: the documents are too short")
    return pairs


# ------------------------------------------------------------------------------------ task


class SentenceHead(nn.Module):
    """BERT's pooler (dense + tanh on the [CLS] state) and a 2-way classifier: logits (B, 2)."""
    d_model: int

    @nn.compact
    def __call__(self, cls_BD):
        D, init = self.d_model, nn.initializers.normal(0.02)
        w_DD = layers.logical_param(self, "w_pool", init, (D, D), ("embed", None), jnp.float32)
        b_D = layers.logical_param(self, "b_pool", nn.initializers.zeros, (D,), (None,),
                                   jnp.float32)
        w_DC = layers.logical_param(self, "w_out", init, (D, 2), (None, None), jnp.float32)
        b_C = layers.logical_param(self, "b_out", nn.initializers.zeros, (2,), (None,),
                                   jnp.float32)
        pooled_BD = jnp.tanh(cls_BD.astype(jnp.float32) @ w_DD + b_D)
        return pooled_BD @ w_DC + b_C


def vocab_logits(params, cfg: model_lib.TransformerConfig, hidden_BTD) -> jax.Array:
    """The encoder's output projection of its final hidden states, as lm/model.Transformer ends
    (tied: through the token table, and ALBERT's projection; else `unembed`)."""
    dtype = jnp.dtype(cfg.dtype)
    if not cfg.tie_embeddings:
        return jnp.einsum("btd,dv->btv", hidden_BTD, nn.meta.unbox(params["unembed"]).astype(
            dtype), preferred_element_type=jnp.float32)
    x_BTE = hidden_BTD
    if cfg.embed_dim:
        x_BTE = hidden_BTD @ nn.meta.unbox(params["embed_proj"]).T.astype(dtype)
    return jnp.einsum("bte,ve->btv", x_BTE, nn.meta.unbox(params["token_embed"]).astype(dtype),
                      preferred_element_type=jnp.float32)


class SentencePairTask(MaskedLMTask):
    """Masked LM on [CLS] A [SEP] B [SEP] pairs plus NSP or SOP on the pooled [CLS] state."""
    name = "masked_lm"

    def __init__(self, model_cfg, seq_len: int, mask_id: int, objective: str, rate: float = 0.15,
                 span_p: float = 0.0, max_span: int = 10, dupe_factor: int = 5,
                 short_seq_prob: float = 0.1, seed: int = 0, cls_id: int = 2, sep_id: int = 3):
        if objective not in OBJECTIVES:
            raise ValueError(f"sentence.objective {objective!r} is not one of "
                             f"{OBJECTIVES + ('none',)}")
        if model_cfg.type_vocab_size < 2:
            raise ValueError(f"{objective} feeds sentence A/B token types: set "
                             "model.type_vocab_size=2 (bert.py does with sentence_objective)")
        if dupe_factor < 1 or not 0.0 <= short_seq_prob < 1.0:
            raise ValueError(f"sentence.dupe_factor must be >= 1 and short_seq_prob in [0, 1), "
                             f"got {dupe_factor}, {short_seq_prob}")
        super().__init__(model_cfg, seq_len, mask_id, rate, span_p, max_span)
        self.objective, self.dupe_factor, self.short_seq_prob = objective, dupe_factor, \
            short_seq_prob
        self.seed, self.cls_id, self.sep_id = seed, cls_id, sep_id
        self.head = SentenceHead(model_cfg.d_model)
        self.tokenizer = None

    def use_tokenizer(self, tokenizer) -> None:
        """lm/pipeline.build hands the tokenizer over: pairs are built in token space."""
        self.tokenizer, self.cls_id, self.sep_id = tokenizer, tokenizer.bos_id, tokenizer.eos_id

    def make_windows(self, split: str, texts) -> data_lib.Windows:
        """The split's pair rows (train: dupe_factor draws; validation: one, fixed)."""
        if self.tokenizer is None:
            raise ValueError("call task.use_tokenizer(tokenizer) first (lm/pipeline.build does)")
        docs = tokenized_documents(self.tokenizer, list(data_lib._iter_texts(texts)))
        train = split == "train"
        pairs = build_pairs(docs, self.seq_len, self.objective, self.seed if train else 10_000,
                            self.dupe_factor if train else 1, self.short_seq_prob)
        return pair_windows(pairs, self.seq_len, self.cls_id, self.sep_id)

    def init_params(self, rng):
        encoder_rng, head_rng = jax.random.split(rng)
        tokens_BT = jnp.zeros((1, self.seq_len), jnp.int32)
        params = dict(self.model.init({"params": encoder_rng}, tokens_BT)["params"])
        params["sentence_head"] = self.head.init(
            head_rng, jnp.zeros((1, self.model_cfg.d_model)))["params"]
        return params

    def loss(self, params, batch, rng, train: bool) -> LossSums:
        tokens_BT, segments_BT = batch["tokens"], batch["segment_ids"]
        encoder = {k: v for k, v in params.items() if k != "sentence_head"}
        choose_rng, corrupt_rng, dropout_rng = jax.random.split(rng, 3)
        maskable_BT = (segments_BT > 0) & (tokens_BT != self.cls_id) & (tokens_BT != self.sep_id)
        chosen_BT = choose_positions(choose_rng, maskable_BT, self.rate, self.span_p,
                                               self.max_span)
        inputs_BT = corrupt(corrupt_rng, tokens_BT, chosen_BT, self.mask_id,
                                      self.mask_id)
        hidden_BTD = self.model.apply(
            {"params": encoder}, inputs_BT, positions_from_segments(segments_BT), segments_BT,
            deterministic=not train, rngs={"dropout": dropout_rng} if train else None,
            token_types_BT=batch["token_types"], return_hidden=True)
        logits_BTV = vocab_logits(encoder, self.model_cfg, hidden_BTD)
        nll_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, tokens_BT)
        chosen_f_BT = chosen_BT.astype(jnp.float32)
        correct_BT = (jnp.argmax(logits_BTV, -1) == tokens_BT).astype(jnp.float32)
        logits_BC = self.head.apply({"params": params["sentence_head"]}, hidden_BTD[:, 0])
        labels_B = batch["labels"]
        pair_B = (segments_BT[:, 0] > 0).astype(jnp.float32)  # eval batches pad with 0 rows
        sentence_nll_B = optax.softmax_cross_entropy_with_integer_labels(logits_BC, labels_B)
        sentence_correct_B = (jnp.argmax(logits_BC, -1) == labels_B).astype(jnp.float32)
        num_masked = jnp.sum(chosen_f_BT)
        per_pair = num_masked / jnp.maximum(jnp.sum(pair_B), 1.0)  # pair means, masked weight
        mlm_loss = jnp.sum(nll_BT * chosen_f_BT)
        sentence_loss = per_pair * jnp.sum(sentence_nll_B * pair_B)
        return LossSums(loss=mlm_loss + sentence_loss, weight=num_masked,
                        extra={"mlm_loss": mlm_loss,
                               "accuracy": jnp.sum(correct_BT * chosen_f_BT),
                               "sentence_loss": sentence_loss,
                               "sentence_accuracy": per_pair * jnp.sum(sentence_correct_B * pair_B)})

    def batch_fields(self):
        row = BatchField((self.seq_len,), jnp.int32, ("batch", "length"))
        return {"tokens": row, "segment_ids": row, "token_types": row,
                "labels": BatchField((), jnp.int32, ("batch",))}

    @staticmethod
    def metrics(sums: dict[str, float], num_bytes: float = 0.0) -> dict[str, float]:
        """Total loss (MLM + sentence), its two parts, MLM perplexity and both accuracies."""
        weight = max(sums["weight"], 1.0)
        mlm = sums["mlm_loss"] / weight
        return {"loss": sums["loss"] / weight, "mlm_loss": mlm,
                "perplexity": math.exp(min(mlm, 50.0)), "accuracy": sums["accuracy"] / weight,
                "sentence_loss": sums["sentence_loss"] / weight,
                "sentence_accuracy": sums["sentence_accuracy"] / weight,
                "masked_tokens": sums["weight"]}


def build_task(config, model_cfg: model_lib.TransformerConfig, mask_id: int) -> SentencePairTask:
    """The masked-LM task of a config whose `sentence.objective` is nsp or sop."""
    masking, sentence = config.masking, config.sentence
    return SentencePairTask(model_cfg, config.data.seq_len, mask_id, sentence.objective,
                            masking.rate, masking.span_p, masking.max_span,
                            sentence.dupe_factor, sentence.short_seq_prob, config.train.seed)
