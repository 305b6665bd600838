"""Zero-/few-shot evaluation by log-likelihood, scored the way lm-evaluation-harness scores.

A task is a list of requests (context, continuation), grouped by document; a multiple-choice
document has one request per choice and a gold index. Per request we compute the summed
log-probability of the continuation tokens given the context and whether every one of them is
the greedy choice. Metrics:
  acc       argmax over choices of the summed log-likelihood
  acc_norm  the same divided by the choice's length in characters, without the space that
            joins it to the context (lm-evaluation-harness's `acc_norm`: len(choice))
  greedy    (one-choice tasks such as LAMBADA) every continuation token is the argmax
  perplexity, bits_per_byte of the continuations (one-choice tasks)
Tokenization follows the harness: encode(context + continuation) and split off the context's
tokens, so a word boundary inside the join is tokenized as it would be in running text.

Where requests come from and how k-shot prompts are built: lm/eval/requests.py. Every batch is
split over all devices (data parallel, parameters replicated).
"""
from __future__ import annotations

import collections
import math
import re
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from core import mesh
from core.batches import padded_length
from lm.decode import decoding
from lm.eval import shared_context
from lm.models import param_tree
from lm.eval.requests import (FEW_SHOT_SEED, GENERATION_TASKS, GenerationRequest, Request,
                              limit_docs, load_generation_requests, task_requests)

LOGITS_BUDGET = 1 << 30  # bytes of float32 logits per batch: long rows get fewer per batch


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------

def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as the harness splits them; trailing whitespace of the
    context moves to the continuation first (whitespace, not only spaces)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode([context + continuation])[0]
    context_ids = tokenizer.encode([context])[0] if context else []
    return whole[:len(context_ids)], whole[len(context_ids):]


def _score_block(model, params, tokens_BT, segments_BT, predict_at_BK, scored_BK):
    """(summed log-prob [B], all greedy [B]) of the tokens after positions predict_at where
    scored; logits are computed at predict_at only."""
    logits_BKV = model.apply({"params": params}, tokens_BT[:, :-1], None, segments_BT[:, :-1],
                             logits_at_BK=predict_at_BK)
    targets_BK = jnp.take_along_axis(tokens_BT, predict_at_BK + 1, axis=1)
    return shared_context.summed_logp_and_greedy(logits_BKV, targets_BK, scored_BK)


_score_block_jit = jax.jit(_score_block, static_argnums=0)  # module level: compiled once per shape


def score_rows(model, params, rows: Sequence[tuple[Sequence[int], int]], batch_size: int,
               max_len: int, progress: Callable[[int], None] | None = None
               ) -> list[tuple[float, bool]]:
    """(summed log-prob, all greedy) of the last n tokens of each (ids, n) row, in order.

    Rows are batched longest first and right-padded to core.batches.padded_length; a batch
    holds at most `batch_size` rows and at most LOGITS_BUDGET bytes of logits, rounded up to a
    multiple of the device count."""
    rows_sharding, replicated = mesh.data_parallel()
    params = jax.device_put(params, replicated)
    devices = jax.device_count()
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    results: list[tuple[float, bool]] = [None] * len(rows)  # type: ignore[list-item]
    start = 0
    while start < len(order):
        # The model sees ids[:-1]; the last id is only a target.
        inputs = min(max_len, padded_length(len(rows[order[start]][0]) - 1))
        most_scored = max(scored for _, scored in (rows[i] for i in order[start:start + batch_size]))
        K = min(inputs, padded_length(most_scored))
        fits = LOGITS_BUDGET // (K * model.cfg.vocab_size * 4)
        chunk = order[start:start + max(1, min(batch_size, fits))]
        batch = -(-len(chunk) // devices) * devices
        tokens = np.zeros((batch, inputs + 1), np.int32)
        segments = np.zeros((batch, inputs + 1), np.int32)
        predict_at = np.zeros((batch, K), np.int32)
        scored_mask = np.zeros((batch, K), bool)
        for row, index in enumerate(chunk):
            ids, scored = rows[index]
            tokens[row, :len(ids)] = ids
            segments[row, :len(ids)] = 1
            # Token len(ids) - scored + k is predicted at the position before it.
            predict_at[row] = np.minimum(len(ids) - scored - 1 + np.arange(K), inputs - 1)
            scored_mask[row, :scored] = True
        logp, greedy = jax.device_get(_score_block_jit(model, params, *(
            jax.device_put(a, rows_sharding) for a in (tokens, segments, predict_at, scored_mask))))
        for row, index in enumerate(chunk):
            results[index] = (float(logp[row]), bool(greedy[row]))
        if progress is not None:
            progress(len(chunk))
        start += len(chunk)
    return results


def score_requests(model, params, tokenizer, requests: Sequence[Request], batch_size: int = 16,
                   max_len: int = 0, prefix_ids: Sequence[int] = (),
                   progress: Callable[[int], None] | None = None,
                   share_contexts: bool = True) -> list[tuple[float, bool, int]]:
    """(log-likelihood, greedy, number of continuation tokens) per request, in order.

    Choices of one document with the same context are scored in one row, the context run once
    (lm/eval/shared_context.py; share_contexts=False, or a long-sequence attention pattern,
    scores each as its own row); the rest row by row, a pair longer than max_len keeping the end
    of its context. The model runs with its layers scanned (param_tree.with_scanned_layers)."""
    model, params = param_tree.with_scanned_layers(model, params)
    max_len = max_len or model.cfg.max_len
    encoded = []
    for r in requests:
        context_ids, cont_ids = encode_pair(tokenizer, r.context, r.continuation)
        if not cont_ids:
            raise ValueError(f"request of doc {r.doc_id} has an empty continuation")
        # As the harness does, an empty context is the end-of-text token, so that the first
        # continuation token is scored too.
        context_ids = list(prefix_ids) + context_ids or [tokenizer.eos_id]
        encoded.append((context_ids, cont_ids))
    groups: dict[tuple, list[int]] = collections.defaultdict(list)
    for index, (r, (context, _)) in enumerate(zip(requests, encoded)):
        groups[(r.doc_id, tuple(context))].append(index)
    share_contexts = share_contexts and shared_context.can_share(model.cfg)
    # a shared row holds the context and every choice: no longer than a row scored alone may be
    shared = [members for (_, context), members in groups.items() if share_contexts and
              len(members) > 1 and context and
              len(context) + sum(len(encoded[i][1]) for i in members) <= max_len]
    alone = sorted(set(range(len(requests))) - {i for members in shared for i in members})
    scores: list[tuple[float, bool]] = [None] * len(requests)  # type: ignore[list-item]
    by_group = shared_context.score_groups(
        model, params, [(encoded[m[0]][0], [encoded[i][1] for i in m]) for m in shared],
        batch_size, LOGITS_BUDGET, min(shared_context.ROW_TOKENS, max_len), progress)
    for members, group_scores in zip(shared, by_group):
        for index, score in zip(members, group_scores):
            scores[index] = score
    rows = [((encoded[i][0] + encoded[i][1])[-(max_len + 1):], len(encoded[i][1])) for i in alone]
    for index, score in zip(alone, score_rows(model, params, rows, batch_size, max_len, progress)):
        scores[index] = score
    return [(logp, greedy, len(cont)) for (logp, greedy), (_, cont) in zip(scores, encoded)]


def rolling_windows(ids: Sequence[int], max_len: int, stride: int) -> list[tuple[list[int], int]]:
    """(window, number of scored tokens at its end) covering every token of `ids` once.

    The first window scores all its tokens after the first; each later one advances by
    `stride` tokens and scores only those, seeing up to max_len - stride tokens of context
    (lm-evaluation-harness's rolling loglikelihood, with overlap)."""
    if not 0 < stride <= max_len:
        raise ValueError(f"stride must be in 1..max_len ({max_len}), got {stride}")
    if len(ids) < 2:
        return []  # nothing to predict
    windows = [(list(ids[:max_len + 1]), min(len(ids), max_len + 1) - 1)]
    end = min(len(ids), max_len + 1)
    while end < len(ids):
        new_end = min(end + stride, len(ids))
        windows.append((list(ids[max(0, new_end - max_len - 1):new_end]), new_end - end))
        end = new_end
    return windows


def document_perplexity(model, params, tokenizer, texts: Sequence[str], max_len: int = 0,
                        stride: int = 0, batch_size: int = 16,
                        prefix_ids: Sequence[int] = ()) -> dict[str, float]:
    """Perplexity (per token) and bits per byte of whole documents, scored in rolling windows.

    Each document starts after `prefix_ids` (e.g. BOS), so its first token is scored too."""
    model, params = param_tree.with_scanned_layers(model, params)
    max_len = max_len or model.cfg.max_len
    stride = stride or max_len // 2
    rows = []
    for text in texts:
        ids = list(prefix_ids) + tokenizer.encode([text])[0]
        rows.extend(rolling_windows(ids, max_len, stride))
    total_logp = sum(logp for logp, _ in score_rows(model, params, rows, batch_size, max_len))
    total_tokens = sum(scored for _, scored in rows)
    if not total_tokens:
        raise ValueError("the documents hold no tokens to score (empty texts?)")
    num_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return {"documents": len(texts), "tokens": total_tokens, "bytes": num_bytes,
            "perplexity": math.exp(-total_logp / max(total_tokens, 1)),
            "bits_per_byte": -total_logp / math.log(2) / max(num_bytes, 1)}


def choice_text(continuation: str) -> str:
    """The choice without the target delimiter (one leading space) that joins it to the
    context: lm-evaluation-harness divides by this length for acc_norm."""
    return continuation[1:] if continuation.startswith(" ") else continuation


def metrics(requests: Sequence[Request], scores: Sequence[tuple[float, bool, int]]) -> dict:
    """acc / acc_norm for multiple choice; greedy accuracy, perplexity and bpb for one choice."""
    docs: dict[int, list[tuple[Request, tuple]]] = collections.defaultdict(list)
    for request, score in zip(requests, scores):
        docs[request.doc_id].append((request, score))
    if all(len(items) == 1 for items in docs.values()):
        logp = sum(s[0] for s in scores)
        chars = sum(len(r.continuation.encode("utf-8")) for r in requests)
        return {"docs": len(docs),
                "acc": float(np.mean([s[1] for s in scores])),
                "perplexity": math.exp(-np.mean([s[0] for s in scores])),
                "bits_per_byte": -logp / math.log(2) / max(chars, 1)}
    acc, acc_norm = [], []
    for items in docs.values():
        items.sort(key=lambda item: item[0].choice)
        gold = items[0][0].gold
        loglik = np.array([s[0] for _, s in items])
        chars = np.array([max(len(choice_text(r.continuation)), 1) for r, _ in items])
        acc.append(float(np.argmax(loglik) == gold))
        acc_norm.append(float(np.argmax(loglik / chars) == gold))
    return {"docs": len(docs), "acc": float(np.mean(acc)), "acc_norm": float(np.mean(acc_norm))}


ANSWER_PATTERN = re.compile(r"answer is\s*\$?\s*(-?[\d,]*\.?\d+)")
NUMBER_PATTERN = re.compile(r"-?[\d,]*\.?\d+")


def extract_answer(text: str) -> str:
    """The number after "answer is" (the chain-of-thought format's last line), else the last
    number in the text; commas and a trailing ".0" removed."""
    match = ANSWER_PATTERN.search(text)
    numbers = [match.group(1)] if match else NUMBER_PATTERN.findall(text)
    if not numbers:
        return ""
    answer = numbers[-1].replace(",", "").rstrip(".")
    return answer.removesuffix(".0")


def evaluate_generation(model, params, tokenizer, requests: Sequence[GenerationRequest],
                        batch_size: int = 8, max_new_tokens: int = 256,
                        stop: Sequence[str] = ("\n\n", "Question:"), prefix_ids: Sequence[int] = (),
                        progress: Callable[[int], None] | None = None) -> dict:
    """Greedy generation until a stop string, then exact match of the extracted answer."""
    # Any token whose text contains a stop string ends a row early; the text is cut there too.
    stop_ids = tuple(i for i in range(model.cfg.vocab_size)
                     if any(s in tokenizer.decode([i]) for s in stop)) + (tokenizer.eos_id,)
    sampling = decoding.SamplingConfig(max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                                       pad_id=tokenizer.pad_id, padding="left")
    room = model.cfg.max_len - max_new_tokens
    prompts = [(list(prefix_ids) + ids)[-room:]
               for ids in tokenizer.encode([r.context for r in requests])]
    order = sorted(range(len(requests)), key=lambda i: -len(prompts[i]))
    texts: list[str] = [""] * len(requests)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        for index, ids in zip(chunk, decoding.generate(model, params, [prompts[i] for i in chunk],
                                                       sampling)):
            text = tokenizer.decode(ids)
            for s in stop:
                text = text.split(s)[0]
            texts[index] = text
        if progress is not None:
            progress(len(chunk))
    correct = [extract_answer(t) == extract_answer(r.answer) for t, r in zip(texts, requests)]
    return {"docs": len(requests), "exact_match": float(np.mean(correct)),
            "examples": [{"generated": t, "answer": r.answer} for t, r in
                         zip(texts[:3], requests[:3])]}


def evaluate_tasks(model, params, tokenizer, tasks: Iterable[str], shots: Sequence[int] = (0,),
                   limit: int = 0, batch_size: int = 16, prefix_ids: Sequence[int] = (),
                   show_progress: bool = True, seed: int = FEW_SHOT_SEED) -> dict[str, dict]:
    """{"task/kshot": metrics and where the shots came from} for every task and shot count.
    Generation tasks (GSM8K) use their own pre-rendered 8-shot chain-of-thought prompts."""
    from tqdm import tqdm
    results = {}
    # stacked once, not per task
    scoring_model, scoring_params = param_tree.with_scanned_layers(model, params)
    for k in shots:
        for task in tasks:
            if task in GENERATION_TASKS:
                requests = limit_docs(load_generation_requests(task), limit)
                with tqdm(total=len(requests), desc=task, disable=not show_progress) as bar:
                    results[f"{task}/8shot-cot"] = evaluate_generation(
                        model, params, tokenizer, requests, max(1, batch_size // 2),
                        prefix_ids=prefix_ids, progress=bar.update)
                continue
            requests, shots_from = task_requests(task, k, seed)
            requests = limit_docs(requests, limit)
            with tqdm(total=len(requests), desc=f"{task} {k}-shot",
                      disable=not show_progress) as bar:
                scores = score_requests(scoring_model, scoring_params, tokenizer, requests,
                                        batch_size, prefix_ids=prefix_ids, progress=bar.update)
            results[f"{task}/{k}shot"] = {**metrics(requests, scores), "shots_from": shots_from}
    return results
