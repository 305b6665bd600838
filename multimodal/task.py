"""The generalist's task for the engine (core/task.py): next-token loss on the tokens it must
produce (text, captions, actions), per domain as well as in total.

Rows come packed from multimodal/sequences.py with their targets already paired, so the loss is
one weighted cross-entropy: weight 1 on text and action targets, 0 on observation values, image
patches, separators and padding. `domains` names the rows' domain ids, and each domain's summed
loss and trained tokens are summed beside the total (logged as their shares of the step's).
"""
from __future__ import annotations

import jax.numpy as jnp
import optax

from core.task import BatchField, LossSums
from lm.models import param_tree
from multimodal.model import Gato, GatoConfig


class GatoTask:
    name = "gato"

    def __init__(self, cfg: GatoConfig, seq_len: int, domains: tuple[str, ...]):
        if seq_len > cfg.decoder.max_len:
            raise ValueError(f"data.seq_len {seq_len} exceeds model.max_len {cfg.decoder.max_len}")
        self.cfg, self.seq_len, self.domains = cfg, seq_len, tuple(domains)
        self.model = Gato(cfg)
        self.pixels = cfg.patch_side ** 2 * cfg.channels

    def init_params(self, rng):
        T = self.seq_len
        zeros_BT = jnp.zeros((1, T), jnp.int32)
        return self.model.init({"params": rng}, zeros_BT, jnp.zeros((1, T, self.pixels)),
                               zeros_BT)["params"]

    def logits(self, params, batch, rng=None, train: bool = False):
        return self.model.apply(
            {"params": params}, batch["tokens"], batch["patches"], batch["local"],
            batch["positions"], batch["segments"], deterministic=not train,
            rngs={"dropout": rng} if train and rng is not None else None)

    def loss(self, params, batch, rng, train: bool) -> LossSums:
        logits_BTV = self.logits(params, batch, rng, train)
        targets_BT, weight_BT = batch["targets"], batch["weights"]
        nll_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)
        correct_BT = (jnp.argmax(logits_BTV, axis=-1) == targets_BT).astype(jnp.float32)
        extra = {"accuracy": jnp.sum(correct_BT * weight_BT)}
        row_nll_B, row_weight_B = jnp.sum(nll_BT * weight_BT, 1), jnp.sum(weight_BT, 1)
        for d, name in enumerate(self.domains):  # logged / weight: shares of loss and tokens
            mine_B = (batch["domain"] == d).astype(jnp.float32)
            extra[f"{name}_loss_share"] = jnp.sum(row_nll_B * mine_B)
            extra[f"{name}_token_share"] = jnp.sum(row_weight_B * mine_B)
        return LossSums(loss=jnp.sum(nll_BT * weight_BT), weight=jnp.sum(weight_BT), extra=extra)

    def batch_fields(self):
        T = self.seq_len
        row = ("batch", "length")
        return {"tokens": BatchField((T,), jnp.int32, row),
                "targets": BatchField((T,), jnp.int32, row),
                "weights": BatchField((T,), jnp.float32, row),
                "segments": BatchField((T,), jnp.int32, row),
                "positions": BatchField((T,), jnp.int32, row),
                "local": BatchField((T,), jnp.int32, row),
                "patches": BatchField((T, self.pixels), jnp.float32, (*row, None)),
                "domain": BatchField((), jnp.int32, ("batch",))}

    def train_flops_per_example(self) -> float:
        return param_tree.flops_per_token(self.cfg.decoder, self.seq_len) * self.seq_len

    def units_per_example(self):
        return "tokens", self.seq_len

    def domain_loss(self, sums: dict[str, float], name: str) -> float:
        """A domain's loss per trained token, from summed metrics."""
        return sums[f"{name}_loss_share"] / max(sums[f"{name}_token_share"], 1.0)
