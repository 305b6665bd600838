"""Glow (multi-scale: actnorm, invertible 1x1 conv, affine coupling) on 8-bit images.

  python -m experiments.main train --config experiments/configs/generative/flow.py:size=digits \\
      --workdir runs/flow-digits
  python -m experiments.main train --config experiments/configs/generative/flow.py \\
      --workdir runs/flow-fmnist
  python -m experiments.main evaluate --workdir runs/flow-fmnist
Args: size=fashion_mnist|fashion_mnist_large|digits, steps (0: the size's default), batch.
The eval metric is bits/dim of the test set with uniform dequantisation (generative/flow.py).
Target on Fashion-MNIST test: below 3.0 bits/dim (RealNVP/Glow-style flows reach ~2.9 and below).
Measured on CPU: size=digits (30 k parameters, 1,500 steps, ~25 s) reaches 5.31 bits/dim on the
digits test split, against 5.81 for a full-covariance Gaussian in the same logit space.
size=fashion_mnist (114 k parameters: 2 levels x 6 steps, 64-wide coupling nets) reaches 3.69
bits/dim on the test set after its 4,000 steps (16 min on one core, 5 steps/s; 4.08 / 3.84 /
3.75 / 3.71 at steps 800 / 1,600 / 2,400 / 3,200): the 3.0 target needs a larger flow trained
far longer than this size does.
"""
import ml_collections

from core.config import check_choice, parse_arg
from generative.flow import flow_config
from vision.pipeline import base_config

SIZES = {
    # name: (dataset, levels, steps per level, coupling width, batch, train steps, learning rate)
    "digits": ("digits", 2, 4, 32, 64, 1500, 2e-3),
    "fashion_mnist": ("fashion_mnist", 2, 6, 64, 64, 4000, 1e-3),
    "fashion_mnist_large": ("fashion_mnist", 2, 12, 128, 64, 6000, 1e-3),
}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    args = parse_arg(arg, size="fashion_mnist", steps=0, batch=0)
    check_choice("size", args.size, SIZES)
    dataset, levels, flow_steps, width, batch, steps, lr = SIZES[args.size]
    # Adam without weight decay or clipping (Glow's recipe), warmup then cosine decay.
    config = base_config("flow", dataset, args.steps or steps, args.batch or batch, lr,
                         weight_decay=0.0, clip_norm=0.0, b2=0.999)
    config.optim.warmup_steps = min(200, config.train.steps // 10)
    config.flow = flow_config(levels=levels, steps=flow_steps, width=width)
    return config
