"""DDPM diffusion (eps or v prediction, linear or cosine schedule, optional classifier-free
guidance) with a small U-Net, on 8-bit images.

  python -m experiments.main train --config experiments/configs/generative/diffusion.py:size=digits \\
      --workdir runs/diffusion-digits
  python -m experiments.main train --config experiments/configs/generative/diffusion.py \\
      --workdir runs/diffusion-fmnist                                   # an accelerator run
  python -m experiments.main train \\
      --config experiments/configs/generative/diffusion.py:size=fashion_mnist_cpu \\
      --workdir runs/diffusion-fmnist-cpu --config.train.max_wallclock_s=540
  python -m generative.sample --workdir runs/diffusion-fmnist --sampler ddim --steps 50 \\
      --num 1000 --out runs/diffusion-fmnist/samples-ddim50   # PNG grid + FID-FMNIST JSON
Args: size=digits|fashion_mnist|fashion_mnist_cpu, schedule=cosine|linear, prediction=v|eps
(default v: with the cosine schedule, eps-prediction's x0 = (x - sqrt(1-ab) eps) / sqrt(ab)
amplifies the network's error ~20,000x at t = 999, which deterministic DDIM never washes out;
v's x0 = sqrt(ab) x - sqrt(1-ab) v is well conditioned at every t: docs/generative.md),
conditional (class labels + null class, label dropout p_uncond), steps, batch.
The eval metric is the MSE per pixel of the training target at a random timestep (eps_mse: of
the noise, whatever the target); sample quality is FID-FMNIST (generative/fid.py), not a loss.
Sizes: digits (8x8, ~8 min on 2 CPU cores), fashion_mnist_cpu (a small U-Net, 2,000 steps in
18 min on one CPU core; with steps=8000, 72 min: FID-FMNIST 6.9 with DDPM-1000, 8.9-9.6 with
deterministic DDIM-50, 8.5 at eta 1; prediction=eps gives 8.2 and 20.6-22.1: docs/generative.md), fashion_mnist
(base width 64, 2 blocks per level, 30k steps of 128: for a GPU). The optimiser keeps a
parameter EMA (optim.ema_decay: 0.999, about the last 1,000 steps; 0.9999 as in Ho et al. suits
runs of 100k+ steps); generative.sample draws from it, and the eval loss uses the raw parameters.
"""
import ml_collections

from core.config import check_choice, parse_arg
from generative.diffusion import diffusion_config
from vision.pipeline import base_config

SIZES = {
    # name: (dataset, base width, channel mults, res blocks, batch, steps, learning rate)
    "digits": ("digits", 32, (1, 2), 1, 128, 1500, 1e-3),
    "fashion_mnist_cpu": ("fashion_mnist", 16, (1, 2, 2), 1, 64, 2000, 1e-3),
    "fashion_mnist": ("fashion_mnist", 64, (1, 2, 2), 2, 128, 30_000, 2e-4),
}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    args = parse_arg(arg, size="fashion_mnist", schedule="cosine", prediction="v",
                     conditional=True, steps=0, batch=0)
    check_choice("size", args.size, SIZES)
    dataset, width, mults, blocks, batch, steps, lr = SIZES[args.size]
    config = base_config("diffusion", dataset, args.steps or steps, args.batch or batch, lr,
                         weight_decay=0.0, b2=0.999, min_lr_ratio=0.1)
    config.train.eval_batches = 20   # 20 batches of held-out images: the loss is a noisy estimate
    config.optim.ema_decay = 0.999
    config.diffusion = diffusion_config(
        schedule=args.schedule, prediction=args.prediction, conditional=args.conditional,
        unet=dict(base_channels=width, channel_mults=mults, num_res_blocks=blocks,
                  attention_heads=4, groups=8, dropout=0.0))
    return config
