"""Every test runs on 8 simulated CPU devices, so sharding tests use a real mesh.

XLA reads the flag when JAX initialises its backend, so it is set before anything imports jax.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# A persistent XLA compilation cache beside the project's other caches (core.packages.cache_dir),
# set in the environment so that both xdist workers and every command a test starts share it:
# tests that build the same tiny models compile each program once, not once per test (a tiny
# training run takes 17 s warm instead of 45 s). Small programs too: they add up. No size limit
# (JAX's LRU eviction rescans the folder on every write); delete the folder to reclaim it. An
# entry read while the other worker is still writing it is only recompiled, with a warning.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.expanduser(os.environ.get("GENLAB_CACHE") or "~/.cache/genlab"), "xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
# A small real setup: Austen only, a 512-piece tokenizer, a 2-layer model, 64-token windows.
TINY = "experiments/configs/lm/gpt.py:size=tiny,corpus=austen"
QUIET = ["--config.train.eval_every=0", "--config.train.eval_batches=2",
         "--config.train.log_every=1", "--config.train.async_checkpoint=false",
         "--config.optim.warmup_steps=2"]


def tiny_config(*overrides: str):
    from core.config import load_config
    return load_config(str(REPO / TINY.split(":")[0]) + ":" + TINY.split(":")[1],
                       [*QUIET, *overrides])


def train_tiny(workdir, *overrides: str) -> dict:
    """Trains (or resumes) the tiny config in this process."""
    from core import trainer
    from lm import pipeline
    config = tiny_config(*overrides)
    setup = pipeline.build(config, workdir)
    return trainer.train(config, workdir, setup.task, setup.data)


def train_losses(workdir) -> dict[int, float]:
    from core.metrics import read_jsonl
    return {r["step"]: r["loss"] for r in read_jsonl(pathlib.Path(workdir) / "metrics.jsonl")
            if r["split"] == "train"}


def tiny_chat_files(root, conversations: int = 80) -> tuple[pathlib.Path, pathlib.Path]:
    """(tokenizer, chats.jsonl) for a tiny SFT run of ours: a 512-piece sentencepiece model
    trained on generated task text, and `conversations` generated chats as `messages` lines."""
    import json
    from lm.data import instructions
    from lm.data.tokenizer import Tokenizer
    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    texts = [m["content"] for c in instructions.load("cot", 150, seed=3) for m in c.messages]
    Tokenizer.train(texts, root / "tokenizer.model", "bpe", 512)
    (root / "chats.jsonl").write_text("".join(
        json.dumps({"messages": list(c.messages)}) + "\n"
        for c in instructions.load("cot", conversations // 2, seed=9)))
    return root / "tokenizer.model", root / "chats.jsonl"


def tiny_pairs_file(path, count: int = 48) -> pathlib.Path:
    """Preference pairs of generated last-letter questions: the worked answer chosen, the same
    answer with a wrong final letter rejected (a verifiable preference)."""
    from lm.data import instructions, preferences
    pairs = [preferences.Pair(c.messages[:-1], c.messages[-1]["content"],
                              c.messages[-1]["content"].replace(c.answer, c.answer + "x"),
                              "last_letters", c.where, 1.0, 0.0)
             for c in instructions.generate("last_letters", count, (2,), 5)]
    return preferences.save(pairs, path)


def cli(*args: str, env: dict | None = None, **popen) -> list[str]:
    """The command line of `python -m experiments.main ...` run from the repo root."""
    return [sys.executable, "-m", "experiments.main", *args]


def run_cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cli(*args), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
