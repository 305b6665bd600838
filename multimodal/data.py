"""The generalist's data: every domain's examples, mixed by weight into resumable batches.

Domains (their order gives the domain ids the loss reports by):
  text       the built-in corpora (data.corpus), split by document; windows of our tokenizer's ids
  captions   Fashion-MNIST training images, each followed by a templated caption of it (the
             training templates of vision/captions.py; held-out ones are left for evaluation)
  cartpole, acrobot, minigrid   expert episodes (multimodal/environments.py), played once per
             (task, count, seed) and cached; windows of whole steps
Batch `step` is a pure function of (seed, step): each row draws its domain by weight, then fills
itself with that domain's examples (several captions share a row), so the iterator's state is the
step and a resumed run reads the same batches. A specialist is the same mixture with one domain.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from core.batches import StepBatches, digest
from core.config import DataError
from core.packages import atomic_write, cache_dir
from multimodal import environments, sequences, tokens
from vision import captions as captions_lib

DOMAINS = ("text", "captions", "cartpole", "acrobot", "minigrid")
CONTROL = ("cartpole", "acrobot", "minigrid")


# ------------------------------------------------------------------------------ control


def expert_episodes(name: str, count: int, seed: int, cache: str = "",
                    progress: bool = True) -> list[environments.Episode]:
    """`count` expert episodes from reset seeds seed, seed+1, ...; cached as one .npz."""
    import gymnasium
    control = environments.task(name)
    path = (cache_dir(cache) / "gato" /
            f"{name}-{count}-{seed}-{digest(gymnasium.__version__, control.env_id)[:8]}.npz")
    if path.is_file():
        with np.load(path) as saved:
            ends = np.cumsum(saved["lengths"])[:-1]
            return [environments.Episode(c, d, a, float(r)) for c, d, a, r in zip(
                np.split(saved["continuous"], ends), np.split(saved["discrete"], ends),
                np.split(saved["actions"], ends), saved["returns"])]
    from tqdm import tqdm
    env = control.make()
    episodes = [environments.play(control, control.expert, seed + i, env)
                for i in tqdm(range(count), desc=f"{name} expert", disable=not progress)]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: np.savez(
        f, continuous=np.concatenate([e.continuous for e in episodes]),
        discrete=np.concatenate([e.discrete for e in episodes]),
        actions=np.concatenate([e.actions for e in episodes]),
        returns=np.array([e.ret for e in episodes]),
        lengths=np.array([len(e.actions) for e in episodes])), "wb")
    return episodes


@dataclasses.dataclass
class ControlSource:
    control: environments.ControlTask
    episodes: list
    vocab: tokens.Vocabulary

    def example(self, rng: np.random.Generator, seq_len: int) -> sequences.Example:
        """A window of whole steps of a random episode, at a random step."""
        per_step = sequences.observation_length(self.control) + 2
        steps = (seq_len + 1) // per_step
        if steps == 0:
            raise DataError(f"one {self.control.name} step has {per_step} tokens, more than "
                            f"data.seq_len + 1 = {seq_len + 1}; raise data.seq_len")
        episode = self.episodes[rng.integers(len(self.episodes))]
        start = rng.integers(max(1, len(episode.actions) - steps + 1))
        return sequences.control_example(self.control, self.vocab, episode, int(start), steps)


# ------------------------------------------------------------------------------ text, captions


@dataclasses.dataclass
class TextSource:
    ids: np.ndarray          # the split's documents' ids, each followed by end-of-text

    def example(self, rng: np.random.Generator, seq_len: int) -> sequences.Example:
        if len(self.ids) < seq_len + 1:
            raise DataError(f"the text holds {len(self.ids)} tokens, fewer than one window")
        start = rng.integers(len(self.ids) - seq_len)
        return sequences.text_example(self.ids[start:start + seq_len + 1])


def text_ids(texts, tokenizer) -> np.ndarray:
    encoded = tokenizer.encode(list(texts))
    return np.concatenate([np.asarray([*ids, tokenizer.eos_id], np.int32) for ids in encoded])


@dataclasses.dataclass
class CaptionSource:
    images: np.ndarray       # [N, H, W, C] uint8
    labels: np.ndarray       # [N]
    tokenizer: object
    vocab: tokens.Vocabulary
    patch_side: int
    templates: str = "train"

    def __post_init__(self):
        self.table = captions_lib.caption_table("fashion_mnist")
        H, W, _ = self.images.shape[1:]
        self.num_patches = H * W // self.patch_side ** 2
        light_N, large_N = captions_lib.image_attributes(self.images)
        self.light, self.large = np.asarray(light_N), np.asarray(large_N)

    def caption(self, rng: np.random.Generator, i: int) -> str:
        label = int(self.labels[i])
        start, stop = captions_lib.template_range(self.templates)
        form = int(rng.integers(captions_lib.NUM_FORMS))
        phrase = int(captions_lib.phrase_index(form, self.light[i], self.large[i]))
        return self.table.text(label, int(rng.integers(self.table.syn_counts_C[label])),
                               int(rng.integers(start, stop)), phrase)

    def example(self, rng: np.random.Generator, seq_len: int) -> sequences.Example:
        i = int(rng.integers(len(self.images)))
        ids = self.tokenizer.encode([self.caption(rng, i)])[0]
        return sequences.caption_example(i, self.num_patches, self.vocab, ids,
                                         self.tokenizer.eos_id)


# ------------------------------------------------------------------------------ batches


class MixedBatches(StepBatches):
    """Endless batches: each row one domain (drawn by weight), filled with its examples."""

    _mismatch = "another mixture (domains, weights, data, batch size or seed differ)"

    def __init__(self, sources: dict[str, object], weights: dict[str, float], seq_len: int,
                 global_batch_size: int, seed: int, pad_id: int, images: np.ndarray | None,
                 patch_side: int, process_index: int = 0, process_count: int = 1,
                 identity: str = ""):
        self.names = [d for d in DOMAINS if weights.get(d, 0) > 0]
        if not self.names:
            raise DataError(f"gato.mixture gives no domain a positive weight: {weights}")
        p = np.array([weights[d] for d in self.names], float)
        self.p = p / p.sum()
        self.sources, self.seq_len, self.seed, self.pad_id = sources, seq_len, seed, pad_id
        self.local = global_batch_size // process_count
        self._lo = process_index * self.local
        self.global_batch_size = global_batch_size
        self.images, self.patch_side = images, patch_side
        self.step = 0
        self._fingerprint = digest(self.names, list(self.p), seq_len, global_batch_size, seed,
                                   identity)[:16]

    def row(self, rng: np.random.Generator) -> tuple[str, dict[str, np.ndarray]]:
        """(domain drawn by weight, a packed row of its examples)."""
        name = self.names[rng.choice(len(self.names), p=self.p)]
        return name, fill_row(self.sources[name], name, rng, self.seq_len, self.pad_id)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, step])
        rows = [self.row(rng) for _ in range(self.global_batch_size)]
        mine = rows[self._lo:self._lo + self.local]
        return packed_rows(mine, self.images, self.patch_side).rows(slice(None))


def fill_row(source, domain: str, rng: np.random.Generator, seq_len: int,
             pad_id: int) -> dict[str, np.ndarray]:
    """One packed row of a domain's examples: a text or control window fills it alone; captions
    are drawn until the next one does not fit."""
    examples, used = [], 0
    while True:
        example = source.example(rng, seq_len)
        if examples and used + len(example) - 1 > seq_len:
            break
        examples.append(example)
        used += len(example) - 1
        if domain != "captions":
            break
    return sequences.pack(examples, seq_len, pad_id)


def packed_rows(rows: list[tuple[str, dict]], images, patch_side: int) -> sequences.PackedRows:
    """(domain, packed row) pairs as one RowSource."""
    fields = {k: np.concatenate([r[k] for _, r in rows]) for k in sequences.FIELDS}
    return sequences.PackedRows(fields, images, patch_side,
                                np.array([DOMAINS.index(d) for d, _ in rows], np.int32))


def fixed_rows(source, domain: str, count: int, seq_len: int, pad_id: int, seed: int,
               images=None, patch_side: int = 7) -> sequences.PackedRows:
    """`count` rows of one domain drawn once (validation): the same rows at every evaluation."""
    one = MixedBatches({domain: source}, {domain: 1.0}, seq_len, count, seed, pad_id, images,
                       patch_side)
    rng = np.random.default_rng([seed, 0])
    return packed_rows([one.row(rng) for _ in range(count)], images, patch_side)

