"""The importance-weighted log-likelihood estimate of a VAE run on its eval split (Burda et al.
2016): log (1/K) sum_k p(x, z_k) / q(z_k | x) with z_k ~ q(z | x), a lower bound on log p(x)
that tightens as K grows. Printed in nats per image and bits/dim beside the ELBO of the same
draws (their mean), so the gap between the two is measured on the same images.

  python -m generative.iwae --workdir runs/vae-fmnist --k 100 --num 1000
"""
from __future__ import annotations

import math
import sys

import jax
import numpy as np

from core import cli


def estimate(task, params, images_NHWC: np.ndarray, k: int, seed: int = 0,
             batch: int = 100) -> dict:
    """Mean ELBO and IWAE-K bound (nats per image, and bits/dim) over the given images."""
    run = jax.jit(lambda p, x, r: task.log_weights(p, x, r, k))
    elbo, iwae = [], []
    for index, start in enumerate(range(0, len(images_NHWC), batch)):
        log_w_KB = run(params, images_NHWC[start:start + batch],
                       jax.random.fold_in(jax.random.key(seed), index))
        elbo.append(np.asarray(log_w_KB.mean(0)))
        iwae.append(np.asarray(jax.nn.logsumexp(log_w_KB, axis=0) - math.log(k)))
    result = {"k": k, "images": len(images_NHWC)}
    for name, values in (("neg_elbo", elbo), ("neg_iwae", iwae)):
        nats = -float(np.concatenate(values).mean())
        result.update({f"{name}_nats": nats, f"{name}_bits_per_dim": task.bits_per_dim(nats)})
    return result


def main(argv=None) -> int:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--k", type=int, default=100, help="importance samples per image")
    parser.add_argument("--num", type=int, default=1000, help="eval images (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    from core.config import ConfigError, load_run_config
    if args.k < 1 or args.num < 0:
        raise ConfigError("--k must be positive and --num non-negative")
    from core.metrics import emit
    from vision.pipeline import restore
    config = load_run_config(args.workdir, [])
    if config.task != "vae" or config.vae.kind != "vae":
        raise ConfigError(f"{args.workdir} is not a VAE run (task {config.task!r}); the IWAE "
                          "bound needs a Gaussian posterior")
    setup, _, state, step = restore(config, args.workdir)
    images = setup.eval_set.images[:args.num or None]
    emit({"workdir": args.workdir, "step": step,
          **estimate(setup.task, jax.device_get(state.params), images, args.k, args.seed)})
    return 0


if __name__ == "__main__":
    cli.main_entry(main)
