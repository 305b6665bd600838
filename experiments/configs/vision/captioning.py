"""Show-and-Tell style captioning on Fashion-MNIST (or the 8x8 digits): a ViT encoder and a
transformer decoder that cross-attends to the image tokens, trained by teacher forcing on
synthetic captions (vision/captions.py).

  python -m experiments.main train --config experiments/configs/vision/captioning.py:size=digits \\
      --workdir runs/caption-digits
  python -m experiments.main train --config experiments/configs/vision/captioning.py \\
      --workdir runs/caption-fmnist
  python -m vision.captioning --workdir runs/caption-fmnist --num 10   # greedy captions
Sizes: tiny (tests), digits, fashion_mnist (7x7 patches and a 2-layer decoder, small enough for
2 CPU cores; on an accelerator use --config.captioning.vit.patch=4 and more steps). Evaluation
reports the teacher-forced loss and token accuracy on test images (training templates by
default: --config.captioning.eval_templates=heldout scores unseen templates) and the class-word
accuracy of greedy captions (the first class word named must be the label's).
Measured (2 shared CPU cores, 7.5 min; 400 steps of 128 = 0.85 epoch):
  ... captioning.py:size=fashion_mnist --config.train.steps=400 --config.train.global_batch_size=128
  on the 10k test images: class-word accuracy 77.7%, teacher-forced token accuracy 71.1%, loss
  0.904 nats/token; e.g. "a silhouette of a large light jumper" for a Pullover.
"""
import dataclasses

import ml_collections

from core.config import check_choice, parse_arg
from lm.models.transformer import TransformerConfig
from vision.pipeline import base_config
from vision.vit import ViTConfig

# size -> (dataset, ViT (patch, layers, width, heads, mlp), decoder (layers, width, heads),
#          batch, steps, learning rate)
SIZES = {
    "tiny": ("digits", (2, 1, 32, 2, 64), (1, 32, 2), 64, 20, 3e-3),
    "digits": ("digits", (2, 2, 64, 4, 128), (2, 64, 4), 128, 1000, 1e-3),
    "fashion_mnist": ("fashion_mnist", (7, 4, 128, 4, 256), (2, 128, 4), 256, 2000, 1e-3),
}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    args = parse_arg(arg, size="fashion_mnist")
    check_choice("size", args.size, SIZES)
    dataset, vit, decoder, batch, steps, lr = SIZES[args.size]
    patch, layers, width, heads, mlp = vit
    image = 8 if dataset == "digits" else 28
    vit_cfg = ViTConfig(image_size=(image, image), patch=patch, num_layers=layers, d_model=width,
                        num_heads=heads, mlp_dim=mlp, num_classes=10, pool="mean", dropout=0.0)
    # The decoder of lm/models/encoder_decoder.py: causal, pre-norm, learned positions, tied output.
    # vocab_size and max_len are set from the caption vocabulary when the task is built.
    dec_layers, dec_width, dec_heads = decoder
    decoder_cfg = TransformerConfig(vocab_size=0, num_layers=dec_layers, d_model=dec_width,
                                    num_heads=dec_heads, max_len=16)
    config = base_config("captioning", dataset, steps, batch, lr, weight_decay=0.1, b2=0.98,
                         min_lr_ratio=0.0)
    config.captioning = ml_collections.ConfigDict({
        "vit": dataclasses.asdict(vit_cfg),
        "decoder": dataclasses.asdict(decoder_cfg),
        "eval_templates": "train",     # "heldout": templates the decoder never saw
        "crop_pad": 0,
        "flip": dataset == "fashion_mnist",
    })
    return config
