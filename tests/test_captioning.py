"""Captioning: a ViT encoder under lm/models/encoder_decoder.py's decoder. Cached greedy decoding must
equal decoding by recomputing the whole prefix, the loss must ignore padding, the class word is
read correctly, and a few training steps reduce the loss (8x8 digits, tiny sizes)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from core.config import load_config
from lm.decode import decoding
from vision import augment, captioning, captions
from vision.data import load_image_set

CONFIG = "experiments/configs/vision/captioning.py:size=tiny"


@pytest.fixture(scope="module")
def setup():
    config = load_config(CONFIG)
    train = load_image_set("digits", "train")
    task = captioning.build_task(config, train.info)
    params = nn.unbox(jax.jit(task.init_params)(jax.random.key(0)))
    return task, params, train


def test_parameters_are_the_image_encoder_and_the_decoder(setup):
    task, params, _ = setup
    assert set(params) == {"image_encoder", "memory_proj", "token_embed", "pos_embed", "decoder"}
    assert "cross_attn" in params["decoder"]["layers"]
    # The word vocabulary padded to a multiple of 64 (a "vocab"-sharded table must divide).
    assert params["token_embed"].shape[0] == -(-task.table.vocab_size // 64) * 64


def test_cached_greedy_decoding_equals_recomputing_the_prefix(setup):
    task, params, train = setup
    # The initial weights (std 0.02) make every step's argmax the same token; large random
    # weights give varied, well-separated greedy choices.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.5 * jax.random.normal(k, x.shape)
                                       for x, k in zip(leaves, keys)])
    images = augment.normalize(jnp.asarray(train.images[:5]), task.info)
    sampling = decoding.SamplingConfig(max_new_tokens=6)
    tokens_BN, logits_BNV = jax.jit(lambda p, x: captioning.decode_captions(
        task.model, p, x, sampling))(params, images)
    assert tokens_BN.shape == (5, 6) and logits_BNV.shape == (5, 6, task.cfg.vocab_size)
    # Recompute: the whole prefix through the uncached model at every step. The prefix lives in
    # a fixed 6-slot array (one compile); causal attention keeps later slots out of slot n.
    forward = jax.jit(lambda p, x, t: task.model.apply({"params": p}, x, t))
    prefix = np.full((5, 6), captions.BOS, np.int32)
    for n in range(6):
        logits_BV = np.asarray(forward(params, images, prefix)[:, n])
        np.testing.assert_allclose(np.asarray(logits_BNV[:, n]), logits_BV, rtol=1e-4, atol=1e-4)
        if n < 5:
            prefix[:, n + 1] = logits_BV.argmax(-1)
    np.testing.assert_array_equal(np.asarray(tokens_BN[:, :5]), prefix[:, 1:])
    np.testing.assert_array_equal(np.asarray(tokens_BN[:, 5]), logits_BV.argmax(-1))
    assert len(np.unique(np.asarray(tokens_BN))) > 1


def test_predicted_class_reads_the_first_class_word_before_eos():
    table = captions.caption_table("fashion_mnist")
    ids = table.tokenizer.ids
    rows = [["a", "photo", "of", "a", "dark", "sneaker", "[EOS]", "bag"],
            ["a", "boot", "zebra", "a", "bag", "[EOS]", "[PAD]", "[PAD]"],
            ["a", "photo", "[EOS]", "tee", "[PAD]", "[PAD]", "[PAD]", "[PAD]"],
            ["running", "shoe", "[PAD]", "[PAD]", "[PAD]", "[PAD]", "[PAD]", "[PAD]"]]
    assert "zebra" not in ids  # an unknown word is [UNK], which names nothing
    tokens = np.array([[ids.get(w, captions.UNK) for w in row] for row in rows])
    np.testing.assert_array_equal(np.asarray(captions.predicted_class(tokens, table)),
                                  [7, 9, -1, 7])


def test_loss_counts_real_caption_tokens_only(setup):
    task, params, train = setup
    batch = {"image": train.images[:8], "label": train.labels[:8],
             "mask": np.array([1, 1, 1, 1, 1, 1, 0, 0], np.int32)}
    loss = jax.jit(lambda p, b: task.loss(p, b, jax.random.key(1), False))
    full = loss(params, batch)
    keys = jax.random.split(jax.random.split(jax.random.key(1), 3)[0], 8)
    tokens = captions.caption_tokens(keys, batch["label"], batch["image"], task.table, "train")
    real_targets = int(np.sum(np.asarray(tokens)[:6, 1:] != captions.PAD))
    assert float(full.weight) == real_targets and float(full.extra["images"]) == 6
    # Changing the padded rows' pixels changes nothing.
    other = {**batch, "image": np.concatenate([batch["image"][:6], train.images[100:102]])}
    again = loss(params, other)
    assert float(again.loss) == pytest.approx(float(full.loss), rel=1e-6)


def test_training_reduces_the_loss(setup):
    task, params, train = setup
    opt = optax.adam(3e-3)
    state = opt.init(params)

    @jax.jit
    def step(params, state, batch, rng):
        def loss(p):
            sums = task.loss(p, batch, rng, True)
            return sums.loss / sums.weight
        value, grads = jax.value_and_grad(loss)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    losses = []
    for i in range(40):
        rows = np.random.default_rng(i).choice(len(train.labels), 32)
        batch = {"image": train.images[rows], "label": train.labels[rows],
                 "mask": np.ones(32, np.int32)}
        params, state, value = step(params, state, batch, jax.random.key(i))
        losses.append(float(value))
    # Uniform over the vocabulary is log(V) ~ 4.4 nats per token; templates are learnt first.
    assert np.mean(losses[:3]) > 4.0 and np.mean(losses[-5:]) < 3.0
    texts = task.generate(params, train.images[:4])
    assert all(set(t.split()) <= set(task.table.tokenizer.vocab) for t in texts)
