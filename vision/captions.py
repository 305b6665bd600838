"""Synthetic captions for labelled images: templates x synonyms x attributes read off the pixels.

Fashion-MNIST (and the 8x8 digits) come with a class label only, so the captions that CLIP-style
training and captioning need are written here: a template ("a grayscale picture of {a} {desc}"),
a synonym of the class ("tee", "t-shirt", "top"), and attribute words that are true of the image,
computed deterministically from its pixels: "dark"/"light" from the mean intensity of the object's
pixels and "small"/"large" from the fraction of the frame the object covers (thresholds near the
Fashion-MNIST training medians, so each word splits the data roughly in half). An attribute form
(none, brightness, size or both) is drawn per caption, so captions carry more than the label.

Templates are split once and for all into training templates and held-out ones (the last
quarter); training captions never use a held-out template, and zero-shot prompts and evaluation
captions use only held-out ones. Every filled-in caption is checked to be produced by exactly one
template, so "a held-out template never appears in training" is a fact about the strings too.

Tokenizer: a word-level vocabulary of every word the templates, synonyms and attributes can
produce, plus [PAD] [BOS] [EOS] [UNK]. The caption language is closed and synthetic (a few
hundred words), so a learned subword vocabulary would only split known words into pieces; a word
vocabulary keeps captions short (at most `CaptionTable.length` tokens) and class words single
tokens, which makes "did the caption name the class" a token lookup.

All captions of a dataset are precomputed as one token table [classes, synonyms, templates,
attribute phrases, length], small enough (< 1 MB) to index inside a jitted loss.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIAL_TOKENS = ("[PAD]", "[BOS]", "[EOS]", "[UNK]")

# Object pixels are those above OBJECT_LEVEL (in [0, 1]); the thresholds are close to the medians
# over the Fashion-MNIST training set (covered fraction 0.460, object intensity 0.650; the 8x8
# digits have 0.469 and 0.639), measured when this module was written.
OBJECT_LEVEL = 0.1
LARGE_FRACTION = 0.46
LIGHT_INTENSITY = 0.65

# {a} is the article of the description that follows it ("a", "an" or "a pair of").
TEMPLATES = (
    "a photo of {a} {desc}",
    "a picture of {a} {desc}",
    "a grayscale picture of the {desc}",
    "someone's {desc} on a plain background",
    "an image showing {a} {desc}",
    "a low resolution photo of {a} {desc}",
    "a black and white photo of the {desc}",
    "this is {a} {desc}",
    "here we see {a} {desc}",
    "a thumbnail of {a} {desc}",
    "a centered {desc} on black",
    "the {desc} in the middle of the frame",
    "a product shot of {a} {desc}",
    "a close up of the {desc}",
    "a blurry photo of {a} {desc}",
    "a catalogue image of {a} {desc}",
    "there is {a} {desc} in this picture",
    "a scan of {a} {desc}",
    "{a} {desc} seen from the front",
    "a tiny image of {a} {desc}",
    "my {desc}",
    "a cropped photo of the {desc}",
    "a pixelated {desc}",
    "the picture shows {a} {desc}",
    "a monochrome rendering of {a} {desc}",
    "an example of {a} {desc}",
    "just {a} {desc}",
    "a sketch of {a} {desc}",
    "a snapshot of the {desc}",
    "a silhouette of {a} {desc}",
    # held out (the last quarter): zero-shot prompts and evaluation captions only
    "a good photo of {a} {desc}",
    "a faded picture of the {desc}",
    "look at this {desc}",
    "an old photo of {a} {desc}",
    "it is {a} {desc}",
    "a quick shot of the {desc}",
    "the {desc} on an empty background",
    "a drawing of {a} {desc}",
    "a photograph of my {desc}",
    "an icon of {a} {desc}",
)
HELDOUT_FRACTION = 0.25
NUM_TRAIN_TEMPLATES = len(TEMPLATES) - round(HELDOUT_FRACTION * len(TEMPLATES))

# (noun phrase, plural) per class. Every synonym holds a word no other class uses (its keyword).
FASHION_MNIST_SYNONYMS = (
    (("t-shirt", False), ("tee", False), ("top", False)),
    (("trousers", True), ("pants", True), ("slacks", True)),
    (("pullover", False), ("sweater", False), ("jumper", False)),
    (("dress", False), ("gown", False), ("frock", False)),
    (("coat", False), ("jacket", False), ("overcoat", False)),
    (("sandal", False), ("strappy sandal", False), ("slide", False)),
    (("shirt", False), ("blouse", False), ("button-up shirt", False)),
    (("sneaker", False), ("trainer", False), ("running shoe", False)),
    (("bag", False), ("handbag", False), ("purse", False)),
    (("ankle boot", False), ("boot", False), ("bootie", False)),
)
_DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGITS_SYNONYMS = tuple(((name, False), (f"digit {name}", False), (f"handwritten {name}", False))
                        for name in _DIGIT_NAMES)
SYNONYMS = {"fashion_mnist": FASHION_MNIST_SYNONYMS, "digits": DIGITS_SYNONYMS}

# Attribute phrases, indexed by phrase_index(form, light, large). Form 0: none; 1: brightness;
# 2: size; 3: both.
PHRASES = ("", "dark", "light", "small", "large",
           "small dark", "small light", "large dark", "large light")
NUM_FORMS = 4


def phrase_index(form, light, large):
    """Row of PHRASES for an attribute form and the image's two attributes (arrays or ints)."""
    light = jnp.asarray(light, jnp.int32)
    large = jnp.asarray(large, jnp.int32)
    return jnp.select([form == 0, form == 1, form == 2],
                      [jnp.zeros_like(light), 1 + light, 3 + large], 5 + 2 * large + light)


def image_attributes(images_BHWC) -> tuple[jax.Array, jax.Array]:
    """(light_B, large_B) booleans of uint8 images: the object's mean intensity and covered
    fraction against the module's thresholds (channels averaged first)."""
    x_BHW = jnp.mean(jnp.asarray(images_BHWC, jnp.float32), axis=-1) / 255.0
    object_BHW = (x_BHW > OBJECT_LEVEL).astype(jnp.float32)
    count_B = jnp.sum(object_BHW, axis=(1, 2))
    fraction_B = count_B / (x_BHW.shape[1] * x_BHW.shape[2])
    intensity_B = jnp.sum(x_BHW * object_BHW, axis=(1, 2)) / jnp.maximum(count_B, 1.0)
    return intensity_B >= LIGHT_INTENSITY, fraction_B >= LARGE_FRACTION


def _article(desc: str, plural: bool) -> str:
    if plural:
        return "a pair of"
    return "an" if desc[0] in "aeiou" else "a"


def fill(template: str, noun: str, plural: bool, phrase: str) -> str:
    desc = f"{phrase} {noun}".strip()
    return template.format(a=_article(desc, plural), desc=desc)


class WordTokenizer:
    """Whitespace word tokenizer over a fixed vocabulary (specials first)."""

    def __init__(self, words):
        self.vocab = list(SPECIAL_TOKENS) + sorted(set(words) - set(SPECIAL_TOKENS))
        self.ids = {w: i for i, w in enumerate(self.vocab)}

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        return [self.ids.get(w, UNK) for w in text.lower().split()]

    def decode(self, ids) -> str:
        words = []
        for i in np.asarray(ids).tolist():
            if i == EOS:
                break
            if i not in (PAD, BOS):
                words.append(self.vocab[i] if 0 <= i < len(self.vocab) else SPECIAL_TOKENS[UNK])
        return " ".join(words)


@dataclasses.dataclass(frozen=True)
class CaptionTable:
    """Every caption of one dataset as tokens [BOS] words [EOS] [PAD]..., with what built them.

    tokens_CSTPL: [classes, synonyms, templates, phrases, length]; a class with fewer synonyms
    than S repeats its last one (syn_counts_C says how many are real). keyword_class_V: for every
    vocabulary id, the class whose keyword it is, or -1."""
    dataset: str
    synonyms: tuple
    tokenizer: WordTokenizer
    tokens_CSTPL: np.ndarray
    syn_counts_C: np.ndarray
    keyword_class_V: np.ndarray

    @property
    def num_classes(self) -> int:
        return self.tokens_CSTPL.shape[0]

    @property
    def length(self) -> int:
        return self.tokens_CSTPL.shape[-1]

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def text(self, label: int, synonym: int, template: int, phrase: int) -> str:
        noun, plural = self.synonyms[label][min(synonym, len(self.synonyms[label]) - 1)]
        return fill(TEMPLATES[template], noun, plural, PHRASES[phrase])


def _keywords(synonyms) -> list[set[str]]:
    words = [{w for noun, _ in syns for w in noun.split()} for syns in synonyms]
    keywords = []
    for c, mine in enumerate(words):
        others = set().union(*(w for k, w in enumerate(words) if k != c))
        keywords.append(mine - others)
        for noun, _ in synonyms[c]:
            if not set(noun.split()) & keywords[c]:
                raise ValueError(f"synonym {noun!r} of class {c} has no word of its own: every "
                                 "synonym needs a word no other class uses")
    return keywords


@functools.lru_cache(maxsize=None)
def caption_table(dataset: str) -> CaptionTable:
    """The caption table of a dataset ("fashion_mnist" or "digits")."""
    if dataset not in SYNONYMS:
        raise ValueError(f"no captions for dataset {dataset!r}; captions exist for "
                         f"{sorted(SYNONYMS)} (add its class synonyms to vision/captions.py)")
    synonyms = SYNONYMS[dataset]
    keywords = _keywords(synonyms)
    reserved = set().union(*keywords) | {w for p in PHRASES for w in p.split()}
    for template in TEMPLATES:
        clash = reserved & set(template.split())
        if clash:
            raise ValueError(f"template {template!r} uses {sorted(clash)}, which are class "
                             "keywords or attribute words; captions would name the wrong thing")
    C, S, T, P = len(synonyms), max(len(s) for s in synonyms), len(TEMPLATES), len(PHRASES)
    texts = {}
    for c in range(C):
        for s in range(S):
            noun, plural = synonyms[c][min(s, len(synonyms[c]) - 1)]
            for t in range(T):
                for p in range(P):
                    texts[c, s, t, p] = fill(TEMPLATES[t], noun, plural, PHRASES[p])
    owner = {}
    for (c, s, t, p), text in texts.items():
        if owner.setdefault(text, t) != t:
            raise ValueError(f"templates {owner[text]} and {t} both produce {text!r}")
    tokenizer = WordTokenizer(w for text in texts.values() for w in text.split())
    L = 2 + max(len(text.split()) for text in texts.values())
    tokens = np.full((C, S, T, P, L), PAD, np.int32)
    for (c, s, t, p), text in texts.items():
        ids = [BOS, *tokenizer.encode(text), EOS]
        tokens[c, s, t, p, :len(ids)] = ids
    keyword_class = np.full(len(tokenizer), -1, np.int32)
    for c, words in enumerate(keywords):
        keyword_class[[tokenizer.ids[w] for w in words]] = c
    return CaptionTable(dataset, synonyms, tokenizer, tokens,
                        np.array([len(s) for s in synonyms], np.int32), keyword_class)


def template_range(split: str) -> tuple[int, int]:
    """[start, stop) of the template indices of "train" or "heldout"."""
    if split == "train":
        return 0, NUM_TRAIN_TEMPLATES
    if split == "heldout":
        return NUM_TRAIN_TEMPLATES, len(TEMPLATES)
    raise ValueError(f"template split must be 'train' or 'heldout', got {split!r}")


def draw_choices(keys_B, labels_B, table: CaptionTable, split: str):
    """(synonym_B, template_B, form_B): one independent draw per key (jax, jittable)."""
    start, stop = template_range(split)
    syn_counts_C = jnp.asarray(table.syn_counts_C)

    def one(key, label):
        k_syn, k_template, k_form = jax.random.split(key, 3)
        return (jax.random.randint(k_syn, (), 0, syn_counts_C[label]),
                jax.random.randint(k_template, (), start, stop),
                jax.random.randint(k_form, (), 0, NUM_FORMS))
    return jax.vmap(one)(keys_B, labels_B)


def caption_tokens(keys_B, labels_B, images_BHWC, table: CaptionTable, split: str):
    """Caption tokens [B, L] for labelled uint8 images, drawn from per-example keys: the same key,
    label and image always give the same caption (jax, jittable)."""
    syn_B, template_B, form_B = draw_choices(keys_B, labels_B, table, split)
    light_B, large_B = image_attributes(images_BHWC)
    phrase_B = phrase_index(form_B, light_B, large_B)
    return jnp.asarray(table.tokens_CSTPL)[labels_B, syn_B, template_B, phrase_B]


def example_keys(seed: int, indices_B) -> jax.Array:
    """Per-example keys from (seed, example index): captions that depend on nothing else."""
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(indices_B, jnp.uint32))


def zero_shot_prompts(table: CaptionTable, split: str = "heldout"):
    """(tokens [C, Q, L], weights [C, Q]): every synonym x template of the split with no
    attribute words, Q = synonyms x templates; weight 0 marks a repeated synonym's slot."""
    start, stop = template_range(split)
    tokens_CSTL = table.tokens_CSTPL[:, :, start:stop, 0]
    C, S, T, L = tokens_CSTL.shape
    real_CS = np.arange(S)[None, :] < table.syn_counts_C[:, None]
    weights_CST = np.broadcast_to(real_CS[:, :, None], (C, S, T)).astype(np.float32)
    return tokens_CSTL.reshape(C, S * T, L), weights_CST.reshape(C, S * T)


def predicted_class(tokens_BN, table: CaptionTable) -> jax.Array:
    """The class named by each generated caption: that of its first keyword before [EOS], or -1
    (jax, jittable)."""
    tokens_BN = jnp.asarray(tokens_BN)
    before_eos_BN = jnp.cumsum(tokens_BN == EOS, axis=1) == 0
    class_BN = jnp.where(before_eos_BN, jnp.asarray(table.keyword_class_V)[tokens_BN], -1)
    first_B = jnp.argmax(class_BN >= 0, axis=1)
    return jnp.where(jnp.any(class_BN >= 0, axis=1),
                     jnp.take_along_axis(class_BN, first_B[:, None], axis=1)[:, 0], -1)
