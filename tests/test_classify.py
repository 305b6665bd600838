"""Fine-tuning an encoder with a classification head: data, initialisation, freezing."""
import json
import statistics
import types

import jax
import numpy as np
import pytest

from core import cli
from conftest import QUIET, REPO
from core.config import ConfigError, load_config
from core.engine import restore_params
from lm import commands
from lm.objectives import classification as classify
from lm.data import documents, labelled
from lm.models import transformer as model_lib

CLASSIFY = str(REPO / "experiments/configs/lm/classify.py")
BERT = str(REPO / "experiments/configs/lm/bert.py")


def test_brown_genres_are_the_15_of_the_package():
    doc_ids, texts, labels, names = labelled.brown_genres()
    assert len(doc_ids) == len(texts) == 500 and len(names) == 15
    counts = dict(zip(names, np.bincount(labels)))
    assert counts["learned"] == 80 and counts["science_fiction"] == 6 and counts["news"] == 44
    train, test = labelled.document_split(doc_ids, "brown", 0.2, 0)
    assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == 500
    # the very rule the LM pipeline uses for its validation split
    assert all(documents.is_validation(0, "brown", doc_ids[i], 0.2) for i in test)
    assert 70 < len(test) < 130


def test_windows_carry_special_tokens_labels_and_documents():
    windows, docs = labelled.labelled_windows([[5] * 50, [6] * 3], [1, 2], 16, per_doc=3,
                                              prefix=(101,), suffix=(102,))
    assert windows.tokens.shape == (4, 16)  # 50 tokens: 3 windows of 14; 3 tokens: 1 window
    assert list(docs) == [0, 0, 0, 1] and list(windows.labels) == [1, 1, 1, 2]
    assert list(windows.tokens[0, [0, 15]]) == [101, 102]
    assert list(windows.tokens[3, :5]) == [101, 6, 6, 6, 102] and windows.segment_ids[3].sum() == 5
    assert set(windows.rows([0, 3])) == {"tokens", "segment_ids", "labels", "token_types"}


def test_pairs_are_laid_out_as_bert_pairs_and_cut_to_fit():
    encoder = classify.Encoder(None, None, lambda texts: [[len(t)] * len(t) for t in texts],
                               (101,), (102,))
    windows = classify.pair_windows(encoder, [("ab", "cde"), ("x" * 20, "y" * 20)], [0, 1], 12)
    assert list(windows.tokens[0, :8]) == [101, 2, 2, 102, 3, 3, 3, 102]
    assert list(windows.token_types[0, :8]) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert windows.segment_ids[0].sum() == 8 and windows.segment_ids[1].sum() == 12
    assert list(windows.tokens[1, [0, 4, 5, 6, 10, 11]]) == [101, 20, 102, 20, 20, 102]  # 4 + 5
    assert list(windows.labels) == [0, 1]


def test_sst2_rte_boolq_come_from_the_evaluation_package():
    for name, size in (("sst2", 872), ("rte", 277), ("boolq", 3270)):
        ids, texts, labels, names = labelled.eval_package_task(name)
        assert len(texts) == size and set(labels) == {0, 1} and len(names) == 2
        assert len(texts[0]) == (1 if name == "sst2" else 2)


@pytest.fixture(scope="module")
def mlm_run(tmp_path_factory):
    from core import trainer
    from lm import pipeline
    workdir = tmp_path_factory.mktemp("mlm")
    # Learned positions, so that freezing is checked on the position table too.
    config = load_config(BERT + ":size=tiny,corpus=austen,positions=learned",
                         [*QUIET, "--config.train.steps=4", "--config.train.checkpoint_every=4",
                          "--config.model.scan_layers=true"])
    setup = pipeline.build(config, workdir)
    trainer.train(config, workdir, setup.task, setup.data)
    return workdir


def _finetune(workdir, encoder, *arg, steps=4):
    config = load_config(
        CLASSIFY + ":" + ",".join([f"encoder={encoder}", f"steps={steps}", "seq_len=64", "batch=8",
                                   *arg]),
        [*QUIET, "--config.classify.windows_per_doc=1"])
    return config, commands.train(config, types.SimpleNamespace(workdir=str(workdir)))


def _params(workdir, config):
    setup = classify.build_setup(config, workdir, need_train=False)
    return jax.device_get(restore_params(config, setup.task, workdir, setup.data.check_meta)[1])


def test_head_only_keeps_the_pretrained_encoder_and_trains_the_head(mlm_run, tmp_path):
    config, result = _finetune(tmp_path / "probe", mlm_run, "head_only=true", "lr=1e-2")
    assert 0.0 <= result["document_accuracy"] <= 1.0 and result["test_documents"] > 50
    assert json.loads((tmp_path / "probe" / "test_accuracy.json").read_text())["step"] == 4
    tuned = _params(tmp_path / "probe", config)
    encoder = classify.load_encoder(str(mlm_run), "pretrained")
    jax.tree.map(np.testing.assert_array_equal, tuned["encoder"], encoder.params)
    initial = classify.ClassificationTask(encoder.cfg, 15, 64).init_params(jax.random.key(0))
    assert np.abs(tuned["w_head"] - np.asarray(initial["w_head"].value)).max() > 1e-3


def test_freezing_the_first_layer_moves_only_the_rest(mlm_run, tmp_path):
    config, _ = _finetune(tmp_path / "k1", mlm_run, "freeze_layers=1", "lr=1e-2")
    tuned = _params(tmp_path / "k1", config)["encoder"]
    pretrained = classify.load_encoder(str(mlm_run), "pretrained").params
    for name in ("token_embed", "pos_embed", "embed_norm", "layers_0"):
        jax.tree.map(np.testing.assert_array_equal, tuned[name], pretrained[name])
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), tuned["layers_1"],
                                         pretrained["layers_1"]))
    assert max(moved) > 1e-4


def test_scratch_uses_the_architecture_but_not_the_weights(mlm_run, tmp_path):
    pretrained = classify.load_encoder(str(mlm_run), "pretrained")
    scratch = classify.load_encoder(str(mlm_run), "scratch")
    assert scratch.params is None and scratch.cfg == pretrained.cfg
    assert not pretrained.cfg.scan_layers and "layers_1" in pretrained.params  # unstacked
    assert scratch.fingerprint == pretrained.fingerprint  # the same tokenizer
    imported = classify.load_encoder("all-minilm-l6-v2", "pretrained")
    imported_scratch = classify.load_encoder("all-minilm-l6-v2", "scratch")
    assert imported_scratch.params is None and imported_scratch.cfg == imported.cfg
    assert imported_scratch.encode(["A man is eating food."]) == imported.encode(
        ["A man is eating food."])


def test_bad_classification_configs_are_clear_errors(mlm_run, tmp_path):
    with pytest.raises(ConfigError, match="init"):
        load_config(CLASSIFY + ":init=random")
    with pytest.raises(FileNotFoundError, match="neither a packaged encoder"):
        classify.load_encoder(str(tmp_path), "pretrained")
    with pytest.raises(ConfigError, match="causal"):
        classify.ClassificationTask(model_lib.preset("tiny-gpt2"), 3, 16)
    with pytest.raises(ConfigError, match="regular expression"):
        from core.optim import frozen_mask
        frozen_mask("(")


def test_brown_tags_are_simplified_to_their_base():
    from lm.data import brown_pos
    assert [brown_pos.simplify_tag(t) for t in
            ("np-tl", "pps+bez", "fw-nn", "bez*", "*", "*-hl", "nn$-tl", "NN-HL")] == [
        "np", "pps", "nn", "bez", "*", "*", "nn$", "nn"]
    tagged = brown_pos.tagged_documents()
    assert sum(len(words) for words in tagged.values()) == 1_161_192
    assert tagged["ca01"][:3] == [("The", "at"), ("Fulton", "np"), ("County", "nn")]
    tags = {t for words in tagged.values() for _, t in words}
    assert 85 <= len(tags) <= 95
    ids = sorted(tagged)
    train, test = labelled.document_split(ids, "brown", 0.2, 0)
    baseline = brown_pos.most_frequent_tag_accuracy([tagged[ids[i]] for i in train],
                                                    [tagged[ids[i]] for i in test])
    # The classic unigram baseline on Brown is near 90% (words unseen in training ~4%).
    assert 0.85 < baseline["most_frequent_tag_accuracy"] < 0.93
    assert 0.01 < baseline["unknown_word_fraction"] < 0.08


def test_tag_windows_label_first_subwords_and_never_split_a_word():
    from lm.data import brown_pos
    words = [[[7], [8, 9, 10], [11]], [[12, 13]]]
    windows, docs = brown_pos.tag_windows(words, [[1, 2, 3], [4]], 6, prefix=(101,),
                                          suffix=(102,))
    assert windows.tokens.tolist() == [[101, 7, 8, 9, 10, 102], [101, 11, 102, 0, 0, 0],
                                       [101, 12, 13, 102, 0, 0]]
    assert windows.labels.tolist() == [[-1, 1, 2, -1, -1, -1], [-1, 3, -1, -1, -1, -1],
                                       [-1, 4, -1, -1, -1, -1]]
    assert windows.segment_ids.sum(1).tolist() == [6, 3, 4] and docs.tolist() == [0, 0, 1]


def test_token_classification_counts_only_labelled_positions(mlm_run, tmp_path):
    encoder = classify.load_encoder(str(mlm_run), "pretrained")
    task = classify.ClassificationTask(encoder.cfg, 5, 8, per_token=True)
    params = task.init_params(jax.random.key(0))
    batch = {"tokens": np.full((2, 8), 7, np.int32), "token_types": np.zeros((2, 8), np.int32),
             "segment_ids": np.array([[1] * 6 + [0] * 2, [0] * 8], np.int32),
             "labels": np.array([[-1, 2, 3, -1, 4, -1, 0, 0], [0] * 8], np.int32)}
    sums = task.loss(params, batch, None, train=False)
    assert float(sums.weight) == 3  # the second row is padding; -1 marks unlabelled tokens
    assert task.batch_fields()["labels"].shape == (8,)
    config, result = _finetune(tmp_path / "pos", mlm_run, "dataset=brown_pos", "lr=1e-2")
    assert 0.0 <= result["word_accuracy"] <= 1.0 and result["test_words"] > 100_000
    assert 0.85 < result["most_frequent_tag_accuracy"] < 0.93


def test_transfer_study_pairs_differ_only_in_the_initial_weights(capsys):
    from experiments import transfer
    chosen = transfer.settings("runs/mlm", 300, 3e-4, 100, 1e-4)
    assert list(chosen) == ["ours_pretrained", "ours_scratch",
                            "minilm_pretrained", "minilm_scratch"]
    for name in ("ours", "minilm"):
        pretrained, scratch = chosen[f"{name}_pretrained"], chosen[f"{name}_scratch"]
        assert pretrained.replace("init=pretrained", "init=scratch") == scratch
        load_config(f"{CLASSIFY}:{scratch},dataset=rte")
    assert list(transfer.settings("", 300, 3e-4, 100, 1e-4)) == ["minilm_pretrained",
                                                                 "minilm_scratch"]
    # A run of ours is needed for its settings.
    assert cli.run(transfer.main, ["--dataset", "sst2", "--only", "ours_scratch"]) == 2
    assert "ours_* need --encoder" in capsys.readouterr().err


def test_pretraining_gain_is_welchs_one_sided_t_test():
    import math

    import scipy.stats

    from experiments import transfer
    pre, scratch = [0.41, 0.45, 0.44], [0.37, 0.35, 0.41]
    runs = lambda accs: {"runs": [{"window_accuracy": a / 2, "document_accuracy": a}
                                  for a in accs]}
    results = {"ours_pretrained": runs(pre), "ours_scratch": runs(scratch),
               "minilm_pretrained": runs(pre), "solo_pretrained": runs(pre),
               "solo_scratch": runs(scratch[:1])}
    gains = transfer.pretraining_gains(results)
    assert list(gains) == ["ours"]  # minilm has no scratch runs, solo only one scratch seed
    # Welch by hand: t on the unpooled standard error, Welch-Satterthwaite degrees of freedom.
    va, vb = (statistics.variance(x) / len(x) for x in (pre, scratch))
    t = (statistics.mean(pre) - statistics.mean(scratch)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(pre) - 1) + vb ** 2 / (len(scratch) - 1))
    document = gains["ours"]["document_accuracy"]
    assert document["gain"] == pytest.approx(statistics.mean(pre) - statistics.mean(scratch))
    assert document["welch_t_p_one_sided"] == pytest.approx(scipy.stats.t.sf(t, df))
    assert gains["ours"]["window_accuracy"]["gain"] == pytest.approx(document["gain"] / 2)
    # The test is one-sided: swapping the settings gives the complementary p-value.
    swapped = transfer.pretraining_gains({"ours_pretrained": runs(scratch),
                                          "ours_scratch": runs(pre)})
    assert swapped["ours"]["document_accuracy"]["welch_t_p_one_sided"] == pytest.approx(
        1 - document["welch_t_p_one_sided"])
