"""The training-memory estimator (launch/memory.py) against the model, the engine's shardings,
peft's adapter counts and XLA's memory_analysis() of the compiled step."""
import math

import jax
import pytest

from conftest import tiny_config
from core import cli
from core.engine import Engine
from launch import aot, memory
from lm.models import param_tree

VOCAB = "--config.model.vocab_size=512"


def shard_bytes(tree) -> int:
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
               for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("overrides", [
    ("--config.mesh.ici.fsdp=8", "--config.mesh.ici.data=1"),
    ("--config.mesh.ici.tensor=2", "--config.mesh.ici.data=2", "--config.mesh.ici.fsdp=2",
     "--config.optim.name=sgd"),
])
def test_parameter_and_optimizer_lines_equal_the_engines_shards(overrides):
    config = tiny_config(VOCAB, "--config.train.global_batch_size=32", *overrides)
    task = aot.make_task(config)
    result = memory.estimate(config, 8, task)
    assert result["parameters"] == param_tree.num_params(task.model_cfg)
    state = Engine(config, task, jax.devices()[:8]).abstract_state
    assert result["bytes"]["parameters"] == shard_bytes(state.params)
    scalars = sum(x.dtype.itemsize for x in jax.tree_util.tree_leaves(state.opt_state)
                  if x.shape == ())  # optax's step counts
    assert result["bytes"]["optimizer state"] == shard_bytes(state.opt_state) - scalars


# (devices, overrides): optimiser x remat x sharding x microbatches x LoRA, each a different mix.
CONFIGS = [
    (1, ("--config.model.num_layers=3",)),
    (8, ("--config.mesh.ici.fsdp=8", "--config.mesh.ici.data=1", "--config.model.remat=full",
         "--config.optim.name=sgd", "--config.train.global_batch_size=32")),
    (8, ("--config.mesh.ici.tensor=2", "--config.mesh.ici.data=4", "--config.model.remat=dots",
         "--config.train.microbatches=2", "--config.train.global_batch_size=32",
         "--config.data.seq_len=128", "--config.model.max_len=128")),
    (8, ("--config.mesh.ici.fsdp=4", "--config.mesh.ici.data=2", "--config.lora.rank=8",
         "--config.train.global_batch_size=32")),
]


@pytest.mark.parametrize("devices, overrides", CONFIGS)
def test_estimate_within_15_percent_of_memory_analysis(devices, overrides):
    config = tiny_config(VOCAB, f"--config.mesh.num_devices={devices}", *overrides)
    result = memory.estimate(config, devices)
    actual = memory.compiled(config, devices)
    assert result["peak_phase"] == "backward"
    assert 0.85 < result["total_bytes"] / actual["peak"] < 1.15, (result["bytes"], actual)


def test_lora_counts_equal_peft_and_the_base_is_weights_only():
    """The adapters (lm/models/lora.py: r x (in + out) per target kernel) as peft counts its
    trainable parameters on the same LLaMA shape (transformers' LlamaForCausalLM); the frozen
    base has no gradients or moments, at 4.126 bits per parameter in nf4."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    llama = ("--config.model.vocab_size=512", "--config.model.num_kv_heads=2",
             "--config.model.pos_emb=rope", "--config.model.norm=rmsnorm",
             "--config.model.mlp=swiglu", "--config.model.use_bias=false",
             "--config.model.tie_embeddings=false")
    cfg = aot.make_task(tiny_config(*llama)).model_cfg
    hf_config = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.resolved_num_kv_heads,
        intermediate_size=cfg.resolved_d_ff)
    for rank, targets, modules in [(8, "qv", ["q_proj", "v_proj"]), (4, "all-linear", [
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])]:
        model = peft.get_peft_model(transformers.LlamaForCausalLM(hf_config),
                                    peft.LoraConfig(r=rank, target_modules=modules))
        trained, total = model.get_nb_trainable_parameters()
        config = tiny_config(*llama, f"--config.lora.rank={rank}",
                             f"--config.lora.targets={targets}")
        result = memory.estimate(config, 1, base_format="nf4")
        assert (result["trainable_parameters"], result["parameters"]) == (trained,
                                                                          total - trained)
        lines = result["bytes"]
        assert lines["LoRA adapters"] == lines["gradients"] == 4 * trained
        assert lines["optimizer state"] == 8 * trained
        assert lines["frozen base weights"] == int(result["parameters"] * 4.126 / 8)


def test_rule_of_thumb_16_bytes_per_parameter():
    """fp32 AdamW: 4 (weights) + 4 (gradients) + 8 (two moments) bytes per parameter; bf16
    moments take 4 off, 8-bit moments 6."""
    config = tiny_config(VOCAB)
    task = aot.make_task(config)
    for moments, per_param in [("", 16), ("bfloat16", 12), ("int8", 10)]:
        lines = memory.estimate(config, 1, task, moment_dtype=moments)["bytes"]
        total = lines["parameters"] + lines["gradients"] + lines["optimizer state"]
        assert total == per_param * param_tree.num_params(task.model_cfg)


def test_a_step_that_does_not_fit_is_one_clear_line(capsys):
    code = cli.run(memory.main, ["--config", "experiments/configs/lm/gpt.py:size=gpt2_124m",
                                 "--topology", "v5e-8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "needs about" in err[0] and "GiB is usable" in err[0] and "remat" in err[0]


def test_a_base_format_without_lora_is_a_config_error(capsys):
    code = cli.run(memory.main, ["--config", "experiments/configs/lm/gpt.py:size=tiny",
                                 "--base-format", "nf4"])
    assert code == 2 and "a base format is for LoRA's frozen base" in capsys.readouterr().err
