"""BERT's next-sentence and ALBERT's sentence-order prediction (lm/objectives/sentence_pairs.py)."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import QUIET, REPO, train_losses
from core.config import ConfigError, load_config
from lm.models import transformer as model_lib
from lm import pipeline
from lm.objectives import sentence_pairs
from lm.objectives import registry

BERT = str(REPO / "experiments/configs/lm/bert.py")
MAX_TOKENS = 61  # seq_len 64 - [CLS] - 2 [SEP]


def _documents(num_docs=40, sentences=20, seed=0):
    """Sentences of 3-15 tokens whose ids say where they come from: doc * 1000 + position."""
    rng = np.random.default_rng(seed)
    docs = []
    for doc in range(num_docs):
        lengths = rng.integers(3, 16, sentences)
        ids = doc * 1000 + 10 + np.arange(lengths.sum())
        docs.append([list(s) for s in np.split(ids, np.cumsum(lengths)[:-1])])
    return docs


def _is_run(ids):
    return all(b == a + 1 for a, b in zip(ids, ids[1:]))


def test_split_sentences_cuts_after_sentence_ends_and_newlines():
    text = 'He said "Go." She went! Why? Mr. X\nnew line 3.5 m'
    assert sentence_pairs.split_sentences(text) == [
        'He said "Go."', " She went!", " Why?", " Mr.", " X\n", "new line 3.5 m"]


@pytest.mark.parametrize("objective", ["nsp", "sop"])
def test_pairs_are_half_negatives_of_the_right_kind(objective):
    docs = _documents()
    pairs = sentence_pairs.build_pairs(docs, MAX_TOKENS + 3, objective, seed=1, dupe_factor=4)
    labels = np.array([label for _, _, label in pairs])
    n = len(labels)
    assert n > 500
    assert abs(labels.mean() - 0.5) < 3 * 0.5 / np.sqrt(n), (labels.mean(), n)  # 3 sigma
    untruncated = 0
    for a, b, label in pairs:
        assert a and b and len(a) + len(b) <= MAX_TOKENS
        assert _is_run(a) and _is_run(b)  # each side is contiguous text (truncation: ends only)
        doc_a, doc_b = a[0] // 1000, b[0] // 1000
        fits = len(a) + len(b) < MAX_TOKENS  # nothing was cut
        untruncated += fits
        if objective == "nsp" and label:
            assert doc_b != doc_a  # a random segment of another document
        elif objective == "nsp" or not label:
            assert doc_b == doc_a and b[0] > a[-1]  # B follows A
            assert not fits or b[0] == a[-1] + 1  # ... directly
        else:  # sop negative: the same two consecutive segments, swapped
            assert doc_b == doc_a and a[0] > b[-1]
            assert not fits or a[0] == b[-1] + 1
    assert untruncated > n // 10  # the adjacency checks above did run
    if objective == "nsp":  # negatives come from every other document, not a favourite few
        negatives = [b[0] // 1000 for _, b, label in pairs if label]
        assert len(set(negatives)) == len(docs)


def test_pair_rows_are_cls_a_sep_b_sep_with_token_types():
    pairs = [([10, 11, 12], [20, 21], 0), ([30], [40, 41, 42, 43], 1)]
    windows = sentence_pairs.pair_windows(pairs, 10, cls_id=2, sep_id=3)
    np.testing.assert_array_equal(windows.tokens, [[2, 10, 11, 12, 3, 20, 21, 3, 0, 0],
                                                   [2, 30, 3, 40, 41, 42, 43, 3, 0, 0]])
    np.testing.assert_array_equal(windows.token_types, [[0, 0, 0, 0, 0, 1, 1, 1, 0, 0],
                                                        [0, 0, 0, 1, 1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(windows.segment_ids, [[1] * 8 + [0, 0]] * 2)
    np.testing.assert_array_equal(windows.labels, [0, 1])


@pytest.mark.parametrize("fields", [{}, {"tie_embeddings": False}, {"embed_dim": 32}])
def test_vocab_logits_equal_the_encoders_own(fields):
    cfg = model_lib.preset("tiny-bert", type_vocab_size=2, **fields)
    model = model_lib.Transformer(cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, cfg.vocab_size)
    params = model.init(jax.random.key(1), tokens)["params"]
    want = model.apply({"params": params}, tokens)
    hidden = model.apply({"params": params}, tokens, return_hidden=True)
    got = sentence_pairs.vocab_logits(params, cfg, hidden)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_nsp_head_learns_above_chance_where_documents_differ_in_vocabulary():
    """Two vocabularies of documents: a negative drawn from the other kind is visible from
    A and B's tokens, so a working pooled head must beat 50% (its ceiling here is 75%)."""
    rng = np.random.default_rng(0)
    docs = [[list(rng.integers(10 + 100 * (d % 2), 110 + 100 * (d % 2), rng.integers(5, 13)))
             for _ in range(30)] for d in range(40)]
    train = sentence_pairs.pair_windows(sentence_pairs.build_pairs(docs, 64, "nsp", 0, 4), 64,
                                        2, 3)
    test = sentence_pairs.pair_windows(sentence_pairs.build_pairs(docs, 64, "nsp", 99), 64, 2, 3)
    cfg = model_lib.preset("tiny-bert", vocab_size=256, type_vocab_size=2)
    task = sentence_pairs.SentencePairTask(cfg, 64, 250, "nsp")
    params = nn.meta.unbox(task.init_params(jax.random.key(0)))
    opt = optax.adam(1e-3)
    state = opt.init(params)

    @jax.jit
    def step(params, state, batch, rng):
        grads = jax.grad(lambda p: (lambda s: s.loss / s.weight)(task.loss(p, batch, rng, True)))(
            params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for i in range(400):
        rows = np.random.default_rng(i).integers(0, len(train.tokens), 32)
        params, state = step(params, state, {k: jnp.asarray(v) for k, v in
                                             train.rows(rows).items()}, jax.random.key(i))
    sums = task.loss(params, {k: jnp.asarray(v) for k, v in test.rows(slice(None)).items()},
                     jax.random.key(0), False)
    accuracy = float(sums.extra["sentence_accuracy"] / sums.weight)
    assert 0.6 < accuracy, accuracy  # 200+ test pairs: chance stays below 0.6 (4 sigma)


def test_real_corpus_pipeline_trains_mlm_and_sentence_loss(tmp_path):
    """Through the config and the engine on Austen: pairs with token types, loss falling."""
    from core import trainer
    config = load_config(BERT + ":size=tiny,corpus=austen,sentence_objective=sop",
                         [*QUIET, "--config.train.steps=30", "--config.train.checkpoint_every=100",
                          "--config.sentence.dupe_factor=1", "--config.data.val_fraction=0.02",
                          "--config.mesh.num_devices=1", "--config.mesh.ici.data=1"])
    assert config.model.type_vocab_size == 2
    setup = pipeline.build(config, tmp_path)
    assert isinstance(setup.task, sentence_pairs.SentencePairTask)
    batch = next(iter(setup.data.train))
    assert set(batch) == {"tokens", "segment_ids", "token_types", "labels"}
    assert (batch["tokens"][:, 0] == setup.tokenizer.bos_id).all()  # [CLS] first
    assert (batch["token_types"][batch["segment_ids"] == 0] == 0).all()
    final = trainer.train(config, tmp_path, setup.task, setup.data)
    losses = train_losses(tmp_path)
    assert np.mean([losses[s] for s in range(26, 31)]) < np.mean([losses[s] for s in range(1, 6)]) - 0.3
    # The two parts add up to the loss, and a 2-way head starts near ln 2.
    assert abs(final["eval_mlm_loss"] + final["eval_sentence_loss"] - final["eval_loss"]) < 1e-3
    assert 0.6 < final["eval_sentence_loss"] < 0.8


def test_bad_sentence_configs_are_clear_errors():
    with pytest.raises(ConfigError, match="sentence_objective"):
        load_config(BERT + ":sentence_objective=nextsent", [])
    config = load_config(BERT + ":size=tiny,sentence_objective=nsp",
                         ["--config.model.type_vocab_size=0"])
    with pytest.raises(ValueError, match="type_vocab_size=2"):
        registry.make_task(config, 512)
    with pytest.raises(ValueError, match="another document"):
        sentence_pairs.document_pairs([[[5, 6, 7]]], 0, 20, "nsp", np.random.default_rng(0))
    cfg = dataclasses.replace(model_lib.preset("tiny-bert"), type_vocab_size=2)
    with pytest.raises(ValueError, match="objective"):
        sentence_pairs.SentencePairTask(cfg, 64, 250, "order")
