"""Every entry point, every kind of bad input: one line `error: ...`, exit status 2, nothing lost.

The matrix runs each command's `main` in this process through `core.cli.run` (what its
`python -m` line runs; test_architecture.py checks every entry point ends in cli.main_entry, and
the last tests here run three of them as real processes). After each case the trained run it was
pointed at is byte-identical: its checkpoints and config.json.
"""
import hashlib
import importlib
import pathlib
import shutil
import subprocess
import sys
import time

import pytest

from conftest import QUIET, REPO, TINY, train_tiny
from core import cli

RESUME = [*QUIET, "--config.train.steps=4", "--config.train.checkpoint_every=2"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> pathlib.Path:
    """Small bad files, one per kind of mistake."""
    folder = tmp_path_factory.mktemp("inputs")
    (folder / "empty.jsonl").write_text("")
    (folder / "blank.txt").write_text("  \n\n")
    (folder / "broken.jsonl").write_text('{"text": "one"}\n{"text": "two"\n{"text": "three"}\n')
    (folder / "list.jsonl").write_text('{"text": "one"}\n["two"]\n')
    (folder / "latin1.txt").write_bytes("Caf\u00e9 au lait, na\u00efve.\n".encode("latin-1"))
    (folder / "latin1.jsonl").write_bytes('{"text": "ok"}\n{"text": "caf\u00e9"}\n'
                                          .encode("latin-1"))
    (folder / "columns.jsonl").write_text("".join(f'{{"body": "text {k}"}}\n' for k in range(30)))
    (folder / "truncated.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x01" * 11)
    (folder / "not_gguf.gguf").write_bytes(b"this is not a model file" * 4)
    (folder / "no_loss.csv").write_text("params,tokens\n1e6,2e7\n2e6,4e7\n")
    (folder / "empty.csv").write_text("")
    (folder / "get_config_missing.py").write_text("X = 1\n")
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> pathlib.Path:
    """A tiny trained decoder with checkpoints at steps 2 and 4."""
    workdir = tmp_path_factory.mktemp("run")
    train_tiny(workdir, "--config.train.steps=4", "--config.train.checkpoint_every=2")
    return workdir


def digest(folder: pathlib.Path) -> dict[str, str]:
    """Every file under `folder` by relative path -> sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def damaged_copy(run: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    """A copy of the run whose every checkpoint has been truncated."""
    copy = tmp_path / "damaged"
    shutil.copytree(run, copy)
    for path in (copy / "checkpoints").rglob("*"):
        if path.is_file() and path.stat().st_size > 0 and "state" in path.parts:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return copy


def train(*args):
    return ["train", "--config", str(REPO / TINY.split(":")[0]) + ":" + TINY.split(":")[1],
            *args]


def train_on(name: str):
    """argv for training the tiny config on one of the bad input files."""
    return lambda i, r, t: train("--workdir", str(t / "w"),
                                 f"--config.data.corpus=files:{i}/{name}")


# (id, entry point module, argv(inputs, run, tmp_path), text the error line must contain)
CASES = [
    # experiments.main: train
    ("main-unknown-key", "experiments.main",
     lambda i, r, t: train("--workdir", str(t / "w"), "--config.train.learning_rate=0.1"),
     "did you mean"),
    ("main-bad-type", "experiments.main",
     lambda i, r, t: train("--workdir", str(t / "w"), "--config.train.steps=many"),
     "train.steps: cannot read 'many' as int"),
    ("main-bad-flag", "experiments.main",
     lambda i, r, t: train("--workdir", str(t / "w"), "--steps=3"), "unrecognised arguments"),
    ("main-out-of-range-lr", "experiments.main",
     lambda i, r, t: train("--workdir", str(t / "w"), "--config.optim.learning_rate=-1"),
     "optim.learning_rate must be > 0"),
    ("main-out-of-range-prob", "experiments.main",
     lambda i, r, t: train("--workdir", str(t / "w"), "--config.data.val_fraction=1.5"),
     "data.val_fraction must be in [0, 1)"),
    ("main-out-of-range-warmup", "experiments.main",
     lambda i, r, t: train("--workdir", str(t / "w"), "--config.optim.warmup_steps=80"),
     "must be below the decay horizon"),
    ("main-missing-config", "experiments.main",
     lambda i, r, t: ["train", "--config", str(t / "nope.py"), "--workdir", str(t / "w")],
     "does not exist"),
    ("main-config-without-get_config", "experiments.main",
     lambda i, r, t: ["train", "--config", str(i / "get_config_missing.py"),
                      "--workdir", str(t / "w")], "defines no get_config"),
    ("main-missing-corpus", "experiments.main",
     lambda i, r, t: train("--workdir", str(t / "w"), f"--config.data.corpus=files:{t}/no.jsonl"),
     "no such file"),
    ("main-empty-file", "experiments.main",
     train_on("empty.jsonl"), "empty.jsonl is empty"),
    ("main-blank-text-file", "experiments.main",
     train_on("blank.txt"), "blank.txt is empty"),
    ("main-malformed-line", "experiments.main",
     train_on("broken.jsonl"), "broken.jsonl:2: not a JSON line"),
    ("main-line-not-an-object", "experiments.main",
     train_on("list.jsonl"), "list.jsonl:2: expected a JSON object"),
    ("main-wrong-encoding-txt", "experiments.main",
     train_on("latin1.txt"), "latin1.txt is not UTF-8 text: byte 3"),
    ("main-wrong-encoding-jsonl", "experiments.main",
     train_on("latin1.jsonl"), "latin1.jsonl is not UTF-8 text: byte 28"),
    ("main-wrong-column", "experiments.main",
     train_on("columns.jsonl"), "has no column 'text'"),
    ("main-unknown-corpus", "experiments.main",
     lambda i, r, t: train("--workdir", str(t / "w"), "--config.data.corpus=austin"),
     "Did you mean 'austen'"),
    ("main-batch-mesh", "experiments.main",
     lambda i, r, t: train("--workdir", str(t / "w"), "--config.train.global_batch_size=12"),
     "does not divide over the 8 devices"),
    ("main-mesh-too-big", "experiments.main",
     lambda i, r, t: train("--workdir", str(t / "w"), "--config.mesh.ici.data=16"),
     "mesh.ici"),
    ("main-unknown-task", "experiments.main",
     lambda i, r, t: train("--workdir", str(t / "w"), "--config.task=causal"),
     "did you mean 'causal_lm'"),
    ("main-unknown-model-choice", "experiments.main",
     lambda i, r, t: train("--workdir", str(t / "w"), "--config.model.norm=batchnorm"),
     "model.norm='batchnorm'"),
    ("main-resume-shape", "experiments.main",
     lambda i, r, t: train("--workdir", str(r), *RESUME, "--config.model.d_model=32"),
     "model.d_model: 64 -> 32"),
    ("main-resume-tokenizer", "experiments.main",
     lambda i, r, t: train("--workdir", str(r), *RESUME, "--config.data.tokenizer.vocab_size=384"),
     "data.tokenizer.vocab_size: 512 -> 384"),
    ("main-resume-objective", "experiments.main",
     lambda i, r, t: ["train", "--config", str(REPO / "experiments/configs/lm/bert.py:size=tiny"),
                      "--workdir", str(r)],
     "task: 'causal_lm' -> 'masked_lm'"),
    ("main-damaged-checkpoints", "experiments.main",
     lambda i, r, t: ["evaluate", "--workdir", str(damaged_copy(r, t))], "could be restored"),
    ("main-evaluate-not-a-run", "experiments.main",
     lambda i, r, t: ["evaluate", "--workdir", str(t)], "config.json does not exist"),
    ("main-sample-too-long", "experiments.main",
     lambda i, r, t: ["sample", "--workdir", str(r), "--prompt", "It is",
                      "--max-new-tokens", "100000"], "100000"),
    ("main-evaluate-unknown-harness-task", "experiments.main",
     lambda i, r, t: ["evaluate", "--workdir", str(r), "--tasks", "piqaa", "--limit", "2"],
     "piqaa"),
    # lm.eval.evaluate_tasks
    ("tasks-bad-type", "lm.eval.evaluate_tasks",
     lambda i, r, t: ["--workdir", str(r), "--shots", "one"], "--shots 'one'"),
    ("tasks-bad-option-type", "lm.eval.evaluate_tasks",
     lambda i, r, t: ["--workdir", str(r), "--limit", "ten"], "invalid int value"),
    ("tasks-unknown-task", "lm.eval.evaluate_tasks",
     lambda i, r, t: ["--workdir", str(r), "--tasks", "hellaswagg", "--limit", "2"],
     "hellaswagg"),
    ("tasks-missing-documents", "lm.eval.evaluate_tasks",
     lambda i, r, t: ["--workdir", str(r), "--documents", str(t / "none.jsonl")],
     "does not exist"),
    ("tasks-empty-documents", "lm.eval.evaluate_tasks",
     lambda i, r, t: ["--workdir", str(r), "--documents", str(i / "empty.jsonl")], "is empty"),
    ("tasks-malformed-documents", "lm.eval.evaluate_tasks",
     lambda i, r, t: ["--workdir", str(r), "--documents", str(i / "broken.jsonl")],
     "broken.jsonl:2"),
    ("tasks-wrong-encoding", "lm.eval.evaluate_tasks",
     lambda i, r, t: ["--workdir", str(r), "--documents", str(i / "latin1.txt")],
     "not UTF-8 text: byte 3"),
    ("tasks-wrong-column", "lm.eval.evaluate_tasks",
     lambda i, r, t: ["--workdir", str(r), "--documents", str(i / "columns.jsonl")],
     "has no \"text\" field"),
    ("tasks-malformed-weights", "lm.eval.evaluate_tasks",
     lambda i, r, t: ["--model", str(i / "truncated.gguf")], "truncated.gguf"),
    ("tasks-unknown-model", "lm.eval.evaluate_tasks",
     lambda i, r, t: ["--model", "smollm3"], "unknown pretrained model 'smollm3'"),
    ("tasks-damaged-checkpoints", "lm.eval.evaluate_tasks",
     lambda i, r, t: ["--workdir", str(damaged_copy(r, t)), "--tasks", "piqa"],
     "could be restored"),
    # lm.decode.chat
    ("chat-malformed-weights", "lm.decode.chat",
     lambda i, r, t: ["--model", str(i / "not_gguf.gguf"), "--prompt", "hi"], "not_gguf.gguf"),
    ("chat-missing-weights", "lm.decode.chat",
     lambda i, r, t: ["--model", str(t / "absent.gguf"), "--prompt", "hi"], "absent.gguf"),
    ("chat-unknown-model", "lm.decode.chat",
     lambda i, r, t: ["--model", "smollm3", "--prompt", "hi"], "unknown pretrained model"),
    ("chat-bad-type", "lm.decode.chat",
     lambda i, r, t: ["--max-new-tokens", "many"], "invalid int value"),
    # lm.weights.embed
    ("embed-missing-file", "lm.weights.embed",
     lambda i, r, t: ["--file", str(t / "absent.txt")], "absent.txt does not exist"),
    ("embed-empty-file", "lm.weights.embed",
     lambda i, r, t: ["--file", str(i / "blank.txt")], "blank.txt is empty"),
    ("embed-wrong-encoding", "lm.weights.embed",
     lambda i, r, t: ["--file", str(i / "latin1.txt")], "not UTF-8 text: byte 3"),
    ("embed-unknown-model", "lm.weights.embed",
     lambda i, r, t: ["hello", "--model", "no-such-encoder"], "neither a packaged encoder"),
    ("embed-nothing-to-embed", "lm.weights.embed", lambda i, r, t: [], "give texts"),
    # generative.sample
    ("gensample-wrong-task", "generative.sample",
     lambda i, r, t: ["--workdir", str(r), "--sampler", "ddpm", "--out", str(t / "o")], "needs a diffusion run"),
    ("gensample-out-of-range", "generative.sample",
     lambda i, r, t: ["--workdir", str(r), "--num", "0", "--out", str(t / "o")], "--num and --batch must be positive"),
    ("gensample-not-a-run", "generative.sample",
     lambda i, r, t: ["--workdir", str(t), "--out", str(t / "o")], "config.json does not exist"),
    # experiments.sweep
    ("sweep-missing-config", "experiments.sweep",
     lambda i, r, t: ["--config", str(t / "nope.py"), "--workdir", str(t / "s")], "does not exist"),
    ("sweep-unknown-key", "experiments.sweep",
     lambda i, r, t: ["--config", str(REPO / TINY), "--workdir", str(t / "s"), "--dry-run",
                      "--config.optim.lr=1"], "did you mean"),
    ("sweep-bad-regex", "experiments.sweep",
     lambda i, r, t: ["--config", str(REPO / TINY), "--workdir", str(t / "s"), "--only", "(",
                      "--dry-run"], "not a regular expression"),
    ("sweep-out-of-range", "experiments.sweep",
     lambda i, r, t: ["--config", str(REPO / TINY), "--workdir", str(t / "s"), "--parallel", "0"],
     "--parallel and --processes must be at least 1"),
    # experiments.scaling.fit
    ("fit-missing-file", "experiments.scaling.fit",
     lambda i, r, t: ["--points", str(t / "none.csv")], "none.csv"),
    ("fit-empty-file", "experiments.scaling.fit",
     lambda i, r, t: ["--points", str(i / "empty.csv")], "empty.csv"),
    ("fit-wrong-column", "experiments.scaling.fit",
     lambda i, r, t: ["--points", str(i / "no_loss.csv")], "loss"),
    ("fit-out-of-range", "experiments.scaling.fit",
     lambda i, r, t: ["--points", str(REPO.parent / "shared/data/chinchilla_figure4_points.csv"),
                      "--chinchilla", "--level", "1.5"], "--level must lie in (0, 1)"),
    ("fit-bad-type", "experiments.scaling.fit",
     lambda i, r, t: ["--points", "x.csv", "--bootstrap", "a few"], "invalid int value"),
    # launch
    ("launch-unknown-launcher", "launch.__main__", lambda i, r, t: ["lcoal"], "unknown launcher"),
    ("launch-aot-unknown-topology", "launch.__main__",
     lambda i, r, t: ["aot", "--config", str(REPO / TINY), "--topology", "h100-3"], "h100-3"),
    ("launch-aot-unknown-key", "launch.__main__",
     lambda i, r, t: ["aot", "--config", str(REPO / TINY), "--topology", "8xH100",
                      "--config.model.widht=3"], "did you mean"),
]


@pytest.mark.parametrize("name,module,argv,expected", CASES, ids=[c[0] for c in CASES])
def test_user_error_is_one_line_exit_2_and_loses_nothing(name, module, argv, expected, inputs,
                                                         run, tmp_path, capsys):
    before = digest(run)
    status = cli.run(importlib.import_module(module).main, argv(inputs, run, tmp_path))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert status == 2, err
    assert "Traceback" not in err
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    assert expected in errors[0], errors[0]
    assert digest(run) == before


def test_damaged_checkpoints_are_set_aside_not_destroyed(run, tmp_path, capsys):
    """The one change an error may leave: the damaged checkpoints moved aside, bytes kept."""
    copy = damaged_copy(run, tmp_path)
    before = sorted(digest(copy).values())
    main = importlib.import_module("experiments.main").main
    assert cli.run(main, ["evaluate", "--workdir", str(copy)]) == 2
    assert sorted(digest(copy).values()) == before
    assert not [p for p in (copy / "checkpoints").iterdir() if p.name.isdigit()]
    assert "could be restored" in capsys.readouterr().err


def test_config_errors_come_before_any_data_is_read(run, tmp_path, monkeypatch):
    """A config-only mistake costs the same on any corpus: no file of a 40 MB corpus is opened
    and no tokenizer trained before the error (so its time cannot depend on the corpus)."""
    corpus = tmp_path / "big.jsonl"
    line = '{"text": "' + "word " * 2000 + '"}\n'
    corpus.write_text(line * 4000)
    assert corpus.stat().st_size > 40e6
    from lm.data import windows
    for name in ("load_splits", "get_tokenizer", "train_texts", "corpus_windows"):
        monkeypatch.setattr(windows, name, lambda *a, _name=name, **k: pytest.fail(f"{_name} ran"))
    main = importlib.import_module("experiments.main").main
    for override in ("--config.optim.warmup_steps=1000", "--config.optim.b2=1.0",
                     "--config.train.global_batch_size=12", "--config.model.dropout=-0.1"):
        started = time.perf_counter()
        assert cli.run(main, train("--workdir", str(tmp_path / "w"),
                                   f"--config.data.corpus=files:{corpus}", override)) == 2
        assert time.perf_counter() - started < 60  # generous: no corpus work, just imports
    assert not (tmp_path / "w").exists()


def test_resume_with_safe_changes_keeps_config_in_step_with_the_run(run, tmp_path):
    """Steps, cadence and layout may change on resume; config.json then says what was used."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    main = importlib.import_module("experiments.main").main
    assert cli.run(main, train("--workdir", str(copy), *QUIET, "--config.train.steps=5",
                               "--config.train.checkpoint_every=5",
                               "--config.mesh.ici.data=4", "--config.mesh.ici.fsdp=2")) == 0
    import json
    saved = json.loads((copy / "config.json").read_text())
    assert saved["train"]["steps"] == 5 and saved["mesh"]["ici"]["fsdp"] == 2


@pytest.mark.parametrize("argv", [
    ["-m", "experiments.main", "train", "--config", TINY, "--workdir", "/nonexistent/w",
     "--config.optim.learning_rate=-1"],
    ["-m", "lm.eval.evaluate_tasks", "--model", "smollm3"],
    ["-m", "launch", "lcoal"],
], ids=["experiments.main", "lm.eval.evaluate_tasks", "launch"])
def test_real_process_prints_one_error_line_and_exits_2(argv):
    result = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr


def test_a_bug_keeps_its_traceback():
    def broken(argv):
        raise KeyError("a bug, not a user error")
    with pytest.raises(KeyError):
        cli.run(broken, [])


def test_resume_compares_every_key_and_an_empty_section_filled_in(tmp_path):
    """The saved config against the new one: equal passes; filling an empty section (optimiser
    groups) is a difference like any other, though keys an older config.json lacks pass."""
    import ml_collections

    from conftest import tiny_config
    from core import trainer
    from core.config import ConfigError
    config = tiny_config()
    trainer.write_run_config(tmp_path, config)
    trainer.check_resume(tmp_path, tiny_config("--config.train.steps=99"))
    changed = tiny_config()
    changed.optim.groups = ml_collections.ConfigDict({"head": {"match": "^head",
                                                               "learning_rate": 1.0}})
    with pytest.raises(ConfigError, match=r"optim.groups: \{\} -> \(filled in\)"):
        trainer.check_resume(tmp_path, changed)
