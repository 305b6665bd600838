"""FID-FMNIST: the Fréchet distance between Gaussian fits of *our own* Fashion-MNIST classifier's
features of generated and real images. It is NOT Inception FID (no Inception network is
available offline, and Inception features suit 28x28 grey clothes poorly): numbers are comparable
only with other FID-FMNIST numbers from the same classifier config (`CLASSIFIER`), never with
published FIDs.

The classifier is a small CNN (conv32-pool-conv64-pool-dense128-dense10) trained here,
deterministically under its seed, in a few CPU minutes; `ensure_classifier()` trains it once and
caches its parameters under ~/.cache/genlab/fid/, keyed by a hash of its config. Features are the
128 post-ReLU units before the logits. The reference statistics are those of the 60k training
images; FID-FMNIST of the 10k test images against them is the floor a perfect generator would
reach with that many samples (FID is biased upwards at small N, so compare equal sample counts).

    fid_fmnist(samples_uint8_NHWC) -> float
    conditional_accuracy(samples_uint8_NHWC, labels) -> float   (class-conditional samples)
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import pathlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from core import cli, packages

log = logging.getLogger(__name__)

CLASSIFIER = {"version": 1, "dataset": "fashion_mnist", "conv_channels": (32, 64),
              "features": 128, "epochs": 3, "batch_size": 128, "learning_rate": 1e-3, "seed": 0}
IMAGE_SHAPE = (28, 28, 1)


def cache_dir() -> pathlib.Path:
    """$GENLAB_FID_CACHE, else fid/ under the project's cache root (core.packages.cache_dir)."""
    if os.environ.get("GENLAB_FID_CACHE"):
        return pathlib.Path(os.environ["GENLAB_FID_CACHE"]).expanduser()
    return packages.cache_dir() / "fid"


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


def load_fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [N, 28, 28, 1], int32 [N]) of "train" or "test", from the shared image loader."""
    from vision.data import load_image_set
    images = load_image_set("fashion_mnist", split)
    return np.asarray(images.images), np.asarray(images.labels)


class FeatureCNN(nn.Module):
    """The classifier; `__call__` returns (features [B, F], logits [B, 10])."""
    conv_channels: tuple[int, ...]
    features: int
    num_classes: int = 10

    @nn.compact
    def __call__(self, x_BHWC):
        h = x_BHWC
        for index, channels in enumerate(self.conv_channels):
            h = nn.relu(nn.Conv(channels, (3, 3), padding="SAME", name=f"conv{index}")(h))
            h = nn.max_pool(h, (2, 2), (2, 2))
        h = h.reshape(h.shape[0], -1)
        features_BF = nn.relu(nn.Dense(self.features, name="hidden")(h))
        return features_BF, nn.Dense(self.num_classes, name="logits")(features_BF)


def _model(config: dict) -> FeatureCNN:
    return FeatureCNN(tuple(config["conv_channels"]), config["features"])


def _standardise(images_BHWC, mean, std):
    return (images_BHWC.astype(jnp.float32) / 255.0 - mean) / std


def train_classifier(config: dict, images: np.ndarray, labels: np.ndarray):
    """Adam on cross-entropy; the data order is a NumPy permutation per (seed, epoch), so the
    same config and data give the same parameters. Returns (params, mean, std)."""
    model = _model(config)
    mean, std = float(images.mean() / 255.0), float(images.std() / 255.0)
    params = model.init(jax.random.key(config["seed"]), jnp.zeros((1, *images.shape[1:])))["params"]
    optimizer = optax.adam(config["learning_rate"])
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, x_BHWC, y_B):
        def loss_fn(p):
            _, logits = model.apply({"params": p}, _standardise(x_BHWC, mean, std))
            return optax.softmax_cross_entropy_with_integer_labels(logits, y_B).mean()
        grads = jax.grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    batch = config["batch_size"]
    for epoch in range(config["epochs"]):
        order = np.random.RandomState([config["seed"], epoch]).permutation(len(images))
        for start in range(0, len(order) - batch + 1, batch):
            rows = order[start:start + batch]
            params, opt_state = step(params, opt_state, images[rows], labels[rows])
    return params, mean, std


class Classifier:
    """A trained FeatureCNN with its input standardisation; features and predictions in batches."""

    def __init__(self, config: dict, params, mean: float, std: float):
        self.config, self.params, self.mean, self.std = config, params, mean, std
        model = _model(config)
        self._apply = jax.jit(lambda p, x: model.apply({"params": p}, _standardise(x, mean, std)))

    def features_and_logits(self, images: np.ndarray, batch: int = 1000):
        check_images(images)
        outputs = [self._apply(self.params, images[i:i + batch]) for i in range(0, len(images), batch)]
        return (np.concatenate([np.asarray(f, np.float64) for f, _ in outputs]),
                np.concatenate([np.asarray(g) for _, g in outputs]))

    def accuracy(self, images, labels) -> float:
        _, logits = self.features_and_logits(images)
        return float(np.mean(np.argmax(logits, axis=-1) == np.asarray(labels)))


def check_images(images) -> None:
    if not isinstance(images, np.ndarray) and not hasattr(images, "dtype"):
        raise TypeError(f"expected a uint8 array [N, 28, 28, 1], got {type(images).__name__}")
    if images.dtype != np.uint8:
        raise ValueError(f"FID-FMNIST takes uint8 images in [0, 255], got dtype {images.dtype}; "
                         "convert [-1, 1] floats with generative.diffusion.unit_to_images")
    if images.ndim != 4 or tuple(images.shape[1:]) != IMAGE_SHAPE:
        raise ValueError(f"FID-FMNIST takes images shaped [N, 28, 28, 1] (NHWC), got "
                         f"{tuple(images.shape)}")


def _save(path: pathlib.Path, params, extra: dict) -> None:
    flat = {"/".join(str(k.key) for k in kp): np.asarray(v)
            for kp, v in jax.tree_util.tree_leaves_with_path(params)}
    packages.atomic_write(path, lambda f: np.savez(f, **flat, __meta__=json.dumps(extra)), "wb")


def _load(path: pathlib.Path):
    data = np.load(path)
    params: dict = {}
    for name in data.files:
        if name == "__meta__":
            continue
        node = params
        *parents, leaf = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = jnp.asarray(data[name])
    return params, json.loads(str(data["__meta__"]))


def classifier_path(config: dict = CLASSIFIER) -> pathlib.Path:
    return cache_dir() / f"classifier-{config_hash(config)}.npz"


@functools.lru_cache(maxsize=None)
def _ensure(config_json: str) -> Classifier:
    config = json.loads(config_json)
    path = classifier_path(config)
    if not path.exists():
        log.info("training the FID-FMNIST classifier (once; cached at %s)", path)
        start = time.time()
        train_images, train_labels = load_fashion_mnist("train")
        params, mean, std = train_classifier(config, train_images, train_labels)
        test_images, test_labels = load_fashion_mnist("test")
        accuracy = Classifier(config, params, mean, std).accuracy(test_images, test_labels)
        _save(path, params, {"mean": mean, "std": std, "test_accuracy": accuracy,
                             "train_seconds": time.time() - start, "config": config})
        log.info("FID-FMNIST classifier: test accuracy %.4f", accuracy)
    params, meta = _load(path)
    classifier = Classifier(config, params, meta["mean"], meta["std"])
    classifier.meta = meta
    return classifier


def ensure_classifier(config: dict = CLASSIFIER) -> Classifier:
    """The cached classifier of `config`, trained first if it is not in the cache."""
    return _ensure(json.dumps(config, sort_keys=True))


def gaussian_fit(features_NF: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if features_NF.shape[0] < 2:
        raise ValueError(f"a Gaussian fit needs at least 2 samples, got {features_NF.shape[0]}")
    features_NF = np.asarray(features_NF, np.float64)
    return features_NF.mean(axis=0), np.cov(features_NF, rowvar=False)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), in float64.

    tr((S1 S2)^1/2) equals tr((S1^1/2 S2 S1^1/2)^1/2) (similar matrices), and the latter is a
    symmetric PSD square root, so eigh gives it without sqrtm's complex round-off."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"mismatched Gaussians: means {mu1.shape}, {mu2.shape}; covariances "
                         f"{sigma1.shape}, {sigma2.shape}")
    root1 = _psd_sqrt(sigma1)
    cross = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    trace_sqrt = np.sum(np.sqrt(np.clip(cross, 0.0, None)))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


@functools.lru_cache(maxsize=4)
def reference_stats(split: str = "train", config_json: str | None = None):
    """(mu, sigma) of the classifier's features of a Fashion-MNIST split, cached on disk."""
    config = json.loads(config_json) if config_json else CLASSIFIER
    path = cache_dir() / f"stats-{config_hash(config)}-{split}.npz"
    if path.exists():
        data = np.load(path)
        return data["mu"], data["sigma"]
    images, _ = load_fashion_mnist(split)
    features, _ = ensure_classifier(config).features_and_logits(images)
    mu, sigma = gaussian_fit(features)
    packages.atomic_write(path, lambda f: np.savez(f, mu=mu, sigma=sigma), "wb")
    return mu, sigma


def fid_fmnist(samples_uint8_NHWC: np.ndarray, reference: str = "train",
               config: dict = CLASSIFIER) -> float:
    """FID-FMNIST of the samples against the Fashion-MNIST `reference` split (not Inception FID).

    `config` is the classifier's; only the default `CLASSIFIER` gives reportable numbers (the
    tests pass a smaller one, which trains in a minute rather than several)."""
    check_images(samples_uint8_NHWC)
    features, _ = ensure_classifier(config).features_and_logits(np.asarray(samples_uint8_NHWC))
    return frechet_distance(*gaussian_fit(features),
                            *reference_stats(reference, json.dumps(config, sort_keys=True)))


def conditional_accuracy(samples_uint8_NHWC: np.ndarray, labels,
                         config: dict = CLASSIFIER) -> float:
    """How often the classifier (of `config`) names the class the samples were generated for."""
    labels = np.asarray(labels)
    if labels.shape != (len(samples_uint8_NHWC),):
        raise ValueError(f"need one label per sample: {len(samples_uint8_NHWC)} samples, "
                         f"labels shaped {labels.shape}")
    return ensure_classifier(config).accuracy(np.asarray(samples_uint8_NHWC), labels)


def floor(num: int = 0, seed: int = 0) -> dict[str, float]:
    """FID-FMNIST of real test images (all, or `num` drawn with `seed`) against the train set."""
    images, labels = load_fashion_mnist("test")
    if num:
        rows = np.random.RandomState(seed).choice(len(images), num, replace=False)
        images, labels = images[rows], labels[rows]
    return {"num": len(images), "fid_fmnist": fid_fmnist(images),
            "classifier_accuracy": conditional_accuracy(images, labels)}


def main(argv=None) -> dict:
    """`python -m generative.fid`: trains (once) the classifier FID-FMNIST uses and prints the
    floor: real test images against the train set."""
    cli.ArgumentParser(description=main.__doc__).parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    classifier = ensure_classifier()
    result = {"classifier": classifier.meta, "floor_10000": floor(), "floor_1000": floor(1000)}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    cli.main_entry(main)
