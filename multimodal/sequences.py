"""Examples of every domain as one kind of token sequence, packed into training rows.

An example is (ids, local place, patch reference, trained) per token:
  text       a window of the corpus's tokens; every token trained
  caption    an image's patches (the image id, place = patch index, the patch as reference),
             then its caption's text tokens and end-of-text; the caption is trained
  control    whole steps of an episode: observation values (place = index inside the
             observation), the separator, the action (its own place); only actions are trained
Rows hold `seq_len` inputs and their next-token targets. Examples are cut into (input, target)
pairs before packing, so no target ever crosses from one example into the next; several short
examples share a row with their own segment ids and positions (attention restarts too).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from core.batches import arrays_crc
from core.config import DataError
from multimodal import environments, tokens

NO_PLACE = -1
NO_PATCH = -1


@dataclasses.dataclass
class Example:
    ids: np.ndarray       # [n] int32
    local: np.ndarray     # [n] int32, NO_PLACE for text
    patch: np.ndarray     # [n] int64: image index * patches + patch index, or NO_PATCH
    trained: np.ndarray   # [n] bool: this token is a target of the loss

    def __len__(self) -> int:
        return len(self.ids)


def text_example(ids: np.ndarray) -> Example:
    n = len(ids)
    return Example(np.asarray(ids, np.int32), np.full(n, NO_PLACE, np.int32),
                   np.full(n, NO_PATCH, np.int64), np.ones(n, bool))


def caption_example(image_index: int, num_patches: int, vocab: tokens.Vocabulary,
                    caption_ids: list[int], end_of_text: int) -> Example:
    """The image's patches, then the caption and end-of-text (trained)."""
    text = np.asarray([*caption_ids, end_of_text], np.int32)
    n = num_patches + len(text)
    return Example(
        np.concatenate([np.full(num_patches, vocab.image, np.int32), text]),
        np.concatenate([np.arange(num_patches), np.full(len(text), NO_PLACE)]).astype(np.int32),
        np.concatenate([image_index * num_patches + np.arange(num_patches),
                        np.full(len(text), NO_PATCH)]).astype(np.int64),
        np.arange(n) >= num_patches)


def step_ids(control: environments.ControlTask, vocab: tokens.Vocabulary,
             continuous: np.ndarray, discrete: np.ndarray) -> np.ndarray:
    """[steps, tokens per observation]: discrete values, then mu-law tokens of continuous ones."""
    return np.concatenate([vocab.discrete_ids(discrete), vocab.continuous_ids(continuous)],
                          axis=1).astype(np.int32)


def observation_length(control: environments.ControlTask) -> int:
    return control.discrete + control.continuous


def step_tokens(vocab: tokens.Vocabulary, obs_SO: np.ndarray,
                actions_S: np.ndarray) -> np.ndarray:
    """[steps, O + 2]: each step's observation ids, the separator, the action's id. A token's
    local place is its column."""
    S = len(obs_SO)
    return np.concatenate([obs_SO, np.full((S, 1), vocab.separator),
                           vocab.discrete_ids(actions_S)[:, None]], axis=1).astype(np.int32)


def control_example(control: environments.ControlTask, vocab: tokens.Vocabulary,
                    episode: environments.Episode, start: int, steps: int) -> Example:
    """Steps [start, start + steps) of an episode: observation, separator, action each."""
    obs_SO = step_ids(control, vocab, episode.continuous[start:start + steps],
                      episode.discrete[start:start + steps])
    S, O = obs_SO.shape
    ids_SW = step_tokens(vocab, obs_SO, episode.actions[start:start + steps])
    local_W = np.arange(O + 2, dtype=np.int32)
    trained_W = np.arange(O + 2) == O + 1
    return Example(ids_SW.reshape(-1), np.tile(local_W, S),
                   np.full(S * (O + 2), NO_PATCH, np.int64), np.tile(trained_W, S))


# ------------------------------------------------------------------------------ rows


FIELDS = ("tokens", "targets", "weights", "segments", "positions", "local", "patch")


def pack(examples: list[Example], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Examples (each at most seq_len + 1 tokens) into rows of seq_len inputs, in order, a new
    row when the next one does not fit. Weights mark the targets to train on."""
    rows: list[list[Example]] = [[]]
    used = 0
    for example in examples:
        need = len(example) - 1
        if need > seq_len or need < 1:
            raise DataError(f"an example of {len(example)} tokens does not fit rows of "
                            f"{seq_len} + 1; cut it first")
        if used + need > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(example)
        used += need
    out = {"tokens": np.full((len(rows), seq_len), pad_id, np.int32),
           "targets": np.full((len(rows), seq_len), pad_id, np.int32),
           "weights": np.zeros((len(rows), seq_len), np.float32),
           "segments": np.zeros((len(rows), seq_len), np.int32),
           "positions": np.zeros((len(rows), seq_len), np.int32),
           "local": np.full((len(rows), seq_len), NO_PLACE, np.int32),
           "patch": np.full((len(rows), seq_len), NO_PATCH, np.int64)}
    for r, row in enumerate(rows):
        at = 0
        for s, ex in enumerate(row, 1):
            n = len(ex) - 1
            cols = slice(at, at + n)
            out["tokens"][r, cols], out["targets"][r, cols] = ex.ids[:-1], ex.ids[1:]
            out["weights"][r, cols] = ex.trained[1:]
            out["segments"][r, cols], out["positions"][r, cols] = s, np.arange(n)
            out["local"][r, cols], out["patch"][r, cols] = ex.local[:-1], ex.patch[:-1]
            at += n
    return out


class PackedRows:
    """A RowSource (core/batches.py) of packed rows whose image patches are cut from the image
    array when rows are read, so the rows themselves stay small integer tables."""

    def __init__(self, fields: dict[str, np.ndarray], images_NHWC: np.ndarray | None,
                 patch_side: int, domain: np.ndarray | None = None):
        self.fields, self.images, self.side = fields, images_NHWC, patch_side
        self.domain = np.zeros(len(fields["tokens"]), np.int32) if domain is None else domain
        if images_NHWC is not None:
            H, W, C = images_NHWC.shape[1:]
            self.per_image, self.pixels = H * W // patch_side ** 2, patch_side ** 2 * C
        else:
            self.per_image, self.pixels = 1, patch_side ** 2

    def __len__(self) -> int:
        return len(self.fields["tokens"])

    def rows(self, index) -> dict[str, np.ndarray]:
        out = {k: v[index] for k, v in self.fields.items() if k != "patch"}
        out["domain"] = self.domain[index]
        ref = self.fields["patch"][index]
        patches = np.zeros((*ref.shape, self.pixels), np.float32)
        has = ref >= 0
        if has.any():
            image, k = np.divmod(ref[has], self.per_image)
            unique, where = np.unique(image, return_inverse=True)
            cut = np.stack([tokens.patches(self.images[i], self.side) for i in unique])
            patches[has] = cut[where, k]
        out["patches"] = patches
        return out

    def content_crc(self) -> int:
        return arrays_crc(*(self.fields[k] for k in FIELDS))
