"""Preference pairs: a prompt, a chosen and a rejected reply, as a JSONL file of records

  {"task": "last_letters", "where": "last_letters:0:17", "prompt": [{"role": "user", ...}],
   "chosen": "...", "rejected": "...", "chosen_reward": 1.0, "rejected_reward": 0.0}

(task, where and the rewards are optional for a user's own pairs). The ones we make come from a
programmatic judge: several replies of the policy to one prompt, ranked by the task's verifiable
reward (lm/data/rewards.py), the best against the worst, prompts whose replies all tie dropped
(UltraFeedback's recipe with a checker where it asks GPT-4). The package registries hold no
human preference pairs; these are the real preferences we can have offline.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

from core import textfiles
from core.config import DataError
from lm.data import chat


@dataclasses.dataclass(frozen=True)
class Pair:
    prompt: tuple[dict, ...]
    chosen: str
    rejected: str
    task: str = ""
    where: str = ""
    chosen_reward: float | None = None
    rejected_reward: float | None = None

    def conversation(self, reply: str) -> list[dict]:
        return [*self.prompt, {"role": "assistant", "content": reply}]


def judge(task: str, where: str, prompt, replies: list[str], scores: list[float]) -> Pair | None:
    """The best-scored reply against the worst; None when they tie (no preference to learn).
    Ties keep the first sampled, so the pair is a pure function of the samples."""
    best = max(range(len(scores)), key=lambda k: (scores[k], -k))
    worst = min(range(len(scores)), key=lambda k: (scores[k], k))
    if scores[best] == scores[worst]:
        return None
    return Pair(tuple(prompt), replies[best], replies[worst], task, where, float(scores[best]),
                float(scores[worst]))


def save(pairs: list[Pair], path: str | pathlib.Path) -> pathlib.Path:
    """Written whole to a temporary file, then renamed: an interrupted save keeps no half file."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps({**dataclasses.asdict(p), "prompt": list(p.prompt)}) + "\n"
                           for p in pairs), encoding="utf-8")
    tmp.replace(path)
    return path


def load(path: str | pathlib.Path) -> list[Pair]:
    """The pairs of a JSONL file; a DataError naming the line of a malformed record."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise DataError(f"preference pairs {path}: no such file")
    pairs = []
    for number, line in enumerate(textfiles.read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
            if not (isinstance(row["chosen"], str) and isinstance(row["rejected"], str)
                    and isinstance(row["prompt"], list)):
                raise TypeError
            prompt = chat.check_messages([*row["prompt"], {"role": "assistant",
                                                           "content": row["chosen"]}], where)[:-1]
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not JSON ({error})") from None
        except (KeyError, TypeError):
            raise DataError(f"{where}: expected 'prompt' (a list of messages) and 'chosen' and "
                            "'rejected' strings") from None
        pairs.append(Pair(tuple(prompt), row["chosen"], row["rejected"], row.get("task", ""),
                          row.get("where", where), row.get("chosen_reward"),
                          row.get("rejected_reward")))
    if not pairs:
        raise DataError(f"preference pairs {path} holds no pair")
    return pairs
