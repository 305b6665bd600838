"""Two processes on localhost (jax.distributed, CPU collectives) train to the same losses as one
process with the same global batch; each process loads only its half of every batch."""
import os
import socket
import subprocess

import numpy as np
import pytest

from conftest import QUIET, REPO, TINY, cli, train_losses, train_tiny
from lm import pipeline
from conftest import tiny_config

pytestmark = pytest.mark.slow
ARGS = [*QUIET, "--config.train.steps=4", "--config.train.checkpoint_every=2",
        "--config.train.global_batch_size=8"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    # The tokenizer is trained once here so the two processes do not race to train it.
    tokenizer = pipeline.build(tiny_config(*ARGS), tmp_path / "tok", need_train=False).tokenizer
    shared = [*ARGS, f"--config.data.tokenizer.path={tokenizer.path}"]
    train_tiny(tmp_path / "one", *shared, "--config.mesh.num_devices=4")

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(REPO)
    workers = [subprocess.Popen(
        cli("train", "--config", TINY, "--workdir", str(tmp_path / "two"), *shared,
            "--config.distributed.enabled=true",
            f"--config.distributed.coordinator_address=127.0.0.1:{port}",
            "--config.distributed.num_processes=2", f"--config.distributed.process_id={rank}",
            "--config.distributed.local_device_count=2"),
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for rank in range(2)]
    for worker in workers:
        _, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err[-3000:]
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert sorted(two) == sorted(one) == [1, 2, 3, 4]
    np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)],
                               rtol=1e-5)
    assert (tmp_path / "two" / "checkpoints" / "4").is_dir()
