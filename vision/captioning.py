"""Show-and-Tell style captioning (Vinyals et al. 2015) with a ViT encoder and a transformer
decoder that cross-attends to the image tokens.

The model is lm/models/encoder_decoder.py's EncoderDecoder with the token encoder swapped for an image
encoder: vision/vit.py's ViT returns every token (B, N, D_vit), a linear map takes them to the
decoder's width, and EncoderDecoder.decode (the causal stack of lm/models/transformer.py blocks with a
cross-attention sublayer, the shared token embedding and output projection) does the rest. So
the decoder's attention, KV cache and sharding names are the language models' own.

Training is teacher forcing on the synthetic captions of vision/captions.py, drawn inside the
jitted loss from the label, the pixels and the step's rng (training templates only). Evaluation
adds greedy decoding through the KV cache (one decoder step per token, as
lm/seq2seq.decode_steps does; the image is encoded once) and scores the generated
caption: class-word accuracy is the fraction of images whose caption names the right class first
(any synonym counts; a caption naming no class is wrong). Teacher-forced token accuracy and loss
use the configured evaluation templates: "train" (default) measures generalisation to new
images; "heldout" adds templates the decoder has never seen, whose words it cannot predict.

Show captions of test images from a trained run:
  python -m vision.captioning --workdir runs/caption --num 10
"""
from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from core import cli
from core.task import LossSums
from lm.decode import decoding
from lm.models import param_tree
from lm.models.encoder_decoder import EncoderDecoder
from lm.models.transformer import TransformerConfig
from vision import augment, captions
from vision.classify import image_fields
from vision.clip import image_inputs, padded_vocab, tower_configs, vit_flops_per_example
from vision.vit import ViT, ViTConfig

Array = jax.Array


class ImageCaptioner(EncoderDecoder):
    """(normalised images (B, H, W, C), decoder inputs (B, T)) -> next-token logits (B, T, V).

    `cfg` is the decoder's TransformerConfig, `vit` the image encoder's. The inherited token
    encoder is never called, so it has no parameters."""
    vit: ViTConfig = None

    def setup(self):
        super().setup()
        self.image_encoder = ViT(self.vit)
        self.memory_proj = nn.Dense(
            self.cfg.d_model, name="memory_proj", kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), (None, "embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))

    def encode_images(self, images_BHWC: Array, deterministic: bool = True) -> Array:
        """The memory (B, N, D): every image token, projected to the decoder's width."""
        tokens_BND = self.image_encoder(images_BHWC, not deterministic, tokens=True)
        memory_BND = self.memory_proj(tokens_BND)
        return nn.with_logical_constraint(memory_BND, ("batch", "length", "embed"))

    def __call__(self, images_BHWC: Array, decoder_inputs_BT: Array,
                 deterministic: bool = True, decode: bool = False) -> Array:
        memory_BND = self.encode_images(images_BHWC, deterministic)
        return self.decode(decoder_inputs_BT, memory_BND, deterministic=deterministic,
                           decode=decode)


def init_cache(model: ImageCaptioner, images_BHWC: Array, length: int):
    """A zero decoder cache for these images' batch and `length` caption slots."""
    def create(images, tokens):
        return model.init(jax.random.key(0), images, tokens, decode=True)["cache"]
    shapes = jax.eval_shape(create, images_BHWC,
                            jax.ShapeDtypeStruct((images_BHWC.shape[0], length), jnp.int32))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def decode_captions(model: ImageCaptioner, params, images_BHWC: Array,
                    sampling: decoding.SamplingConfig,
                    memory_BND: Array | None = None) -> tuple[Array, Array]:
    """(tokens (B, N), logits (B, N, V)) of N = sampling.max_new_tokens cached decoder steps
    from [BOS]; temperature 0 is greedy. The images are encoded once (or memory_BND, their
    encoding, is given). Jittable (model and sampling static)."""
    B, N = images_BHWC.shape[0], sampling.max_new_tokens
    if memory_BND is None:
        memory_BND = model.apply({"params": params}, images_BHWC,
                                 method=ImageCaptioner.encode_images)
    cache = init_cache(model, images_BHWC, N)
    rng = jax.random.key(sampling.seed)

    def step(carry, i):
        token_B, cache = carry
        logits_B1V, variables = model.apply(
            {"params": params, "cache": cache}, token_B[:, None], memory_BND, None,
            jnp.ones((B, 1), jnp.int32), jnp.full((B, 1), i), decode=True, mutable=["cache"],
            method=EncoderDecoder.decode)
        logits_BV = logits_B1V[:, 0]
        token_B = decoding.choose_tokens(logits_BV, jax.random.fold_in(rng, i), sampling)
        return (token_B, variables["cache"]), (token_B, logits_BV)

    start_B = jnp.full((B,), captions.BOS, jnp.int32)
    _, (tokens_NB, logits_NBV) = jax.lax.scan(step, (start_B, cache), jnp.arange(N))
    return tokens_NB.T, logits_NBV.transpose(1, 0, 2)


class CaptioningTask:
    """Teacher-forced caption loss; evaluation also decodes greedily and checks the class word."""
    name = "captioning"

    def __init__(self, decoder_cfg: TransformerConfig, vit_cfg: ViTConfig, info,
                 eval_templates: str = "train", crop_pad: int = 0, flip: bool = False):
        self.table = captions.caption_table(info.name)
        if info.num_classes != self.table.num_classes:
            raise ValueError(f"dataset {info.name!r} has {info.num_classes} classes but its "
                             f"captions name {self.table.num_classes}")
        captions.template_range(eval_templates)  # validates the name
        self.cfg = dataclasses.replace(decoder_cfg, causal=True,
                                       vocab_size=padded_vocab(self.table.vocab_size),
                                       max_len=max(decoder_cfg.max_len, self.table.length))
        self.vit_cfg = dataclasses.replace(vit_cfg, image_size=tuple(info.image_shape[:2]))
        self.info = info
        self.eval_templates = eval_templates
        self.crop_pad, self.flip = crop_pad, flip
        self.model = ImageCaptioner(self.cfg, vit=self.vit_cfg)
        self.sampling = decoding.SamplingConfig(max_new_tokens=self.table.length - 1,
                                                stop_ids=(captions.EOS,), pad_id=captions.PAD)

    def init_params(self, rng):
        images = jnp.zeros((1, *self.info.image_shape), jnp.float32)
        tokens = jnp.zeros((1, self.table.length - 1), jnp.int32)
        return self.model.init({"params": rng}, images, tokens)["params"]

    def loss(self, params, batch, rng, train: bool) -> LossSums:
        caption_rng, dropout_rng, augment_rng = jax.random.split(rng, 3)
        keys_B = jax.random.split(caption_rng, batch["label"].shape[0])
        tokens_BL = captions.caption_tokens(keys_B, batch["label"], batch["image"], self.table,
                                            "train" if train else self.eval_templates)
        inputs_BT, targets_BT = tokens_BL[:, :-1], tokens_BL[:, 1:]
        images_BHWC = image_inputs(batch, augment_rng, train, self.info, self.crop_pad, self.flip)
        rngs = {"dropout": dropout_rng} if train else None
        memory_BND = self.model.apply({"params": params}, images_BHWC, not train, rngs=rngs,
                                      method=ImageCaptioner.encode_images)
        logits_BTV = self.model.apply({"params": params}, inputs_BT, memory_BND,
                                      deterministic=not train, rngs=rngs,
                                      method=EncoderDecoder.decode)
        mask_B = batch["mask"].astype(jnp.float32)
        mask_BT = (targets_BT != captions.PAD) * mask_B[:, None]
        nll_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)
        correct_BT = jnp.argmax(logits_BTV, axis=-1) == targets_BT
        extra = {"accuracy": jnp.sum(correct_BT * mask_BT)}
        if not train:
            generated_BN, _ = decode_captions(self.model, params, images_BHWC, self.sampling,
                                              memory_BND)
            named_B = captions.predicted_class(generated_BN, self.table)
            extra["class_word_correct"] = jnp.sum((named_B == batch["label"]) * mask_B)
            extra["images"] = jnp.sum(mask_B)
        return LossSums(loss=jnp.sum(nll_BT * mask_BT), weight=jnp.sum(mask_BT), extra=extra)

    def batch_fields(self):
        return image_fields(self.info)

    def train_flops_per_example(self) -> float:
        """The ViT, plus the decoder counted as lm/encoder_decoder.flops_per_example counts its
        decoder: T caption positions, cross-attention keys/values over the N image tokens."""
        T, S = self.table.length - 1, self.vit_cfg.num_tokens
        shapes = nn.meta.unbox(jax.eval_shape(self.init_params, jax.random.key(0)))
        decoder = param_tree.count_params(shapes["decoder"])
        cross_kv = 0
        for path, leaf in jax.tree_util.tree_leaves_with_path(shapes["decoder"]):
            names = [getattr(key, "key", None) for key in path]
            if "cross_attn" in names and names[-1] in ("w_k", "w_v", "b_k", "b_v"):
                cross_kv += int(np.prod(leaf.shape))
        matmuls = ((decoder - cross_kv + self.cfg.vocab_size * self.cfg.d_model) * T
                   + (cross_kv + self.vit_cfg.d_model * self.cfg.d_model) * S)
        attention = 12.0 * self.cfg.num_layers * self.cfg.d_attn * (T * T + T * S)
        return (vit_flops_per_example(self.vit_cfg, self.info.image_shape[2])
                + 6.0 * matmuls + attention)

    def units_per_example(self):
        return "images", 1

    def metrics(self, totals: dict[str, float]) -> dict[str, float]:
        tokens = max(totals["weight"], 1.0)
        out = {"loss": totals["loss"] / tokens, "token_accuracy": totals["accuracy"] / tokens,
               "target_tokens": totals["weight"]}
        if "images" in totals:
            out["class_word_accuracy"] = totals["class_word_correct"] / max(totals["images"], 1.0)
            out["images"] = totals["images"]
        return out

    @functools.cached_property
    def _generate(self):
        return jax.jit(lambda p, x: decode_captions(self.model, p, augment.normalize(x, self.info),
                                                    self.sampling)[0])

    def generate(self, params, images_BHWC) -> list[str]:
        """Greedy captions of uint8 images, as text."""
        tokens_BN = np.asarray(self._generate(params, jnp.asarray(images_BHWC)))
        return [self.table.tokenizer.decode(row) for row in tokens_BN]


def build_task(config, info) -> CaptioningTask:
    """The task from a run config's `captioning` section (vit, decoder, eval_templates, ...)."""
    from core.config import ConfigError
    section = config.captioning
    vit, decoder = tower_configs(section, info)
    try:
        return CaptioningTask(decoder, vit, info, section.eval_templates, section.crop_pad,
                              section.flip)
    except ValueError as error:
        raise ConfigError(f"captioning: {error}") from error


def main(argv=None) -> int:
    import json

    from core.config import load_run_config
    from vision import pipeline
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--num", type=int, default=10, help="evaluation images to caption")
    args = parser.parse_args(argv)
    config = load_run_config(args.workdir)
    setup, _, state, step = pipeline.restore(config, args.workdir)
    images, labels = setup.eval_set.images[:args.num], setup.eval_set.labels[:args.num]
    texts = setup.task.generate(jax.device_get(state.params), images)
    names = setup.info.class_names
    print(json.dumps({"step": step, "captions": [
        {"label": names[int(label)], "caption": text} for label, text in zip(labels, texts)]},
        indent=2))
    return 0


if __name__ == "__main__":
    cli.main_entry(main)
