"""Weight quantisation: codes and bytes against gguf and torchao, the dequantise-on-the-fly forward,
GGUF export read back by gguf.GGUFReader and by our importer, and the errors."""
import flax.linen as nn
import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

from core.config import ConfigError
from lm.data.bpe_tokenizer import ByteLevelBPE
from lm.decode import decoding
from lm.models import lora
from lm.models import transformer as model_lib
from lm.weights import gguf_export, import_gguf
from lm.weights import quantize as quant
from lm.weights.gguf import GGUFFile


def _weights(shape, seed=0):
    """Heavy-tailed like trained weights, with an all-zero block and exact .5 ties for rounding."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(5, size=shape) * 0.02).astype(np.float32)
    w[0, :32] = 0.0
    w[1, :32] = np.linspace(-127, 127, 32, dtype=np.float32) / 254 * 3  # q*id lands on k + .5
    return w


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0"])
def test_block_bytes_equal_the_gguf_quantiser(kind):
    w_OI = _weights((48, 256))
    ours = gguf_export.ggml_blocks(w_OI, kind)
    reference = gguf.quants.quantize(w_OI, gguf.GGMLQuantizationType[kind])
    np.testing.assert_array_equal(ours, reference.reshape(-1))
    # and our in-model dequantisation equals gguf's of the same bytes
    q = quant.quantize(w_OI.T, kind.lower(), out_axes=1)
    expected = gguf.quants.dequantize(reference, gguf.GGMLQuantizationType[kind])
    np.testing.assert_array_equal(np.asarray(quant.dequantize(q)).T, expected)


def test_nf4_double_quantisation_equals_torchao():
    w_OI = _weights((128, 512), seed=1)  # 1,024 blocks of 64: four blocks of 256 scales
    reference = to_nf4(torch.from_numpy(w_OI))
    q = quant.quantize(w_OI.T, "nf4_dq", out_axes=1)  # ours is (in, out): blocks along in
    packed = reference.quantized_data.numpy()  # two codes a byte, first in the high nibble
    codes = np.stack([packed >> 4, packed & 15], axis=-1).reshape(w_OI.shape)
    np.testing.assert_array_equal(np.asarray(q.codes).astype(np.uint8).T, codes)
    np.testing.assert_array_equal(np.asarray(q.scales).T.reshape(-1),
                                  reference.quantized_scalers.numpy())
    # factors and mean within float32 rounding: torch and NumPy sum the mean in other orders
    np.testing.assert_allclose(np.asarray(q.dq_factor), reference.quantization_factor.numpy(),
                               rtol=1e-6)
    np.testing.assert_allclose(float(q.dq_mean), float(reference.scaler_mean), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(quant.dequantize(q)).T,
                               reference.get_original_weight().numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(quant.NF4_CODEBOOK, reference.nf4.numpy())
    # bits per parameter: torchao's storage of the same tensor, counted the same way
    torchao_bits = (packed.size * 8 + reference.quantized_scalers.numel() * 8 +
                    reference.quantization_factor.numel() * 32 + 32) / w_OI.size
    ours = quant.bits_per_parameter({"w": q})["kernels"]
    assert ours == torchao_bits
    bits = {fmt: quant.bits_per_parameter({"w": quant.quantize(w_OI.T, fmt, 1)})["kernels"]
            for fmt in quant.FORMATS}
    print("bits per parameter,", w_OI.shape, "kernel:", {k: round(v, 4) for k, v in bits.items()})
    assert 4.12 < bits["nf4_dq"] < 4.13 and bits["nf4"] == 4.5 and bits["q8_0"] == 8.5


def test_int4_and_nf4_reconstruct_and_nf4_wins_on_normal_weights():
    w = np.random.default_rng(2).normal(size=(512, 64)).astype(np.float32)
    error = {fmt: float(np.sqrt(np.mean((np.asarray(quant.dequantize(
        quant.quantize(w, fmt, 1))) - w) ** 2))) for fmt in ("int8", "int4", "nf4", "nf4_dq")}
    assert error["int8"] < 0.01 < error["nf4"] < error["int4"] < 0.2
    assert error["nf4_dq"] < 1.01 * error["nf4"]


def _llama(**overrides):
    fields = dict(vocab_size=256, num_layers=2, d_model=64, num_heads=4, num_kv_heads=2,
                  max_len=64, scan_layers=True)
    return model_lib.preset("llama", **{**fields, **overrides})


# Every format's codes, scales and dequantisation are checked above; here each code dtype
# (int8, uint4, int4) and both layer layouts go through the jitted model.
@pytest.mark.parametrize("scan,formats", [(True, ("int8", "q4_0", "nf4_dq")), (False, ("int4",))])
def test_quantised_forward_equals_the_forward_on_dequantised_params(scan, formats):
    cfg = _llama(scan_layers=scan)
    model = model_lib.Transformer(cfg)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)))
    params = model.init(jax.random.key(0), tokens)["params"]
    forward = jax.jit(lambda p: model.apply({"params": p}, tokens))
    reference = forward(params)
    drift = {}
    for fmt in formats:
        qparams = quant.quantize_params(params, fmt)
        kernels = [x for x in jax.tree.leaves(qparams, is_leaf=lambda x: isinstance(
            x, quant.QuantizedKernel)) if isinstance(x, quant.QuantizedKernel)]
        assert len(kernels) == 7 * (1 if scan else cfg.num_layers)
        assert all(k.codes.dtype in (jnp.int8, jnp.int4, jnp.uint4) for k in kernels)
        logits = forward(qparams)  # the jitted forward takes the quantised tree
        np.testing.assert_allclose(logits, forward(quant.dequantize_params(qparams)),
                                   rtol=1e-5, atol=1e-6, err_msg=fmt)
        drift[fmt] = float(jnp.sqrt(jnp.mean((logits - reference) ** 2) /
                                    jnp.mean((reference - reference.mean()) ** 2)))
    print("relative logit drift:", drift)
    assert all(d > 0 for d in drift.values())
    if scan:
        assert drift["int8"] < min(drift["q4_0"], drift["nf4_dq"])


def test_greedy_decoding_with_the_kv_cache_runs_on_the_quantised_tree():
    cfg = _llama()
    model = model_lib.Transformer(cfg)
    params = model.init(jax.random.key(3), jnp.zeros((1, 8), jnp.int32))["params"]
    qparams = quant.quantize_params(params, "nf4_dq")
    sampling = decoding.SamplingConfig(max_new_tokens=4)
    prompts = [[5, 17, 42, 9], [7, 3]]
    assert decoding.generate(model, qparams, prompts, sampling) == decoding.generate(
        model, quant.dequantize_params(qparams), prompts, sampling)


def test_qlora_is_lora_on_the_nf4_base_with_gradients_to_the_adapters_only():
    cfg = _llama(num_layers=1, scan_layers=False)
    model = lora.LoraModel(model_lib.Transformer(cfg))
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, 256, (2, 12)))
    boxed = model.init(jax.random.key(4), tokens)["params"]
    config = lora.LoraConfig(rank=4, targets="qv")
    adapters = nn.meta.unbox(lora.init_adapters(jax.random.key(5), boxed, config))
    adapters = jax.tree.map(lambda x: x + 0.01, adapters)  # B != 0: the adapters matter
    base = quant.quantize_params(boxed, "nf4_dq")

    def loss(adapters, base):
        logits = model.apply({"params": lora.LoraParams(base, adapters, config)}, tokens)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    value, grads = jax.jit(jax.value_and_grad(loss))(adapters, base)
    ref_value, ref_grads = jax.jit(jax.value_and_grad(loss))(adapters,
                                                             quant.dequantize_params(base))
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-7), grads,
                 ref_grads)
    assert jax.tree.structure(grads) == jax.tree.structure(adapters)


@pytest.fixture(scope="module")
def smollm2_tokenizer_keys():
    path = import_gguf.pretrained_path("smollm2-135m-instruct")
    return gguf_export.tokenizer_metadata(GGUFFile(path).metadata)


def test_gguf_export_reads_back_in_gguf_and_our_importer(smollm2_tokenizer_keys, tmp_path):
    keys = smollm2_tokenizer_keys
    cfg = _llama(vocab_size=len(keys["tokenizer.ggml.tokens"]), d_model=64, max_len=128,
                 rope_base=100000.0)
    tokens = jnp.asarray([[1, 504, 3458, 314, 260, 3575, 282, 4649, 47]])
    params = nn.meta.unbox(model_lib.Transformer(cfg).init(jax.random.key(1), tokens)["params"])
    params = jax.tree.map(lambda x: x * 4, params)  # trained-size weights, not init's tiny ones
    forward = jax.jit(lambda p: model_lib.Transformer(cfg).apply({"params": p}, tokens))
    for file_type in ("q8_0", "q4_0"):
        path = gguf_export.export_gguf(tmp_path / f"{file_type}.gguf", params, cfg, keys,
                                       file_type)
        by_name = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
        up = by_name["blk.1.ffn_up.weight"]
        assert up.tensor_type == gguf.GGMLQuantizationType[file_type.upper()]
        w_up = np.asarray(params["layers"]["mlp"]["w_up"][1])
        np.testing.assert_array_equal(np.asarray(up.data).reshape(-1), gguf.quants.quantize(
            np.ascontiguousarray(w_up.T), up.tensor_type).reshape(-1))
        assert by_name["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F32

        loaded_cfg, loaded, tokenizer = import_gguf.load_gguf(path, scan_layers=True)
        for field in ("num_layers", "d_model", "num_heads", "resolved_num_kv_heads",
                      "resolved_d_ff", "resolved_head_dim", "rope_base", "norm_eps",
                      "tie_embeddings", "vocab_size"):
            # GGUF keeps float32 (norm_eps 1e-5 comes back as float32(1e-5))
            assert np.float32(getattr(loaded_cfg, field)) == np.float32(getattr(cfg, field)), field
        expected = forward(quant.dequantize_params(quant.quantize_params(params, file_type)))
        np.testing.assert_allclose(forward(loaded), expected, rtol=1e-5, atol=1e-5)
    text = ["What is the capital of France? 1234"]
    assert tokenizer.encode(text) == ByteLevelBPE.from_gguf_metadata(keys).encode(text)
    assert tokenizer.chat_template == keys["tokenizer.chat_template"]


def test_bad_input_is_a_one_line_error():
    with pytest.raises(ConfigError, match="not a multiple of nf4's block of 64"):
        quant.quantize(np.zeros((96, 8), np.float32), "nf4", 1, name="mlp/w_down")
    with pytest.raises(ConfigError, match="unknown quantisation format 'int3'"):
        quant.quantize_params({"mlp": {"w_up": np.zeros((64, 8))}}, "int3")
    with pytest.raises(ConfigError, match="token_embed matches the kernels regex"):
        quant.quantize_params({"token_embed": np.zeros((64, 8))}, "int8", kernels="embed")
    with pytest.raises(ConfigError, match="LLaMA-shaped"):
        gguf_export.llama_tensors({}, model_lib.preset("gpt2", vocab_size=256))


def test_the_benchmark_measures_divergence_from_the_float_model(tmp_path):
    """benchmarks/quantised_perplexity.py on a tiny trained run: the KL from fp32 and top-1
    agreement follow the formats' precision (int8 far closer than 4-bit)."""
    from benchmarks import quantised_perplexity
    from conftest import train_tiny
    train_tiny(tmp_path, "--config.train.steps=3", "--config.train.checkpoint_every=3")
    results = quantised_perplexity.perplexities(str(tmp_path), 1, ("int8", "int4"))["results"]
    int8, int4 = results["int8"], results["int4"]
    assert 0 < int8["kl_nats_per_token"] < 0.1 * int4["kl_nats_per_token"]
    assert int4["top1_agreement"] <= int8["top1_agreement"] <= 1.0
    assert abs(int8["perplexity"] / results["fp32"]["perplexity"] - 1) < 1e-3
