"""LoRA against PEFT (counts, logits unmerged and merged, adapter files both ways) and on the
engine (frozen base, adapters only in the optimiser and checkpoints, resumption, a 2x2x2 mesh)."""
import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import QUIET, REPO, TINY, train_losses
from core import trainer
from core.checkpoint import CheckpointMismatchError, Checkpointer
from core.config import ConfigError, load_config
from core.engine import Engine, restore_state
from lm import commands, pipeline
from lm.models import lora, transformer as model_lib
from lm.weights import hf_checkpoint, hf_llama, peft_adapter

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ALL_SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# SmolLM2-135M's shapes (its GGUF metadata; lm/weights/import_gguf.py reads the same numbers).
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, head_dim=64,
               tie_word_embeddings=True, max_position_embeddings=2048, rms_norm_eps=1e-5)


def _peft_trainable(hf_kwargs: dict, **lora_kwargs) -> int:
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_kwargs))
    model = peft.get_peft_model(model, peft.LoraConfig(**lora_kwargs))
    return model.get_nb_trainable_parameters()[0]


def _our_trainable(hf_kwargs: dict, cfg: lora.LoraConfig) -> int:
    model_cfg = hf_llama.config_from_hf({**hf_kwargs, "model_type": "llama"}, scan_layers=True)
    model = model_lib.Transformer(model_cfg)
    base = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    adapters = jax.eval_shape(lambda: lora.init_adapters(jax.random.key(1), base["params"], cfg))
    return lora.count(adapters)


@pytest.mark.parametrize("rank,ours,theirs", [
    (8, "qv", ["q_proj", "v_proj"]), (8, "all-linear", "all-linear"), (16, "all-linear", ALL_SEVEN)])
def test_trainable_counts_equal_peft_on_smollm2_shapes(rank, ours, theirs):
    expected = _peft_trainable(SMOLLM2, r=rank, target_modules=theirs)
    assert _our_trainable(SMOLLM2, lora.LoraConfig(rank=rank, targets=ours)) == expected


TINY_HF = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=8,
               max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False)


def _tiny_pair(scan: bool):
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_HF)).eval()
    cfg = hf_llama.config_from_hf(hf.config.to_dict(), scan_layers=scan)
    tensors = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    return hf, cfg, hf_llama.from_hf_tensors(tensors, cfg)


def _torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


@pytest.mark.parametrize("scan,rslora", [(True, False), (False, True)])
def test_logits_equal_peft_unmerged_and_merged_and_adapters_travel_both_ways(tmp_path, scan,
                                                                             rslora):
    hf, cfg, base = _tiny_pair(scan)
    tokens = np.random.default_rng(0).integers(0, 96, (2, 11))
    # init_lora_weights=False: A and B both random, so every adapter changes the output.
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=ALL_SEVEN, init_lora_weights=False,
        use_rslora=rslora)).eval()
    peft_model.save_pretrained(tmp_path / "from_peft")
    adapters, lora_cfg = peft_adapter.import_adapter(tmp_path / "from_peft", cfg)
    assert lora_cfg.scale == pytest.approx(8 / (2 if rslora else 4))
    params = lora.LoraParams(base, adapters, lora_cfg)
    model = model_lib.Transformer(cfg)
    ours = np.asarray(lora.LoraModel(model).apply({"params": params}, jnp.asarray(tokens)))
    np.testing.assert_allclose(ours, _torch_logits(peft_model, tokens), atol=1e-5)

    # Our export loads into PEFT on a fresh copy of the base and gives the same logits.
    peft_adapter.export_adapter(tmp_path / "ours", adapters, lora_cfg, cfg)
    fresh, _, _ = _tiny_pair(scan)
    reloaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "ours").eval()
    np.testing.assert_allclose(_torch_logits(reloaded, tokens), ours, atol=1e-5)

    merged = params.merged()
    merged_logits = np.asarray(model.apply({"params": merged}, jnp.asarray(tokens)))
    np.testing.assert_allclose(merged_logits, _torch_logits(peft_model.merge_and_unload(), tokens),
                               atol=1e-5)
    # ... and the merged model exports as a Hugging Face checkpoint transformers reads.
    hf_checkpoint.save_pretrained(tmp_path / "merged", merged, cfg)
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    np.testing.assert_allclose(_torch_logits(exported, tokens), merged_logits, atol=1e-5)


def test_zero_b_is_the_base_and_a_is_initialised_as_peft_does():
    _, cfg, base = _tiny_pair(scan=True)
    boxed = model_lib.Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    lora_cfg = lora.LoraConfig(rank=4, targets="attention")
    adapters = nn.unbox(lora.init_adapters(jax.random.key(1), boxed["params"], lora_cfg))
    tokens = jnp.arange(16).reshape(2, 8)
    model = model_lib.Transformer(cfg)
    assert np.array_equal(
        lora.LoraModel(model).apply({"params": lora.LoraParams(base, adapters, lora_cfg)}, tokens),
        model.apply({"params": base}, tokens))
    # PEFT: kaiming_uniform_(a=sqrt(5)) on A's (r, fan_in) weight: U(-1/sqrt(fan_in), +).
    a_q, a_o = adapters["layers"]["attn"]["w_q"]["a"], adapters["layers"]["attn"]["w_o"]["a"]
    assert a_q.shape == (2, 32, 4) and a_o.shape == (2, 4, 8, 4)
    for a, fan_in in ((a_q, 32), (a_o, 32)):
        bound = 1 / np.sqrt(fan_in)
        assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound
    assert all(not np.any(v["b"]) for v in adapters["layers"]["attn"].values())


def test_a_thousand_merge_unmerge_cycles_drift_below_1e_6():
    _, cfg, base = _tiny_pair(scan=True)
    lora_cfg = lora.LoraConfig(rank=4)
    adapters = nn.unbox(lora.init_adapters(jax.random.key(1), jax.eval_shape(lambda: base),
                                           lora_cfg))
    adapters = jax.tree_util.tree_map(
        lambda x: x + 0.1 * jax.random.normal(jax.random.key(2), x.shape), adapters)

    @jax.jit
    def cycles(params):
        return jax.lax.fori_loop(0, 1000, lambda _, p: lora.unmerge(
            lora.merge(p, adapters, lora_cfg), adapters, lora_cfg), params)
    drift = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                zip(jax.tree_util.tree_leaves(cycles(base)), jax.tree_util.tree_leaves(base)))
    assert drift < 1e-6


LORA = ["--config.lora.rank=4", "--config.lora.alpha=8", "--config.optim.learning_rate=3e-2",
        "--config.optim.decay_steps=4"]  # one schedule whether a run stops at 2 or 4
STEPS = ["--config.train.checkpoint_every=2", "--config.train.eval_every=0"]


def _config(*overrides: str):
    """The tests' tiny config in LLaMA style (what PEFT's adapter files describe)."""
    return load_config(str(REPO / TINY.split(":")[0]) + ":" + TINY.split(":")[1] + ",style=llama",
                       [*QUIET, *STEPS, *LORA, *overrides])


def _train(workdir, *overrides: str) -> dict:
    config = _config(*overrides)
    setup = pipeline.build(config, workdir)
    return trainer.train(config, workdir, setup.task, setup.data)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A tiny LoRA run of 4 steps and the same run stopped at 2 and resumed to 4."""
    root = tmp_path_factory.mktemp("lora")
    _train(root / "straight", "--config.train.steps=4")
    _train(root / "resumed", "--config.train.steps=2")
    _train(root / "resumed", "--config.train.steps=4")
    return root


def _state(workdir):
    config = _config("--config.train.steps=4")
    task = pipeline.build(config, workdir, need_train=False).task
    return restore_state(config, task, workdir)


def test_only_adapters_train_and_the_base_is_untouched(lora_run):
    engine, state, step = _state(lora_run / "straight")
    assert step == 4
    fresh = engine.init_state()
    for a, b in zip(jax.tree_util.tree_leaves(state.frozen), jax.tree_util.tree_leaves(fresh.frozen)):
        assert np.array_equal(np.asarray(a), np.asarray(b))  # bit for bit
    # The optimiser holds moments of the adapters only.
    mu = jax.tree_util.tree_leaves(state.opt_state[1][0].mu)
    assert sum(x.size for x in mu) == lora.count(state.params) < 0.2 * sum(
        x.size for x in jax.tree_util.tree_leaves(state.frozen))
    # Every B moved away from zero (the adapters trained), and the checkpoint holds no base.
    assert all(np.any(np.asarray(leaf)) for path, leaf in
               jax.tree_util.tree_leaves_with_path(state.params) if "'b'" in jax.tree_util.keystr(path))
    checkpoints = Checkpointer(lora_run / "straight" / "checkpoints", async_save=False)
    saved = checkpoints._saved_shapes(4)
    assert not any("frozen" in name for name in saved) and any("params" in n for n in saved)
    assert checkpoints.restore_meta(4)["frozen"]["base"] == "initialised from train.seed"
    losses = train_losses(lora_run / "straight")
    assert losses[4] < losses[1]


def test_resume_is_bitwise_and_another_base_is_refused(lora_run, monkeypatch):
    (_, straight, _), (engine, resumed, _) = _state(lora_run / "straight"), _state(lora_run / "resumed")
    for a, b in zip(jax.tree_util.tree_leaves(straight.params), jax.tree_util.tree_leaves(resumed.params)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert train_losses(lora_run / "straight") == train_losses(lora_run / "resumed")
    monkeypatch.setattr(type(engine.task.inner), "base_source", "another model", raising=False)
    with pytest.raises(CheckpointMismatchError, match="another model"):
        _state(lora_run / "straight")


def test_export_writes_a_peft_adapter_and_a_merged_model_that_agree(lora_run, tmp_path):
    engine, state, _ = _state(lora_run / "straight")
    config = _config("--config.train.steps=4")
    written = commands.export(config, argparse.Namespace(workdir=str(lora_run / "straight"),
                                                         out=str(tmp_path / "out")))
    hf_checkpoint.save_pretrained(tmp_path / "base", jax.device_get(state.frozen),
                                  engine.task.model_cfg)
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    adapted = peft.PeftModel.from_pretrained(base, written["adapter"]).eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(written["model"]).eval()
    tokens = np.random.default_rng(1).integers(0, engine.task.model_cfg.vocab_size, (2, 16))
    ours = np.asarray(engine.task.model.apply({"params": engine.loss_params(state)},
                                              jnp.asarray(tokens)))
    np.testing.assert_allclose(_torch_logits(adapted, tokens), ours, atol=1e-4)
    np.testing.assert_allclose(_torch_logits(merged, tokens), ours, atol=1e-4)


def test_a_2x2x2_mesh_trains_the_same_adapters(lora_run, tmp_path):
    mesh = ["--config.mesh.ici.data=2", "--config.mesh.ici.fsdp=2", "--config.mesh.ici.tensor=2"]
    _train(tmp_path, "--config.train.steps=4", *mesh)
    one, sharded = train_losses(lora_run / "straight"), train_losses(tmp_path)
    np.testing.assert_allclose([sharded[s] for s in range(1, 5)], [one[s] for s in range(1, 5)],
                               rtol=2e-5)
    config = _config("--config.train.steps=4", *mesh)
    engine = Engine(config, pipeline.build(config, tmp_path, need_train=False).task)
    specs = {str(leaf.sharding.spec) for leaf in jax.tree_util.tree_leaves(engine.init_state().frozen)}
    assert any("tensor" in s for s in specs) and any("fsdp" in s for s in specs)


@pytest.mark.parametrize("override,message", [
    ("--config.lora.targets=mlp/w_nothing", "matches no parameter"),
    ("--config.lora.targets=(unclosed", "neither a preset"),
    ("--config.lora.alpha=0", "lora.alpha"),
])
def test_bad_lora_settings_are_one_line_errors(override, message, tmp_path):
    config = _config(override)
    with pytest.raises(ConfigError, match=message):
        pipeline.check_config(config)
        Engine(config, pipeline.build(config, tmp_path, need_train=False).task)


def test_lora_on_a_task_that_cannot_take_it_is_refused():
    config = _config()
    config.task = "masked_lm"
    with pytest.raises(ConfigError, match="does not train through LoRA"):
        pipeline.check_config(config)


def test_qlora_stores_an_nf4_base_trains_resumes_bitwise_and_shards(lora_run, tmp_path):
    """QLoRA: the frozen base in NF4 with double quantisation (the codes quantize_params gives),
    adapters trained over it; stop-and-resume is bitwise; a 2x2x2 mesh gives the same losses."""
    from lm.weights import quantize
    qlora = ["--config.lora.base_format=nf4_dq"]
    _train(tmp_path / "straight", "--config.train.steps=4", *qlora)
    _train(tmp_path / "resumed", "--config.train.steps=2", *qlora)
    _train(tmp_path / "resumed", "--config.train.steps=4", *qlora)
    _train(tmp_path / "mesh", "--config.train.steps=4", *qlora, "--config.mesh.ici.data=2",
           "--config.mesh.ici.fsdp=2", "--config.mesh.ici.tensor=2")
    config = _config("--config.train.steps=4", *qlora)
    task = pipeline.build(config, tmp_path / "straight", need_train=False).task
    engine, straight, _ = restore_state(config, task, tmp_path / "straight")
    _, resumed, _ = restore_state(config, task, tmp_path / "resumed")
    for a, b in zip(jax.tree_util.tree_leaves(straight.params),
                    jax.tree_util.tree_leaves(resumed.params)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    losses = train_losses(tmp_path / "straight")
    mesh = train_losses(tmp_path / "mesh")
    np.testing.assert_allclose([mesh[s] for s in range(1, 5)], [losses[s] for s in range(1, 5)],
                               rtol=2e-5)
    assert losses[4] < losses[1]
    w_up = straight.frozen["layers"]["mlp"]["w_up"]
    assert isinstance(w_up, quantize.QuantizedKernel) and w_up.fmt == "nf4_dq"
    # The codes are quantize_params' of the float base this seed makes.
    _, float_state, _ = _state(lora_run / "straight")
    expected = quantize.quantize_params(jax.device_get(float_state.frozen), "nf4_dq")
    for a, b in zip(jax.tree_util.tree_leaves(straight.frozen), jax.tree_util.tree_leaves(expected)):
        assert np.array_equal(np.asarray(a).astype(np.float32), np.asarray(b).astype(np.float32))
    # The merged model (what scoring decodes and export writes) is float: W dequantised + s A B.
    merged = engine.loss_params(straight).merged()
    assert not any(isinstance(x, quantize.QuantizedKernel) for x in jax.tree_util.tree_leaves(
        merged, is_leaf=lambda x: isinstance(x, quantize.QuantizedKernel)))
    w_up_merged = quantize.dequantize(w_up, jnp.float32) + jax.vmap(lora.delta)(
        *(straight.params["layers"]["mlp"]["w_up"][k] for k in ("a", "b"))) * 2.0
    np.testing.assert_allclose(merged["layers"]["mlp"]["w_up"], w_up_merged, rtol=1e-5,
                               atol=1e-6)
    # On the engine the 4-bit codes are held one per byte (quantize_traced says why).
    assert quantize.bits_per_parameter(expected)["kernels"] < 4.2


def test_the_finetune_cost_benchmark_compares_full_lora_and_qlora(tmp_path):
    """benchmarks/finetune_cost.py on a tiny SFT config: LoRA trains a sliver of the parameters
    with a fraction of the optimiser state, and QLoRA's base takes less than LoRA's."""
    from benchmarks import finetune_cost
    from conftest import tiny_chat_files
    tokenizer, chats = tiny_chat_files(tmp_path)
    result = finetune_cost.main([
        "--args", f"model=,size=tiny,tokenizer={tokenizer},dataset=files:{chats},batch=8,"
        "seq_len=128", "--set", "sft.val_fraction=0.2", "--rounds", "1", "--steps", "1"])["results"]
    full, adapters, quantised = result["full"], result["lora"], result["qlora"]
    assert full["frozen_bytes"] == 0 and adapters["trained_parameters"] == quantised[
        "trained_parameters"] < 0.2 * full["trained_parameters"]
    assert adapters["optimizer_bytes"] < 0.2 * full["optimizer_bytes"]
    # (The tiny model is mostly embedding tables, which stay float.)
    assert quantised["frozen_bytes"] < 0.6 * adapters["frozen_bytes"]
    assert all(r["step_seconds"] > 0 and r["xla_step_gib"] > 0 for r in result.values())


def test_qlora_over_pretrained_weights_quantises_them_as_the_engine_holds_them(tmp_path):
    """A task with pretrained weights (SFT of SmolLM2) gives its base through pretrained_frozen:
    it must come out in the layout of a base made from the seed (4-bit codes as bytes), and its
    codes must be quantize_params' of those weights."""
    from lm.weights import quantize
    config = _config("--config.train.steps=4", "--config.lora.base_format=nf4_dq")
    task = pipeline.build(config, tmp_path, need_train=False).task
    rng = np.random.default_rng(0)
    weights = jax.tree.map(lambda x: rng.normal(0, 0.02, x.shape).astype(x.dtype),
                           nn.unbox(jax.eval_shape(task.inner.init_params,
                                                        jax.random.key(0))))
    task.inner.pretrained_params = lambda: weights  # as SFTTask gives an imported model's
    state = Engine(config, task).init_state()
    expected = quantize.quantize_params(weights, "nf4_dq")
    for a, b in zip(jax.tree_util.tree_leaves(state.frozen), jax.tree_util.tree_leaves(expected)):
        assert np.array_equal(np.asarray(a).astype(np.float32), np.asarray(b).astype(np.float32))
    codes = state.frozen["layers"]["mlp"]["w_up"].codes
    assert codes.dtype == np.uint8
