"""CLIP-style two towers (Radford et al. 2021) on synthetic Fashion-MNIST captions.

Image tower: vision/vit.py's ViT, pooled as its config says (mean of the patches or the class
token), then a linear projection. Text tower: lm/models/transformer.py's transformer, causal, pooled at the
[EOS] token as CLIP does (its hidden state after the final norm has seen the whole caption), then
a linear projection. Both embeddings are L2-normalised; logits are their cosines times a learned
scale exp(s), s initialised to log(1/0.07) and clipped at log(100) (CLIP clamps the parameter
after each step; clipping inside the forward pass gives the same scale and a zero gradient while
clipped). The loss is the symmetric InfoNCE: cross-entropy of image->text and text->image
logits against the diagonal, averaged.

Duplicates: Fashion-MNIST has 10 classes, so a batch of 256 holds ~25 pairs per class, and the
InfoNCE treats another image's caption of the same class as a negative even when it says the
same thing. That is the nature of CLIP on a labelled set: the loss cannot reach zero, and the
captions' attribute words (dark/light, small/large, read off the pixels) and templates are what
distinguish pairs within a class. Exact-pair retrieval recall@1 is bounded well below 1 for the
same reason, so `retrieval_metrics` also reports how often the top hit has the right class.

The batch's negatives are the whole global batch: under jit the [B, B] logits span every device's
rows. Gradient accumulation would shrink the negatives to a microbatch (a different objective),
so build_task refuses train.microbatches > 1.

Zero-shot classification: each class's embedding is the normalised mean of its prompt
embeddings (every synonym x held-out template, no attribute words), as CLIP's prompt ensembles;
an image is assigned the class of highest cosine.

Evaluate a trained run (zero-shot accuracy on the test split, recall@1/5 on 1000 test pairs):
  python -m vision.clip --workdir runs/clip
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from core import cli
from core.task import LossSums
from lm.models import param_tree
from lm.models import transformer as model_lib
from lm.models.transformer import TransformerConfig
from vision import augment, captions
from vision.classify import image_fields
from vision.vit import ViT, ViTConfig

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    vit: ViTConfig
    text: TransformerConfig            # causal; vocab_size and max_len from the caption table
    embed_dim: int = 128
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0

    def __post_init__(self):
        if not self.text.causal:
            raise ValueError("the text tower pools at [EOS], which needs a causal text config "
                             "(text.causal=True)")
        if self.embed_dim <= 0 or not 0 < self.init_temperature:
            raise ValueError(f"need embed_dim > 0 and init_temperature > 0, got "
                             f"{self.embed_dim}, {self.init_temperature}")
        if self.max_logit_scale < 1.0 / self.init_temperature:
            raise ValueError(f"max_logit_scale {self.max_logit_scale} is below the initial scale "
                             f"1/{self.init_temperature}; raise it or the temperature")


def _projection(features: int, name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=False, name=name, kernel_init=nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), ("embed", None)))


def _normalise(x_BE: Array) -> Array:
    x_BE = x_BE.astype(jnp.float32)
    return x_BE * jax.lax.rsqrt(jnp.sum(x_BE * x_BE, axis=-1, keepdims=True) + 1e-12)


class LogitScale(nn.Module):
    """The learned log logit scale (a leaf named "scale", so core/optim never decays it)."""
    init_value: float
    max_value: float

    @nn.compact
    def __call__(self) -> Array:
        log_scale = self.param("scale", nn.with_logical_partitioning(
            nn.initializers.constant(self.init_value), ()), (), jnp.float32)
        return jnp.exp(jnp.minimum(log_scale, math.log(self.max_value)))


class Clip(nn.Module):
    """(normalised images (B, H, W, C), caption tokens (B, L)) -> (image (B, E), text (B, E),
    logit scale): unit-norm embeddings in the shared space."""
    cfg: ClipConfig

    def setup(self):
        cfg = self.cfg
        self.image_tower = ViT(cfg.vit)
        self.text_tower = model_lib.Transformer(cfg.text)
        self.image_proj = _projection(cfg.embed_dim, "image_proj")
        self.text_proj = _projection(cfg.embed_dim, "text_proj")
        self.logit_scale = LogitScale(math.log(1.0 / cfg.init_temperature), cfg.max_logit_scale)

    def encode_image(self, images_BHWC: Array, train: bool = False) -> Array:
        return _normalise(self.image_proj(self.image_tower(images_BHWC, train, features=True)))

    def encode_text(self, tokens_BL: Array, train: bool = False) -> Array:
        """Captions [BOS] words [EOS] [PAD]...: the hidden state at [EOS] (the last real one)."""
        real_BL = (tokens_BL != captions.PAD).astype(jnp.int32)
        eos_B1 = jnp.maximum(jnp.sum(real_BL, axis=1, keepdims=True) - 1, 0)
        hidden_B1D = self.text_tower(tokens_BL, segment_ids_BT=real_BL, deterministic=not train,
                                     logits_at_BK=eos_B1, return_hidden=True)
        return _normalise(self.text_proj(hidden_B1D[:, 0]))

    def __call__(self, images_BHWC: Array, tokens_BL: Array, train: bool = False):
        return (self.encode_image(images_BHWC, train), self.encode_text(tokens_BL, train),
                self.logit_scale())


# ---------------------------------------------------------------------------------------------
# Loss and evaluation maths (pure functions; tests check them against NumPy)
# ---------------------------------------------------------------------------------------------

def contrastive_loss(image_BE: Array, text_BE: Array, scale: Array, mask_B: Array) -> Array:
    """Per-row symmetric InfoNCE (B,): (CE(image i -> texts) + CE(text i -> images)) / 2, with
    masked rows dropped from every row's negatives too (their own loss is set to 0)."""
    real_B = mask_B > 0
    logits_BB = scale * jnp.einsum("ie,te->it", image_BE, text_BE,
                                   preferred_element_type=jnp.float32)
    valid_BB = real_B[:, None] & real_B[None, :]
    logits_BB = jnp.where(valid_BB, logits_BB, -1e9)
    labels_B = jnp.arange(image_BE.shape[0])
    i2t_B = optax.softmax_cross_entropy_with_integer_labels(logits_BB, labels_B)
    t2i_B = optax.softmax_cross_entropy_with_integer_labels(logits_BB.T, labels_B)
    return jnp.where(real_B, 0.5 * (i2t_B + t2i_B), 0.0)


def class_embeddings(prompt_CQE: Array, weights_CQ: Array) -> Array:
    """(C, E): each class's weighted mean of unit prompt embeddings, renormalised."""
    mean_CE = jnp.einsum("cqe,cq->ce", prompt_CQE, weights_CQ) / jnp.sum(weights_CQ, 1)[:, None]
    return _normalise(mean_CE)


def zero_shot_predict(image_BE: Array, class_CE: Array) -> Array:
    return jnp.argmax(image_BE @ class_CE.T, axis=-1)


def recall_at_k(query_NE, target_NE, ks=(1, 5)) -> dict[int, float]:
    """Recall@k of query i retrieving target i among all N targets by cosine: the fraction of
    queries whose paired target has fewer than k targets strictly more similar (ties go to the
    pair)."""
    sims_NN = np.asarray(query_NE, np.float64) @ np.asarray(target_NE, np.float64).T
    rank_N = np.sum(sims_NN > np.diag(sims_NN)[:, None], axis=1)
    return {k: float(np.mean(rank_N < k)) for k in ks}


# ---------------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------------

def padded_vocab(size: int, multiple: int = 64) -> int:
    """Vocabulary rounded up so a "vocab"-sharded table divides over tensor-parallel devices."""
    return -(-size // multiple) * multiple


def vit_flops_per_example(cfg: ViTConfig, channels: int) -> float:
    """Training FLOPs of one image through the ViT's patch embedding and blocks: 6 x matmul
    parameters x tokens + 12 L D T^2 (attention), as param_tree.flops_per_token counts (a hybrid's
    CNN stem is not counted)."""
    from vision.vit import param_shapes
    shapes = nn.meta.unbox(param_shapes(cfg, channels)["params"])
    blocks = param_tree.count_params({k: v for k, v in shapes.items() if k.startswith("layers")})
    patch = cfg.patch * cfg.patch * channels * cfg.d_model
    T = cfg.num_tokens
    attention = 12.0 * cfg.num_layers * cfg.d_model * T * T
    return 6.0 * (blocks * T + patch * cfg.num_patches) + attention


def image_inputs(batch, rng, train: bool, info, crop_pad: int = 0, flip: bool = False):
    """Normalised float images of a batch, crop/flip-augmented in training. Captions are drawn
    from the unaugmented pixels (a flip keeps every attribute; a small crop nearly so)."""
    images = batch["image"]
    if train and (crop_pad or flip):
        images = augment.random_crop_flip(rng, images, crop_pad, flip)
    return augment.normalize(images, info)


def tower_configs(section, info) -> tuple[ViTConfig, TransformerConfig]:
    """(ViT, text/decoder transformer) configs from a config section's `vit` and `text_key`
    subsections, the ViT fitted to the dataset's image size; bad fields are ConfigErrors."""
    from core.config import ConfigError
    vit_fields = {**section.vit.to_dict(), "image_size": tuple(info.image_shape[:2])}
    text_key = "text" if "text" in section else "decoder"
    try:
        return ViTConfig(**vit_fields), TransformerConfig(**section[text_key].to_dict())
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{section_name(section)} towers: {error}") from error


def section_name(section) -> str:
    return "clip" if "text" in section else "captioning"


class ClipTask:
    """Contrastive image-caption training; captions drawn in the jitted loss from the labels,
    the pixels and the step's rng (training templates; held-out ones when train=False)."""
    name = "clip"

    def __init__(self, cfg: ClipConfig, info, eval_templates: str = "heldout",
                 crop_pad: int = 0, flip: bool = False):
        self.table = captions.caption_table(info.name)
        if info.num_classes != self.table.num_classes:
            raise ValueError(f"dataset {info.name!r} has {info.num_classes} classes but its "
                             f"captions name {self.table.num_classes}")
        text = dataclasses.replace(cfg.text, vocab_size=padded_vocab(self.table.vocab_size),
                                   max_len=max(cfg.text.max_len, self.table.length))
        vit = dataclasses.replace(cfg.vit, image_size=tuple(info.image_shape[:2]))
        self.cfg = dataclasses.replace(cfg, text=text, vit=vit)
        self.info = info
        self.eval_templates = eval_templates
        self.crop_pad, self.flip = crop_pad, flip
        captions.template_range(eval_templates)  # validates the name
        self.model = Clip(self.cfg)
        self.prompts_CQL, self.prompt_weights_CQ = captions.zero_shot_prompts(self.table)

    def init_params(self, rng):
        images = jnp.zeros((1, *self.info.image_shape), jnp.float32)
        tokens = jnp.full((1, self.table.length), captions.BOS, jnp.int32)
        return self.model.init({"params": rng}, images, tokens)["params"]

    def captions(self, batch, rng, train: bool) -> Array:
        keys_B = jax.random.split(rng, batch["label"].shape[0])
        split = "train" if train else self.eval_templates
        return captions.caption_tokens(keys_B, batch["label"], batch["image"], self.table, split)

    def class_embeddings(self, params) -> Array:
        C, Q, L = self.prompts_CQL.shape
        text_XE = self.model.apply({"params": params}, jnp.asarray(self.prompts_CQL.reshape(
            C * Q, L)), method=Clip.encode_text)
        return class_embeddings(text_XE.reshape(C, Q, -1), jnp.asarray(self.prompt_weights_CQ))

    def loss(self, params, batch, rng, train: bool) -> LossSums:
        caption_rng, dropout_rng, augment_rng = jax.random.split(rng, 3)
        tokens_BL = self.captions(batch, caption_rng, train)
        images_BHWC = image_inputs(batch, augment_rng, train, self.info, self.crop_pad, self.flip)
        image_BE, text_BE, scale = self.model.apply(
            {"params": params}, images_BHWC, tokens_BL, train,
            rngs={"dropout": dropout_rng} if train else None)
        mask_B = batch["mask"].astype(jnp.float32)
        loss_B = contrastive_loss(image_BE, text_BE, scale, mask_B)
        sims_BB = jnp.where(mask_B[None, :] > 0, image_BE @ text_BE.T, -jnp.inf)
        diagonal = jnp.arange(mask_B.shape[0])
        extra = {
            "image_to_text_in_batch": jnp.sum((jnp.argmax(sims_BB, 1) == diagonal) * mask_B),
            "text_to_image_in_batch": jnp.sum(
                (jnp.argmax(jnp.where(mask_B[:, None] > 0, sims_BB, -jnp.inf), 0) == diagonal)
                * mask_B),
            "logit_scale": scale * jnp.sum(mask_B),
        }
        if not train:
            predicted_B = zero_shot_predict(image_BE, self.class_embeddings(params))
            extra["zero_shot_accuracy"] = jnp.sum((predicted_B == batch["label"]) * mask_B)
        return LossSums(loss=jnp.sum(loss_B), weight=jnp.sum(mask_B), extra=extra)

    def batch_fields(self):
        return image_fields(self.info)

    def train_flops_per_example(self) -> float:
        L = self.table.length
        text = param_tree.flops_per_token(self.cfg.text, L) * L
        # flops_per_token counts the (unused) vocabulary projection; the text tower returns the
        # hidden state at [EOS] only, so that term is taken out.
        text -= 6.0 * self.cfg.text.vocab_size * self.cfg.text.d_model * L
        heads = 6.0 * self.cfg.embed_dim * (self.cfg.vit.d_model + self.cfg.text.d_model)
        return vit_flops_per_example(self.cfg.vit, self.info.image_shape[2]) + text + heads

    def units_per_example(self):
        return "images", 1

    def metrics(self, totals: dict[str, float]) -> dict[str, float]:
        weight = max(totals["weight"], 1.0)
        out = {"loss": totals["loss"] / weight, "images": totals["weight"]}
        out.update({k: v / weight for k, v in totals.items() if k not in ("loss", "weight")})
        return out


# ---------------------------------------------------------------------------------------------
# Evaluation over a test set: zero-shot accuracy and exact-pair retrieval
# ---------------------------------------------------------------------------------------------

def embed_test_set(task: ClipTask, params, images_NHWC, labels_N, seed: int = 0,
                   batch: int = 500):
    """(image (N, E), text (N, E)) of test images and their captions, the caption of example i
    drawn from (seed, i) with the task's evaluation templates."""
    encode = jax.jit(lambda p, x, t: task.model.apply(
        {"params": p}, augment.normalize(x, task.info), t))
    caption = jax.jit(lambda keys, y, x: captions.caption_tokens(
        keys, y, x, task.table, task.eval_templates))
    images, texts = [], []
    for start in range(0, len(labels_N), batch):
        x = jnp.asarray(images_NHWC[start:start + batch])
        y = jnp.asarray(labels_N[start:start + batch], jnp.int32)
        keys = captions.example_keys(seed, np.arange(start, start + len(y)))
        image_BE, text_BE, _ = encode(params, x, caption(keys, y, x))
        images.append(np.asarray(image_BE))
        texts.append(np.asarray(text_BE))
    return np.concatenate(images), np.concatenate(texts)


def retrieval_metrics(task: ClipTask, params, images_NHWC, labels_N, num_pairs: int = 1000,
                      seed: int = 0) -> dict[str, float]:
    """Zero-shot accuracy on every given image; recall@1/5 both ways on the first num_pairs
    (image, caption) pairs; and how often the top retrieved caption/image has the right class."""
    labels_N = np.asarray(labels_N)
    image_NE, text_NE = embed_test_set(task, params, images_NHWC, labels_N, seed)
    class_CE = np.asarray(jax.jit(task.class_embeddings)(params))
    out = {"zero_shot_accuracy": float(np.mean(np.argmax(image_NE @ class_CE.T, 1) == labels_N)),
           "images": len(labels_N), "pairs": min(num_pairs, len(labels_N))}
    image_NE, text_NE, pair_labels_N = (a[:num_pairs] for a in (image_NE, text_NE, labels_N))
    for direction, (query, target) in {"image_to_text": (image_NE, text_NE),
                                       "text_to_image": (text_NE, image_NE)}.items():
        for k, recall in recall_at_k(query, target, (1, 5)).items():
            out[f"{direction}_recall@{k}"] = recall
        top_N = np.argmax(query @ target.T, axis=1)
        out[f"{direction}_top1_same_class"] = float(np.mean(pair_labels_N[top_N] == pair_labels_N))
    return out


def build_task(config, info) -> ClipTask:
    """The task from a run config's `clip` section (vit, text, embed_dim, ...)."""
    from core.config import ConfigError
    if config.train.get("microbatches", 1) != 1:
        raise ConfigError("the contrastive loss takes its negatives from the whole batch; "
                          "train.microbatches > 1 would shrink them to a microbatch (a different "
                          "loss). Use train.microbatches=1 and a batch that fits")
    section = config.clip
    vit, text = tower_configs(section, info)
    try:
        cfg = ClipConfig(vit=vit, text=text, embed_dim=section.embed_dim,
                         init_temperature=section.init_temperature,
                         max_logit_scale=section.max_logit_scale)
        return ClipTask(cfg, info, section.eval_templates, section.crop_pad, section.flip)
    except ValueError as error:
        raise ConfigError(f"clip: {error}") from error


def evaluation_extras(setup, state, workdir) -> dict:
    """vision/commands.py's evaluate hook: retrieval recall@1/5 both ways on the eval split."""
    return retrieval_metrics(setup.task, jax.device_get(state.params), setup.eval_set.images,
                             setup.eval_set.labels)


def main(argv=None) -> int:
    import json

    from core.config import load_run_config
    from vision import pipeline
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--num-pairs", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = load_run_config(args.workdir)
    setup, engine, state, step = pipeline.restore(config, args.workdir)
    params = jax.device_get(state.params)
    result = retrieval_metrics(setup.task, params, setup.eval_set.images, setup.eval_set.labels,
                               args.num_pairs, args.seed)
    print(json.dumps({"step": step, "split": config.data.eval_split, **result}, indent=2))
    return 0


if __name__ == "__main__":
    cli.main_entry(main)
