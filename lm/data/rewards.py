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

from core.config import ConfigError, DataError, check_choice
from lm.data import ifbench
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
