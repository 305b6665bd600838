"""BART's and PEGASUS's denoising objectives on the encoder-decoder (lm/models/encoder_decoder.py).

objective="bart" (Lewis et al. 2020): the encoder reads a noised window, the decoder rebuilds the
ORIGINAL tokens of every document in it. Noises (lm/objectives/noising.py), each switchable, applied in
this order: sentence permutation, document rotation, token masking, token deletion, text
infilling (Poisson(3) spans, 30% of tokens, one [MASK] per span). The paper's final model uses
infilling + permutation, the default here.

objective="pegasus" (Zhang et al. 2020): gap-sentence generation. In each document the
round(gsr * sentences) sentences of highest ROUGE-1 F1 against the rest (Ind-Orig) become one
[MASK1] each in the inputs, and the targets are those sentences in document order. Optionally
(mlm_rate > 0, PEGASUS-base) 15% of the other tokens are noised BERT's 80/10/10 way with [MASK2]
and predicted from the encoder's output through the shared embedding; that loss is added to the
decoder's, each token weighed once.

Where the noise runs: inside the jitted loss, as span corruption's does, from the step's key
(fold_in(seed, step)), so it is a pure function of (seed, step, row) and a resumed run
reproduces the uninterrupted one; the variable-length edits are static-shape scatters. The data
pipeline stays the causal LM's (no host transform exists for a task to hook into).

Targets: the original (bart) or gap (pegasus) tokens of the window, each keeping its document's
segment id, then EOS after the last real one (span corruption's convention); the decoder reads
them shifted right with the start id at each document's first target. Lengths: inputs T,
targets T + 1. Mask ids sit just past the tokenizer's vocabulary ([MASK] / [MASK1], then
[MASK2]). Sentences end at ids whose piece ends in . ! ? (closing quotes or brackets allowed) or
at a document's end: `use_tokenizer` marks them (the pipeline calls it).
"""
from __future__ import annotations

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from core.task import LossSums
from lm.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from lm.models import encoder_decoder
from lm.models import transformer as model_lib
from lm.objectives import masking, noising
from lm.objectives.span_corruption import SpanCorruptionTask
from lm.objectives.window_task import WindowTask, positions_from_segments

BART_NOISES = ("permute_sentences", "rotate_document", "mask_rate", "delete_rate",
               "infill_ratio")
_SENTENCE_END = re.compile(r"[.!?][\"'”’)\]]*$")


def sentence_end_table(tokenizer, vocab_size: int) -> np.ndarray:
    """(vocab_size,) bool: the ids whose piece ends a sentence (. ! ? then closing marks)."""
    table = np.zeros(vocab_size, bool)
    for i in range(tokenizer.vocab_size):
        table[i] = bool(_SENTENCE_END.search(tokenizer.id_to_piece(i).strip()))
    return table


def add_eos_and_shift(targets_T, segments_T, eos_id: int, start_id: int):
    """(targets, segments, decoder inputs) of length T + 1: EOS right after the last real target
    (in its segment); the decoder input is the target shifted right, start_id at each segment's
    first target."""
    targets_L = jnp.concatenate([targets_T, jnp.zeros(1, targets_T.dtype)])
    segments_L = jnp.concatenate([segments_T, jnp.zeros(1, segments_T.dtype)])
    real = jnp.sum(segments_L > 0)
    targets_L = targets_L.at[real].set(eos_id)
    segments_L = segments_L.at[real].set(jnp.where(real > 0, segments_L[real - 1], 0))
    new_doc_L = jnp.concatenate([jnp.ones(1, bool), segments_L[1:] != segments_L[:-1]])
    decoder_L = jnp.where(new_doc_L, start_id, jnp.concatenate([targets_L[:1], targets_L[:-1]]))
    return targets_L, segments_L, decoder_L


def bart_noise_row(rng, tokens_T, segments_T, settings: dict, sentence_end_V, mask_id: int,
                   bos_id: int = BOS_ID):
    """One window's noised encoder input (tokens, segments), each enabled noise in order."""
    keys = jax.random.split(rng, 5)
    x = (tokens_T, segments_T)
    if settings["permute_sentences"]:
        x = noising.sentence_permutation(keys[0], *x, sentence_end_V, bos_id)
    if settings["rotate_document"]:
        x = noising.document_rotation(keys[1], *x, bos_id)
    if settings["mask_rate"] > 0:
        x = noising.token_masking(keys[2], *x, settings["mask_rate"], mask_id)
    if settings["delete_rate"] > 0:
        x = noising.token_deletion(keys[3], *x, settings["delete_rate"])
    if settings["infill_ratio"] > 0:
        x = noising.text_infilling(keys[4], *x, settings["infill_ratio"],
                                   settings["poisson_lambda"], mask_id)
    return x


@functools.partial(jax.jit, static_argnames=("objective", "settings", "mask_id", "mask2_id",
                                             "ordinary_vocab", "eos_id", "start_id"))
def denoise_pairs(rng, tokens_BT, segments_BT, sentence_end_V, objective: str,
                  settings: tuple, mask_id: int, mask2_id: int, ordinary_vocab: int,
                  eos_id: int = EOS_ID, start_id: int = PAD_ID) -> dict[str, jax.Array]:
    """Noised inputs and clean targets of every row, each row from its own key: inputs,
    input_segment_ids (B, T); targets, target_segment_ids, decoder_inputs (B, T + 1); for
    pegasus also mlm_chosen and mlm_targets (B, T). `settings` is a sorted tuple of items."""
    settings = dict(settings)

    def row(key, tokens_T, segments_T):
        noise_key, mlm_key = jax.random.split(key)
        out = {}
        if objective == "bart":
            inputs, input_segments = bart_noise_row(noise_key, tokens_T, segments_T, settings,
                                                    sentence_end_V, mask_id)
            targets, target_segments = tokens_T, segments_T
        else:
            inputs, input_segments, targets, target_segments, _ = \
                noising.gap_sentence_generation(tokens_T, segments_T, sentence_end_V,
                                                settings["gsr"], mask_id)
            chosen_T = jax.random.bernoulli(mlm_key, settings["mlm_rate"], inputs.shape) & (
                input_segments > 0) & (inputs != mask_id)
            out["mlm_targets"], out["mlm_chosen"] = inputs, chosen_T
            inputs = masking.corrupt(jax.random.fold_in(mlm_key, 1), inputs[None],
                                       chosen_T[None], mask2_id, ordinary_vocab)[0]
        targets, target_segments, decoder_inputs = add_eos_and_shift(targets, target_segments,
                                                                     eos_id, start_id)
        return {**out, "inputs": inputs, "input_segment_ids": input_segments,
                "targets": targets, "target_segment_ids": target_segments,
                "decoder_inputs": decoder_inputs}

    keys = jax.random.split(rng, tokens_BT.shape[0])
    return jax.vmap(row)(keys, tokens_BT.astype(jnp.int32), segments_BT.astype(jnp.int32))


class DenoisingTask(WindowTask):
    """The packed windows, noised on device into BART's or PEGASUS's inputs and targets for an
    encoder-decoder."""
    name = "denoising"

    def __init__(self, model_cfg: model_lib.TransformerConfig, seq_len: int,
                 ordinary_vocab: int, objective: str = "bart", settings: dict | None = None,
                 sentence_end_ids=(), document_masking: bool = True, eos_id: int = EOS_ID,
                 start_id: int = PAD_ID):
        settings = dict(settings or {})
        unknown = set(settings) - set(BART_NOISES + ("poisson_lambda", "gsr", "mlm_rate"))
        if unknown:
            raise ValueError(f"unknown denoising setting(s) {sorted(unknown)}; known: "
                             f"{sorted(BART_NOISES + ('poisson_lambda', 'gsr', 'mlm_rate'))}")
        if objective not in ("bart", "pegasus"):
            raise ValueError(f"denoising.objective must be 'bart' or 'pegasus', got "
                             f"{objective!r}")
        for name in ("mask_rate", "delete_rate", "infill_ratio", "mlm_rate"):
            if not 0.0 <= settings.get(name, 0.0) < 1.0:
                raise ValueError(f"denoising.{name} must be in [0, 1), got {settings[name]}")
        if not 0.0 < settings.setdefault("gsr", 0.3) <= 1.0:
            raise ValueError(f"denoising.gsr must be in (0, 1], got {settings['gsr']}")
        if settings.setdefault("poisson_lambda", 3.0) <= 0:
            raise ValueError(f"denoising.poisson_lambda must be > 0, got "
                             f"{settings['poisson_lambda']}")
        for name in BART_NOISES + ("mlm_rate",):
            settings.setdefault(name, 0.0 if "rate" in name or "ratio" in name else False)
        if objective == "bart" and not any(settings[name] for name in BART_NOISES):
            raise ValueError("every BART noise is off (the decoder would copy its input): set "
                             "one of denoising." + ", denoising.".join(BART_NOISES))
        if model_cfg.vocab_size < ordinary_vocab + 2:
            raise ValueError(f"model.vocab_size {model_cfg.vocab_size} leaves no room for the "
                             f"mask ids above the tokenizer's {ordinary_vocab}; set "
                             "model.vocab_size=0 to size it automatically")
        super().__init__(model_cfg, seq_len + 1, document_masking,  # targets: T + 1
                         model=encoder_decoder.EncoderDecoder(model_cfg))
        self.seq_len = seq_len
        self.objective, self.ordinary_vocab = objective, ordinary_vocab
        self.settings = tuple(sorted(settings.items()))
        self.mask_id, self.mask2_id = ordinary_vocab, ordinary_vocab + 1
        self.eos_id, self.start_id = eos_id, start_id
        self.sentence_end_V = np.zeros(model_cfg.vocab_size, bool)
        self.sentence_end_V[list(sentence_end_ids)] = True

    def use_tokenizer(self, tokenizer) -> None:
        """Marks the tokenizer's sentence-final ids (sentence permutation, gap sentences)."""
        self.sentence_end_V = sentence_end_table(tokenizer, self.model_cfg.vocab_size)

    def init_params(self, rng):
        return self.model.init({"params": rng}, jnp.zeros((1, self.seq_len), jnp.int32),
                               jnp.zeros((1, self.seq_len + 1), jnp.int32))["params"]

    def corrupt(self, rng, batch) -> dict[str, jax.Array]:
        """The (noised input, clean target) pairs of a batch of windows."""
        needs_sentences = self.objective == "pegasus" or dict(self.settings)["permute_sentences"]
        if needs_sentences and not self.sentence_end_V.any():
            raise ValueError("no sentence-final ids are marked: call task.use_tokenizer("
                             "tokenizer) before training (lm.objectives.denoising's commands do)")
        segments_BT = batch["segment_ids"][:, :self.seq_len]
        if not self.document_masking:
            segments_BT = (segments_BT > 0).astype(jnp.int32)
        return denoise_pairs(rng, batch["tokens"][:, :self.seq_len], segments_BT,
                             jnp.asarray(self.sentence_end_V), self.objective, self.settings,
                             self.mask_id, self.mask2_id, self.ordinary_vocab, self.eos_id,
                             self.start_id)

    def loss(self, params, batch, rng, train: bool) -> LossSums:
        corrupt_rng, dropout_rng = jax.random.split(rng)
        pair = self.corrupt(corrupt_rng, batch)
        kwargs = dict(deterministic=not train, rngs={"dropout": dropout_rng} if train else None)
        memory_BSD = self.model.apply(
            {"params": params}, pair["inputs"], pair["input_segment_ids"],
            positions_from_segments(pair["input_segment_ids"]),
            method=encoder_decoder.EncoderDecoder.encode, **kwargs)
        logits_BLV = self.model.apply(
            {"params": params}, pair["decoder_inputs"], memory_BSD, pair["input_segment_ids"],
            pair["target_segment_ids"], positions_from_segments(pair["target_segment_ids"]),
            method=encoder_decoder.EncoderDecoder.decode, **kwargs)
        nll_BL = optax.softmax_cross_entropy_with_integer_labels(logits_BLV, pair["targets"])
        weight_BL = (pair["target_segment_ids"] > 0).astype(jnp.float32)
        correct_BL = (jnp.argmax(logits_BLV, -1) == pair["targets"]).astype(jnp.float32)
        loss, weight = jnp.sum(nll_BL * weight_BL), jnp.sum(weight_BL)
        extra = {"accuracy": jnp.sum(correct_BL * weight_BL)}
        if self.objective == "pegasus" and dict(self.settings)["mlm_rate"] > 0:
            # PEGASUS-base's MLM: the encoder's outputs through the shared embedding.
            embed_VD = nn.meta.unbox(params["token_embed"]).astype(memory_BSD.dtype)
            mlm_logits_BSV = jnp.einsum("bsd,vd->bsv", memory_BSD, embed_VD,
                                        preferred_element_type=jnp.float32)
            mlm_weight_BS = pair["mlm_chosen"].astype(jnp.float32)
            mlm_nll = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(
                mlm_logits_BSV, pair["mlm_targets"]) * mlm_weight_BS)
            loss, weight = loss + mlm_nll, weight + jnp.sum(mlm_weight_BS)
            extra["mlm_tokens"] = jnp.sum(mlm_weight_BS)
        return LossSums(loss=loss, weight=weight, extra=extra)

    def train_flops_per_example(self) -> float:
        return encoder_decoder.flops_per_example(self.model_cfg, self.seq_len, self.seq_len + 1)

    def units_per_example(self):
        return "tokens", self.seq_len

    metrics = staticmethod(SpanCorruptionTask.metrics)


CONFIG_RANGES = {"denoising": {"mask_rate": "[0, 1)", "delete_rate": "[0, 1)",
                               "infill_ratio": "[0, 1)", "poisson_lambda": "> 0", "gsr": "(0, 1)",
                               "mlm_rate": "[0, 1)"}}


def build_task(config, vocab_size: int) -> DenoisingTask:
    """The task of a config's `denoising` block: [MASK] (BART; PEGASUS's [MASK1]) and [MASK2]
    take the two ids past the tokenizer's vocabulary."""
    ordinary_vocab = vocab_size
    model_cfg = model_lib.config_from(config, model_lib.padded_vocab(vocab_size, 2))
    block = config.denoising.to_dict()
    objective = block.pop("objective")
    return DenoisingTask(model_cfg, config.data.seq_len, ordinary_vocab, objective, block,
                         document_masking=config.data.get("document_masking", True))


# ---------------------------------------------------------------------------------------------
# Sample hooks (lm/commands.py): <mask> marks in the prompt, the restored text out
# ---------------------------------------------------------------------------------------------

_MASK = re.compile(r"<mask2?>")


def encode_prompt(task: DenoisingTask, tokenizer, prompt: str) -> list[int]:
    """BOS + the prompt's ids, each <mask> (PEGASUS: also <mask2>) mark a mask id: BART
    restores the whole text, PEGASUS generates the gap sentences."""
    ids = [tokenizer.bos_id]
    for piece, mark in zip(_MASK.split(prompt), _MASK.findall(prompt) + [None]):
        ids += tokenizer.encode([piece])[0] if piece else []
        if mark:
            ids.append(task.mask2_id if mark == "<mask2>" else task.mask_id)
    if task.objective == "pegasus" and task.mask_id not in ids:
        raise ValueError("the prompt has no <mask> (a gap sentence) to generate")
    return ids


def render_output(task: DenoisingTask, tokenizer, ids: list[int]) -> str:
    return tokenizer.decode([t for t in ids if t < task.ordinary_vocab])
