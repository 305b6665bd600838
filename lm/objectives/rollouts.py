"""Rollouts: a policy's replies to chat prompts, sampled with the KV-cache decoder, as rows.

What online RL (PPO, GRPO), the preference-pair builder and the feedback scores share: prompts
rendered with the chat template and encoded once, replies sampled in batches (one traced key
per call, so a new key compiles nothing), each reply's tokens kept exactly as sampled (its
end-of-turn included) in left-aligned rows (lm/objectives/policy_model.py) and decoded to text
for the reward.
"""
from __future__ import annotations

import dataclasses
import logging

import jax
import numpy as np

from core.config import DataError
from lm.data import rewards
from lm.decode import decoding
from lm.models import lora
from lm.objectives import policy_model

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Sampler:
    """A policy's prompt encoder and sampler: tokenizer, chat template and decoding settings."""
    model: object
    tokenizer: object
    template: object
    max_prompt_tokens: int
    max_new_tokens: int
    temperature: float
    drop_long: bool = False

    @property
    def row_len(self) -> int:
        return self.max_prompt_tokens + self.max_new_tokens

    def settings(self, greedy: bool = False) -> decoding.SamplingConfig:
        stop = self.tokenizer.encode([self.template.end_of_turn])[0][-1:]
        return decoding.SamplingConfig(max_new_tokens=self.max_new_tokens,
                                       temperature=0.0 if greedy else self.temperature,
                                       stop_ids=tuple(stop), pad_id=self.tokenizer.pad_id)

    def encode(self, items: list, keys: list | None = None) -> tuple[list, list[list[int]]]:
        """(items, ids): each item's prompt turns rendered for a reply and encoded. A prompt over
        max_prompt_tokens is a DataError naming it, or with drop_long (IFBench's longest
        prompts) dropped and counted in the log; `keys` (default the items) are what is kept."""
        texts = [self.template.render(rewards.prompt_messages(item), add_generation_prompt=True)
                 for item in items]
        kept, ids = [], []
        for key, item, encoded in zip(keys or items, items, self.tokenizer.encode(texts)):
            if len(encoded) <= self.max_prompt_tokens:
                kept.append(key)
                ids.append(encoded)
            elif not self.drop_long:
                raise DataError(f"a prompt of {len(encoded)} tokens exceeds feedback."
                                f"max_prompt_tokens={self.max_prompt_tokens} "
                                f"({getattr(item, 'where', getattr(item, 'key', '?'))}); raise it "
                                "or set feedback.drop_long_prompts=true")
        if len(kept) < len(items):
            log.warning("dropped %d of %d prompts over feedback.max_prompt_tokens=%d",
                        len(items) - len(kept), len(items), self.max_prompt_tokens)
        if not kept:
            raise DataError(f"no prompt fits feedback.max_prompt_tokens={self.max_prompt_tokens}")
        return kept, ids

    def sample(self, params, prompt_ids: list[list[int]], rng, greedy: bool = False,
               batch_size: int = 0) -> tuple[dict[str, np.ndarray], list[str]]:
        """(rows of prompt + reply, the replies as text) for each prompt, in `batch_size`
        chunks (0: all at once); chunk k draws with fold_in(rng, k)."""
        settings = self.settings(greedy)
        params = lora.plain(params)  # a LoRA policy decodes merged
        batch_size = batch_size or len(prompt_ids)
        completions: list[list[int]] = []
        for k, start in enumerate(range(0, len(prompt_ids), batch_size)):
            _, out_BN = decoding.generate_padded(self.model, params,
                                                 prompt_ids[start:start + batch_size], settings,
                                                 jax.random.fold_in(rng, k))
            completions.extend(_through_stop(row, settings.stop_ids) for row in out_BN.tolist())
        # Ids past the tokenizer's (the model's padded vocabulary) decode to nothing.
        vocab = self.tokenizer.vocab_size
        texts = [self.tokenizer.decode([t for t in ids if t < vocab and t not in settings.stop_ids],
                                       skip_special=True) for ids in completions]
        return policy_model.rows(prompt_ids, completions, self.row_len,
                                 self.tokenizer.pad_id), texts


def _through_stop(ids: list[int], stop_ids) -> list[int]:
    """A sampled row up to and including its first stop token (all of it if none)."""
    for i, t in enumerate(ids):
        if t in stop_ids:
            return ids[:i + 1]
    return ids
