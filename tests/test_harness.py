"""The evaluation harness scores requests as the harness defines them, on real task data."""
import json

import jax
import numpy as np
import pytest

from lm import harness, import_gguf
from lm import model as model_lib
from lm.bpe_tokenizer import ByteLevelBPE
from lm.gguf import GGUFFile


@pytest.fixture(scope="module")
def tokenizer():
    path = import_gguf.pretrained_path("smollm2-135m-instruct")
    return ByteLevelBPE.from_gguf_metadata(GGUFFile(path).metadata)


@pytest.fixture(scope="module")
def tiny(tokenizer):
    cfg = model_lib.preset("llama", vocab_size=tokenizer.vocab_size, num_layers=2, d_model=32,
                           num_heads=4, max_len=64, scan_layers=False)
    model = model_lib.Decoder(cfg)
    return model, model.init(jax.random.key(0), np.zeros((1, 8), np.int32))["params"]


def test_context_and_continuation_split_as_the_harness_does(tokenizer):
    context, continuation = "Question: what is 2+2?\nAnswer: ", "4, of course"
    ctx, cont = harness.encode_pair(tokenizer, context, continuation)
    assert ctx + cont == tokenizer.encode([context + continuation])[0]
    assert ctx == tokenizer.encode([context.rstrip(" ")])[0]  # the space moved to the answer
    assert tokenizer.decode(cont) == " 4, of course"


def test_scores_equal_a_direct_forward_pass(tiny, tokenizer):
    model, params = tiny
    requests = [harness.Request(0, 0, "The cat sat on the", " mat", 0),
                harness.Request(0, 1, "The cat sat on the", " moon tonight", 0),
                harness.Request(1, 0, "A much longer context " * 12, " ends here", 0)]
    scores = harness.score_requests(model, params, tokenizer, requests, batch_size=2, max_len=32)
    for request, (logp, greedy, n) in zip(requests, scores):
        ctx, cont = harness.encode_pair(tokenizer, request.context, request.continuation)
        ids = (ctx + cont)[-33:]  # the end of an over-long pair is kept
        logits = model.apply({"params": params}, np.array([ids[:-1]]))[0]
        logp_all = np.asarray(jax.nn.log_softmax(logits))
        positions = range(len(ids) - 1 - len(cont), len(ids) - 1)
        expected = sum(logp_all[p, ids[p + 1]] for p in positions)
        assert n == len(cont) and logp == pytest.approx(float(expected), abs=1e-4)
        assert greedy == all(logp_all[p].argmax() == ids[p + 1] for p in positions)


def test_acc_and_acc_norm_follow_their_definitions():
    requests = [harness.Request(0, 0, "q", " a", 1), harness.Request(0, 1, "q", " bbbbbbbb", 1),
                harness.Request(1, 0, "q", " yes", 0), harness.Request(1, 1, "q", " no", 0)]
    # Doc 0: choice 0 has the higher sum, choice 1 the higher per-character score.
    scores = [(-2.0, False, 1), (-3.0, False, 3), (-1.0, False, 1), (-5.0, False, 1)]
    result = harness.metrics(requests, scores)
    assert result == {"docs": 2, "acc": 0.5, "acc_norm": 1.0}


def test_a_local_jsonl_file_is_a_task(tmp_path, tiny, tokenizer):
    records = [{"request_type": "loglikelihood", "doc_id": d, "idx": i, "label": 0,
                "request": {"context": f"Q{d}:", "continuation": c}}
               for d in range(3) for i, c in enumerate([" right", " wrong"])]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    model, params = tiny
    result = harness.evaluate_tasks(model, params, tokenizer, [str(path)], show_progress=False)
    assert result[str(path)]["docs"] == 3


def test_unknown_task_names_the_closest():
    with pytest.raises(ValueError, match="did you mean 'hellaswag'"):
        harness.load_requests("helaswag")


def test_smollm2_zero_shot_piqa_is_well_above_chance():
    cfg, params, tokenizer = import_gguf.load_gguf(
        import_gguf.pretrained_path("smollm2-135m-instruct"))
    requests = harness.limit_docs(harness.load_requests("piqa:rc_0shot"), 100)
    assert len({r.doc_id for r in requests}) == 100 and len(requests) == 200
    scores = harness.score_requests(model_lib.Decoder(cfg), params, tokenizer, requests)
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
    done = subprocess.run([sys.executable, "-m", "lm.evaluate_tasks", "--workdir",
                           str(tmp_path / "run"), "--tasks", str(tasks), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    # Every doc has the same two choices and golds alternate, so exactly half are right.
    assert result["results"][str(tasks)]["acc"] == 0.5
    assert "step 3" in result["settings"]["model"]
