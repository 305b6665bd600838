"""Bad input gets a clear error and destroys nothing."""
import argparse
import logging
import os

import pytest

from conftest import REPO, TINY, run_cli, tiny_config, train_losses, train_tiny
from core.checkpoint import CheckpointError, Checkpointer
from core.config import ConfigError
from core.engine import Engine
from core.memory import OutOfMemoryError
from lm import commands, pipeline
from core.config import DataError
from lm.data.tokenizer import TokenizerMismatchError

ENV = dict(os.environ, PYTHONPATH=str(REPO))


def test_mistyped_key_on_the_command_line_names_the_closest_key(tmp_path):
    result = run_cli("train", "--config", TINY, "--workdir", str(tmp_path),
                     "--config.train.learning_rate=0.1", env=ENV)
    assert result.returncode == 2
    assert "unknown config key 'train.learning_rate'" in result.stderr
    assert "did you mean" in result.stderr and "learning_rate" in result.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_missing_data_file_names_the_path(tmp_path):
    missing = tmp_path / "no-such-corpus.jsonl"
    config = tiny_config(f"--config.data.corpus=files:{missing}")
    with pytest.raises(DataError, match=str(missing)):
        pipeline.build(config, tmp_path / "run")


def test_unknown_corpus_names_the_closest(tmp_path):
    config = tiny_config("--config.data.corpus=austin")
    with pytest.raises(DataError, match="austen"):
        pipeline.build(config, tmp_path / "run")


def test_batch_that_does_not_divide_over_the_mesh(tmp_path):
    config = tiny_config("--config.train.global_batch_size=12")  # 8 devices shard the batch
    setup = pipeline.build(config, tmp_path)
    with pytest.raises(ConfigError, match="does not divide over the 8 devices"):
        Engine(config, setup.task)


def test_parameter_that_does_not_shard_names_the_parameter(tmp_path):
    config = tiny_config("--config.mesh.ici.data=1", "--config.mesh.ici.tensor=8")
    setup = pipeline.build(config, tmp_path)  # 4 heads cannot split 8 ways
    with pytest.raises(ConfigError, match="parameter .* does not divide over mesh axes"):
        Engine(config, setup.task)


def test_run_that_does_not_fit_says_how_much_it_needs(tmp_path):
    config = tiny_config("--config.train.memory_limit_bytes=100000")
    with pytest.raises(OutOfMemoryError, match=r"needs \d+\.\d+ GiB per device"):
        train_tiny(tmp_path, "--config.train.memory_limit_bytes=100000")
    del config
    assert not (tmp_path / "checkpoints").exists() or not os.listdir(tmp_path / "checkpoints")


def test_corrupt_latest_checkpoint_falls_back_and_is_kept(tmp_path, caplog):
    overrides = ["--config.train.steps=4", "--config.train.checkpoint_every=2"]
    train_tiny(tmp_path, *overrides)
    checkpoints = tmp_path / "checkpoints"
    damaged = 0
    for path in (checkpoints / "4" / "state").rglob("*"):
        if path.is_file() and path.stat().st_size > 0:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
            damaged += 1
    assert damaged
    config = tiny_config(*overrides)
    engine = Engine(config, pipeline.build(config, tmp_path).task)
    with caplog.at_level(logging.WARNING):
        _, meta, step = Checkpointer(checkpoints).restore_latest_good(
            engine.saved_state(engine.abstract_state))
    assert step == 2 and meta["step"] == 2
    assert "step 4 could not be restored" in caplog.text
    kept = [p for p in checkpoints.iterdir() if p.name.startswith("4.corrupt")]
    assert kept and any(f.is_file() for f in kept[0].rglob("*"))  # moved aside, not deleted
    # Training resumes from step 2 and finishes.
    train_tiny(tmp_path, "--config.train.steps=5", "--config.train.checkpoint_every=2")
    assert max(train_losses(tmp_path)) == 5
    assert (checkpoints / "5").is_dir()
    # When no checkpoint restores, the run stops rather than silently starting from step 0.
    for step in Checkpointer(checkpoints).steps():
        for path in (checkpoints / str(step) / "state").rglob("*"):
            if path.is_file() and path.stat().st_size > 0:
                path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="none of the .* could be restored"):
        Checkpointer(checkpoints).restore_latest_good(
            engine.saved_state(engine.abstract_state))
    assert not Checkpointer(checkpoints).steps()
    assert len([p for p in checkpoints.iterdir() if ".corrupt" in p.name]) >= 3


def test_tokenizer_that_does_not_match_the_checkpoint(tmp_path):
    train_tiny(tmp_path / "run", "--config.train.steps=3")
    other = tiny_config("--config.data.tokenizer.vocab_size=384")
    other_tokenizer = pipeline.build(other, tmp_path / "other").tokenizer
    config = tiny_config("--config.train.steps=3",
                         f"--config.data.tokenizer.path={other_tokenizer.path}")
    saved = (tmp_path / "run" / "tokenizer.model").read_bytes()
    with pytest.raises(TokenizerMismatchError, match="tokenizer"):
        commands.evaluate(config, argparse.Namespace(workdir=str(tmp_path / "run")))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["3"]
    assert (tmp_path / "run" / "tokenizer.model").read_bytes() == saved


def test_checkpoint_of_another_model_shape_is_refused_and_kept(tmp_path):
    train_tiny(tmp_path, "--config.train.steps=3")
    config = tiny_config("--config.train.steps=3", "--config.model.d_model=32")
    engine = Engine(config, pipeline.build(config, tmp_path).task)
    from core.checkpoint import CheckpointMismatchError
    with pytest.raises(CheckpointMismatchError, match="another configuration"):
        Checkpointer(tmp_path / "checkpoints").restore_latest_good(
            engine.saved_state(engine.abstract_state))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3"]
