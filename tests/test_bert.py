"""The encoder shape of the transformer: bidirectional attention, BERT import, sentence embeddings."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.weights import embed as embed_lib
from lm.weights import hf_bert, hf_checkpoint
from lm.models import attention
from lm.models import param_tree
from lm.models import transformer as model_lib

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome, and the cinema was nearly empty on a Tuesday afternoon.",
    "Quantum chromodynamics describes the strong interaction between quarks and gluons.",
    "ok",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife; however little known the feelings or views of such a man may be.",
]


@pytest.fixture(scope="module")
def minilm():
    return embed_lib.load_sentence_encoder("all-minilm-l6-v2")


def test_minilm_cosine_is_the_published_0_755(minilm):
    a, b = embed_lib.embed(minilm, SENTENCES[:2])
    assert round(float(a @ b), 3) == 0.755
    np.testing.assert_allclose([np.linalg.norm(a), np.linalg.norm(b)], 1.0, atol=1e-6)


def test_minilm_embeddings_match_transformers_bert(minilm):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    directory = embed_lib.model_dir("all-minilm-l6-v2")
    reference = transformers.BertModel.from_pretrained(directory, torch_dtype=torch.float32).eval()
    batch = minilm.tokenizer.encode_batch(SENTENCES)
    expected = []
    with torch.inference_mode():
        for encoding in batch:  # one at a time: no padding on the reference side
            ids = torch.tensor([encoding.ids])
            hidden = reference(input_ids=ids, token_type_ids=torch.tensor([encoding.type_ids]),
                               attention_mask=torch.ones_like(ids)).last_hidden_state[0]
            mean = hidden.mean(0)
            expected.append((mean / mean.norm()).numpy())
    ours = embed_lib.embed(minilm, SENTENCES, batch_size=4)  # padded, length-sorted batches
    assert np.abs(ours - np.stack(expected)).max() < 1e-4


def test_embeddings_do_not_depend_on_batch_company(minilm):
    alone = embed_lib.embed(minilm, SENTENCES[4:5])
    together = embed_lib.embed(minilm, SENTENCES)[4:5]  # padded next to the longest sentence
    np.testing.assert_allclose(alone, together, atol=1e-5)


def test_encoder_sees_both_ways_and_decoder_only_back():
    for causal in (False, True):
        cfg = model_lib.preset("tiny-gpt2", causal=causal, scan_layers=False)
        model = model_lib.Transformer(cfg)
        tokens = jnp.array([[5, 6, 7, 8]])
        params = model.init(jax.random.key(0), tokens)["params"]
        changed = tokens.at[0, -1].set(9)
        first = lambda t: model.apply({"params": params}, t, return_hidden=True)[0, 0]
        moved = float(jnp.abs(first(tokens) - first(changed)).max())
        assert (moved > 1e-4) if not causal else (moved == 0.0)


def test_bidirectional_mask_keeps_segments_apart():
    mask = attention.attention_mask(jnp.array([[1, 1, 2, 0]]), 4, causal=False)[0]
    expected = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], bool)
    np.testing.assert_array_equal(mask, expected)


def test_encoders_refuse_the_kv_cache():
    cfg = model_lib.preset("tiny-gpt2", causal=False)
    with pytest.raises(ValueError, match="causal"):
        model_lib.Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32), decode=True)


def test_bert_reader_errors_are_clear(tmp_path):
    hf = json.loads((embed_lib.model_dir("all-minilm-l6-v2") / "config.json").read_text())
    with pytest.raises(ValueError, match="hidden_act"):
        hf_bert.config_from_hf({**hf, "hidden_act": "relu"})
    with pytest.raises(ValueError, match="model_type"):
        hf_bert.config_from_hf({**hf, "model_type": "roberta"})
    cfg = hf_bert.config_from_hf(hf)
    with pytest.raises(KeyError, match="missing"):
        hf_bert.from_hf_tensors({}, cfg)
    with pytest.raises(FileNotFoundError, match="neither a packaged encoder"):
        embed_lib.model_dir(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        hf_checkpoint.load_pretrained(tmp_path)


def test_embed_command_prints_the_cosine_table(capsys, tmp_path):
    out = tmp_path / "e.npy"
    vectors = embed_lib.main([*SENTENCES[:2], "--out", str(out)])
    assert np.load(out).shape == (2, 384)
    printed = capsys.readouterr().out
    assert f"{float(vectors[0] @ vectors[1]):6.3f}" in printed


def test_albert_shared_layers_equal_identical_unshared_layers():
    shared_cfg = model_lib.preset("tiny-bert", num_layers=3, share_layers=True)
    plain_cfg = model_lib.preset("tiny-bert", num_layers=3, scan_layers=False)
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 256)
    shared = model_lib.Transformer(shared_cfg).init(jax.random.key(0), tokens)["params"]
    plain = {k: v for k, v in shared.items() if k != "layers_shared"}
    plain.update({f"layers_{i}": shared["layers_shared"] for i in range(3)})
    np.testing.assert_allclose(model_lib.Transformer(shared_cfg).apply({"params": shared}, tokens),
                               model_lib.Transformer(plain_cfg).apply({"params": plain}, tokens),
                               atol=1e-5)
    block = param_tree.count_params(shared["layers_shared"])
    assert param_tree.count_params(plain) - param_tree.count_params(shared) == 2 * block
    with pytest.raises(ValueError, match="share_layers"):
        model_lib.Transformer(shared_cfg).init(jax.random.key(0), tokens, decode=True)


def test_albert_factorised_embeddings_with_identity_projection_are_plain_embeddings():
    factorised_cfg = model_lib.preset("tiny-bert", embed_dim=64)  # E = D = 64
    plain_cfg = model_lib.preset("tiny-bert")
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 256)
    params = dict(model_lib.Transformer(factorised_cfg).init(jax.random.key(0), tokens)["params"])
    params["embed_proj"] = jnp.eye(64)
    plain = {k: v for k, v in params.items() if k != "embed_proj"}
    np.testing.assert_allclose(model_lib.Transformer(factorised_cfg).apply({"params": params}, tokens),
                               model_lib.Transformer(plain_cfg).apply({"params": plain}, tokens),
                               atol=1e-5)
    small = model_lib.preset("tiny-bert", embed_dim=16)
    shapes = nn.meta.unbox(param_tree._param_shapes(small))
    assert shapes["token_embed"].shape == (256, 16) and shapes["embed_proj"].shape == (16, 64)
