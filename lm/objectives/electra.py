"""ELECTRA (Clark et al. 2020): replaced-token detection, a generator and a discriminator trained
jointly in one loss.

A small masked-LM generator (the discriminator's depth, `generator_width_ratio` of its width,
heads and feed-forward) fills the masked 15% of the tokens with samples from its softmax (the
step's RNG; sampling is not differentiable, so the discriminator's loss never reaches the
generator). The discriminator, a full-width encoder with a dense-GELU-dense head, labels every
real token as replaced or original; a sampled token equal to the original counts as original.
  loss = generator MLM loss (mean over masked tokens)
       + disc_weight (50) * discriminator cross-entropy (mean over real tokens)
Generator inputs follow ELECTRA's code: 85% of the chosen tokens become [MASK], 15% stay.
The token embeddings are shared, as in the paper: the generator embeds in the discriminator's
width and projects to its own (lm/models/transformer.py's embed_dim, ALBERT's factorisation), and its tied
output layer projects back, so one (V, D) table serves both; it lives in the discriminator's
tree and both losses train it. Parameters:
  {"generator": Transformer params less token_embed, "discriminator": Transformer params (a plain
   encoder, loadable for fine-tuning), "discriminator_head": {w_hidden, b_hidden, w_out, b_out}}
The loss is summed over the batch with the masked-token count as its weight, so the
discriminator's sums are scaled by masked / real tokens of the batch (its mean, weighted as the
generator's): a step's loss is exactly the two means combined.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from core.config import ConfigError
from core.task import LossSums
from lm.models import layers
from lm.models import param_tree
from lm.models import transformer as model_lib
from lm.objectives.masking import MaskedLMTask, choose_positions
from lm.objectives.window_task import positions_from_segments


def generator_config(disc_cfg: model_lib.TransformerConfig,
                     width_ratio: float) -> model_lib.TransformerConfig:
    """The discriminator's encoder at width_ratio of its width, heads and d_ff, embedding (and
    unembedding) through a table of the discriminator's width."""
    if not 0.0 < width_ratio <= 1.0:
        raise ConfigError(f"electra.generator_width_ratio must be in (0, 1], got {width_ratio}")
    d_model = round(disc_cfg.d_model * width_ratio)
    num_heads = max(1, round(disc_cfg.num_heads * width_ratio))
    if d_model < 1 or d_model % num_heads:
        raise ConfigError(f"electra.generator_width_ratio {width_ratio} gives a generator of width "
                          f"{d_model} with {num_heads} heads; pick a ratio that divides "
                          f"d_model={disc_cfg.d_model} and num_heads={disc_cfg.num_heads}")
    return dataclasses.replace(
        disc_cfg, d_model=d_model, num_heads=num_heads, num_kv_heads=None, head_dim=None,
        d_ff=max(1, round(disc_cfg.resolved_d_ff * width_ratio)),
        embed_dim=None if d_model == disc_cfg.d_model else disc_cfg.d_model)


class DetectionHead(nn.Module):
    """ELECTRA's discriminator head: dense, GELU, dense to one logit (replaced) per token."""
    cfg: model_lib.TransformerConfig

    @nn.compact
    def __call__(self, hidden_BTD: jax.Array) -> jax.Array:
        D, pdtype = self.cfg.d_model, jnp.dtype(self.cfg.param_dtype)
        init = nn.initializers.normal(self.cfg.init_std)
        w_DD = layers.logical_param(self, "w_hidden", init, (D, D), ("embed", "mlp"), pdtype)
        b_D = layers.logical_param(self, "b_hidden", nn.initializers.zeros, (D,), ("mlp",), pdtype)
        w_D = layers.logical_param(self, "w_out", init, (D,), ("mlp",), pdtype)
        b_1 = layers.logical_param(self, "b_out", nn.initializers.zeros, (1,), (None,), pdtype)
        h_BTD = jax.nn.gelu(hidden_BTD.astype(jnp.float32) @ w_DD + b_D, approximate=False)
        return h_BTD @ w_D + b_1[0]


def replace_masked(tokens_BT, chosen_BT, sampled_BT) -> tuple[jax.Array, jax.Array]:
    """(discriminator inputs, is_replaced): the chosen tokens become the generator's samples;
    a token counts as replaced only where it now differs from the original."""
    inputs_BT = jnp.where(chosen_BT, sampled_BT, tokens_BT)
    return inputs_BT, inputs_BT != tokens_BT


class ElectraTask(MaskedLMTask):
    """The masked-LM task's windows and masking; self.model is the discriminator."""
    name = "electra"

    def __init__(self, model_cfg: model_lib.TransformerConfig, seq_len: int, mask_id: int,
                 rate: float = 0.15, generator_width_ratio: float = 0.25,
                 disc_weight: float = 50.0, mask_token_prob: float = 0.85):
        super().__init__(model_cfg, seq_len, mask_id, rate)
        if disc_weight <= 0:
            raise ConfigError(f"electra.disc_weight must be positive, got {disc_weight}")
        if not 0.0 <= mask_token_prob <= 1.0:
            raise ConfigError(f"electra.mask_token_prob must be in [0, 1], got {mask_token_prob}")
        self.generator_cfg = generator_config(model_cfg, generator_width_ratio)
        self.generator = model_lib.Transformer(self.generator_cfg)
        self.head = DetectionHead(model_cfg)
        self.disc_weight, self.mask_token_prob = disc_weight, mask_token_prob

    def init_params(self, rng):
        gen_rng, disc_rng, head_rng = jax.random.split(rng, 3)
        tokens_BT = jnp.zeros((1, self.seq_len), jnp.int32)
        generator = dict(self.generator.init({"params": gen_rng}, tokens_BT)["params"])
        del generator["token_embed"]  # the discriminator's table serves both
        discriminator = self.model.init({"params": disc_rng}, tokens_BT)["params"]
        head = self.head.init({"params": head_rng}, jnp.zeros((1, 1, self.model_cfg.d_model)))
        return {"generator": generator, "discriminator": discriminator,
                "discriminator_head": head["params"]}

    def generator_params(self, params):
        """The generator's full Transformer tree: its own params plus the shared token table."""
        return {**params["generator"], "token_embed": params["discriminator"]["token_embed"]}

    def loss(self, params, batch, rng, train: bool) -> LossSums:
        tokens_BT = batch["tokens"][:, :self.seq_len]
        segments_BT = batch["segment_ids"][:, :self.seq_len]
        positions_BT = positions_from_segments(segments_BT)
        real_BT = segments_BT > 0
        choose_rng, keep_rng, sample_rng, gen_rng, disc_rng = jax.random.split(rng, 5)
        chosen_BT = choose_positions(choose_rng, real_BT, self.rate)
        masked_BT = chosen_BT & (jax.random.uniform(keep_rng, tokens_BT.shape)
                                 < self.mask_token_prob)
        gen_inputs_BT = jnp.where(masked_BT, self.mask_id, tokens_BT)
        gen_logits_BTV = self.generator.apply(
            {"params": self.generator_params(params)}, gen_inputs_BT, positions_BT, segments_BT,
            deterministic=not train, rngs={"dropout": gen_rng} if train else None)
        gen_nll_BT = optax.softmax_cross_entropy_with_integer_labels(gen_logits_BTV, tokens_BT)
        chosen_f_BT = chosen_BT.astype(jnp.float32)
        gen_correct_BT = (jnp.argmax(gen_logits_BTV, -1) == tokens_BT).astype(jnp.float32)

        # Samples from the generator's softmax over ordinary tokens only ([MASK] and the padding
        # ids are never inputs); integers carry no gradient, stop_gradient says so explicitly.
        ordinary_V = jnp.arange(gen_logits_BTV.shape[-1]) < self.mask_id
        sample_logits_BTV = jnp.where(ordinary_V, jax.lax.stop_gradient(gen_logits_BTV), -1e9)
        sampled_BT = jax.random.categorical(sample_rng, sample_logits_BTV, axis=-1)
        disc_inputs_BT, replaced_BT = replace_masked(tokens_BT, chosen_BT, sampled_BT)

        hidden_BTD = self.model.apply(
            {"params": params["discriminator"]}, disc_inputs_BT, positions_BT, segments_BT,
            deterministic=not train, rngs={"dropout": disc_rng} if train else None,
            return_hidden=True)
        disc_logit_BT = self.head.apply({"params": params["discriminator_head"]}, hidden_BTD)
        replaced_f_BT = replaced_BT.astype(jnp.float32)
        disc_bce_BT = optax.sigmoid_binary_cross_entropy(disc_logit_BT, replaced_f_BT)
        disc_correct_BT = ((disc_logit_BT > 0) == replaced_BT).astype(jnp.float32)

        real_f_BT = real_BT.astype(jnp.float32)
        num_masked, num_real = jnp.sum(chosen_f_BT), jnp.maximum(jnp.sum(real_f_BT), 1.0)
        per_real = num_masked / num_real  # real-token sums, weighted as masked-token sums
        real_sum = lambda x_BT: per_real * jnp.sum(x_BT * real_f_BT)
        gen_loss = jnp.sum(gen_nll_BT * chosen_f_BT)
        disc_loss = real_sum(disc_bce_BT)
        return LossSums(loss=gen_loss + self.disc_weight * disc_loss, weight=num_masked,
                        extra={"generator_loss": gen_loss,
                               "generator_accuracy": jnp.sum(gen_correct_BT * chosen_f_BT),
                               "discriminator_loss": disc_loss,
                               "detection_accuracy": real_sum(disc_correct_BT),
                               "replaced_fraction": real_sum(replaced_f_BT)})

    def train_flops_per_example(self) -> float:
        """Both encoders forward and backward, plus the head's two matmuls per token."""
        per_token = (param_tree.flops_per_token(self.model_cfg, self.seq_len)
                     + param_tree.flops_per_token(self.generator_cfg, self.seq_len)
                     + 6 * (self.model_cfg.d_model ** 2 + self.model_cfg.d_model))
        return per_token * self.seq_len

    def describe(self) -> dict[str, float]:
        """The discriminator's size (the model kept for fine-tuning) and the joint FLOPs."""
        return {"params_non_embedding": param_tree.num_params(self.model_cfg,
                                                              exclude_embeddings=True),
                "generator_params_non_embedding": param_tree.num_params(
                    self.generator_cfg, exclude_embeddings=True),
                "train_flops_per_token": self.train_flops_per_example() / self.seq_len}

    @staticmethod
    def metrics(sums: dict[str, float], num_bytes: float) -> dict[str, float]:
        """Joint loss, each part's mean, and the two accuracies."""
        weight = max(sums["weight"], 1.0)
        out = {name: sums.get(name, 0.0) / weight for name in (
            "loss", "generator_loss", "generator_accuracy", "discriminator_loss",
            "detection_accuracy", "replaced_fraction")}
        out["generator_perplexity"] = math.exp(min(out["generator_loss"], 50.0))
        out["masked_tokens"] = sums["weight"]
        return out


CONFIG_RANGES = {"electra": {"rate": "(0, 1)", "mask_token_prob": "[0, 1]",
                             "generator_width_ratio": "(0, 1]", "disc_weight": ">= 0"}}


def build_task(config, vocab_size: int) -> ElectraTask:
    """The task of a config with an `electra` section (experiments/configs/lm/electra.py);
    [MASK] is the first id past the tokenizer's vocabulary."""
    e = config.electra
    model_cfg = model_lib.config_from(config, model_lib.padded_vocab(vocab_size, 1))
    return ElectraTask(model_cfg, config.data.seq_len, vocab_size, e.rate, e.generator_width_ratio,
                       e.disc_weight, e.mask_token_prob)
