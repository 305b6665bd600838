"""Real pretrained weights: GGUF dequantisation, LLaMA import, Hugging Face export, SmolLM2."""
import gguf
import jax
import numpy as np
import pytest

from lm.decode import decoding
from lm.weights import import_gguf
from lm.models import transformer as model_lib
from lm.weights.gguf import GGML_TYPES, GGUFError, GGUFFile, dequantize


@pytest.fixture(scope="module")
def smollm2():
    path = import_gguf.pretrained_path("smollm2-135m-instruct")
    cfg, params, tokenizer = import_gguf.load_gguf(path)
    return path, cfg, params, tokenizer


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0", "F16", "F32", "BF16"])
def test_dequantisation_equals_the_gguf_package(kind):
    values = np.random.default_rng(0).normal(size=(8, 64)).astype(np.float32)
    qtype = gguf.GGMLQuantizationType[kind]
    raw = gguf.quants.quantize(values, qtype)
    ours = dequantize(raw.reshape(-1).view(np.uint8), int(qtype)).reshape(values.shape)
    np.testing.assert_array_equal(ours, gguf.quants.dequantize(raw, qtype))
    if kind.startswith("Q"):  # and it is a real reconstruction, not garbage that matches garbage
        assert np.abs(ours - values).max() < 0.25 * np.abs(values).max()


def test_every_smollm2_tensor_equals_the_gguf_package(smollm2):
    path = smollm2[0]
    ours, reference = GGUFFile(path), gguf.GGUFReader(str(path))
    kinds = set()
    for tensor in reference.tensors:
        expected = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        np.testing.assert_array_equal(ours.tensor(tensor.name), expected, err_msg=tensor.name)
        kinds.add(GGML_TYPES[int(tensor.tensor_type)][0])
    assert {"Q4_1", "Q8_0", "F32"} <= kinds


def test_rope_row_permutation_inverts_llama_cpp():
    heads, head_dim, d = 3, 8, 5
    w_hf = np.arange(heads * head_dim * d, dtype=np.float32).reshape(heads * head_dim, d)
    # llama.cpp convert_hf_to_gguf.py: w.reshape(n, 2, H/2, ...).swapaxes(1, 2).reshape(w.shape)
    w_gguf = w_hf.reshape(heads, 2, head_dim // 2, d).swapaxes(1, 2).reshape(w_hf.shape)
    np.testing.assert_array_equal(import_gguf.unpermute_rope_rows(w_gguf, heads), w_hf)


def test_truncated_or_foreign_files_are_clear_errors(smollm2, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(smollm2[0].read_bytes()[:5_000_000])
    with pytest.raises(GGUFError, match="truncated"):
        GGUFFile(cut)
    other = tmp_path / "other.gguf"
    other.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(GGUFError, match="not a GGUF file"):
        GGUFFile(other)


def test_smollm2_answers_paris_in_chatml(smollm2):
    _, cfg, params, tokenizer = smollm2
    assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}])
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    ids = tokenizer.encode([prompt])[0]
    sampling = decoding.SamplingConfig(max_new_tokens=24, stop_ids=(tokenizer.eos_id,),
                                       pad_id=tokenizer.pad_id)
    answer = tokenizer.decode(decoding.generate(model_lib.Transformer(cfg), params, [ids],
                                                sampling)[0])
    assert "Paris" in answer, answer


def test_hf_export_round_trips(smollm2, tmp_path):
    from lm.weights import hf_checkpoint
    _, cfg, params, tokenizer = smollm2
    hf_checkpoint.save_pretrained(tmp_path, params, cfg, tokenizer)
    cfg2, params2 = hf_checkpoint.load_pretrained(tmp_path)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    from lm.data.bpe_tokenizer import ByteLevelBPE
    reloaded = ByteLevelBPE.from_tokenizer_json(tmp_path / "tokenizer.json")
    text = "It is a truth universally acknowledged, 1812."
    assert reloaded.encode([text]) == tokenizer.encode([text])
    assert reloaded.eos_id == tokenizer.eos_id


def test_logits_match_transformers_on_real_text(smollm2, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from lm.data import corpora
    from lm.weights import hf_checkpoint
    _, cfg, params, tokenizer = smollm2
    hf_checkpoint.save_pretrained(tmp_path, params, cfg, tokenizer)
    reference = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path, torch_dtype=torch.float32, attn_implementation="eager").eval()
    # A few hundred tokens of real text: the opening of Pride and Prejudice.
    novels = corpora.austen_novels()
    text = next(t for title, t in novels.items() if "pride" in title.lower())
    start = text.index("It is a truth")
    ids = tokenizer.encode([text[start:start + 2000]])[0][:300]
    assert len(ids) == 300
    ours = np.asarray(model_lib.Transformer(cfg).apply({"params": params}, np.array([ids]))[0])
    with torch.no_grad():
        theirs = reference(torch.tensor([ids])).logits[0].numpy()
    print(f"max |logit difference| over {len(ids)} tokens: {np.abs(ours - theirs).max():.2e}")
    assert np.abs(ours - theirs).max() < 1e-3
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() == 1.0


def test_chat_command_streams_the_answer(smollm2):
    import subprocess
    import sys

    from conftest import REPO
    done = subprocess.run([sys.executable, "-m", "lm.decode.chat", "--prompt",
                           "What is the capital of France?", "--max-new-tokens", "24"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Paris" in done.stdout and "<|im_end|>" not in done.stdout


def test_chat_merges_a_peft_adapter_into_smollm2(smollm2, tmp_path):
    """`lm.decode.chat --adapter DIR`: the merged model computes what base + adapter compute."""
    import flax.linen as nn
    import jax.numpy as jnp

    from lm.decode import chat
    from lm.models import lora
    from lm.weights import peft_adapter
    path, cfg, params, _ = smollm2
    lora_cfg = lora.LoraConfig(rank=2, alpha=4, targets="qv")
    adapters = jax.tree_util.tree_map(  # B random too, so the adapter changes the logits
        lambda x: np.asarray(jax.random.normal(jax.random.key(x.size), x.shape)) * 0.01,
        nn.unbox(lora.init_adapters(jax.random.key(0), params, lora_cfg)))
    peft_adapter.export_adapter(tmp_path, adapters, lora_cfg, cfg)
    _, merged, _ = chat.load(str(path), str(tmp_path))
    tokens = jnp.arange(1, 17)[None]
    model = model_lib.Transformer(cfg)
    adapted = lora.LoraModel(model).apply(
        {"params": lora.LoraParams(params, adapters, lora_cfg)}, tokens)
    np.testing.assert_allclose(model.apply({"params": merged}, tokens), adapted, atol=2e-4)
    assert np.abs(adapted - model.apply({"params": params}, tokens)).max() > 1e-2


def test_gpt2_checkpoints_load_and_export_against_transformers(tmp_path):
    """A randomly initialised GPT2LMHeadModel (transformers' own code and naming) read by us,
    and our GPT-2-style model written for transformers: the logits agree both ways."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from lm.weights import hf_checkpoint
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=96, n_positions=32, n_embd=48, n_layer=2, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    reference = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a swapped name cannot hide
        for name, p in reference.named_parameters():
            if "ln" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    reference.save_pretrained(tmp_path / "theirs")
    ids = np.random.default_rng(0).integers(0, 96, (2, 20))
    with torch.no_grad():
        expected = reference(torch.tensor(ids)).logits.numpy()
    cfg, params = hf_checkpoint.load_pretrained(tmp_path / "theirs")
    ours = np.asarray(model_lib.Transformer(cfg).apply({"params": params}, ids))
    assert np.abs(ours - expected).max() < 1e-4
    # And back: our parameters exported, read by transformers.
    hf_checkpoint.save_pretrained(tmp_path / "ours", params, cfg)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert np.abs(again(torch.tensor(ids)).logits.numpy() - expected).max() < 1e-4
