"""Normalisation and augmentation inside the jitted step, so the host only slices uint8 arrays
and the accelerator does the per-pixel work (each example draws its own crop and flip)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from vision.data import DatasetInfo


def normalize(images_BHWC: jax.Array, info: DatasetInfo) -> jax.Array:
    """uint8 pixels -> float32 (x / 255 - mean) / std, per channel (train-split statistics)."""
    mean_C = jnp.asarray(info.mean, jnp.float32)
    std_C = jnp.asarray(info.std, jnp.float32)
    return (images_BHWC.astype(jnp.float32) / 255.0 - mean_C) / std_C


def random_crop_flip(rng: jax.Array, images_BHWC: jax.Array, pad: int = 0,
                     flip: bool = False) -> jax.Array:
    """Pads by `pad` pixels (zeros, i.e. the normalised image's background when applied before
    normalisation), crops back to the original size at a random offset, and mirrors left-right
    with probability 1/2 where `flip`."""
    B, H, W, _ = images_BHWC.shape
    crop_rng, flip_rng = jax.random.split(rng)
    if pad:
        padded_BHWC = jnp.pad(images_BHWC, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        offsets_B2 = jax.random.randint(crop_rng, (B, 2), 0, 2 * pad + 1)

        def crop(image_HWC, offset_2):
            return jax.lax.dynamic_slice(image_HWC, (offset_2[0], offset_2[1], 0),
                                         (H, W, image_HWC.shape[-1]))
        images_BHWC = jax.vmap(crop)(padded_BHWC, offsets_B2)
    if flip:
        mirror_B = jax.random.bernoulli(flip_rng, 0.5, (B,))
        images_BHWC = jnp.where(mirror_B[:, None, None, None], images_BHWC[:, :, ::-1],
                                images_BHWC)
    return images_BHWC
