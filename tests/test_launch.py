"""The launchers' commands, checked as argument lists (no gcloud or sbatch runs here), and the
choice of jax.distributed.initialize() arguments from the config and the environment."""
import contextlib
import io
import json
import logging
import os
import shlex
import subprocess
import sys

import pytest

from core import cli
from conftest import REPO
from core.config import ConfigError, distributed_config
from core.distributed import ProcessLogFilter, expand_nodelist, initialize_kwargs
from launch import __main__ as launch_main
from launch import slurm, tpu

ENTRY = ["train", "--config", "experiments/configs/lm/gpt.py:size=gpt2_124m",
         "--workdir", "/mnt/shared/run 1"]
RUN = ("cd genlab && set -o pipefail && python3 -m experiments.main train --config "
       "experiments/configs/lm/gpt.py:size=gpt2_124m --workdir '/mnt/shared/run 1' "
       "--config.distributed.enabled=true 2>&1 | tee -a run.log")
WHERE = ["--zone=us-west4-a", "--project=proj"]


def cluster(**kw):
    base = dict(name="gpt2", accelerator_type="v5e-16", zone="us-west4-a", project="proj")
    return tpu.Cluster(**{**base, **kw})


def commands(steps):
    return [list(cmd) for step in steps for cmd in step.commands]


# --- Cloud TPU -------------------------------------------------------------------------------
def test_tpu_all_creates_copies_runs_and_deletes_one_vm():
    steps = tpu.plan("all", cluster(spot=True), ENTRY, archive="/tmp/code.tgz")
    assert commands(steps) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "create", "gpt2", *WHERE,
         "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite", "--spot"],
        ["git", "archive", "--format=tar.gz", "--output=/tmp/code.tgz", "HEAD"],
        ["gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/code.tgz", "gpt2:genlab.tar.gz",
         *WHERE, "--worker=all"],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "gpt2", *WHERE, "--worker=all",
         "--command=mkdir -p genlab && tar -xzf genlab.tar.gz -C genlab && cd genlab && "
         "python3 -m pip install -q -e . 'jax[tpu]==0.10.2'"],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "gpt2", *WHERE, "--worker=all",
         f"--command={RUN}"],
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "gpt2", *WHERE, "--quiet"],
    ]
    assert [s.always for s in steps] == [False] * 5 + [True]  # deletion survives a failed run


def test_tpu_preemptible_and_runtime_version():
    cmd = commands(tpu.plan("create", cluster(accelerator_type="v4-32", preemptible=True,
                                              version="tpu-vm-v4-base"), []))[0]
    assert cmd[-3:] == ["--accelerator-type=v4-32", "--version=tpu-vm-v4-base", "--preemptible"]


def test_tpu_multislice_goes_through_a_queued_resource_and_runs_on_every_slice():
    c = cluster(accelerator_type="v5p-128", node_count=2, spot=True)
    assert commands(tpu.plan("create", c, [])) == [
        ["gcloud", "compute", "tpus", "queued-resources", "create", "gpt2-qr",
         "--node-count=2", "--node-prefix=gpt2", *WHERE, "--accelerator-type=v5p-128",
         "--runtime-version=v2-alpha-tpuv5", "--spot"],
        ["gcloud", "compute", "tpus", "queued-resources", "describe", "gpt2-qr", *WHERE,
         "--format=value(state.state)"],
    ]
    run = tpu.plan("run", c, ENTRY)
    assert len(run) == 1 and [cmd[5] for cmd in commands(run)] == ["gpt2-0", "gpt2-1"]
    assert all(cmd[-2:] == ["--worker=all", f"--command={RUN}"] for cmd in commands(run))
    assert commands(tpu.plan("delete", c, [])) == [
        ["gcloud", "compute", "tpus", "queued-resources", "delete", "gpt2-qr", *WHERE,
         "--force", "--quiet"]]


def test_tpu_single_queued_slice_and_logs():
    c = cluster(queued=True)
    assert commands(tpu.plan("create", c, []))[0][5:7] == ["gpt2-qr", "--node-id=gpt2"]
    assert commands(tpu.plan("logs", c, [], worker=3)) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "gpt2", *WHERE, "--worker=3",
         "--command=tail -n 200 -F genlab/run.log"]]


@pytest.mark.parametrize("kw, message", [
    (dict(accelerator_type="v9-8"), "GENERATION-SIZE"),
    (dict(spot=True, preemptible=True), "exclude each other"),
    (dict(queued=True, preemptible=True), "--spot, not --preemptible"),
    (dict(node_count=0), "at least 1"),
])
def test_tpu_bad_options_say_what_is_wrong(kw, message):
    with pytest.raises(ValueError, match=message):
        cluster(**kw)


def test_tpu_dry_run_prints_shell_quoted_commands_that_split_back(capsys):
    argv = ["tpu", "all", "--dry-run", "--name", "gpt2", "--zone", "us-west4-a", "--project",
            "proj", "--accelerator-type", "v5e-16", "--archive", "/tmp/code.tgz", "--", *ENTRY]
    assert launch_main.main(argv) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    expected = commands(tpu.plan("all", cluster(), ENTRY, archive="/tmp/code.tgz"))
    assert [shlex.split(line) for line in lines] == expected


def test_tpu_run_without_a_command_is_an_error(capsys):
    assert cli.run(tpu.main, ["run", "--name", "x", "--accelerator-type", "v5e-8",
                              "--dry-run"]) == 2
    assert "give the command to run after --" in capsys.readouterr().err


def test_tpu_execute_deletes_after_a_failed_run():
    steps = [tpu.Step("fail", ((sys.executable, "-c", "import sys; sys.exit(3)"),)),
             tpu.Step("skipped", ((sys.executable, "-c", "print('no')"),)),
             tpu.Step("cleanup", ((sys.executable, "-c", "print('deleted')"),), always=True)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = tpu.execute(steps)
    ran = out.getvalue()
    assert code == 3 and "deleted" in ran and "no\n" not in ran and "# skipped" not in ran


# --- SLURM -----------------------------------------------------------------------------------
def test_slurm_script_runs_the_entry_point_on_every_task():
    text = slurm.script(ENTRY, nodes=4, gpus_per_node=8, time="04:00:00", partition="gpu",
                        account="acct", job_name="gpt2", port=23456, python="python3",
                        workdir="/shared/genlab", setup="module load cuda")
    lines = text.splitlines()
    assert lines[:10] == ["#!/bin/bash", "#SBATCH --job-name=gpt2", "#SBATCH --nodes=4",
                          "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                          "#SBATCH --time=04:00:00", "#SBATCH --partition=gpu",
                          "#SBATCH --account=acct", "#SBATCH --output=slurm-%x-%j.out", ""]
    assert "cd /shared/genlab" in lines and "module load cuda" in lines
    srun = shlex.split(lines[-1])
    assert srun == ["srun", "--kill-on-bad-exit=1", "python3", "-m", "experiments.main", *ENTRY,
                    "--config.distributed.enabled=true",
                    "--config.distributed.coordinator_port=23456"]


def test_slurm_dry_run_prints_script_and_sbatch(capsys, tmp_path):
    argv = ["slurm", "--dry-run", "--nodes", "2", "--gpus-per-node", "8", "--time", "30",
            "--chdir", str(tmp_path), "--python", "python3", "--", *ENTRY]
    assert launch_main.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    path = tmp_path / "runs" / "slurm" / "genlab.sbatch"
    assert out[0] == f"# {path}" and out[1] == "#!/bin/bash"
    assert shlex.split(out[-1]) == ["sbatch", str(path)]
    assert not path.exists()  # a dry run writes nothing


@pytest.mark.parametrize("kw, message", [
    (dict(time="4 hours"), "SLURM's forms"),
    (dict(tasks_per_node=3), "one process per GPU"),
    (dict(nodes=0), "at least 1"),
])
def test_slurm_bad_options(kw, message):
    args = {**dict(nodes=2, gpus_per_node=8, time="01:00:00"), **kw}
    with pytest.raises(ValueError, match=message):
        slurm.script(ENTRY, **args)


# --- one entry point -------------------------------------------------------------------------
def test_entry_point_dispatches_and_rejects_unknown_launchers(capsys):
    assert launch_main.main(["local", "--dry-run", "--processes", "2", "--port", "999", "--",
                             "train", "--workdir", "w"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[1].endswith(
        "--config.distributed.process_id=1 --config.distributed.local_device_count=1")
    assert cli.run(launch_main.main, ["gke"]) == 2
    assert "unknown launcher 'gke'" in capsys.readouterr().err


def test_python_dash_m_launch_runs_as_a_program():
    result = subprocess.run([sys.executable, "-m", "launch", "slurm", "--dry-run", "--nodes", "1",
                             "--gpus-per-node", "1", "--time", "10", "--", "train"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "srun --kill-on-bad-exit=1" in result.stdout


# --- jax.distributed.initialize() from the environment ---------------------------------------
@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu-[01-03,07]", ["gpu-01", "gpu-02", "gpu-03", "gpu-07"]),
    ("node7", ["node7"]),
    ("a1,b2", ["a1", "b2"]),
    ("n[8-11],login", ["n8", "n9", "n10", "n11", "login"]),
    ("rack[1-2]-g[009-010]", ["rack1-g009", "rack1-g010", "rack2-g009", "rack2-g010"]),
])
def test_nodelist_expands_like_scontrol_show_hostnames(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["gpu-[01-03", "gpu-[a-b]", "gpu-[5-3]", ""])
def test_bad_nodelists_are_errors(bad):
    with pytest.raises(ConfigError, match="nodelist"):
        expand_nodelist(bad)


# Values we chose are final: jax's SLURM detection would pin each process to one GPU.
OURS = {"cluster_detection_method": "deactivate"}
SLURM = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-[01-03,07]", "SLURM_NTASKS": "4",
         "SLURM_PROCID": "2", "SLURM_LOCALID": "0"}


def test_slurm_environment_gives_coordinator_count_and_id():
    source, kwargs = initialize_kwargs(distributed_config(), SLURM)
    # jax's rule: job id mod 4096 into the top 4096 ports, so every task picks the same one.
    assert source == "slurm"
    assert kwargs == {"coordinator_address": f"gpu-01:{4242 % 4096 + 61440}",
                      "num_processes": 4, "process_id": 2, **OURS}


def test_step_nodelist_wins_and_one_task_per_gpu_pins_its_device():
    env = {**SLURM, "SLURM_STEP_NODELIST": "gpu-[02-03]", "SLURM_NTASKS": "16",
           "SLURM_PROCID": "9", "SLURM_LOCALID": "1"}
    cfg = distributed_config()
    cfg.coordinator_port = 7000
    assert initialize_kwargs(cfg, env) == ("slurm", {
        "coordinator_address": "gpu-02:7000", "num_processes": 16, "process_id": 9,
        "local_device_ids": [1], **OURS})


def test_explicit_config_wins_over_slurm():
    cfg = distributed_config()
    cfg.coordinator_address, cfg.num_processes, cfg.process_id = "10.0.0.5:1234", 2, 1
    assert initialize_kwargs(cfg, SLURM) == ("config", {
        "coordinator_address": "10.0.0.5:1234", "num_processes": 2, "process_id": 1, **OURS})
    partial = distributed_config()
    partial.coordinator_address = "head:99"
    assert initialize_kwargs(partial, SLURM)[1]["coordinator_address"] == "head:99"


WORKER = """
import json, logging, os, sys
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
import jax
from core.config import distributed_config
from core.distributed import maybe_initialize
cfg = distributed_config()
cfg.enabled, cfg.local_device_count, cfg.coordinator_port = True, 2, int(sys.argv[1])
maybe_initialize(cfg)
total = jax.jit(lambda x: x.sum())(jax.make_array_from_process_local_data(
    jax.sharding.NamedSharding(jax.make_mesh((4,), ("d",)), jax.sharding.PartitionSpec("d")),
    jax.numpy.full((2,), jax.process_index() + 1.0)))
print(json.dumps([jax.process_index(), jax.process_count(), jax.device_count(), float(total)]))
"""


def test_two_processes_join_from_a_fake_slurm_environment():
    """The SLURM path end to end: jax.distributed on localhost with only SLURM_* to go on."""
    from launch.local import free_port
    port = free_port()
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        env.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", SLURM_JOB_ID="77",
                   SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2", SLURM_PROCID=str(rank),
                   SLURM_LOCALID=str(rank))
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, str(port)], cwd=REPO,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = [proc.communicate(timeout=120) for proc in procs]
    for proc, (out, err) in zip(procs, outs):
        assert proc.returncode == 0, err[-2000:]
    # Each process gave 2 rows of (its index + 1) to a 4-device global array: 2*1 + 2*2 = 6.
    # (gloo prints its own lines to stdout first)
    assert [json.loads(out.splitlines()[-1]) for out, _ in outs] == [[0, 2, 4, 6.0],
                                                                     [1, 2, 4, 6.0]]
    assert "INFO [process 0/2] process 0 of 2 (slurm)" in outs[0][1]
    # After start-up only process 0 logs below WARNING (jax's own start-up lines come first).
    assert "process 1 of 2" not in outs[1][1]


def test_no_slurm_leaves_it_to_jax_and_partial_slurm_is_an_error():
    assert initialize_kwargs(distributed_config(), {"HOME": "/root"}) == ("auto", {})
    with pytest.raises(ConfigError, match="SLURM_NTASKS"):
        initialize_kwargs(distributed_config(), {"SLURM_JOB_ID": "1", "SLURM_PROCID": "0",
                                                 "SLURM_JOB_NODELIST": "n1"})


def test_process_log_filter_tags_records_and_quiets_other_processes():
    def record(level):
        return logging.LogRecord("x", level, __file__, 1, "step %d", (5,), None)
    zero, three = ProcessLogFilter(0, 4), ProcessLogFilter(3, 4)
    info = record(logging.INFO)
    assert zero.filter(info) and info.process_index == 0
    assert info.getMessage() == "[process 0/4] step 5"
    assert not three.filter(record(logging.INFO))
    warning = record(logging.WARNING)
    assert three.filter(warning) and warning.getMessage() == "[process 3/4] step 5"
    assert ProcessLogFilter(3, 4, all_processes=True).filter(record(logging.INFO))
