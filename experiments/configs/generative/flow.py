"""Glow (multi-scale: actnorm, invertible 1x1 conv, affine coupling) on 8-bit images.

  python -m experiments.main train --config experiments/configs/generative/flow.py:size=digits \\
      --workdir runs/flow-digits
  python -m experiments.main train --config experiments/configs/generative/flow.py \\
      --workdir runs/flow-fmnist
  python -m experiments.main evaluate --workdir runs/flow-fmnist
Args: size=fashion_mnist|digits, steps (0: the size's default), batch.
The eval metric is bits/dim of the test set with uniform dequantisation (generative/flow.py).
Target on Fashion-MNIST test: below 3.0 bits/dim (RealNVP/Glow-style flows reach ~2.9 and below).
Measured (2 shared CPU cores, other jobs running; runs stopped by --config.train.max_wallclock_s
and resumed): size=digits (30 k parameters, 1,500 steps, ~25 s) reaches 5.31 bits/dim on the
digits test split, against 5.81 for a full-covariance Gaussian in the same logit space.
size=fashion_mnist (114 k parameters: 2 levels x 6 steps, 64-wide coupling nets) reached 4.39
bits/dim after 639 steps (9 min), 4.00 after 1,200 (18 min), 3.80 after 2,200 (27 min, 2.3
epochs); its 4,000 steps were not run to the end here, and on these shared cores the 3.0 target
is beyond a 30-minute budget.
"""
import ml_collections

from core.config import ConfigError, parse_arg
from generative.flow import flow_config
from vision.pipeline import base_config

SIZES = {
    # name: (dataset, levels, steps per level, coupling width, batch, train steps, learning rate)
    "digits": ("digits", 2, 4, 32, 64, 1500, 2e-3),
    "fashion_mnist": ("fashion_mnist", 2, 6, 64, 64, 4000, 1e-3),
}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    args = parse_arg(arg, size="fashion_mnist", steps=0, batch=0)
    if args.size not in SIZES:
        raise ConfigError(f"size {args.size!r} is not one of {sorted(SIZES)}")
    dataset, levels, flow_steps, width, batch, steps, lr = SIZES[args.size]
    # Adam without weight decay or clipping (Glow's recipe), warmup then cosine decay.
    config = base_config("flow", dataset, args.steps or steps, args.batch or batch, lr,
                         weight_decay=0.0, clip_norm=0.0, b2=0.999)
    config.optim.warmup_steps = min(200, config.train.steps // 10)
    config.flow = flow_config(levels=levels, steps=flow_steps, width=width)
    return config
