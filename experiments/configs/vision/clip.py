"""CLIP-style contrastive training of a ViT and a text transformer on Fashion-MNIST (or the 8x8
digits) with synthetic captions (vision/captions.py).

  python -m experiments.main train --config experiments/configs/vision/clip.py:size=digits \\
      --workdir runs/clip-digits
  python -m experiments.main train --config experiments/configs/vision/clip.py \\
      --workdir runs/clip-fmnist
  python -m vision.clip --workdir runs/clip-fmnist   # zero-shot accuracy, recall@1/5 (1000 pairs)
Sizes: digits (seconds per hundred steps on 2 CPU cores), fashion_mnist (a ViT with 7x7 patches
and a 2-layer text tower, small enough for CPU; on an accelerator use --config.clip.vit.patch=4
and more steps). Evaluation during training reports the in-batch contrastive loss on held-out
templates and zero-shot accuracy over the whole test split (held-out prompt templates).
Measured (2 shared CPU cores, 8 min; 400 steps of 128 = 0.85 epoch):
  ... clip.py:size=fashion_mnist --config.train.steps=400 --config.train.global_batch_size=128
  zero-shot accuracy (held-out templates, 10k test images) 79.6%; on 1000 test pairs
  image->text recall@1/5 2.4%/8.3%, text->image 2.1%/8.9%; the top-ranked caption has the
  image's class 79.5% of the time, the top-ranked image the caption's class 96.0%. Exact-pair
  recall is low by construction: ~100 of the 1000 captions share each class and ~25 also its
  attributes (choosing uniformly among the captions consistent with the image's class and
  attributes gives recall@1/5 1.5%/7.4% image->text, 2.1%/10.1% text->image).
"""
import dataclasses

import ml_collections

from core.config import check_choice, parse_arg
from lm.models.transformer import TransformerConfig
from vision.pipeline import base_config
from vision.vit import ViTConfig

# size -> (dataset, ViT (patch, layers, width, heads, mlp), text (layers, width, heads),
#          embed dim, batch, steps, learning rate)
SIZES = {
    "tiny": ("digits", (2, 1, 32, 2, 64), (1, 32, 2), 32, 64, 20, 3e-3),
    "digits": ("digits", (2, 2, 64, 4, 128), (2, 64, 4), 64, 128, 1000, 1e-3),
    "fashion_mnist": ("fashion_mnist", (7, 4, 128, 4, 256), (2, 128, 4), 128, 256, 2000, 1e-3),
}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    args = parse_arg(arg, size="fashion_mnist")
    check_choice("size", args.size, SIZES)
    dataset, vit, text, embed_dim, batch, steps, lr = SIZES[args.size]
    patch, layers, width, heads, mlp = vit
    image = 8 if dataset == "digits" else 28
    vit_cfg = ViTConfig(image_size=(image, image), patch=patch, num_layers=layers, d_model=width,
                        num_heads=heads, mlp_dim=mlp, num_classes=10, pool="mean", dropout=0.0)
    # CLIP's text tower: causal, pre-norm, learned positions, pooled at [EOS]. vocab_size and
    # max_len are set from the caption vocabulary when the task is built.
    text_layers, text_width, text_heads = text
    text_cfg = TransformerConfig(vocab_size=0, num_layers=text_layers, d_model=text_width,
                                 num_heads=text_heads, max_len=16)
    config = base_config("clip", dataset, steps, batch, lr, weight_decay=0.1, b2=0.98,
                         min_lr_ratio=0.0)
    config.clip = ml_collections.ConfigDict({
        "vit": dataclasses.asdict(vit_cfg),
        "text": dataclasses.asdict(text_cfg),
        "embed_dim": embed_dim,
        "init_temperature": 0.07,      # CLIP: logit scale exp(s), s = log(1/0.07) at init
        "max_logit_scale": 100.0,      # and clipped at 100
        "eval_templates": "heldout",   # evaluation captions and zero-shot prompts
        "crop_pad": 0,
        "flip": dataset == "fashion_mnist",  # mirroring keeps a garment's class and attributes
    })
    return config
