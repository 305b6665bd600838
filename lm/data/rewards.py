"""Programmatic, verifiable rewards for feedback tuning: what the RL trainer (PPO, GRPO) and the
preference-pair builder (two samples ranked by the checker) call on a sampled reply.

`reward(task, conversation, response)` dispatches on the task name:
  last_letters, coin_flip, arithmetic   1.0 if the reply's final answer (instructions.
               extract_answer: what follows the last "answer is") equals the task's answer, else
               0.0. No separate format bonus: the answer only counts when written in the
               trained format, and a bonus for the format alone is a reward a policy can collect
               while answering wrong.
  ifbench      the fraction of the prompt's constraints met (lm.data.ifbench, strict mode); the
               conversation is an ifbench.Record.
"""
from __future__ import annotations

import hashlib

from core.config import ConfigError, DataError, check_choice
from lm.data import arithmetic, ifbench, instructions
from lm.data.instructions import Conversation, is_correct


def answer_reward(conversation, response: str, cache: str = "") -> float:
    if not isinstance(conversation, Conversation) or not conversation.answer:
        raise DataError(f"a generated task's reward needs a Conversation with an answer, got "
                        f"{type(conversation).__name__}")
    return float(is_correct(response, conversation))


def ifbench_reward(record, response: str, cache: str = "") -> float:
    if not isinstance(record, ifbench.Record):
        raise DataError(f"the ifbench reward needs an ifbench.Record (from ifbench.load_prompts), "
                        f"got {type(record).__name__}")
    return ifbench.reward(record, response, cache=cache)


TASKS = {"last_letters": answer_reward, "coin_flip": answer_reward,
         "arithmetic": answer_reward, "ifbench": ifbench_reward}


def reward(task: str, conversation, response: str, cache: str = "") -> float:
    """The reward in [0, 1] of `response` to the prompt of `conversation` (see the module
    docstring)."""
    check_choice("reward task", task, TASKS, ConfigError)
    if not isinstance(response, str):
        raise DataError(f"a {task} response must be a string, got {type(response).__name__}")
    return TASKS[task](conversation, response, cache)


def prompts(task: str, count: int, seed: int, held_out: bool = False, lengths=None,
            cache: str = "") -> list:
    """Items of `task` that a policy answers (`prompt_messages`) and `reward` scores.
    Generated tasks: `count` fresh problems of seed (held_out: seed + 1, without questions the
    training seed also drew), of the in-domain lengths unless `lengths` is given. IFBench: the
    scorable prompts, a fixed quarter of them held out by a hash of each key; count > 0 keeps
    the first `count`."""
    check_choice("reward task", task, TASKS, ConfigError)
    if task == "ifbench":
        records = [r for r in ifbench.load_prompts(cache) if ifbench.supported(r)]
        records = [r for r in records if (hashlib.sha256(r.key.encode()).digest()[0] < 64)
                   == held_out]
        return records[:count] if count else records

    def make(at_seed: int, n: int) -> list:
        if task == "arithmetic":
            return arithmetic.generate(n, lengths or arithmetic.IN_DOMAIN, at_seed)
        return instructions.generate(task, n, lengths or instructions.IN_DOMAIN, at_seed, cache)

    if not held_out:
        return make(seed, count)
    seen = {c.messages[0]["content"] for c in make(seed, count)}
    return [c for c in make(seed + 1, 2 * count) if c.messages[0]["content"] not in seen][:count]


def prompt_messages(item) -> list[dict]:
    """The turns a policy answers: a generated task's question, an IFBench prompt."""
    return list(item.messages[:-1] if isinstance(item, Conversation) else item.messages)


def out_of_domain_lengths(task: str) -> tuple[int, ...]:
    """The held-out lengths of a generated task (longer names, more flips, more steps); IFBench
    has none."""
    if task == "ifbench":
        return ()
    return arithmetic.OUT_OF_DOMAIN if task == "arithmetic" else instructions.OUT_OF_DOMAIN
