"""Two processes on localhost (jax.distributed, CPU collectives) build the token store once and
train to the same losses as one process with the same global batch; each process loads only its
half of every batch."""
import os

import numpy as np
import pytest

from core.packages import cache_dir
from conftest import QUIET, REPO, TINY, tiny_config, train_losses, train_tiny
from launch import local as launch
from lm import pipeline

pytestmark = pytest.mark.slow
ARGS = [*QUIET, "--config.train.steps=4", "--config.train.checkpoint_every=2",
        "--config.train.global_batch_size=8"]


def test_two_processes_match_one_process(tmp_path):
    # The tokenizer is trained once here so the two processes do not race to train it.
    tokenizer = pipeline.build(tiny_config(*ARGS), tmp_path / "tok", need_train=False).tokenizer
    shared = [*ARGS, f"--config.data.tokenizer.path={tokenizer.path}"]
    train_tiny(tmp_path / "one", *shared, "--config.mesh.num_devices=4")

    # A cache of their own (sharing the prepared corpora): the token store is built here, once.
    cache = tmp_path / "cache"
    cache.mkdir()
    for sub in ("corpora", "packages"):
        os.symlink(cache_dir() / sub, cache / sub)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    results = launch.launch(
        ["train", "--config", TINY, "--workdir", str(tmp_path / "two"), *shared,
         f"--config.data.cache_dir={cache}"],
        processes=2, devices_per_process=2, env=env, cwd=str(REPO), timeout=600)
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in (cache / "stores").iterdir()] and not list(
        (cache / "stores").glob("*.partial"))
    built = [result.stderr.count("token store ") for result in results]
    assert built[0] >= 1 and built[1] == 0  # process 0 built it; process 1 only read it
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert sorted(two) == sorted(one) == [1, 2, 3, 4]
    np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)],
                               rtol=1e-5)
    assert (tmp_path / "two" / "checkpoints" / "4").is_dir()


def test_dry_run_prints_one_command_per_process():
    cmds = launch.commands(["train", "--workdir", "w"], processes=2, devices_per_process=4,
                           port=4321)
    assert len(cmds) == 2
    assert cmds[1][-4:] == ["--config.distributed.coordinator_address=127.0.0.1:4321",
                            "--config.distributed.num_processes=2",
                            "--config.distributed.process_id=1",
                            "--config.distributed.local_device_count=4"]
