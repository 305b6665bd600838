"""T5's text-to-text multitask mixture (lm/objectives/text_to_text.py)."""
import collections

import numpy as np
import pytest

from conftest import QUIET, REPO, train_losses
from core.config import ConfigError, load_config
from lm.objectives import text_to_text as t2t

CONFIG = str(REPO / "experiments/configs/lm/t5_multitask.py")


def test_rouge1_and_the_oracle_sentence():
    # the: 2 and 2, cat, on -> overlap 4 of 6 words each side
    assert t2t.rouge1_f("the cat sat on the mat".split(), "the cat lay on the rug".split()) == \
        pytest.approx(2 / 3)
    assert t2t.rouge1_f(["a"], ["b"]) == 0.0
    sentences = ["Rain fell on the old town.", "The old town slept under rain and fog.",
                 "Fog hid the town.", "Nobody came."]
    # by hand: sentence 1 shares old, town, rain, fog, the with the rest: the highest F1
    assert t2t.oracle_sentence(sentences) == 1


def test_rendering_of_each_task():
    assert t2t.render_sst2(" a fine film ", 1) == t2t.Example("sst2", "sst2 sentence: a fine film",
                                                             "positive")
    assert t2t.render_boolq("is it wet", "It rains.", False) == t2t.Example(
        "boolq", "question: is it wet context: It rains.", "false")
    text = ("One two three four five. Six seven eight nine ten. Eleven twelve thirteen fourteen. "
            "Fifteen sixteen seventeen eighteen. Too short. Twenty one two three four five.")
    examples, _ = t2t.summarize_examples([text])
    assert len(examples) == 1  # "Too short." (2 words) breaks the run of qualifying sentences
    (example,) = examples
    assert example.inputs == ("summarize: One two three four five. Six seven eight nine ten. "
                              "Eleven twelve thirteen fourteen. Fifteen sixteen seventeen "
                              "eighteen.")
    assert example.target in example.inputs[len("summarize: "):]
    folds = t2t.eval_package_examples("sst2", 0.2, 0)
    assert len(folds["train"]) + len(folds["test"]) == 872  # GLUE SST-2 validation
    assert 0.15 < len(folds["test"]) / 872 < 0.25
    assert not {e.inputs for e in folds["train"]} & {e.inputs for e in folds["test"]}
    assert all(e.inputs.startswith("sst2 sentence: ") and e.target in ("positive", "negative")
               for e in folds["train"] + folds["test"])


def test_mixing_is_examples_proportional_with_a_cap():
    rates = t2t.mixing_rates({"a": 100, "b": 300, "c": 10_000}, cap=500)
    assert rates == pytest.approx({"a": 100 / 900, "b": 300 / 900, "c": 500 / 900})
    sets = {name: t2t.EncodedSet(np.full((n, 4), k + 5, np.int32), np.ones((n, 2), np.int32),
                                 np.full(n, 4, np.int32), np.full(n, 2, np.int32))
            for k, (name, n) in enumerate({"a": 100, "b": 300, "c": 10_000}.items())}
    one = t2t.MixtureIterator(sets, rates, 64, seed=3)
    counts = collections.Counter()
    for _ in range(300):
        batch = next(one)
        counts.update(batch["task_ids"].tolist())
        assert (batch["inputs"][:, 0] == batch["task_ids"] + 5).all()  # rows of the drawn task
    total = sum(counts.values())
    for k, name in enumerate(sets):
        assert abs(counts[k] / total - rates[name]) < 4 * np.sqrt(rates[name] / total), counts
    # Batch `step` is a pure function of (seed, step), and processes split its rows.
    halves = [t2t.MixtureIterator(sets, rates, 64, 3, i, 2) for i in range(2)]
    for it in halves:
        it.set_state(one.get_state() | {"step": 7})
    one.set_state(one.get_state() | {"step": 7})
    whole, parts = next(one), [next(it) for it in halves]
    np.testing.assert_array_equal(whole["inputs"], np.concatenate([p["inputs"] for p in parts]))
    with pytest.raises(ConfigError, match="mixing_cap"):
        t2t.mixing_rates({"a": 1}, 0)


class _Chars:
    """A character tokenizer (ids 4..) with EOS 3, for exact checks of the encoding."""
    vocab_size = 300

    def encode(self, texts):
        return [[ord(c) - 28 for c in t] for t in texts]


def test_targets_never_reach_the_encoder():
    examples = [t2t.render_sst2("good fun", 1), t2t.render_boolq("q", "long context " * 9, True)]
    encoded = t2t.encode_examples(_Chars(), examples, inputs_len=40, targets_len=6)
    tok = _Chars()
    for row, example in enumerate(examples):
        want = (tok.encode([example.inputs])[0][:39] + [3])  # the input alone, cut, + EOS
        n = encoded.input_lengths[row]
        assert encoded.inputs[row, :n].tolist() == want and not encoded.inputs[row, n:].any()
        assert encoded.targets[row, :encoded.target_lengths[row]].tolist() == (
            tok.encode([example.target])[0][:5] + [3])
    # Span corruption: each noise span is one sentinel in the inputs; its tokens are only in
    # the targets, and inputs + targets rebuild the text exactly.
    text = "".join(chr(40 + k % 80) for k in range(300))
    spans = t2t.span_corruption_set(_Chars(), [text], 40, 12, vocab_size=300)
    window = t2t.span_window(40, 12, 0.15, 3.0)
    for row in range(len(spans)):
        ins = spans.inputs[row, :spans.input_lengths[row]].tolist()
        outs = spans.targets[row, :spans.target_lengths[row]].tolist()
        assert outs[-1] == 3
        sentinels = [t for t in ins if t >= 200]
        assert sentinels == list(range(299, 299 - len(sentinels), -1))
        rebuilt, fill = [], {}
        key = None
        for t in outs[:-1]:
            key = t if t >= 200 else key
            if t < 200:
                fill.setdefault(key, []).append(t)
        for t in ins:
            rebuilt += fill[t] if t >= 200 else [t]
        original = _Chars().encode([text])[0][row * window:(row + 1) * window]
        assert rebuilt == original
        if len(original) == window:  # full windows: T5's noise count exactly
            from lm.objectives.span_corruption import noise_counts
            assert sum(len(v) for v in fill.values()) == noise_counts(window, 0.15, 3.0)[0]


def test_short_multitask_run_lowers_the_loss(tmp_path):
    from core import trainer
    config = load_config(CONFIG + ":size=tiny,corpus=austen,tasks=summarize+sst2",
                         [*QUIET, "--config.train.steps=40", "--config.train.checkpoint_every=100",
                          "--config.mesh.num_devices=1", "--config.mesh.ici.data=1"])
    setup = t2t.build_setup(config, tmp_path)
    assert set(setup.tests) == {"summarize", "sst2"}
    assert sum(setup.rates.values()) == pytest.approx(1.0)
    trainer.train(config, tmp_path, setup.task, setup.data)
    losses = train_losses(tmp_path)
    early, late = np.mean([losses[s] for s in range(1, 6)]), np.mean([losses[s] for s in range(36, 41)])
    assert late < early - 1.0, (early, late)
    import jax
    from core.engine import restore_params
    _, params, _ = restore_params(config, setup.task, tmp_path, setup.data.check_meta)
    scores = t2t.exact_match(setup.task, jax.device_get(params), setup.tokenizer,
                             {"sst2": setup.tests["sst2"]}, limit=8)
    assert scores["sst2"]["examples"] == 8


def test_bad_task_names_are_clear_errors(tmp_path):
    config = load_config(CONFIG + ":size=tiny,corpus=austen,tasks=translate", [])
    with pytest.raises(ConfigError, match="translate"):
        t2t.build_setup(config, tmp_path)
