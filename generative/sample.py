"""Sample a trained diffusion model, GAN, VAE or flow, write a PNG grid, and score the samples by
FID-FMNIST.

  python -m generative.sample --workdir RUN --sampler ddim --steps 50 --num 1000 --out DIR
  python -m generative.sample --workdir RUN --sampler ddpm --num 1000 --out DIR     # all T steps
  python -m generative.sample --workdir RUN --sampler gan --num 1000 --out DIR
  python -m generative.sample --workdir RUN --sampler vae --num 1000 --out DIR    # decoder means
  python -m generative.sample --workdir RUN --sampler flow --temperature 0.7 --num 1000 --out DIR
Options: --guidance W (classifier-free guidance scale; 0: the conditional model), --unconditional
(the null class), --eta (DDIM), --temperature (flow), --seed, --batch, --raw-params (a run
trained with optim.ema_decay > 0 samples from its parameter EMA unless this is given). A
class-conditional model samples the classes in turn (0, 1, ..., 9, 0, ...), and its samples'
classifier accuracy is reported beside FID.
DIR gets grid.png (the first 100 samples, one class per column), samples.npz (uint8 NHWC and
labels) and metrics.json. FID-FMNIST is our own classifier's Fréchet distance (generative/fid.py),
not Inception FID; it is computed for 28x28x1 samples only.
"""
from __future__ import annotations

import json
import logging
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from core import cli

# sampler -> the task a run must have trained; the diffusion samplers need labels and steps
RUN_TASK = {"ddpm": "diffusion", "ddim": "diffusion", "gan": "gan", "vae": "vae", "flow": "flow"}
SAMPLERS = tuple(RUN_TASK)


def parse(argv):
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (ddpm uses all T)")
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--guidance", type=float, default=0.0)
    parser.add_argument("--unconditional", action="store_true")
    parser.add_argument("--eta", type=float, default=0.0)
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="flow: the prior's standard deviation (Glow samples at 0.7)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-fid", action="store_true")
    parser.add_argument("--raw-params", action="store_true",
                        help="sample from the trained parameters even if the run keeps an EMA")
    return parser.parse_args(argv)


def _labels(task, num: int, unconditional: bool):
    classes = getattr(task, "null_class", None)
    if classes is None:
        return None
    if unconditional:
        return np.full(num, classes, np.int32)
    return (np.arange(num) % classes).astype(np.int32)


def generate(task, params, args) -> tuple[np.ndarray, np.ndarray | None]:
    """uint8 [num, H, W, C] samples (and their labels), in fixed-size batches."""
    from generative import diffusion, samplers
    diffusing = RUN_TASK[args.sampler] == "diffusion"
    labels = _labels(task, args.num, args.unconditional) if diffusing else None
    if args.sampler == "gan":
        run = jax.jit(lambda p, r: diffusion.unit_to_images(
            task.generate(p["generator"], task.latents(r, args.batch))))
    elif args.sampler == "vae":  # the decoder's mean at z ~ N(0, I)
        run = jax.jit(lambda p, r: task.sample(p, r, args.batch))
    elif args.sampler == "flow":
        run = jax.jit(lambda p, r: task.sample(p, r, args.batch, args.temperature))
    else:
        def run(p, r, y):
            return diffusion.unit_to_images(samplers.sample(
                task, p, r, args.batch, args.sampler, args.steps, y, args.guidance, args.eta))
    chunks = []
    for index, start in enumerate(range(0, args.num, args.batch)):
        rng = jax.random.fold_in(jax.random.key(args.seed), index)
        if not diffusing:
            chunks.append(np.asarray(run(params, rng)))
            continue
        label_B = None
        if labels is not None:
            label_B = np.resize(labels[start:start + args.batch], args.batch)  # pad the last
            label_B = jnp.asarray(label_B)
        chunks.append(np.asarray(run(params, rng, label_B)))
    return np.concatenate(chunks)[:args.num], labels


def write_grid(path: pathlib.Path, images_NHWC: np.ndarray, columns: int = 10) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    count = min(len(images_NHWC), columns * columns)
    rows = -(-count // columns)
    height, width, channels = images_NHWC.shape[1:]
    grid = np.full((rows * (height + 1), columns * (width + 1), channels), 255, np.uint8)
    for k in range(count):
        r, c = divmod(k, columns)
        grid[r * (height + 1):r * (height + 1) + height, c * (width + 1):c * (width + 1) + width] = images_NHWC[k]
    plt.imsave(path, grid[..., 0] if channels == 1 else grid, cmap="gray", vmin=0, vmax=255)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    args = parse(sys.argv[1:] if argv is None else argv)
    from core.config import ConfigError, load_run_config
    from vision.pipeline import restore
    if args.num < 1 or args.batch < 1:
        raise ConfigError("--num and --batch must be positive")
    config = load_run_config(args.workdir, [])
    wanted = RUN_TASK[args.sampler]
    if config.task != wanted:
        raise ConfigError(f"--sampler {args.sampler} needs a {wanted} run; {args.workdir} "
                          f"trained task {config.task!r}")
    args.batch = min(args.batch, args.num)
    setup, _, state, step = restore(config, args.workdir)
    from core.optim import ema_params
    ema = None if args.raw_params else ema_params(state.opt_state)
    params = jax.device_get(state.params if ema is None else ema)
    start = time.time()
    images, labels = generate(setup.task, params, args)
    seconds = time.time() - start
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_grid(out / "grid.png", images)
    np.savez_compressed(out / "samples.npz", images=images,
                        labels=labels if labels is not None else np.zeros(0, np.int32))
    result = {"workdir": args.workdir, "step": step, "sampler": args.sampler,
              "steps": (setup.task.schedule.timesteps if args.sampler == "ddpm" else args.steps)
              if wanted == "diffusion" else 1,
              "params": "raw" if ema is None else "ema",
              "num": args.num, "guidance": args.guidance, "eta": args.eta,
              "unconditional": args.unconditional, "temperature": args.temperature,
              "seed": args.seed,
              "sample_seconds": round(seconds, 1), "device": str(jax.devices()[0].platform)}
    if not args.no_fid and images.shape[1:] == (28, 28, 1):
        from generative import fid
        result["fid_fmnist"] = fid.fid_fmnist(images)
        result["fid_note"] = ("FID-FMNIST (our Fashion-MNIST CNN's 128-d features vs the 60k "
                              "train images), not Inception FID")
        if labels is not None and not args.unconditional:
            result["conditional_accuracy"] = fid.conditional_accuracy(images, labels)
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    cli.main_entry(main)
