"""Any objective trained through LoRA adapters (`config.lora.rank > 0`) on its frozen model.

The wrapped task keeps its data, loss and metrics; its model is wrapped (lm/models/lora.py) so
that the params its loss reads are LoraParams: the base, which the engine keeps frozen (sharded,
outside the optimiser and the checkpoints: core/train_state.py), and the adapters, which are all
the engine trains and saves. The base comes from the task's own initialisation (seeded) or its
pretrained weights (`pretrained_params`), which become the frozen parameters here; with
`lora.base_format` (QLoRA: "nf4_dq") the base is stored quantised and each kernel is dequantised
where a layer reads it (lm/weights/quantize.py).
"""
from __future__ import annotations

import jax

from lm.models import lora
from lm.weights import quantize


class LoraTask:
    def __init__(self, inner, cfg: lora.LoraConfig):
        self.inner = inner
        self.lora = cfg
        inner.model = lora.LoraModel(inner.model)  # the inner loss now reads LoraParams

    def init_params(self, rng):
        """The adapters, shaped and named after the base's kernels (A random, B zero)."""
        base = jax.eval_shape(self.inner.init_params, rng)
        return lora.init_adapters(jax.random.fold_in(rng, 1), base, self.lora)

    def init_frozen(self, rng):
        """The base, stored as lora.base_format says: quantised (QLoRA: nf4_dq) as it is made."""
        base = self.inner.init_params(rng)
        if self.lora.base_format:
            return quantize.quantize_traced(base, self.lora.base_format)
        return base

    def pretrained_params(self) -> dict:
        return {}  # the adapters always start from init_params (B = 0: the base model exactly)

    def pretrained_frozen(self) -> dict:
        pretrained = getattr(self.inner, "pretrained_params", dict)()
        if pretrained and self.lora.base_format:
            return quantize.held_as_bytes(
                quantize.quantize_params(pretrained, self.lora.base_format))
        return pretrained

    def describe_frozen(self) -> dict:
        """The pointer a checkpoint keeps to its base instead of the base itself."""
        return {"base": getattr(self.inner, "base_source", "initialised from train.seed"),
                "lora": {"rank": self.lora.rank, "targets": self.lora.targets,
                         "base_format": self.lora.base_format}}

    def combine(self, adapters, base) -> lora.LoraParams:
        return lora.LoraParams(base, adapters, self.lora)

    def loss(self, params: lora.LoraParams, batch, rng, train: bool, **kwargs):
        return self.inner.loss(params, batch, rng, train, **kwargs)  # model_state, if stateful

    def train_flops_per_example(self) -> float:
        """Forward and input-gradient matmuls only: a frozen kernel needs no weight gradient,
        so a step costs about 4 of the 6 FLOPs per parameter and token (adapters neglected)."""
        return self.inner.train_flops_per_example() * 2 / 3

    def __getattr__(self, name):  # name, batch_fields, units_per_example, model_cfg, ...
        return getattr(self.inner, name)
