"""Supervised fine-tuning (`config.task = "sft"`): a causal LM trained on assistant tokens only.

Conversations (lm/data/instructions.py) are rendered with the model's chat template and masked
by rendering prefixes (lm/data/chat.py): each assistant turn's content and its end-of-turn token
are trained, nothing else. Whole conversations, cut to seq_len+1 tokens, are packed best-fit
into windows with segment ids, so attention and positions restart at every conversation as in
pretraining (lm/objectives/window_task.py). The loss is the causal LM's summed cross-entropy with
the mask as a per-token weight: the engine divides by the trained-token count of the whole
accumulated batch, so 4 microbatches give the same step as 1 batch.

The model starts from
  sft.model = "smollm2-135m-instruct" (or a .gguf path)  the imported weights, tokenizer and chat
               template (ChatML from the GGUF metadata); the run's model section gives only how it
               computes (RUNTIME_FIELDS: dtype, remat, scan_layers ...)
  sft.model = ""  the config's model section from scratch, with data.tokenizer.path (one of our
               sentencepiece models; empty: one of data.tokenizer.vocab_size pieces trained on
               the training conversations and kept in the workdir, as pretraining does) and
               ChatML, whose two markers become ids V and V+1
  sft.model = "runs/pretrain"  a run directory of ours (a pretraining or an earlier sft run): its
               model section, parameters and tokenizer, with ChatML's markers added as above (the
               embedding grows by the rows they need, initialised at the mean row); the config's
               model section gives only RUNTIME_FIELDS, as for a GGUF
sft.prompt_loss_weight > 0 also trains the prompt's tokens at that weight (validation stays on the
reply tokens): a model that has to learn to read from scratch gets the passage and the question,
which echoes it, as copying practice, not only the answer's few tokens.
The task's parameters are the model's parameters, so a parameter transform (LoRA) can wrap it.
"""
from __future__ import annotations

import bisect
import dataclasses
import json
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from core import trainer
from core.batches import ArrayRows, BatchIterator, sum_batches
from core.config import ConfigError, DataError
from core.step import host_eval
from core.task import BatchField, LossSums
from lm.data import chat, documents, instructions, windows
from lm.data.bpe_tokenizer import ByteLevelBPE
from lm.data.tokenizer import Tokenizer
from lm.decode import decoding
from lm.models import lora, param_tree, transformer as model_lib
from lm.objectives import registry
from lm.objectives.causal_lm import CausalLMTask
from lm.objectives.window_task import prediction_metrics
from lm.weights import import_gguf
from lm.weights.gguf import GGUFFile

log = logging.getLogger(__name__)
RUNTIME_FIELDS = ("dtype", "param_dtype", "remat", "scan_layers", "attention_impl", "dropout",
                  "loss_chunk")
LORA = True  # trains through LoRA adapters when config.lora.rank > 0 (lm/objectives/lora_task.py)
CONFIG_RANGES = {"sft": {"max_examples": ">= 0", "eval_examples": ">= 1",
                         "val_fraction": "[0, 1)", "prompt_loss_weight": "[0, 1]"}}


class SFTTask(CausalLMTask):
    """The causal LM with a per-token weight: `loss_mask` marks the trained tokens."""
    name = "sft"

    def __init__(self, model_cfg, seq_len: int, pretrained=None, prompt_loss_weight: float = 0.0):
        super().__init__(model_cfg, seq_len)
        self._pretrained = pretrained  # host arrays of the whole model, or None (scratch)
        self.prompt_loss_weight = prompt_loss_weight

    def pretrained_params(self) -> dict:
        return {} if self._pretrained is None else dict(self._pretrained)

    def batch_fields(self):
        return {**super().batch_fields(),
                "loss_mask": BatchField((self.seq_len + 1,), jnp.int32, ("batch", "length"))}

    def loss(self, params, batch, rng, train: bool) -> LossSums:
        reply_BT = (batch["loss_mask"][:, 1:] > 0).astype(jnp.float32)
        if train and self.prompt_loss_weight:  # the padding is masked by the segment ids
            reply_BT = reply_BT + self.prompt_loss_weight * (1.0 - reply_BT)
        return super().loss(params, batch, rng, train, reply_BT)

    @staticmethod
    def metrics(sums: dict[str, float], num_bytes: float = 0.0) -> dict[str, float]:
        return prediction_metrics(sums, "trained_tokens")


# ------------------------------------------------------------------------------ packing


def pack_conversations(encoded: list[tuple[np.ndarray, np.ndarray]], seq_len: int,
                       pad_id: int) -> ArrayRows:
    """Whole conversations (each at most seq_len+1 tokens) packed best-fit decreasing into
    windows of seq_len+1: tokens, segment ids (1-based within a window, 0 = padding) and the
    loss mask. A conversation never spans two windows."""
    width = seq_len + 1
    order = sorted(range(len(encoded)), key=lambda k: (-len(encoded[k][0]), k))
    windows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, window index), sorted
    for k in order:
        need = len(encoded[k][0])
        if need > width:
            raise DataError(f"conversation {k} has {need} tokens; cut it to {width} first")
        at = bisect.bisect_left(free, (need, -1))
        if at == len(free):
            windows.append([k])
            room, index = width - need, len(windows) - 1
        else:
            room, index = free.pop(at)
            windows[index].append(k)
            room -= need
        bisect.insort(free, (room, index))
    tokens = np.full((len(windows), width), pad_id, np.int32)
    segments, mask = np.zeros_like(tokens), np.zeros_like(tokens)
    for row, members in enumerate(windows):
        at = 0
        for segment, k in enumerate(members, 1):
            ids, trained = encoded[k]
            tokens[row, at:at + len(ids)], mask[row, at:at + len(ids)] = ids, trained
            segments[row, at:at + len(ids)] = segment
            at += len(ids)
    return ArrayRows({"tokens": tokens, "segment_ids": segments, "loss_mask": mask})


# ------------------------------------------------------------------------ model and data


@dataclasses.dataclass
class SFTSetup:
    task: SFTTask
    tokenizer: object
    template: chat.ChatTemplate
    data: trainer.TaskData
    validation: list  # the validation conversations (scores decode their prompts)


def load_model(config, section=None, workdir=None, conversations=None):
    """(model config, host parameters or None, tokenizer, chat template) of sft.model (or of
    `section`.model and .end_of_turn: the feedback objectives' section). A model of ours without
    data.tokenizer.path takes the workdir's tokenizer, else trains one on `conversations`."""
    section = config.sft if section is None else section
    spec = section.model
    if spec and (pathlib.Path(spec) / "config.json").is_file():
        return _from_run(config, spec, section.get("seed", 0))
    if spec and pathlib.Path(spec).is_dir():
        raise ConfigError(f"sft.model {spec} is a folder without config.json, not a run of ours; "
                          "pass a run's --workdir, a .gguf file or a packaged model name")
    if spec:
        path = pathlib.Path(spec)
        if path.suffix != ".gguf":
            path = import_gguf.pretrained_path(spec, config.data.cache_dir)
        elif not path.is_file():
            raise ConfigError(f"model {spec}: no such GGUF file")
        gguf = GGUFFile(path)
        cfg = import_gguf.config_from_gguf(gguf.metadata, gguf.tensors, **_runtime_fields(config))
        tokenizer = ByteLevelBPE.from_gguf_metadata(gguf.metadata)
        if not tokenizer.chat_template:
            raise ConfigError(f"model {spec} has no chat template in its metadata")
        template = chat.ChatTemplate.of_tokenizer(tokenizer, section.end_of_turn)
        return cfg, import_gguf.params_from_gguf(gguf, cfg), tokenizer, template
    tokenizer = chat.ChatTokenizer(_scratch_tokenizer(config.data, workdir, conversations))
    cfg = model_lib.config_from(config, model_lib.padded_vocab(tokenizer.vocab_size))
    return cfg, None, tokenizer, chat.ChatTemplate()


def _runtime_fields(config) -> dict:
    """config.model's RUNTIME_FIELDS: how an imported or continued model computes."""
    model = config.get("model", {})
    return {k: model[k] for k in RUNTIME_FIELDS if k in model}


def _from_run(config, workdir: str, seed: int):
    """A run of ours continued as a chat model: its architecture with config.model's
    RUNTIME_FIELDS, its newest parameters with embedding rows added for ChatML's markers."""
    from lm.objectives import saved_run  # it imports the registry, which imports this module
    run = saved_run.load_run(workdir, what="sft.model")
    if not isinstance(run.task, CausalLMTask) or not getattr(run.task.model_cfg, "causal", False):
        raise ConfigError(f"sft.model {workdir} is a {run.config.get('task')!r} run; start a chat "
                          "model from a causal LM run (task lm or sft)")
    tokenizer = chat.ChatTokenizer(run.tokenizer)
    fields = {**run.config.model, **_runtime_fields(config)}
    fields["vocab_size"] = max(run.task.model_cfg.vocab_size,
                               model_lib.padded_vocab(tokenizer.vocab_size))
    if fields["pos_emb"] != "learned":  # no table of positions: max_len is only a bound
        fields["max_len"] = max(fields["max_len"], config.data.seq_len)
    cfg = model_lib.TransformerConfig(**fields)
    if cfg.pos_emb == "learned" and config.data.seq_len > cfg.max_len:
        raise ConfigError(f"data.seq_len {config.data.seq_len} is longer than the {cfg.max_len} "
                          f"learned positions of sft.model {workdir}; set data.seq_len <= "
                          f"{cfg.max_len} or start from a run with rotary positions")
    params = run.params
    if cfg.scan_layers and "layers" not in params:
        params = param_tree.stack_layers(params, cfg.num_layers)
    elif not cfg.scan_layers and "layers" in params:
        params = param_tree.unstack_layers(params)
    params = param_tree.grow_vocab(params, cfg.vocab_size, seed)
    log.info("sft: %s (step %d) as the starting model, vocabulary %d -> %d", workdir, run.step,
             run.task.model_cfg.vocab_size, cfg.vocab_size)
    return cfg, jax.device_get(params), tokenizer, chat.ChatTemplate()


def _scratch_tokenizer(data_cfg, workdir, conversations) -> Tokenizer:
    """data.tokenizer.path's, else the workdir's, else one trained on the conversations (by
    windows.get_tokenizer, which keeps it in the workdir)."""
    if data_cfg.tokenizer.path:
        return windows.get_tokenizer(data_cfg, (), workdir)
    if workdir is not None and (pathlib.Path(workdir) / "tokenizer.model").is_file():
        return Tokenizer.load(pathlib.Path(workdir) / "tokenizer.model")
    if conversations is None or not data_cfg.tokenizer.get("vocab_size"):
        raise ConfigError("sft.model is empty (a model of ours from scratch): set "
                          "data.tokenizer.path to a sentencepiece tokenizer.model, e.g. a "
                          "pretraining run's, or data.tokenizer.vocab_size to train one on the "
                          "conversations, or set sft.model=smollm2-135m-instruct")
    texts = (m["content"] for c in conversations for m in c.messages)
    return windows.get_tokenizer(data_cfg, texts, workdir)


def encode_all(conversations, template, tokenizer, seq_len: int,
               drop_untrainable: bool = False) -> list:
    """(ids, mask) of each conversation cut to seq_len+1 tokens. One left with no trained token
    is an error naming it, or with drop_untrainable (opted into, e.g. for ShareGPT's long
    prompts) dropped and counted in the log."""
    encoded = []
    for c in conversations:
        try:
            encoded.append(chat.encode_conversation(template, tokenizer.encode, c.messages,
                                                    seq_len + 1, c.where))
        except chat.UntrainableError:
            if not drop_untrainable:
                raise
    if len(encoded) < len(conversations):
        log.warning("sft: dropped %d of %d conversations with no assistant token in the first "
                    "%d tokens (sft.drop_untrainable)", len(conversations) - len(encoded),
                    len(conversations), seq_len + 1)
    if not encoded:
        raise DataError(f"no conversation has an assistant token within {seq_len + 1} tokens")
    return encoded


def split(config, conversations):
    """(train, validation): generated tasks get a validation set of their own seed (seed + 1);
    other sources are split by a hash of each conversation's content, not of its file's path, so
    that the same data gives the same split wherever it lies (and duplicates stay together)."""
    s = config.sft
    if s.dataset in instructions.TASKS or s.dataset == "cot":
        seen = {c.messages[0]["content"] for c in conversations}
        fresh = [c for c in instructions.load(s.dataset, s.eval_examples * 2, s.seed + 1,
                                              config.data.cache_dir)
                 if c.messages[0]["content"] not in seen]
        return conversations, fresh[:s.eval_examples * (2 if s.dataset == "cot" else 1)]
    is_val = [documents.is_validation(s.seed, "sft", json.dumps(c.messages, sort_keys=True),
                                      s.val_fraction) for c in conversations]
    train = [c for c, v in zip(conversations, is_val) if not v]
    validation = [c for c, v in zip(conversations, is_val) if v]
    if not train or not validation:
        raise DataError(f"sft.dataset {s.dataset!r}: {len(conversations)} conversations leave "
                        f"one split empty at sft.val_fraction={s.val_fraction}")
    return train, validation


def build_setup(config, workdir=None, need_train: bool = True) -> SFTSetup:
    """The model, tokenizer and template, the conversations packed into windows, the task."""
    instructions.check_spec(config.sft.dataset)
    conversations = instructions.load(config.sft.dataset, config.sft.max_examples,
                                      config.sft.seed, config.data.cache_dir)
    train, validation = split(config, conversations)
    cfg, params, tokenizer, template = load_model(config, workdir=workdir, conversations=train)
    seq_len = config.data.seq_len
    task = registry.with_lora(config, SFTTask(cfg, seq_len, params,
                                              config.sft.get("prompt_loss_weight", 0.0)))
    drop = config.sft.get("drop_untrainable", False)
    val_rows = pack_conversations(encode_all(validation, template, tokenizer, seq_len, drop),
                                  seq_len, tokenizer.pad_id)
    train_iter = None
    if need_train:
        train_rows = pack_conversations(encode_all(train, template, tokenizer, seq_len, drop),
                                        seq_len, tokenizer.pad_id)
        train_iter = BatchIterator(train_rows, config.train.global_batch_size,
                                   config.train.seed, jax.process_index(), jax.process_count())
        log.info("sft: %d train conversations in %d windows of %d tokens, %d trained tokens; "
                 "%d validation conversations", len(train), len(train_rows), seq_len,
                 int(train_rows.fields["loss_mask"].sum()), len(validation))
    eval_batch = config.train.global_batch_size // max(1, config.train.microbatches)

    def evaluate(run_batch, max_batches: int = 0) -> dict[str, float]:
        return task.metrics(sum_batches(val_rows, eval_batch, run_batch, max_batches)[0])

    meta = {"tokenizer_fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size}

    def check_meta(saved: dict) -> None:
        if saved.get("tokenizer_fingerprint", tokenizer.fingerprint) != tokenizer.fingerprint:
            raise ConfigError("the checkpoint was trained with another tokenizer than sft.model "
                              "/ data.tokenizer.path give; use the run's own settings")

    data = trainer.TaskData(train=train_iter, evaluate=evaluate, eval_batch_size=eval_batch,
                            meta=meta, check_meta=check_meta)
    return SFTSetup(task, tokenizer, template, data, validation)


# ------------------------------------------------------------------------------ scores


def replies(setup: SFTSetup, params, conversations, max_new_tokens: int,
            batch_size: int = 32) -> list[str]:
    """Greedy replies to each conversation without its last reply, stopped at the end-of-turn."""
    tokenizer, template = setup.tokenizer, setup.template
    stop = tokenizer.encode([template.end_of_turn])[0]
    settings = decoding.SamplingConfig(max_new_tokens=max_new_tokens, stop_ids=tuple(stop[-1:]),
                                       pad_id=tokenizer.pad_id)
    prompts = tokenizer.encode([template.render(c.messages[:-1], add_generation_prompt=True)
                                for c in conversations])
    out = []
    for start in range(0, len(prompts), batch_size):
        for ids in decoding.generate(setup.task.model, params, prompts[start:start + batch_size],
                                     settings):
            out.append(tokenizer.decode(ids, skip_special=True))
    return out


SCORES_FILE = "sft_scores.json"  # lm/commands.py writes scores() here after training


def scores(config, setup: SFTSetup, params, step: int) -> dict:
    """Validation loss on trained tokens; for generated tasks, greedy answer accuracy per task
    in domain (held-out seed) and out of domain (longer names / more flips)."""
    result = {"step": step, "validation": setup.data.evaluate(host_eval(setup.task, params), 0)}
    s = config.sft
    if not (s.dataset in instructions.TASKS or s.dataset == "cot"):
        return result
    params = jax.device_get(lora.plain(params))  # a LoRA run decodes its merged model
    tasks = instructions.TASKS if s.dataset == "cot" else (s.dataset,)
    for task in tasks:
        for name, lengths in (("in_domain", instructions.IN_DOMAIN),
                              *((f"length_{n}", (n,)) for n in instructions.OUT_OF_DOMAIN)):
            examples = ([c for c in setup.validation if c.where.startswith(task)]
                        if name == "in_domain" else
                        instructions.generate(task, s.eval_examples, lengths, s.seed + 2,
                                              config.data.cache_dir))
            texts = replies(setup, params, examples, s.max_new_tokens)
            result[f"{task}/{name}"] = instructions.score(texts, examples)
            result[f"{task}/{name}/example"] = texts[0]
    return result
