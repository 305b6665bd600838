"""Samplers for a trained diffusion model: DDPM ancestral, DDIM, classifier-free guidance and
inpainting, each one `lax.scan` over the reverse steps, so the whole chain jits into one program.

A sampler takes `eps_fn(x_t_BHWC, t_B) -> eps_BHWC` (build it with `guided_eps_fn`), the schedule,
an rng and the output shape. Randomness is a function of (rng, step index) only: the start noise
is `normal(fold_in(rng, T))` and the noise added at step t is `normal(fold_in(rng, t))`, so the same
seed gives the same images, and DDIM with eta=1 over all T steps reproduces DDPM draw for draw.

Classifier-free guidance (Ho & Salimans 2022), with guidance scale w:
    eps = (1 + w) * eps(x, label) - w * eps(x, null)
so w = 0 is the plain conditional model, w = -1 the unconditional one, and passing the null class
as the label gives the unconditional model for every w.

Inpainting is the replacement method (Song et al. 2021; RePaint without resampling): after every
step the known pixels are overwritten with the original noised to the new step's level, and after
the last step with the original itself, so known pixels come back exactly.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from generative.diffusion import Schedule, q_sample

EpsFn = Callable[[jax.Array, jax.Array], jax.Array]


def guided_eps_fn(predict_eps: Callable, params, label_B=None, null_class: int | None = None,
                  guidance: float = 0.0) -> EpsFn:
    """`predict_eps(params, x, t, label) -> eps` with classifier-free guidance of scale `guidance`.

    guidance 0 (or an unconditional model) costs one network call per step; otherwise the
    conditional and null-class halves run as one doubled batch."""
    if label_B is None or guidance == 0.0:
        return lambda x_BHWC, t_B: predict_eps(params, x_BHWC, t_B, label_B)
    if null_class is None:
        raise ValueError("classifier-free guidance needs a model trained with a null class "
                         "(diffusion.conditional=True and p_uncond > 0)")

    def eps_fn(x_BHWC, t_B):
        both_labels = jnp.concatenate([label_B, jnp.full_like(label_B, null_class)])
        both_eps = predict_eps(params, jnp.concatenate([x_BHWC, x_BHWC]),
                               jnp.concatenate([t_B, t_B]), both_labels)
        eps_cond, eps_uncond = jnp.split(both_eps, 2)
        return (1.0 + guidance) * eps_cond - guidance * eps_uncond
    return eps_fn


def _known_pixels(schedule: Schedule, known, rng, t_index):
    """The known region's values at noise level t_index (-1: the clean original)."""
    x0_BHWC, _ = known
    t_B = jnp.full((x0_BHWC.shape[0],), jnp.maximum(t_index, 0))
    noised = q_sample(schedule, x0_BHWC, t_B, jax.random.normal(rng, x0_BHWC.shape))
    return jnp.where(t_index < 0, x0_BHWC, noised)


def _replace_known(schedule, known, rng, t_index, x_BHWC):
    if known is None:
        return x_BHWC
    _, mask_BHWC = known
    return jnp.where(mask_BHWC, _known_pixels(schedule, known, rng, t_index), x_BHWC)


def _check_known(known, shape):
    if known is None:
        return None
    x0, mask = known
    if tuple(x0.shape) != tuple(shape) or tuple(mask.shape) != tuple(shape):
        raise ValueError(f"inpainting needs the original and its mask shaped like the samples "
                         f"{tuple(shape)}, got {tuple(x0.shape)} and {tuple(mask.shape)}")
    return jnp.asarray(x0, jnp.float32), jnp.asarray(mask, bool)


def _start(schedule, rng, shape, known):
    x_BHWC = jax.random.normal(jax.random.fold_in(rng, schedule.timesteps), shape)
    known_rng = jax.random.fold_in(rng, 2 * schedule.timesteps + 1)
    return _replace_known(schedule, known, jax.random.fold_in(known_rng, schedule.timesteps),
                          schedule.timesteps - 1, x_BHWC), known_rng


def ddpm_sample(eps_fn: EpsFn, schedule: Schedule, rng, shape, clip: bool = True,
                known=None) -> jax.Array:
    """Ancestral sampling over all T steps with the posterior variance beta_tilde (Ho et al.).

    `clip` clips the predicted x0 to [-1, 1] before forming the posterior mean. `known`:
    (original [-1, 1] images, boolean mask, True where known), both shaped like the output."""
    known = _check_known(known, shape)
    x_BHWC, known_rng = _start(schedule, rng, shape, known)

    def step(x_BHWC, t):
        t_B = jnp.full((shape[0],), t)
        eps_BHWC = eps_fn(x_BHWC, t_B)
        x_BHWC = _ddim_update(schedule, x_BHWC, eps_BHWC, t, t - 1, 1.0, clip,
                              jax.random.fold_in(rng, t))
        return _replace_known(schedule, known, jax.random.fold_in(known_rng, t), t - 1, x_BHWC), None

    x_BHWC, _ = jax.lax.scan(step, x_BHWC, jnp.arange(schedule.timesteps - 1, -1, -1))
    return x_BHWC


def ddim_timesteps(timesteps: int, steps: int) -> np.ndarray:
    """`steps` indices spread evenly over 0..T-1, descending, ending at 0 (DDIM's linear tau)."""
    if not 1 <= steps <= timesteps:
        raise ValueError(f"DDIM steps must be between 1 and the model's T={timesteps}, got {steps}")
    return np.unique(np.round(np.linspace(0, timesteps - 1, steps)).astype(np.int32))[::-1].copy()


def _ddim_update(schedule, x_BHWC, eps_BHWC, t, t_prev, eta, clip, rng):
    """One DDIM step t -> t_prev (t_prev = -1: the clean image). With eta = 1 and t_prev = t - 1
    its variance is DDPM's beta_tilde and its mean the DDPM posterior mean."""
    alpha_bar = schedule.alpha_bars[t]
    alpha_bar_prev = jnp.where(t_prev >= 0, schedule.alpha_bars[jnp.maximum(t_prev, 0)], 1.0)
    x0_BHWC = (x_BHWC - jnp.sqrt(1.0 - alpha_bar) * eps_BHWC) / jnp.sqrt(alpha_bar)
    if clip:
        x0_BHWC = jnp.clip(x0_BHWC, -1.0, 1.0)
        eps_BHWC = (x_BHWC - jnp.sqrt(alpha_bar) * x0_BHWC) / jnp.sqrt(1.0 - alpha_bar)
    variance = (eta ** 2 * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
                * (1.0 - alpha_bar / alpha_bar_prev))
    direction = jnp.sqrt(jnp.maximum(1.0 - alpha_bar_prev - variance, 0.0))
    noise_BHWC = jax.random.normal(rng, x_BHWC.shape)
    return (jnp.sqrt(alpha_bar_prev) * x0_BHWC + direction * eps_BHWC
            + jnp.sqrt(variance) * noise_BHWC)


def ddim_sample(eps_fn: EpsFn, schedule: Schedule, rng, shape, steps: int = 50,
                eta: float = 0.0, clip: bool = True, known=None) -> jax.Array:
    """DDIM (Song et al. 2021) over `steps` of the T timesteps; eta = 0 is deterministic given
    the start noise, eta = 1 with steps = T is DDPM ancestral sampling."""
    known = _check_known(known, shape)
    taus = ddim_timesteps(schedule.timesteps, steps)
    pairs = jnp.asarray(np.stack([taus, np.concatenate([taus[1:], [-1]])], axis=1))
    x_BHWC, known_rng = _start(schedule, rng, shape, known)

    def step(x_BHWC, pair):
        t, t_prev = pair[0], pair[1]
        eps_BHWC = eps_fn(x_BHWC, jnp.full((shape[0],), t))
        x_BHWC = _ddim_update(schedule, x_BHWC, eps_BHWC, t, t_prev, eta, clip,
                              jax.random.fold_in(rng, t))
        return _replace_known(schedule, known, jax.random.fold_in(known_rng, t), t_prev, x_BHWC), None

    x_BHWC, _ = jax.lax.scan(step, x_BHWC, pairs)
    return x_BHWC


def sample(task, params, rng, num: int, sampler: str = "ddim", steps: int = 50,
           label_B=None, guidance: float = 0.0, eta: float = 0.0, known=None) -> jax.Array:
    """Images in [-1, 1] from a DiffusionTask's params, by `sampler` ("ddpm" or "ddim");
    jitted once per (task, num, sampler, steps, guidance, eta)."""
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"sampler {sampler!r} is not 'ddpm' or 'ddim'")
    if task.null_class is not None and label_B is None:
        raise ValueError("this model is class-conditional: pass labels (the null class "
                         f"{task.null_class} for unconditional samples)")
    if sampler == "ddim":
        ddim_timesteps(task.schedule.timesteps, steps)  # checks steps before tracing
    known = _check_known(known, (num, *task.image_shape))
    return _sample_jitted(task, params, rng, label_B, known, num, sampler, steps,
                          float(guidance), float(eta))


@functools.partial(jax.jit, static_argnames=("task", "num", "sampler", "steps", "guidance", "eta"))
def _sample_jitted(task, params, rng, label_B, known, num, sampler, steps, guidance, eta):
    shape = (num, *task.image_shape)
    eps_fn = guided_eps_fn(lambda p, x, t, y: task.predict(p, x, t, y)[0], params, label_B,
                           task.null_class, guidance)
    if sampler == "ddpm":
        return ddpm_sample(eps_fn, task.schedule, rng, shape, known=known)
    return ddim_sample(eps_fn, task.schedule, rng, shape, steps, eta, known=known)
