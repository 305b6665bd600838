"""CLIP on synthetic captions: the loss against NumPy, the temperature clip, zero-shot and
recall@k on constructed embeddings, the captions' determinism and template split, and a short
training run on the 8x8 digits."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from core.config import ConfigError, load_config
from vision import captions, clip
from vision.data import load_image_set

CONFIG = "experiments/configs/vision/clip.py:size=tiny"


def numpy_infonce(image, text, scale, mask):
    """Symmetric InfoNCE written out with explicit loops over the real rows."""
    real = [i for i in range(len(mask)) if mask[i]]
    sims = scale * image @ text.T
    losses = np.zeros(len(mask))
    for i in real:
        row = np.array([sims[i, j] for j in real])
        col = np.array([sims[j, i] for j in real])
        k = real.index(i)
        i2t = -(row[k] - np.log(np.sum(np.exp(row - row.max()))) - row.max())
        t2i = -(col[k] - np.log(np.sum(np.exp(col - col.max()))) - col.max())
        losses[i] = (i2t + t2i) / 2
    return losses


def test_contrastive_loss_equals_numpy():
    rng = np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    image, text = unit(rng.normal(size=(7, 5))), unit(rng.normal(size=(7, 5)))
    mask = np.array([1, 1, 1, 0, 1, 1, 0])
    got = clip.contrastive_loss(jnp.asarray(image, jnp.float32), jnp.asarray(text, jnp.float32),
                                jnp.float32(8.0), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got), numpy_infonce(image, text, 8.0, mask),
                               rtol=1e-5, atol=1e-5)
    # The padding rows change nothing: the same as the loss of the real rows alone.
    real = mask.astype(bool)
    alone = clip.contrastive_loss(jnp.asarray(image[real], jnp.float32),
                                  jnp.asarray(text[real], jnp.float32), jnp.float32(8.0),
                                  jnp.ones(real.sum()))
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(alone), rtol=1e-5)


def test_logit_scale_starts_at_one_over_temperature_and_clips_at_100():
    module = clip.LogitScale(math.log(1 / 0.07), 100.0)
    params = nn.unbox(module.init(jax.random.key(0))["params"])
    assert float(module.apply({"params": params})) == pytest.approx(1 / 0.07, rel=1e-6)
    grad = lambda p: jax.grad(lambda p: module.apply({"params": p}))(p)["scale"]
    # d exp(s) / ds = exp(s) below the clip ...
    assert float(grad(params)) == pytest.approx(1 / 0.07, rel=1e-5)
    # ... and above it the scale stays at 100 and the parameter gets no gradient.
    high = {"scale": jnp.float32(math.log(1000.0))}
    assert float(module.apply({"params": high})) == pytest.approx(100.0, rel=1e-6)
    assert float(grad(high)) == 0.0


def test_zero_shot_with_a_perfect_embedding_is_exact():
    """Embed every prompt as the one-hot of the class its words name and every image as the
    one-hot of its label: the prompt-ensemble classifier must then be right every time, and
    wrong every time when the text side names the next class."""
    table = captions.caption_table("fashion_mnist")
    prompts_CQL, weights_CQ = captions.zero_shot_prompts(table)
    C, Q, _ = prompts_CQL.shape
    assert Q == 3 * (len(captions.TEMPLATES) - captions.NUM_TRAIN_TEMPLATES)
    named_CQ = np.asarray(captions.predicted_class(prompts_CQL.reshape(C * Q, -1)[:, 1:],
                                                   table)).reshape(C, Q)
    assert (named_CQ == np.arange(C)[:, None]).all()  # every prompt names its own class
    labels = np.random.default_rng(0).integers(0, C, 200)
    images = jax.nn.one_hot(labels, C)
    for shift, expected in ((0, 1.0), (1, 0.0)):
        prompt_CQE = jax.nn.one_hot((named_CQ + shift) % C, C)
        classes_CE = clip.class_embeddings(prompt_CQE, jnp.asarray(weights_CQ))
        accuracy = np.mean(np.asarray(clip.zero_shot_predict(images, classes_CE)) == labels)
        assert accuracy == expected


def brute_force_recall(query, target, k):
    hits = 0
    for i in range(len(query)):
        sims = [float(np.dot(query[i], t)) for t in target]
        better = sum(1 for j, s in enumerate(sims) if j != i and s > sims[i])
        hits += better < k
    return hits / len(query)


def test_recall_at_k_on_constructed_embeddings():
    eye = np.eye(10)
    assert clip.recall_at_k(eye, eye) == {1: 1.0, 5: 1.0}
    # Query i's best target is i + 1 and its own pair comes second: recall@1 0, recall@5 1.
    near = 0.5 * eye + np.roll(eye, 1, axis=1)
    got = clip.recall_at_k(near, eye, (1, 2, 5))
    assert got == {1: 0.0, 2: 1.0, 5: 1.0}
    rng = np.random.default_rng(1)
    query, target = rng.normal(size=(40, 6)), rng.normal(size=(40, 6))
    got = clip.recall_at_k(query, target, (1, 3, 10))
    for k in (1, 3, 10):
        assert got[k] == pytest.approx(brute_force_recall(query, target, k))


def test_captions_are_deterministic_and_never_use_held_out_templates():
    table = captions.caption_table("fashion_mnist")
    images = load_image_set("digits", "train").images[:64]  # any uint8 images will do
    labels = np.arange(64) % 10
    draw = jax.jit(lambda keys, y, x: captions.caption_tokens(keys, y, x, table, "train"))
    first = draw(captions.example_keys(3, np.arange(64)), labels, images)
    again = draw(captions.example_keys(3, np.arange(64)), labels, images)
    other_seed = draw(captions.example_keys(4, np.arange(64)), labels, images)
    np.testing.assert_array_equal(first, again)
    assert (np.asarray(first) != np.asarray(other_seed)).any()
    # Every caption string a held-out template can make, against many training draws.
    start, stop = captions.template_range("heldout")
    C, S, _, P, _ = table.tokens_CSTPL.shape
    held_out = {table.text(c, s, t, p) for c in range(C) for s in range(S)
                for t in range(start, stop) for p in range(P)}
    many = np.arange(2048)
    drawn = draw(captions.example_keys(0, many), many % 10, np.tile(images, (32, 1, 1, 1)))
    texts = {table.tokenizer.decode(row) for row in np.asarray(drawn)}
    assert len(texts) > 1000 and not texts & held_out
    # The attribute words are those of the pixels: "dark" only for images below the threshold.
    light, _ = captions.image_attributes(images)
    for row, is_light in zip(np.asarray(first), np.asarray(light)):
        words = table.tokenizer.decode(row).split()
        assert not ("dark" in words and is_light) and not ("light" in words and not is_light)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="no captions for dataset"):
        captions.caption_table("cifar10")
    with pytest.raises(ValueError, match="template split"):
        captions.template_range("test")
    with pytest.raises(ConfigError, match="microbatches"):
        config = load_config(CONFIG, ["--config.train.microbatches=2"])
        clip.build_task(config, load_image_set("digits", "test").info)


def test_training_reduces_the_loss_and_zero_shot_agrees_with_retrieval_eval():
    config = load_config(CONFIG)
    train = load_image_set("digits", "train")
    task = clip.build_task(config, train.info)
    params = nn.unbox(task.init_params(jax.random.key(0)))
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

    batch = {"image": train.images[:32], "label": train.labels[:32],
             "mask": np.ones(32, np.int32)}
    losses = []
    for i in range(40):
        params, state, value = step(params, state, batch, jax.random.key(i))
        losses.append(float(value))
    # Chance is log(32) = 3.47; the captions change every step, the images do not.
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5 and np.mean(losses[-5:]) < 3.1

    test = load_image_set("digits", "test")
    images, labels = test.images[:48], test.labels[:48]
    sums = jax.jit(lambda p, b: task.loss(p, b, jax.random.key(0), False))(
        params, {"image": images, "label": labels, "mask": np.ones(48, np.int32)})
    result = clip.retrieval_metrics(task, params, images, labels, num_pairs=48)
    assert float(sums.extra["zero_shot_accuracy"]) / 48 == pytest.approx(
        result["zero_shot_accuracy"])
    assert 0 <= result["image_to_text_recall@1"] <= result["image_to_text_recall@5"] <= 1
