"""Sweeps: axes combine as documented, every member is checked before anything runs, finished
members are skipped and interrupted ones resume, a member can run as two processes, and the
results land in one table with a plot per axis."""
import json
import os

import pytest

from core import cli
from conftest import QUIET, REPO, TINY, train_losses
from core.config import ConfigError, load_config
from experiments import sweep
from lm import pipeline


def test_product_and_zip_build_members():
    members = sweep.product(sweep.axis("a.x", [1, 2]),
                            sweep.zipped(sweep.axis("b", ["p", "q"]), sweep.axis("c", [3, 4])))
    assert members == [{"a.x": 1, "b": "p", "c": 3}, {"a.x": 1, "b": "q", "c": 4},
                       {"a.x": 2, "b": "p", "c": 3}, {"a.x": 2, "b": "q", "c": 4}]
    with pytest.raises(ConfigError, match="different lengths"):
        sweep.zipped(sweep.axis("b", [1, 2]), sweep.axis("c", [1]))
    with pytest.raises(ConfigError, match="set by two axes"):
        sweep.product(sweep.axis("b", [1]), sweep.axis("b", [2]))
    with pytest.raises(ConfigError, match="no values"):
        sweep.axis("b", [])


def test_members_merge_config_arguments_and_overrides():
    members = sweep.build_members("cfg.py:size=tiny,corpus=austen",
                                  [{"arg.size": "demo", "train.seed": 3, "model.causal": False}],
                                  ["--config.train.steps=5"])
    (member,) = members
    assert member.name == "size=demo,seed=3,causal=false"
    assert member.config_spec == "cfg.py:size=demo,corpus=austen"
    assert member.entry_args("w") == [
        "train", "--config", "cfg.py:size=demo,corpus=austen", "--workdir", "w",
        "--config.train.steps=5", "--config.train.seed=3", "--config.model.causal=false"]
    # Two keys ending alike keep their full names; identical members are refused.
    names = sweep.member_names([{"model.dropout": 0.1, "data.dropout": 0.2}])
    assert names == ["model.dropout=0.1,data.dropout=0.2"]
    with pytest.raises(ConfigError, match="repeat"):
        sweep.member_names([{"a": 1}, {"a": 1}])


def test_ablation_sweep_checks_every_member_before_running():
    members = sweep.load_sweep(str(REPO / "experiments/configs/lm/gpt.py") + ":size=small")
    assert len(members) == 8
    assert {m.overrides["model.mlp"]: m.overrides["model.d_ff"] for m in members} == {
        "gelu": 512, "swiglu": 344}
    with pytest.raises(ConfigError, match="train.stpes"):
        sweep.load_sweep(str(REPO / "experiments/configs/lm/gpt.py") + ":size=small",
                         ["--config.train.stpes=3"])


def test_a_member_directory_of_another_config_is_refused(tmp_path):
    member = sweep.load_sweep(str(REPO / "experiments/configs/lm/gpt.py") + ":size=small")[0]
    saved = json.loads(load_config(member.config_spec,
                                   member.config_overrides).to_json_best_effort())
    # What a resumed run writes: the tokenizer it saved, and no field added to the code since.
    saved["data"]["tokenizer"]["path"] = str(tmp_path / "tokenizer.model")
    del saved["model"]["window"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert sweep.status(member, tmp_path) == "new"
    saved["optim"]["learning_rate"] = 0.5
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match=r"\['optim.learning_rate'\]"):
        sweep.status(member, tmp_path)


def _tiny_sweep_file(tmp_path, seeds):
    """A sweep config of the tiny GPT (a config file may import another)."""
    path = tmp_path / "tiny_sweep.py"
    path.write_text(
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('gpt', {str(REPO / TINY.split(':')[0])!r})\n"
        "gpt = importlib.util.module_from_spec(spec); spec.loader.exec_module(gpt)\n"
        "from experiments.sweep import axis\n"
        "def get_config(arg=''):\n"
        "    return gpt.get_config(arg)\n"
        "def get_sweep(arg=''):\n"
        f"    return axis('train.seed', {list(seeds)!r})\n")
    return f"{path}:{TINY.split(':')[1]}"


@pytest.mark.slow
def test_sweep_runs_skips_resumes_and_tabulates(tmp_path):
    tokenizer = pipeline.build(__import__("conftest").tiny_config(*QUIET), tmp_path / "tok",
                               need_train=False).tokenizer
    common = [*QUIET, "--config.train.checkpoint_every=2", "--config.optim.warmup_steps=1",
              f"--config.data.tokenizer.path={tokenizer.path}"]
    spec = _tiny_sweep_file(tmp_path, [0, 1])
    root = tmp_path / "sweep"
    env_before = dict(os.environ)
    os.environ["PYTHONPATH"] = str(REPO)
    try:
        # Member seed=1 is "interrupted": it has run 2 of its 3 steps.
        assert sweep.main(["--config", spec, "--workdir", str(root),
                           *common, "--config.train.steps=2"]) == 0
        (root / "seed=1" / "summary.json").unlink()
        first_seed0 = train_losses(root / "seed=0")
        rc = sweep.main(["--config", spec, "--workdir", str(root), *common,
                         "--config.train.steps=3"])
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    assert rc == 0
    rows = json.loads((root / "sweep.json").read_text())
    assert [r["name"] for r in rows] == ["seed=0", "seed=1"]
    assert all(r["step"] == 3 and r["finished"] for r in rows)
    assert rows[0]["tokens_seen"] == 3 * 16 * 64  # steps x batch x window
    assert rows[0]["train_flops"] > 0 and rows[0]["params_non_embedding"] < rows[0]["num_params"]
    # seed=0 had finished its 2 steps, so with 3 steps it resumed too; neither started over.
    assert "starting at step 2" in (root / "seed=1" / "train.log").read_text()
    assert train_losses(root / "seed=0")[1] == first_seed0[1]
    assert (root / "sweep.csv").read_text().splitlines()[0].startswith("name,train.seed,outcome")
    assert (root / "sweep_train_seed.png").stat().st_size > 0
    # The scaling study reads the same summaries as (N, D, C, L) points.
    from experiments.scaling import study
    points = study.sweep_points(root, "non_embedding")
    assert [p["name"] for p in points] == ["seed=0", "seed=1"]
    assert points[0]["params"] == rows[0]["params_non_embedding"]
    assert points[1]["loss"] == rows[1]["eval_loss"] and points[1]["tokens"] == 3 * 16 * 64
    # A third call finds both finished and trains nothing.
    assert sweep.run(sweep.load_sweep(spec, [*common, "--config.train.steps=3"]), root) == {
        "seed=0": "skipped (finished)", "seed=1": "skipped (finished)"}
    # The same directory with another config is refused before anything runs or is touched.
    with pytest.raises(ConfigError, match=r"differs .* in \['optim.learning_rate'\]"):
        sweep.run(sweep.load_sweep(spec, [*common, "--config.train.steps=3",
                                          "--config.optim.learning_rate=0.5"]), root)
    assert sweep.main(["--config", spec, "--workdir", str(root), "--only", "seed=1$",
                       "--collect-only", *common, "--config.train.steps=3"]) == 0
    assert [r["name"] for r in json.loads((root / "sweep.json").read_text())] == ["seed=1"]
    assert cli.run(sweep.main, ["--config", spec, "--workdir", str(root), "--only", "seed=7",
                                *common]) == 2


@pytest.mark.slow
def test_sweep_member_as_two_processes(tmp_path):
    tokenizer = pipeline.build(__import__("conftest").tiny_config(*QUIET), tmp_path / "tok",
                               need_train=False).tokenizer
    spec = _tiny_sweep_file(tmp_path, [0])
    common = [*QUIET, "--config.train.steps=2", "--config.train.global_batch_size=8",
              "--config.optim.warmup_steps=1",
              f"--config.data.tokenizer.path={tokenizer.path}"]
    members = sweep.load_sweep(spec, common)
    env_before = dict(os.environ)
    os.environ["PYTHONPATH"] = str(REPO)
    try:
        outcomes = sweep.run(members, tmp_path / "two", processes=2, devices_per_process=2)
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    assert outcomes == {"seed=0": "trained"}, (tmp_path / "two/seed=0/train.0.log").read_text()[-2000:]
    log0 = (tmp_path / "two" / "seed=0" / "train.0.log").read_text()
    assert "'data': 4" in log0 or "process 0 of 2" in log0
    assert sorted(train_losses(tmp_path / "two" / "seed=0")) == [1, 2]
