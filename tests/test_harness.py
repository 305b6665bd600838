"""The evaluation harness scores requests as the harness defines them, on real task data."""
import json

import jax
import numpy as np
import pytest

from lm.eval import harness, shared_context
from lm.weights import import_gguf
from lm.models import lora, transformer as model_lib
from lm.data.bpe_tokenizer import ByteLevelBPE
from lm.weights.gguf import GGUFFile
from lm.eval import requests as eval_requests


@pytest.fixture(scope="module")
def tokenizer():
    path = import_gguf.pretrained_path("smollm2-135m-instruct")
    return ByteLevelBPE.from_gguf_metadata(GGUFFile(path).metadata)


@pytest.fixture(scope="module")
def tiny(tokenizer):
    cfg = model_lib.preset("llama", vocab_size=tokenizer.vocab_size, num_layers=2, d_model=32,
                           num_heads=4, max_len=64, scan_layers=False)
    model = model_lib.Transformer(cfg)
    return model, model.init(jax.random.key(0), np.zeros((1, 8), np.int32))["params"]


def test_context_and_continuation_split_as_the_harness_does(tokenizer):
    context, continuation = "Question: what is 2+2?\nAnswer: ", "4, of course"
    ctx, cont = harness.encode_pair(tokenizer, context, continuation)
    assert ctx + cont == tokenizer.encode([context + continuation])[0]
    assert ctx == tokenizer.encode([context.rstrip(" ")])[0]  # the space moved to the answer
    assert tokenizer.decode(cont) == " 4, of course"


@pytest.mark.parametrize("preset,scan,share_contexts", [
    ("llama", False, True), ("llama", False, False), ("llama", True, True), ("gpt2", False, True)])
def test_scores_equal_a_direct_forward_pass(tokenizer, preset, scan, share_contexts):
    cfg = model_lib.preset(preset, vocab_size=tokenizer.vocab_size, num_layers=2, d_model=32,
                           num_heads=4, max_len=64, scan_layers=scan)
    model = model_lib.Transformer(cfg)
    params = model.init(jax.random.key(1), np.zeros((1, 8), np.int32))["params"]
    requests = [eval_requests.Request(0, 0, "The cat sat on the", " mat", 0),
                eval_requests.Request(0, 1, "The cat sat on the", " moon tonight", 0),
                eval_requests.Request(0, 2, "The cat sat on the", " roof of the old barn, again", 0),
                eval_requests.Request(1, 0, "A much longer context " * 12, " ends here", 0),
                eval_requests.Request(2, 0, "Sarah was a better surgeon than Maria so Sarah", " won", 0),
                eval_requests.Request(2, 1, "Sarah was a better surgeon than Maria so Maria", " won", 0),
                eval_requests.Request(3, 0, "Q: " + "word " * 40, " yes", 0),
                eval_requests.Request(3, 1, "Q: " + "word " * 40, " no", 0),
                # more documents than a batch holds: batches of different row lengths
                eval_requests.Request(4, 0, "It rained, so we", " stayed in", 1),
                eval_requests.Request(4, 1, "It rained, so we", " went out", 1),
                eval_requests.Request(5, 0, "Two and two make", " four", 0),
                eval_requests.Request(5, 1, "Two and two make", " five", 0)]
    scores = harness.score_requests(model, params, tokenizer, requests, batch_size=2, max_len=32,
                                    share_contexts=share_contexts)
    _check_against_direct_passes(model, params, tokenizer, requests, scores, 32)


def _check_against_direct_passes(model, params, tokenizer, requests, scores, max_len):
    for request, (logp, greedy, n) in zip(requests, scores):
        ctx, cont = harness.encode_pair(tokenizer, request.context, request.continuation)
        ids = (ctx + cont)[-(max_len + 1):]  # the end of an over-long pair is kept
        logits = model.apply({"params": params}, np.array([ids[:-1]]))[0]
        logp_all = np.asarray(jax.nn.log_softmax(logits))
        positions = range(len(ids) - 1 - len(cont), len(ids) - 1)
        expected = sum(logp_all[p, ids[p + 1]] for p in positions)
        assert n == len(cont) and logp == pytest.approx(float(expected), abs=1e-4)
        assert greedy == all(logp_all[p].argmax() == ids[p + 1] for p in positions)


def test_a_batch_of_shared_rows_fits_its_document_with_the_most_scored_tokens(tokenizer, tiny):
    """The longest row comes first in a batch, but a shorter one may score more tokens."""
    model, params = tiny
    long_few = [eval_requests.Request(0, c, "word " * 36, f" {c}", 0) for c in "ab"]
    short_many = [eval_requests.Request(1, c, "Go", " one two three four five six seven eight"
                                        f" nine ten {c}", 0) for c in "ab"]
    requests = long_few + short_many
    scores = harness.score_requests(model, params, tokenizer, requests, batch_size=2, max_len=64)
    _check_against_direct_passes(model, params, tokenizer, requests, scores, 64)


def test_a_shared_row_shows_each_choice_its_context_and_itself_only():
    from lm.models.attention import attention_mask, continuation_segment, shared_segment
    # two documents in one row: a context and two choices, a context and one choice; padding
    segments = np.array([[shared_segment(1)] * 2 + [continuation_segment(1, 1)] * 2
                         + [continuation_segment(1, 2)] * 2 + [shared_segment(2)]
                         + [continuation_segment(2, 1)] * 2 + [0]])
    mask = np.asarray(attention_mask(segments, 10))[0].astype(int)
    assert mask[3].tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert mask[5].tolist() == [1, 1, 0, 0, 1, 1, 0, 0, 0, 0]
    assert mask[1].tolist() == [1, 1, 0, 0, 0, 0, 0, 0, 0, 0]  # the context stays causal
    assert mask[6].tolist() == [0, 0, 0, 0, 0, 0, 1, 0, 0, 0]  # nothing of document 1
    assert mask[8].tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1, 0]
    assert mask[9].tolist() == [0] * 9 + [1]
    # the cuDNN kernel reads runs of segments, not this mask: the scorer uses XLA's attention
    cfg = model_lib.preset("llama", vocab_size=128, num_layers=1, d_model=32, num_heads=4,
                           attention_impl="cudnn")
    assert shared_context.with_mask_attention(model_lib.Transformer(cfg)).cfg.attention_impl == "xla"
    wrapped = shared_context.with_mask_attention(lora.LoraModel(model_lib.Transformer(cfg)))
    assert isinstance(wrapped, lora.LoraModel) and wrapped.cfg.attention_impl == "xla"


def test_short_documents_share_rows_within_the_row_length():
    from core.batches import padded_length
    lengths = [100, 60, 50, 30, 20, 10, 10, 3]
    rows = shared_context.pack_rows(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    for row in rows:  # each row led by its longest, within that one's padded length (or 64)
        assert lengths[row[0]] == max(lengths[i] for i in row)
        assert sum(lengths[i] for i in row) <= padded_length(max(lengths[row[0]], 64))
    # 100 (of 112) takes a 10, 60 (of 64) the 3, 50 the other 10, 30 the 20
    assert rows == [[0, 6], [1, 7], [2, 5], [3, 4]]


def test_acc_and_acc_norm_follow_their_definitions():
    requests = [eval_requests.Request(0, 0, "q", " a", 1), eval_requests.Request(0, 1, "q", " bbbbbbbb", 1),
                eval_requests.Request(1, 0, "q", " yes", 0), eval_requests.Request(1, 1, "q", " no", 0)]
    # Doc 0: choice 0 has the higher sum, choice 1 the higher per-character score.
    scores = [(-2.0, False, 1), (-3.0, False, 3), (-1.0, False, 1), (-5.0, False, 1)]
    result = harness.metrics(requests, scores)
    assert result == {"docs": 2, "acc": 0.5, "acc_norm": 1.0}
    # lm-eval divides by len(choice), not len(" " + choice): -5/3 > -2/1 picks choice 1, where
    # -5/4 < -2/2 would pick choice 0
    close = [eval_requests.Request(0, 0, "q", " a", 1), eval_requests.Request(0, 1, "q", " cde", 1)]
    assert harness.metrics(close, [(-2.0, False, 1), (-5.0, False, 1)])["acc_norm"] == 1.0


def test_a_local_jsonl_file_is_a_task(tmp_path, tiny, tokenizer):
    records = [{"request_type": "loglikelihood", "doc_id": d, "idx": i, "label": 0,
                "request": {"context": f"Q{d}:", "continuation": c}}
               for d in range(3) for i, c in enumerate([" right", " wrong"])]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    model, params = tiny
    result = harness.evaluate_tasks(model, params, tokenizer, [str(path)], show_progress=False)
    assert result[f"{path}/0shot"]["docs"] == 3


def test_unknown_task_names_the_closest():
    with pytest.raises(ValueError, match="did you mean 'hellaswag'"):
        eval_requests.load_requests("helaswag")


def test_smollm2_zero_shot_piqa_is_well_above_chance():
    # Scanned layers and 48 contexts a batch: the same scores (acc 0.67, acc_norm 0.71 either
    # way; test_scores_equal_a_direct_forward_pass checks scanned and unscanned, batch sizes), but
    # XLA compiles one block instead of 30 per shape and sees fewer shapes: 150 s, not 320 s.
    cfg, params, tokenizer = import_gguf.load_gguf(
        import_gguf.pretrained_path("smollm2-135m-instruct"), scan_layers=True)
    requests = eval_requests.limit_docs(eval_requests.load_requests("piqa:rc_0shot"), 100)
    assert len({r.doc_id for r in requests}) == 100 and len(requests) == 200
    scores = harness.score_requests(model_lib.Transformer(cfg), params, tokenizer, requests,
                                    batch_size=48)
    result = harness.metrics(requests, scores)
    # Chance is 0.5; Pythia-160M reaches 0.627 on the whole set, SmolLM2-135M reports 0.684.
    assert result["acc_norm"] > 0.6, result


def test_evaluate_command_on_one_of_our_runs(tmp_path):
    import subprocess
    import sys

    from conftest import REPO, train_tiny
    train_tiny(tmp_path / "run", "--config.train.steps=3")
    records = [{"doc_id": d, "idx": i, "label": d % 2,
                "request": {"context": "It is a truth universally", "continuation": c}}
               for d in range(4) for i, c in enumerate([" acknowledged", " denied"])]
    tasks = tmp_path / "truth.jsonl"
    tasks.write_text("\n".join(json.dumps(r) for r in records))
    out = tmp_path / "result.json"
    done = subprocess.run([sys.executable, "-m", "lm.eval.evaluate_tasks", "--workdir",
                           str(tmp_path / "run"), "--tasks", str(tasks), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    # Every doc has the same two choices and golds alternate, so exactly half are right.
    assert result["results"][f"{tasks}/0shot"]["acc"] == 0.5
    assert "step 3" in result["settings"]["model"]
    # The engine's own entry point evaluates the same way, with shots.
    done = subprocess.run([sys.executable, "-m", "experiments.main", "evaluate", "--workdir",
                           str(tmp_path / "run"), "--tasks", str(tasks), "--shots", "0,1"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    same = json.loads(done.stdout)["results"]
    assert same[f"{tasks}/0shot"] == result["results"][f"{tasks}/0shot"]
    assert same[f"{tasks}/1shot"]["shots_from"].startswith("same split")


def test_rolling_windows_score_every_token_once_and_equal_one_pass(tiny, tokenizer):
    ids = list(range(100, 190))
    for max_len, stride in [(32, 16), (32, 32), (32, 5), (200, 100)]:
        windows = harness.rolling_windows(ids, max_len, stride)
        scored = [t for window, n in windows for t in window[len(window) - n:]]
        assert scored == ids[1:] and all(len(w) <= max_len + 1 for w, _ in windows)
    model, params = tiny
    text = "It is a truth universally acknowledged, that a single man in possession of a good " \
           "fortune, must be in want of a wife."
    one_pass = harness.document_perplexity(model, params, tokenizer, [text], max_len=64)
    rolled = harness.document_perplexity(model, params, tokenizer, [text], max_len=8, stride=8)
    assert one_pass["tokens"] == rolled["tokens"] == len(tokenizer.encode([text])[0]) - 1
    # Without overlap each window restarts its context, so rolling scores differ from one pass,
    # but a window wide enough for the whole document gives exactly the one-pass score.
    ids = tokenizer.encode([text])[0]
    logits = model.apply({"params": params}, np.array([ids[:-1]]))[0]
    logp = np.asarray(jax.nn.log_softmax(logits))[np.arange(len(ids) - 1), ids[1:]].sum()
    assert np.log(one_pass["perplexity"]) == pytest.approx(-logp / (len(ids) - 1), rel=1e-5)
    assert rolled["perplexity"] != pytest.approx(one_pass["perplexity"], rel=1e-6)


def test_extract_answer_reads_the_final_number():
    assert harness.extract_answer("3 + 4 = 7. So the answer is 1,234.") == "1234"
    assert harness.extract_answer("He has 5 apples and then 7.0") == "7"
    assert harness.extract_answer("The answer is $-12.") == "-12"
    assert harness.extract_answer("no digits") == ""


def test_generation_eval_reports_each_prompts_own_greedy_text(tiny, tokenizer):
    from lm.decode import decoding
    model, params = tiny
    contexts = ["Question: one?\nAnswer:", "Question: a much longer question, isn't it?\nAnswer:",
                "Q:"]
    requests = [eval_requests.GenerationRequest(i, c, "0") for i, c in enumerate(contexts)]
    result = harness.evaluate_generation(model, params, tokenizer, requests, batch_size=2,
                                         max_new_tokens=12, stop=("\n\n", "Question:"))
    for request, example in zip(requests, result["examples"]):
        ids = decoding.generate(model, params, tokenizer.encode([request.context]),
                                decoding.SamplingConfig(max_new_tokens=12))[0]
        alone = tokenizer.decode(ids).split("\n\n")[0].split("Question:")[0]
        assert example["generated"] == alone
    assert result["exact_match"] == np.mean(
        [harness.extract_answer(e["generated"]) == "0" for e in result["examples"]])


def test_an_empty_context_conditions_on_end_of_text(tiny, tokenizer):
    model, params = tiny
    [(logp, _, n)] = harness.score_requests(model, params, tokenizer,
                                            [eval_requests.Request(0, 0, "", "Hello world", 0)])
    ids = [tokenizer.eos_id] + tokenizer.encode(["Hello world"])[0]
    logp_all = np.asarray(jax.nn.log_softmax(model.apply({"params": params}, np.array([ids]))[0]))
    assert n == len(ids) - 1
    assert logp == pytest.approx(float(sum(logp_all[p, ids[p + 1]] for p in range(n))), abs=1e-4)


def test_task_slices_pick_lm_evals_choice_on_every_document(tmp_path, capsys):
    """The first documents of ARC-Easy and PIQA, scored by us and by
    lm-evaluation-harness itself (its `lm_eval run` on the same weights exported to safetensors,
    benchmarks/harness_vs_lm_eval.py): every request's log-likelihood agrees to float32
    round-off, and every document picks the same choice for acc and for acc_norm."""
    import sys
    from benchmarks import harness_vs_lm_eval
    result = harness_vs_lm_eval.main(["--tasks", "arc_easy,piqa", "--limit", "12",
                                      "--lm-eval-python", sys.executable,
                                      "--workdir", str(tmp_path)])
    capsys.readouterr()
    for task, row in result["tasks"].items():
        assert row["docs"] == row["lm_eval_docs"] == 12, task
        assert row["requests_matched"] == row["requests"] and row["requests_not_ours"] == 0, task
        assert row["docs_choice_differs"] == {"acc": 0, "acc_norm": 0}, (task, row)
        assert row["acc"]["diff_points"] == row["acc_norm"]["diff_points"] == 0.0, (task, row)
        assert row["max_abs_loglik_diff"] < 1e-2, (task, row)
