"""Gato's tokenisation (Reed et al. 2022, section 2.1): every modality as ids of one vocabulary.

  text              [0, text)                        our tokenizer's ids
  continuous value  [text, text + bins)              mu-law companded (mu 100, M 256), clipped
                                                     to [-1, 1], 1024 uniform bins
  discrete value    [text + bins, ... + discrete)    an integer (an action, a grid cell)
  separator         one id                           between an observation and its action
  image patch       one id                           its embedding adds the patch's pixels
                                                     (multimodal/model.py)

The paper lets discrete values share the first 1024 text ids; here they have their own range,
so a small model never confuses an action with a word (one extra table of `discrete` rows).
Images are cut into square patches in row-major order, pixels scaled to [-1, 1] and divided by
the square root of the patch side, as the paper does.
"""
from __future__ import annotations

import dataclasses

import numpy as np

MU, M = 100.0, 256.0


def mu_law(x: np.ndarray, mu: float = MU, m: float = M) -> np.ndarray:
    """F(x) = sgn(x) log(|x| mu + 1) / log(M mu + 1): values up to M map into [-1, 1]."""
    x = np.asarray(x, np.float64)
    return np.sign(x) * np.log1p(np.abs(x) * mu) / np.log1p(m * mu)


def inverse_mu_law(y: np.ndarray, mu: float = MU, m: float = M) -> np.ndarray:
    y = np.asarray(y, np.float64)
    return np.sign(y) * np.expm1(np.abs(y) * np.log1p(m * mu)) / mu


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """Where each modality's ids start in the one vocabulary the decoder predicts over."""
    text: int
    bins: int = 1024
    discrete: int = 256

    @property
    def separator(self) -> int:
        return self.text + self.bins + self.discrete

    @property
    def image(self) -> int:
        return self.separator + 1

    @property
    def size(self) -> int:
        return self.image + 1

    def continuous_ids(self, values: np.ndarray) -> np.ndarray:
        """Companded, clipped to [-1, 1] and put in one of `bins` equal bins."""
        y = np.clip(mu_law(values), -1.0, 1.0)
        return self.text + np.minimum(((y + 1.0) / 2.0 * self.bins).astype(np.int64),
                                      self.bins - 1)

    def continuous_values(self, ids: np.ndarray) -> np.ndarray:
        """The value at each bin's centre (in the companded space)."""
        y = (np.asarray(ids) - self.text + 0.5) / self.bins * 2.0 - 1.0
        return inverse_mu_law(y)

    def discrete_ids(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values, np.int64)
        if values.size and (values.min() < 0 or values.max() >= self.discrete):
            raise ValueError(f"discrete values must lie in [0, {self.discrete}); got "
                             f"{values.min()}..{values.max()}")
        return self.text + self.bins + values

    def discrete_values(self, ids: np.ndarray) -> np.ndarray:
        return np.asarray(ids, np.int64) - self.text - self.bins

    def is_discrete(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        return (ids >= self.text + self.bins) & (ids < self.separator)


def patches(image_HWC: np.ndarray, side: int) -> np.ndarray:
    """[H, W, C] uint8 -> [N, side * side * C] float32, row-major patches, scaled as Gato
    scales them: to [-1, 1], then divided by sqrt(side)."""
    H, W, C = image_HWC.shape
    if H % side or W % side:
        raise ValueError(f"a {H}x{W} image does not cut into {side}x{side} patches")
    x = image_HWC.astype(np.float32) / 127.5 - 1.0
    x = x.reshape(H // side, side, W // side, side, C).transpose(0, 2, 1, 3, 4)
    return x.reshape(-1, side * side * C) / np.sqrt(side)


def image_from_patches(patches_NP: np.ndarray, height: int, width: int, side: int) -> np.ndarray:
    """The inverse of `patches`: [H, W, C] uint8."""
    C = patches_NP.shape[1] // (side * side)
    x = patches_NP.reshape(height // side, width // side, side, side, C).transpose(0, 2, 1, 3, 4)
    x = x.reshape(height, width, C) * np.sqrt(side)
    return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)
