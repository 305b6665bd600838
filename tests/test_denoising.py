"""BART's noises and PEGASUS's gap sentences (lm/objectives/noising.py), the denoising task
(lm/objectives/denoising.py): hand-checked rows, the statistics of the noise, ROUGE-1 against a hand count
and a Counter reference, determinism under (seed, step), and training on the tiny config."""
import collections
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import QUIET, REPO, train_losses
from core.config import load_config
from lm import pipeline
from lm.objectives import denoising, noising
from lm.objectives import registry

BART = str(REPO / "experiments/configs/lm/bart.py")
MASK, BOS, END = 99, 2, 50  # END: the one sentence-final id of these hand-made rows
END_V = jnp.zeros(128, bool).at[END].set(True)


def row(*docs, pad=0):
    """(tokens, segments) of documents packed into one row, then `pad` padding slots."""
    tokens = [t for doc in docs for t in doc] + [0] * pad
    segments = [i + 1 for i, doc in enumerate(docs) for _ in doc] + [0] * pad
    return jnp.array(tokens, jnp.int32), jnp.array(segments, jnp.int32)


def real(tokens, segments, segment=None):
    keep = (segments > 0) if segment is None else (segments == segment)
    return np.asarray(tokens)[np.asarray(keep)].tolist()


# ----------------------------------------------------------------------------- BART's noises

def test_token_masking_masks_at_the_rate_and_never_padding():
    tokens, segments = row(list(range(3, 98)) * 40, pad=200)
    noised, out_segments = noising.token_masking(jax.random.key(0), tokens, segments, 0.3, MASK)
    noised = np.asarray(noised)
    assert abs((noised[:-200] == MASK).mean() - 0.3) < 0.02
    assert not (noised[-200:] == MASK).any()
    unmasked = noised != MASK
    assert (noised[unmasked] == np.asarray(tokens)[unmasked]).all()
    np.testing.assert_array_equal(out_segments, segments)


def test_token_deletion_shortens_and_keeps_order():
    tokens, segments = row(list(range(3, 40)), list(range(40, 90)), pad=13)
    noised, out_segments = noising.token_deletion(jax.random.key(1), tokens, segments, 0.25)
    kept = real(noised, out_segments)
    assert 0 < len(kept) < 87 and len(noised) == 100  # shorter, padded to the same length
    assert kept == sorted(kept)  # a subsequence (the ids increase along the row)
    assert (np.asarray(out_segments)[len(kept):] == 0).all()
    for segment, lo, hi in ((1, 3, 40), (2, 40, 90)):  # each token keeps its document
        assert all(lo <= t < hi for t in real(noised, out_segments, segment))
    # Over many rows the deleted share is the rate.
    many = jax.vmap(lambda k: noising.token_deletion(k, tokens, segments, 0.25)[1])(
        jax.random.split(jax.random.key(2), 200))
    assert abs(1 - (np.asarray(many) > 0).sum(1).mean() / 87 - 0.25) < 0.02


def test_text_infilling_puts_one_mask_per_span_and_rebuilds_the_row():
    tokens, segments = row(list(range(3, 60)), list(range(60, 98)), pad=5)
    num_real = 95
    for seed in range(10):
        key = jax.random.key(seed)
        start, span, used, _ = map(np.asarray, noising.infilling_spans(
            key, jnp.int32(num_real), 100, 0.3, 3.0))
        noised, out_segments = noising.text_infilling(key, tokens, segments, 0.3, 3.0, MASK)
        noised = real(noised, out_segments)
        spans = [(s, n) for s, n, u in zip(start, span, used) if u]
        assert sum(n for _, n in spans) == math.ceil(0.3 * num_real)  # 30% of the tokens
        assert noised.count(MASK) == len(spans)  # one mask per span, zero-length ones too
        assert len(noised) == num_real - sum(n for _, n in spans) + len(spans)
        # Each mask, in order, stands for its span's tokens: putting them back rebuilds the row.
        original, rebuilt, spans_left = real(tokens, segments), [], list(spans)
        for token in noised:
            if token == MASK:
                s, n = spans_left.pop(0)
                rebuilt.extend(original[s:s + n])
            else:
                rebuilt.append(token)
        assert rebuilt == original, seed


def test_infilling_span_lengths_are_poisson_3():
    draws = jax.vmap(lambda k: noising.infilling_spans(k, jnp.int32(400), 400, 0.3, 3.0))(
        jax.random.split(jax.random.key(0), 400))
    start, span, used, drawn = map(np.asarray, draws)
    lengths = drawn[used]  # each used draw is Poisson: whether it is used depends on earlier ones
    assert lengths.size > 10_000
    assert abs(lengths.mean() - 3.0) < 0.05 and abs(lengths.var() - 3.0) < 0.15
    for k in range(6):
        assert abs((lengths == k).mean() - math.exp(-3) * 3 ** k / math.factorial(k)) < 0.01
    # Spans never overlap: each starts at or after the end of the one before it.
    for s, n, u in zip(start[:50], span[:50], used[:50]):
        ends = s[u] + n[u]
        assert (s[u][1:] >= ends[:-1]).all() and ends[-1] <= 400


def test_sentence_permutation_shuffles_whole_sentences_inside_documents():
    sentences = [[10, 11, END], [12, 13, 14, END], [15, END], [16, 17, 18, 19]]
    doc1 = [BOS] + [t for s in sentences for t in s]
    doc2 = [BOS, 20, 21, END, 22, END, 23, 24, END]
    tokens, segments = row(doc1, doc2, pad=4)
    orders = set()
    for seed in range(30):
        noised, out_segments = noising.sentence_permutation(jax.random.key(seed), tokens,
                                                            segments, END_V, BOS)
        np.testing.assert_array_equal(out_segments, segments)  # documents stay in place
        first = real(noised, out_segments, 1)
        assert first[0] == BOS and sorted(first) == sorted(doc1)
        # The body is the sentences, each whole, in one of their 24 orders.
        order = [p for p in itertools.permutations(sentences)
                 if sum(p, []) == first[1:]]
        assert len(order) == 1, (seed, first)
        orders.add(tuple(map(tuple, order[0])))
        second = real(noised, out_segments, 2)
        assert second[0] == BOS and sorted(second) == sorted(doc2)
    assert len(orders) > 10  # 24 orders of 4 sentences: many of them are drawn


def test_document_rotation_is_a_cyclic_shift_of_each_body():
    doc1, doc2 = [BOS] + list(range(10, 30)), [BOS] + list(range(30, 45))
    tokens, segments = row(doc1, doc2, pad=3)
    shifts = set()
    for seed in range(20):
        noised, out_segments = noising.document_rotation(jax.random.key(seed), tokens,
                                                         segments, BOS)
        for segment, doc in ((1, doc1), (2, doc2)):
            got = real(noised, out_segments, segment)
            assert got[0] == BOS
            shift = doc[1:].index(got[1])
            assert got[1:] == doc[1 + shift:] + doc[1:1 + shift]
            shifts.add((segment, shift))
    assert len(shifts) > 15


# ----------------------------------------------------------------------------- PEGASUS

# Sentences A = 5 6 7 7 . , B = 7 8 . , C = 5 9 9 .  By hand (ids as words, "." = END):
# A vs B+C: overlap {5:1, 7:1, .:1} = 3, F1 = 2*3 / (5 + 7) = 1/2;
# B vs A+C: {7:1, .:1} = 2, F1 = 2*2 / (3 + 9) = 1/3;  C vs A+B: {5:1, .:1} = 2, F1 = 4/12 = 1/3.
A, B, C = [5, 6, 7, 7, END], [7, 8, END], [5, 9, 9, END]


def test_rouge1_of_each_sentence_against_the_rest_by_hand():
    tokens, segments = row(B + C + A, pad=2)
    sentence = noising.sentence_ids(tokens, segments, END_V)
    score, _ = noising.sentence_rouge1(tokens, segments, sentence)
    expected = [1 / 3] * 3 + [1 / 3] * 4 + [1 / 2] * 5 + [0, 0]
    np.testing.assert_allclose(score, expected, rtol=1e-6)


def rouge1_f1(candidate, reference) -> float:
    """ROUGE-1 F1 as the rouge-score package counts unigrams (here on ids)."""
    overlap = sum((collections.Counter(candidate) & collections.Counter(reference)).values())
    if not overlap:
        return 0.0
    p, r = overlap / len(candidate), overlap / len(reference)
    return 2 * p * r / (p + r)


def test_rouge1_matches_a_counter_reference_on_random_documents():
    rng = np.random.default_rng(0)
    for _ in range(5):
        docs = [rng.integers(3, 15, rng.integers(6, 30)).tolist() for _ in range(2)]
        docs = [[END if rng.random() < 0.2 else t for t in d] for d in docs]
        tokens, segments = row(*docs, pad=64 - sum(map(len, docs)))  # one shape: one compile
        sentence = np.asarray(noising.sentence_ids(tokens, segments, END_V))
        score, _ = noising.sentence_rouge1(tokens, segments, jnp.asarray(sentence))
        toks, segs = np.asarray(tokens), np.asarray(segments)
        for i in np.flatnonzero(segs > 0):
            own = sentence == sentence[i]
            rest = (segs == segs[i]) & ~own
            assert abs(score[i] - rouge1_f1(toks[own].tolist(), toks[rest].tolist())) < 1e-6


def test_gap_sentences_are_the_top_rouge_ones_in_document_order():
    doc2 = [20, 21, END, 20, 22, END, 23, 24, 25, END]
    tokens, segments = row(B + C + A, doc2, pad=2)
    inputs, input_segments, targets, target_segments, _ = noising.gap_sentence_generation(
        tokens, segments, END_V, 0.67, MASK)  # doc 1: round(0.67 * 3) = 2 of 3 sentences
    # Doc 1: A (1/2), then B over C (both 1/3: the earlier wins); targets in document order.
    assert real(targets, target_segments, 1) == B + A
    assert real(inputs, input_segments, 1) == [MASK] + C + [MASK]
    # Doc 2 scores: 2*2/10, 2*2/10, 2*1/10: the first two sentences.
    assert real(targets, target_segments, 2) == doc2[:6]
    assert real(inputs, input_segments, 2) == [MASK, MASK] + doc2[6:]
    _, _, targets, target_segments, _ = noising.gap_sentence_generation(
        tokens, segments, END_V, 0.3, MASK)  # round(0.9) = 1 sentence each
    assert real(targets, target_segments) == A + doc2[:3]


# ----------------------------------------------------------------------------- the task

def tiny_task(objective: str, *overrides: str):
    config = load_config(BART + f":size=tiny,corpus=austen,objective={objective}",
                         list(overrides))
    task = registry.make_task(config, 512)
    task.sentence_end_V = np.asarray(END_V.tolist() + [False] * (task.model_cfg.vocab_size
                                                                 - 128))
    return task


@pytest.mark.parametrize("objective", ["bart", "pegasus"])
def test_noise_is_a_function_of_seed_and_step(objective):
    task = tiny_task(objective)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 60, (4, 65)).astype(np.int32)
    tokens[:, ::7] = END
    segments = np.repeat(np.array([[1] * 30 + [2] * 30 + [0] * 5]), 4, axis=0)
    batch = {"tokens": tokens, "segment_ids": segments}
    pairs = lambda seed, step: task.corrupt(jax.random.fold_in(jax.random.key(seed), step),
                                            batch)
    first, again, other = pairs(0, 7), pairs(0, 7), pairs(0, 8)
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])
    assert (np.asarray(first["inputs"]) != np.asarray(other["inputs"])).any() or \
        objective == "pegasus"  # PEGASUS's selection is deterministic (no MLM by default)
    # The decoder rebuilds the original (bart) or the gap sentences (pegasus), then EOS.
    targets, seg = np.asarray(first["targets"]), np.asarray(first["target_segment_ids"])
    assert first["targets"].shape == (4, 65) and first["inputs"].shape == (4, 64)
    if objective == "bart":
        assert (targets[:, :60] == tokens[:, :60]).all() and (targets[:, 60] == 3).all()
    dec = np.asarray(first["decoder_inputs"])
    starts = np.concatenate([np.ones((4, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    assert (dec[starts] == 0).all() and (dec[:, 1:][~starts[:, 1:]] ==
                                         targets[:, :-1][~starts[:, 1:]]).all()


def test_pegasus_mlm_masks_the_other_tokens_and_adds_an_encoder_loss():
    task = tiny_task("pegasus", "--config.denoising.mlm_rate=0.15")
    tokens = np.random.default_rng(1).integers(3, 60, (8, 65)).astype(np.int32)
    tokens[:, 5::9] = END
    batch = {"tokens": tokens, "segment_ids": np.ones((8, 65), np.int32)}
    pair = {k: np.asarray(v) for k, v in task.corrupt(jax.random.key(0), batch).items()}
    chosen, real_inputs = pair["mlm_chosen"], pair["input_segment_ids"] > 0
    assert not chosen[pair["mlm_targets"] == task.mask_id].any()  # never a gap sentence's mask
    assert abs(chosen.sum() / (real_inputs & (pair["mlm_targets"] != task.mask_id)).sum()
               - 0.15) < 0.04
    share = (pair["inputs"][chosen] == task.mask2_id).mean()  # BERT's 80% [MASK2]
    assert 0.6 < share < 0.95 and not (pair["inputs"][~chosen] == task.mask2_id).any()
    shapes = jax.eval_shape(task.init_params, jax.random.key(0))
    sums = jax.eval_shape(lambda p: task.loss(p, batch, jax.random.key(0), True), shapes)
    assert set(sums.extra) == {"accuracy", "mlm_tokens"}


def test_bad_denoising_settings_are_clear_errors():
    with pytest.raises(ValueError, match="objective"):
        tiny_task("bart", "--config.denoising.objective=t5")
    with pytest.raises(ValueError, match="every BART noise is off"):
        tiny_task("bart", "--config.denoising.infill_ratio=0",
                  "--config.denoising.permute_sentences=false")
    with pytest.raises(ValueError, match="gsr"):
        tiny_task("pegasus", "--config.denoising.gsr=0")
    untold = registry.make_task(load_config(BART + ":size=tiny,objective=pegasus", []), 512)
    with pytest.raises(ValueError, match="use_tokenizer"):
        untold.corrupt(jax.random.key(0), {"tokens": np.ones((1, 65), np.int32),
                                           "segment_ids": np.ones((1, 65), np.int32)})
    with pytest.raises(Exception, match="mask_rate"):
        tiny_task("pegasus", "--config.denoising.mask_rate=0.1")  # a BART-only key


def test_sentence_end_table_marks_final_punctuation():
    class Pieces:
        vocab_size = 6
        id_to_piece = staticmethod(lambda i: ["<s>", "▁the", ".", "▁end.", '!"', "▁Mr."][i])
    assert denoising.sentence_end_table(Pieces, 8).tolist() == [False, False, True, True, True,
                                                                 True, False, False]


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["bart", "pegasus"])
def test_loss_falls_on_the_tiny_config(tmp_path, objective):
    from core import trainer
    config = load_config(BART + f":size=tiny,corpus=austen,objective={objective}",
                         [*QUIET, "--config.train.steps=30", "--config.train.checkpoint_every=100",
                          "--config.mesh.num_devices=1", "--config.mesh.ici.data=1"])
    setup = pipeline.build(config, tmp_path)  # hands the task its tokenizer
    ids = setup.tokenizer.encode(["It is so. Go! Why? Then"])[0]  # the tokenizer's own ids
    assert sum(setup.task.sentence_end_V[ids]) == 3
    whole = setup.data.evaluate  # the final eval: 2 batches, not the whole split (time)
    setup.data.evaluate = lambda run_batch, max_batches: whole(run_batch, 2)
    summary = trainer.train(config, tmp_path, setup.task, setup.data)
    losses = train_losses(tmp_path)
    early, late = np.mean([losses[s] for s in range(1, 6)]), np.mean([losses[s]
                                                                      for s in range(26, 31)])
    print(f"{objective}: loss {losses[1]:.3f} at step 1 -> {losses[30]:.3f} at step 30")
    assert np.isfinite(summary["eval_loss"]) and summary["eval_target_tokens"] > 0
    assert late < early - 1.0, (early, late)
