"""The model the feedback objectives (reward, dpo, ppo, grpo) train, and the rows it reads.

Rows. An example is a prompt followed by a completion, left-aligned in a row of L tokens and
right-padded: `tokens`, `segment_ids` (1 on real tokens, 0 on padding) and `completion_mask` (1
on the completion's tokens, its end-of-turn included). The causal LM reads tokens[:-1] and
scores tokens[1:], so a completion's log-probs sit where completion_mask[1:] is set. A scalar
head (the reward model's score, PPO's value) reads the final hidden states; the reward is read at
the last real token, whose index comes from the row's length, never from a search for a pad id
(left padding, or pad == EOS, make that search pick the wrong token).

Start and reference. The policy starts from `feedback.model` (a packaged name or a .gguf; "" =
the model section from scratch, with data.tokenizer.path) or from `feedback.init_from`, a run's
workdir (an SFT run: its newest checkpoint, a LoRA run merged). The reference is that start, or
`feedback.reference`, another run. A full fine-tune holds it in TrainState.frozen (sharded,
never saved: loaded again on resume); a LoRA run's reference is its base with the adapters off,
which costs no extra weights.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from core.config import ConfigError, DataError, load_run_config
from core.engine import restore_params
from core.task import BatchField
from lm.models import lora
from lm.objectives import policy_losses, sft
from lm.objectives.window_task import WindowTask, positions_from_segments

ROW_FIELDS = ("tokens", "segment_ids", "completion_mask")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class WithReference:
    """What a full fine-tune's loss reads: the trained policy and the frozen reference."""
    policy: Any
    reference: Any


def policy_and_reference(params) -> tuple[Any, Any]:
    """(policy, reference) parameters: a full fine-tune's pair, or a LoRA run's adapted model
    and its bare base."""
    if isinstance(params, WithReference):
        return params.policy, params.reference
    if isinstance(params, lora.LoraParams):
        return params, params.base
    raise TypeError(f"a feedback objective reads WithReference or LoraParams, got "
                    f"{type(params).__name__}")


def row_fields(row_len: int, pairs: bool = False) -> dict[str, BatchField]:
    """The batch fields of rows ([L] each) or of preference pairs ([2, L]: chosen, rejected)."""
    shape, axes = ((2, row_len), ("batch", None, "length")) if pairs else \
        ((row_len,), ("batch", "length"))
    return {name: BatchField(shape, jnp.int32, axes) for name in ROW_FIELDS}


def rows(prompt_ids: list[list[int]], completion_ids: list[list[int]], row_len: int,
         pad_id: int, where: list[str] | None = None) -> dict[str, np.ndarray]:
    """Rows from each prompt's and completion's token ids; a DataError (naming `where[b]`, if
    given) if one does not fit."""
    tokens = np.full((len(prompt_ids), row_len), pad_id, np.int32)
    segments, mask = np.zeros_like(tokens), np.zeros_like(tokens)
    for b, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids)):
        n = len(prompt) + len(completion)
        if n > row_len:
            raise DataError(f"{where[b] + ': ' if where else ''}a prompt of {len(prompt)} and a "
                            f"completion of {len(completion)} "
                            f"tokens exceed the row of {row_len}: raise feedback.max_prompt_tokens"
                            " or feedback.max_new_tokens")
        tokens[b, :n] = list(prompt) + list(completion)
        segments[b, :n] = 1
        mask[b, len(prompt):n] = 1
    return {"tokens": tokens, "segment_ids": segments, "completion_mask": mask}


class PolicyTask(WindowTask):
    """A causal LM on rows of `row_len` tokens, with optional scalar heads ("reward", "value":
    parameters `<name>_head`, zero at the start) on its final hidden states."""

    def __init__(self, model_cfg, row_len: int, pretrained=None, heads: tuple[str, ...] = (),
                 source: str = ""):
        super().__init__(model_cfg, row_len - 1)
        self.row_len = row_len
        self.heads = tuple(heads)
        self._pretrained = pretrained  # host arrays of the whole model, or None (scratch)
        self.base_source = source or "initialised from train.seed"

    def init_params(self, rng):
        params = dict(super().init_params(rng))
        for name in self.heads:
            params[f"{name}_head"] = {
                "kernel": nn.LogicallyPartitioned(jnp.zeros((self.model_cfg.d_model,)),
                                                  ("embed",)),
                "bias": nn.LogicallyPartitioned(jnp.zeros(()), ())}
        return params

    def pretrained_params(self) -> dict:
        return {} if self._pretrained is None else dict(self._pretrained)

    def _apply(self, params, tokens_BT, segments_BT, train, rng, **kwargs):
        return self.model.apply({"params": params}, tokens_BT, positions_from_segments(segments_BT),
                                segments_BT, deterministic=not train,
                                rngs={"dropout": rng} if train and rng is not None else None,
                                **kwargs)

    def read(self, params, batch, temperature: float = 1.0, head: str = "", train=False,
             rng=None) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        """(log-probs of tokens[1:] [B, L-1], their completion mask, `head` at each input
        position [B, L-1] or None) of rows."""
        tokens_BL, segments_BL = batch["tokens"], batch["segment_ids"]
        out = self._apply(params, tokens_BL[:, :-1], segments_BL[:, :-1], train, rng,
                          with_hidden=bool(head))
        logits_BTV, hidden_BTD = out if head else (out, None)
        logp_BT = policy_losses.token_logprobs(logits_BTV, tokens_BL[:, 1:], temperature)
        mask_BT = (batch["completion_mask"][:, 1:] * (segments_BL[:, 1:] > 0)).astype(jnp.float32)
        return logp_BT, mask_BT, None if not head else self.head(params, head, hidden_BTD)

    def head(self, params, name: str, hidden_BTD: jax.Array) -> jax.Array:
        if isinstance(params, lora.LoraParams):
            raise ConfigError(f"the {name} head is trained whole, which a LoRA run cannot do "
                              "yet: set lora.rank=0 (a full fine-tune)")
        weights = params[f"{name}_head"]
        return (jnp.einsum("btd,d->bt", hidden_BTD.astype(jnp.float32), weights["kernel"])
                + weights["bias"])

    def score(self, params, batch, train=False, rng=None) -> jax.Array:
        """[B] the reward head at each row's last real token (index = length - 1)."""
        tokens_BL, segments_BL = batch["tokens"], batch["segment_ids"]
        last_B = policy_losses.last_token_index(jnp.sum(segments_BL > 0, axis=1))
        hidden_B1D = self._apply(params, tokens_BL, segments_BL, train, rng, return_hidden=True,
                                 logits_at_BK=last_B[:, None])
        return self.head(params, "reward", hidden_B1D)[:, 0]

    def policy_params(self, params):
        """The causal LM alone (export, decoding): a full fine-tune's policy without its
        reference and heads; a LoRA run's LoraParams as they are."""
        if isinstance(params, WithReference):
            params = params.policy
        if isinstance(params, dict):
            params = {k: v for k, v in params.items() if not k.endswith("_head")}
        return params

    def train_flops_per_example(self) -> float:
        return super().train_flops_per_example() * (self.row_len - 1) / self.seq_len

    def units_per_example(self):
        return "tokens", self.row_len


class ReferencedPolicyTask(PolicyTask):
    """A PolicyTask whose loss also reads a frozen reference (DPO, PPO, GRPO)."""

    def __init__(self, *args, reference=None, reference_source: str = "", seed: int = 0,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self._reference = reference  # host arrays, or None: the policy's own start
        self.reference_source = reference_source or self.base_source
        self.seed = seed

    def init_frozen(self, rng):
        """A reference from scratch is the policy's own initialisation (train.seed), so the
        two start equal: heads aside, init_params draws the same weights from the same key."""
        return WindowTask.init_params(self, jax.random.key(self.seed))

    def pretrained_frozen(self) -> dict:
        reference = self._reference if self._reference is not None else self._pretrained
        return {} if reference is None else dict(reference)

    def describe_frozen(self) -> dict:
        return {"reference": self.reference_source}

    def combine(self, params, frozen) -> WithReference:
        return WithReference(params, frozen)


# ------------------------------------------------------------------------------ loading


@dataclasses.dataclass
class Policy:
    model_cfg: Any
    params: Any          # host arrays or None (scratch)
    tokenizer: Any
    template: Any
    source: str


def load_run_model(workdir: str, what: str) -> Policy:
    """The merged model of a decoder run with a chat template (an SFT run), its tokenizer and
    template, from the run's own config."""
    path = pathlib.Path(workdir)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{what} {workdir!r} is not a run directory with config.json")
    config = load_run_config(path, ())
    if config.task != "sft":
        raise ConfigError(f"{what} {workdir} is a {config.task} run; the feedback objectives "
                          "start from an sft run (or set feedback.model)")
    setup = sft.build_setup(config, path, need_train=False)
    _, params, step = restore_params(config, setup.task, path, setup.data.check_meta)
    return Policy(setup.task.model_cfg, jax.device_get(lora.plain(params)), setup.tokenizer,
                  setup.template, f"{workdir} (step {step})")


def load_policy(config) -> tuple[Policy, Any, str]:
    """(the starting policy, the reference's host arrays or None = the start, its source)."""
    f = config.feedback
    if f.init_from:
        policy = load_run_model(f.init_from, "feedback.init_from")
    else:
        cfg, params, tokenizer, template = sft.load_model(config, f)
        policy = Policy(cfg, params, tokenizer, template, f.model or "initialised from "
                        "train.seed")
    if not f.get("reference", ""):
        return policy, None, policy.source
    other = load_run_model(f.reference, "feedback.reference")
    if other.tokenizer.fingerprint != policy.tokenizer.fingerprint:
        raise ConfigError(f"feedback.reference {f.reference} has another tokenizer than the "
                          "policy; use a run fine-tuned from the same model")
    return policy, other.params, other.source
