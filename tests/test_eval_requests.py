"""Task data: the package's sets load completely, COPA/MMLU follow the harness's formats, and
k-shot prompts draw solved examples reproducibly from the right pool."""
import dataclasses

import datasets
import pytest

from lm.data.labelled import eval_package_root
from lm.eval import requests as er


def test_unconditional_companions_are_dropped():
    requests = er.load_requests("piqa")
    docs = {r.doc_id for r in requests}
    # PIQA's validation split has 1,838 questions with two solutions each.
    assert len(docs) == 1838 and len(requests) == 2 * 1838
    assert max(docs) < er.UNCONDITIONAL_DOC_IDS


def test_copa_follows_the_harness_format():
    raw = datasets.load_from_disk(str(eval_package_root() / "hf_datasets/super_glue/copa/validation"))
    requests = er.load_requests("copa")
    assert len(requests) == 2 * len(raw) == 200
    for doc_id, doc in enumerate(raw):
        pair = [r for r in requests if r.doc_id == doc_id]
        connector = "because" if doc["question"] == "cause" else "therefore"
        assert {r.context for r in pair} == {doc["premise"][:-1] + " " + connector}
        assert [r.continuation.strip().lower() for r in pair] == \
            [doc["choice1"].lower(), doc["choice2"].lower()]
        assert all(r.continuation[1].islower() or not r.continuation[1].isalpha() for r in pair)
        assert pair[0].gold == doc["label"]


def test_mmlu_shots_are_the_same_subjects_dev_questions():
    requests = er.load_requests("mmlu")
    assert len({r.doc_id for r in requests}) == 14042
    assert len({r.group for r in requests}) == 57
    # --limit takes a shuffled sample across subjects, not the first subject.
    assert len({r.group for r in er.limit_docs(requests, 100)}) > 30
    dev = er.load_requests("mmlu:dev")
    five_shot, source = er.task_requests("mmlu", 5)
    assert "dev" in source
    for request in er.limit_docs(five_shot, 20):
        solved = [text for _, (group, text) in er.solved_examples(dev).items()
                  if group == request.group]
        assert len(solved) == 5  # the dev split has five per subject: all of them are used
        assert all(text + "\n\n" in request.context for text in solved)


def _toy_task(docs=10):
    return [er.Request(d, c, f"Q{d}:", f" answer {d}.{c}", gold=d % 2)
            for d in range(docs) for c in range(2)]


def test_k_shot_prompts_join_other_documents_gold_answers():
    requests = _toy_task()
    three_shot = er.with_shots(requests, 3)
    for original, shot in zip(requests, three_shot):
        prefix = shot.context[:-len(original.context)]
        assert shot.context.endswith("\n\n" + original.context)
        examples = prefix.split("\n\n")[:-1]
        assert len(examples) == len(set(examples)) == 3
        for example in examples:
            doc = int(example.split(":")[0][1:])
            assert doc != original.doc_id
            assert example == f"Q{doc}: answer {doc}.{doc % 2}"  # the gold continuation
        assert shot.continuation == original.continuation


def test_shots_depend_only_on_seed_and_document():
    requests = _toy_task()
    full = er.with_shots(requests, 2)
    # The order documents come in (and so how many are evaluated) does not change a draw.
    assert sorted(er.with_shots(requests[::-1], 2), key=lambda r: (r.doc_id, r.choice)) == full
    assert er.with_shots(requests, 2, seed=7) != full
    with pytest.raises(ValueError, match="only 9 examples"):
        er.with_shots(requests, 10)


def test_shots_from_another_split_may_include_the_same_doc_id():
    requests, pool = _toy_task(3), [dataclasses.replace(r, context="P" + r.context)
                                    for r in _toy_task(2)]
    two_shot = er.with_shots(requests, 2, pool)
    assert all(r.context.startswith("PQ") for r in two_shot)


def test_pre_rendered_variants_keep_their_own_shots():
    with pytest.raises(ValueError, match="pre-rendered"):
        er.task_requests("piqa:rc_5shot", 1)
    with pytest.raises(ValueError, match="splits"):
        er.load_requests("mmlu:train")


def test_gsm8k_prompts_are_chain_of_thought_with_short_answers():
    requests = er.load_generation_requests("gsm8k")
    assert len(requests) == 1319
    assert all(r.context.count("So the answer is") == 8 and r.answer.lstrip("-").isdigit()
               for r in requests[:50])
