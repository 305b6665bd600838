"""ELECTRA pretraining (replaced-token detection, Clark et al. 2020) on the offline corpus.

  python -m experiments.main train --config experiments/configs/lm/electra.py:size=demo \
      --workdir runs/electra-demo
The discriminator is bert.py's encoder (positions=rope|learned as there) at the same size (tiny: 2
layers, width 64; demo: 4 layers, width 256); the generator has its depth and a quarter of its
width, heads and d_ff (generator_width_ratio, the paper's best 1/4 to 1/2), sharing its token
embeddings. 15% of the tokens are masked (85% [MASK], 15% kept, as ELECTRA's code); the loss is the
generator's MLM loss + 50 x the discriminator's binary cross-entropy over every real token (the
paper's lambda). On the tiny size (Austen only, CPU, tests/test_electra_distill.py,
positions=learned) the joint loss falls from 41.1 to 23.2 in 30 steps (generator MLM 6.46 -> 5.68,
discriminator 0.693 -> 0.350). Fine-tune the discriminator as an encoder (see lm/objectives/electra.py).
Override anything, e.g. --config.electra.generator_width_ratio=0.5.
"""
import ml_collections

from core.config import parse_arg
from experiments.configs.lm import bert


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    args = parse_arg(arg, size="demo", corpus="austen+kjv+brown", positions=bert.POSITIONS[0])
    config = bert.get_config(f"size={args.size},corpus={args.corpus},positions={args.positions}")
    config.task = "electra"
    del config.masking  # the electra section holds ELECTRA's masking
    config.electra = ml_collections.ConfigDict({
        "rate": 0.15,                   # tokens the generator fills in
        "mask_token_prob": 0.85,        # of those, shown to the generator as [MASK] (rest kept)
        "generator_width_ratio": 0.25,  # generator width / discriminator width
        "disc_weight": 50.0,            # lambda on the discriminator's loss
    })
    return config
