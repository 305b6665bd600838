"""A run killed with SIGKILL and resumed ends bit-for-bit where an uninterrupted run ends (the
tiny GPT; SFT through QLoRA adapters on a 2x2x2 mesh; PPO on a 2x2x2 mesh, killed mid-rollout or
mid-update, its sampling keys and adaptive KL coefficient included); SIGTERM saves a checkpoint
and stops cleanly."""
import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from conftest import QUIET, REPO, TINY, cli, run_cli, tiny_chat_files, tiny_pairs_file, train_losses
from core.checkpoint import Checkpointer
from core.config import load_config
from core import trainer
from core.engine import Engine
from lm import commands

pytestmark = pytest.mark.slow
ENV = dict(os.environ, PYTHONPATH=str(REPO))
STEPS = 40
ARGS = [*QUIET, f"--config.train.steps={STEPS}", "--config.train.checkpoint_every=5",
        "--config.model.dropout=0.1"]  # dropout: the RNG stream must resume exactly too


def _gpt_run(root):
    return TINY, ARGS


def _sft_qlora_mesh_run(root):
    """SFT of a tiny model of ours through rank-4 adapters over an NF4 base, on 8 devices."""
    tokenizer, chats = tiny_chat_files(root / "data")
    spec = (f"experiments/configs/lm/sft.py:model=,size=tiny,tokenizer={tokenizer},"
            f"dataset=files:{chats},batch=8,seq_len=128,lr=1e-2")
    return spec, [*ARGS, "--config.sft.val_fraction=0.2", "--config.lora.rank=4",
                  "--config.lora.base_format=nf4_dq", "--config.mesh.ici.data=2",
                  "--config.mesh.ici.fsdp=2", "--config.mesh.ici.tensor=2"]


def _ppo_mesh_run(root):
    """PPO of a tiny model of ours on rollouts scored by a tiny reward run, 2 epochs of 2
    minibatches per rollout, the adaptive KL controller on, on 8 devices."""
    tokenizer, _ = tiny_chat_files(root / "data")
    pairs = tiny_pairs_file(root / "data" / "pairs.jsonl")
    spec = (f"experiments/configs/lm/feedback.py:model=,size=tiny,tokenizer={tokenizer},"
            f"pairs={pairs},prompts=32,new_tokens=32,batch=8,lr=1e-3")
    reward = run_cli("train", "--config", spec + ",task=reward", "--workdir", str(root / "rm"),
                     "--config.train.steps=4", env=ENV)
    assert reward.returncode == 0, reward.stderr[-2000:]
    return spec + ",task=ppo", [*ARGS, f"--config.feedback.reward_model={root / 'rm'}",
                                "--config.ppo.epochs=2", "--config.ppo.minibatches=2",
                                "--config.ppo.kl_target=0.5", "--config.ppo.kl_horizon=100",
                                "--config.mesh.ici.data=2", "--config.mesh.ici.fsdp=2",
                                "--config.mesh.ici.tensor=2"]


def _train_command(workdir, run=(TINY, ARGS)):
    return cli("train", "--config", run[0], "--workdir", str(workdir), *run[1])


def _start(workdir, run=(TINY, ARGS)):
    return subprocess.Popen(_train_command(workdir, run), cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(workdir, process, at_least: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = [int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()]
        if steps and max(steps) >= at_least:
            return
        if process.poll() is not None:
            raise AssertionError(f"training exited early: {process.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared in time")


def _final_state(workdir, step, run):
    path, arg = run[0].split(":", 1)
    config = load_config(str(REPO / path) + ":" + arg, run[1])
    engine = Engine(config, commands.build(config, workdir, need_train=False).task)
    state, _ = Checkpointer(workdir / "checkpoints", async_save=False).restore(
        step, engine.saved_state(engine.abstract_state))
    return jax.device_get(state)


@pytest.mark.parametrize("make_run", [_gpt_run, _sft_qlora_mesh_run, _ppo_mesh_run],
                         ids=["gpt", "sft-qlora-2x2x2", "ppo-2x2x2"])
def test_sigkill_then_resume_is_bitwise_equal_to_uninterrupted(make_run, tmp_path):
    run = make_run(tmp_path)
    reference = subprocess.run(_train_command(tmp_path / "reference", run), cwd=REPO, env=ENV,
                               capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-2000:]

    killed = _start(tmp_path / "killed", run)
    _wait_for_checkpoint(tmp_path / "killed", killed, at_least=10)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    interrupted_at = max(train_losses(tmp_path / "killed"))
    assert interrupted_at < STEPS
    resumed = subprocess.run(_train_command(tmp_path / "killed", run), cwd=REPO, env=ENV,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "restored step" in resumed.stderr

    expected = _final_state(tmp_path / "reference", STEPS, run)
    actual = _final_state(tmp_path / "killed", STEPS, run)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(actual),
                            jax.tree_util.tree_leaves(expected)):
        assert np.array_equal(np.asarray(a), np.asarray(b)), jax.tree_util.keystr(path)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    process = _start(tmp_path)
    _wait_for_checkpoint(tmp_path, process, at_least=5)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 0, process.stderr.read()[-2000:]
    stopped_at = max(train_losses(tmp_path))
    saved = [int(p.name) for p in (tmp_path / "checkpoints").glob("*") if p.name.isdigit()]
    assert stopped_at < STEPS and max(saved) == stopped_at


def test_processes_agree_on_stopping_only_every_log_interval(monkeypatch):
    """Across processes the stop flag is a blocking gather: once per log interval, not per step
    (a single process reads its own flag every step)."""
    from jax.experimental import multihost_utils
    gathered = []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather",
                        lambda flag: gathered.append(flag) or np.array([flag, [False]]))
    stop = trainer._StopSignal()
    stop.requested = True
    decisions = [stop.any_process_requested(step, every=5) for step in range(1, 11)]
    assert len(gathered) == 2 and decisions == [False] * 4 + [True] + [False] * 4 + [True]
    monkeypatch.setattr(jax, "process_count", lambda: 1)
    assert stop.any_process_requested(3, every=5)


def test_the_demo_samples_from_the_checkpoint_it_wrote(tmp_path):
    """`make demo` reads its last checkpoint back to sample: the saved tree (no frozen
    parameters), restored whole, with nothing moved aside as corrupt."""
    from conftest import tiny_config, train_tiny
    from experiments import demo
    from lm import pipeline
    steps = ("--config.train.steps=4", "--config.optim.warmup_steps=1")
    train_tiny(tmp_path, *steps)
    config = tiny_config(*steps)
    setup = pipeline.build(config, tmp_path)
    params = demo.trained_params(config, setup.task, tmp_path)
    expected = Engine(config, setup.task).abstract_state.params
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(expected)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree_util.tree_leaves(params))
    assert not list((tmp_path / "checkpoints").glob("*.corrupt*"))
