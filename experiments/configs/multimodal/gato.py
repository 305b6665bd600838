"""A Gato-style generalist (multimodal/, docs/multimodal.md): one decoder trained on text,
captioned Fashion-MNIST images and expert control episodes, against specialists of its size.

  python -m experiments.main train --config experiments/configs/multimodal/gato.py:size=cpu \
      --workdir runs/gato
  python -m multimodal.evaluate --workdir runs/gato          (the study's metrics of one run)
A specialist trains on one domain with the same number of rows of that domain the generalist saw
(its share of the mixture times the steps): size=cpu,specialist=cartpole.
Sizes: tiny (tests, seconds), cpu (the study on 2 CPU cores).
"""
import dataclasses

import ml_collections

from core.config import check_choice, distributed_config, parse_arg
from core.engine import train_config
from core.mesh import DEFAULT_RULES, mesh_config
from core.optim import optim_config
from lm.models import transformer as model_lib
from multimodal.data import CONTROL, DOMAINS

SIZES = {
    # name: (layers, width, heads, seq_len, text vocab, batch, steps, learning rate,
    #        expert episodes (cartpole, acrobot, minigrid), validation episodes and rows)
    "tiny": (2, 64, 4, 128, 512, 8, 20, 3e-3, (2, 4, 4), 2, 8),
    "cpu": (4, 128, 4, 384, 2048, 16, 800, 2e-3, (100, 400, 800), 20, 64),
}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    args = parse_arg(arg, size="cpu", specialist="", seed=0)
    check_choice("size", args.size, SIZES)
    (layers, width, heads, seq_len, vocab, batch, steps, lr, episodes, val_episodes,
     val_rows) = SIZES[args.size]
    mixture = {d: 1.0 for d in DOMAINS}
    if args.specialist:
        check_choice("specialist", args.specialist, DOMAINS)
        # the same rows of its domain as the generalist: its share of the generalist's steps
        steps = max(1, round(steps * mixture[args.specialist] / sum(mixture.values())))
        mixture = {d: float(d == args.specialist) for d in DOMAINS}
    config = ml_collections.ConfigDict()
    config.task = "gato"
    config.gato = ml_collections.ConfigDict({
        "mixture": mixture,               # weight of each domain's rows
        "specialist": args.specialist,
        "patch_side": 7,                  # 28x28 images -> 16 patches of 7x7
        "patch_channels": 16,             # the residual block inside each patch
        "bins": 1024,                     # mu-law bins of continuous values
        "discrete_values": 256,           # discrete tokens (actions, grid cells)
        "local_positions": 64,            # places inside one step
        "episodes": dict(zip(CONTROL, episodes)),
        "validation_episodes": val_episodes,  # other reset seeds: validation and demonstrations
        "validation_rows": val_rows,      # fixed validation rows per domain
    })
    model = model_lib.preset("llama", vocab_size=0, num_layers=layers, d_model=width,
                             num_heads=heads, num_kv_heads=heads, max_len=seq_len)
    config.model = dataclasses.asdict(model)
    config.data = ml_collections.ConfigDict({
        "corpus": "austen+kjv", "text_column": "text", "val_fraction": 0.05, "split_seed": 0,
        "seq_len": seq_len, "cache_dir": "",
        "tokenizer": {"path": "", "kind": "bpe", "vocab_size": vocab,
                      "max_train_chars": 5_000_000},
    })
    config.train = train_config(steps=steps, global_batch_size=batch, seed=args.seed,
                                log_every=max(1, min(50, steps // 10)),
                                eval_every=max(1, steps // 3), eval_batches=4,
                                checkpoint_every=max(1, steps // 5))
    config.optim = optim_config(learning_rate=lr, warmup_steps=max(1, min(200, steps // 10)))
    config.mesh = mesh_config()
    config.sharding_rules = DEFAULT_RULES
    config.distributed = distributed_config()
    return config
