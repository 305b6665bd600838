"""Image data, on-device augmentation, and image classification on the engine: sharded equals
unsharded (BatchNorm included), resume, evaluation report."""
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import QUIET, REPO, train_losses
from core import trainer
from core.config import ConfigError, DataError, load_config
from vision import augment, commands, pipeline
from vision.data import FASHION_MNIST_CLASSES, load_image_set

CONFIG = str(REPO / "experiments/configs/vision/classify.py")
MESH_222 = ["--config.mesh.ici.data=2", "--config.mesh.ici.fsdp=2", "--config.mesh.ici.tensor=2"]


def digits_config(model: str, *overrides: str):
    return load_config(f"{CONFIG}:model={model},dataset=digits,size=tiny,steps=8,batch=32",
                       [*QUIET, "--config.train.checkpoint_every=100", *overrides])


def train(workdir, model: str, *overrides: str) -> dict:
    config = digits_config(model, *overrides)
    setup = pipeline.build(config, workdir)
    return trainer.train(config, workdir, setup.task, setup.data)


# ---------------------------------------------------------------- data


def test_fashion_mnist_matches_its_published_facts():
    train_set, test_set = load_image_set("fashion_mnist", "train"), load_image_set("fashion_mnist", "test")
    assert train_set.images.shape == (60_000, 28, 28, 1) and test_set.images.shape == (10_000, 28, 28, 1)
    assert train_set.images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(train_set.labels), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(test_set.labels), [1000] * 10)
    assert round(train_set.info.mean[0], 4) == 0.2860  # DESIGN.md
    assert test_set.info == train_set.info  # the train split's statistics everywhere
    assert train_set.info.class_names == FASHION_MNIST_CLASSES


def test_digits_split_is_fixed_and_disjoint():
    train_set, test_set = load_image_set("digits", "train"), load_image_set("digits", "test")
    assert len(train_set) + len(test_set) == 1797 and train_set.images.shape[1:] == (8, 8, 1)
    rows = {img.tobytes() + bytes([lab]) for img, lab in zip(train_set.images, train_set.labels)}
    overlap = sum(img.tobytes() + bytes([lab]) in rows
                  for img, lab in zip(test_set.images, test_set.labels))
    assert overlap <= 2  # the digits set has a handful of duplicate images, nothing more
    np.testing.assert_array_equal(load_image_set("digits", "test").labels, test_set.labels)


def test_local_image_folder_goes_through_datasets(tmp_path):
    from PIL import Image
    digits = load_image_set("digits", "test")
    for split, rows in (("train", range(0, 40)), ("test", range(40, 60))):
        for i in rows:
            folder = tmp_path / split / f"class_{digits.labels[i]}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(digits.images[i, ..., 0]).save(folder / f"{i:03d}.png")
    loaded = load_image_set(f"imagefolder:{tmp_path}", "test")
    assert loaded.images.shape == (20, 8, 8, 1)
    # imagefolder orders classes by folder name; each image keeps its pixels and its class.
    expected = {digits.images[i].tobytes(): f"class_{digits.labels[i]}" for i in range(40, 60)}
    for image, label in zip(loaded.images, loaded.labels):
        assert loaded.info.class_names[label] == expected[image.tobytes()]
    with pytest.raises(DataError, match="not a directory"):
        load_image_set(f"imagefolder:{tmp_path / 'missing'}", "train")
    with pytest.raises(DataError, match="is not one of"):
        load_image_set("fashion-mnist", "train")


# ---------------------------------------------------------------- augmentation


def test_crops_are_windows_of_the_padded_image_and_flips_mirror():
    images = jnp.asarray(np.random.default_rng(0).integers(0, 255, (64, 8, 8, 1)), jnp.uint8)
    np.testing.assert_array_equal(augment.random_crop_flip(jax.random.key(0), images), images)
    cropped = np.asarray(augment.random_crop_flip(jax.random.key(1), images, pad=2))
    padded = np.pad(np.asarray(images), ((0, 0), (2, 2), (2, 2), (0, 0)))
    windows = [{(dy, dx) for dy in range(5) for dx in range(5)
                if np.array_equal(padded[i, dy:dy + 8, dx:dx + 8], cropped[i])} for i in range(64)]
    assert all(windows)
    assert len(set.union(*windows)) > 10  # offsets differ between examples
    flipped = np.asarray(augment.random_crop_flip(jax.random.key(2), images, flip=True))
    mirrored = [np.array_equal(f, i[:, ::-1]) for f, i in zip(flipped, np.asarray(images))]
    same = [np.array_equal(f, i) for f, i in zip(flipped, np.asarray(images))]
    assert all(m or s for m, s in zip(mirrored, same)) and 16 < sum(mirrored) < 48


# ---------------------------------------------------------------- training on the engine


@pytest.mark.parametrize("model", ["resnet", "vit"])
def test_2x2x2_mesh_matches_one_device(tmp_path, model):
    train(tmp_path / "one", model, "--config.mesh.num_devices=1", "--config.mesh.ici.data=1")
    train(tmp_path / "mesh", model, *MESH_222)
    one, mesh = train_losses(tmp_path / "one"), train_losses(tmp_path / "mesh")
    assert sorted(one) == sorted(mesh) == list(range(1, 9))
    np.testing.assert_allclose([mesh[s] for s in one], [one[s] for s in one], rtol=2e-5)


def test_batchnorm_statistics_are_checkpointed_and_resume_is_exact(tmp_path):
    common = ["--config.optim.decay_steps=12", "--config.train.checkpoint_every=4"]
    train(tmp_path / "reference", "resnet", "--config.train.steps=12", *common)
    train(tmp_path / "resumed", "resnet", "--config.train.steps=6", *common)
    train(tmp_path / "resumed", "resnet", "--config.train.steps=12", *common)
    reference, resumed = train_losses(tmp_path / "reference"), train_losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(1, 13))
    np.testing.assert_allclose([resumed[s] for s in range(7, 13)],
                               [reference[s] for s in range(7, 13)], rtol=1e-5)
    config = digits_config("resnet", *common, "--config.train.steps=12")
    _, _, state, step = pipeline.restore(config, tmp_path / "resumed")
    stats = jax.tree_util.tree_leaves(state.model_state["batch_stats"])
    assert step == 12 and stats and any(np.abs(np.asarray(s)).sum() > 0 for s in stats)


def test_classifier_learns_digits_and_evaluate_writes_its_report(tmp_path):
    summary = train(tmp_path, "resnet", "--config.train.steps=150", "--config.optim.learning_rate=0.1",
                    "--config.train.log_every=50")
    assert summary["eval_accuracy"] > 0.8, summary
    config = digits_config("resnet", "--config.train.steps=150")
    result = commands.evaluate(config, types.SimpleNamespace(workdir=str(tmp_path)))
    assert result["accuracy"] == pytest.approx(summary["eval_accuracy"], abs=1e-9)
    assert result["images"] == 359  # every test image once, padding rows masked out
    report = json.loads((tmp_path / "eval" / "confusion.json").read_text())
    counts = np.asarray(report["confusion"])
    assert counts.sum() == 359 and np.trace(counts) / 359 == pytest.approx(result["accuracy"])
    assert (tmp_path / "eval" / "predictions.png").stat().st_size > 1000
    assert (tmp_path / "eval" / "confusion.png").stat().st_size > 1000


def test_classify_config_sizes_are_per_model():
    deep = load_config(f"{CONFIG}:model=resnet,size=deep")
    assert tuple(deep.model.stage_sizes) == (2, 2, 2, 2) and deep.model.width == 16
    with pytest.raises(ConfigError, match="size 'deep' is not one of .* for model=vit"):
        load_config(f"{CONFIG}:model=vit,size=deep")
