"""Multi-step integer arithmetic, a generated task with a verifiable answer for feedback tuning.

A question chains `steps` operations on a running total, read left to right ("Start with 7. Add
5. Multiply by 3. Subtract 4. What is the result?"), so no precedence rule is needed; the
worked answer states each step and ends "So the answer is 32." like the chain-of-thought tasks
of lm.data.instructions, whose `extract_answer` and `score` read it. In domain: 2 or 3 steps;
out of domain: 4 to 6 (length generalisation, as Wei et al. hold out longer name lists).
Multipliers stay in 2..9 and addends in 1..99, so totals fit a few digits and may go negative.
"""
from __future__ import annotations

import random

from core.config import DataError
from lm.data.instructions import Conversation

IN_DOMAIN, OUT_OF_DOMAIN = (2, 3), (4, 5, 6)
OPERATIONS = {"add": ("Add {n}.", "{t} + {n} = {r}", lambda t, n: t + n),
              "subtract": ("Subtract {n}.", "{t} - {n} = {r}", lambda t, n: t - n),
              "multiply": ("Multiply by {n}.", "{t} * {n} = {r}", lambda t, n: t * n)}


def problem(start: int, steps: list[tuple[str, int]]) -> tuple[str, str, str]:
    """(question, step-by-step answer, final answer) for a start and (operation, operand)s."""
    total, said, worked = start, [f"Start with {start}."], []
    for name, n in steps:
        ask, show, apply = OPERATIONS[name]
        result = apply(total, n)
        said.append(ask.format(n=n))
        worked.append(show.format(t=total, n=n, r=result) + ".")
        total = result
    question = " ".join(said) + " What is the result?"
    return question, f"{' '.join(worked)} So the answer is {total}.", str(total)


def generate(count: int, lengths: tuple[int, ...] = IN_DOMAIN, seed: int = 0) -> list[Conversation]:
    """`count` problems, each with a number of steps drawn from `lengths`; a pure function of
    the arguments."""
    if count < 0 or not lengths or any(not isinstance(n, int) or n < 1 for n in lengths):
        raise DataError(f"arithmetic: need count >= 0 and step counts >= 1, got count={count}, "
                        f"lengths={lengths}")
    rng = random.Random(f"arithmetic:{seed}:{tuple(lengths)}")
    out = []
    for index in range(count):
        steps = []
        for _ in range(rng.choice(lengths)):
            name = rng.choice(sorted(OPERATIONS))
            steps.append((name, rng.randint(2, 9) if name == "multiply" else rng.randint(1, 99)))
        question, worked, answer = problem(rng.randint(1, 20), steps)
        out.append(Conversation(({"role": "user", "content": question},
                                 {"role": "assistant", "content": worked}),
                                f"arithmetic:{seed}:{index}", answer))
    return out
