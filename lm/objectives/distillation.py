"""DistilBERT (Sanh et al. 2019): a shallower masked-LM student trained against a teacher.

The teacher is a finished masked-LM run (experiments/configs/lm/bert.py), restored read-only:
its parameters are host arrays held by this task, closed over by the jitted loss as constants,
never in the train state, so the optimiser cannot touch them. The student is the teacher's
architecture with fewer layers (by default every other one, the paper's "one layer out of
two"), initialised from the teacher's embeddings and the chosen layers (`pretrained_params`,
which the engine's init_state applies). Both see the same dynamically masked input; the loss is
  alpha_ce  * T^2 * soft-target cross-entropy (teacher softmax at temperature T vs the student's
              log-softmax at T, mean over masked tokens)
  + alpha_mlm * masked-LM cross-entropy (mean over masked tokens)
  + alpha_cos * (1 - cosine) of the student's and teacher's final hidden states (mean over
              real tokens)
Sums are weighted by the masked-token count; the cosine sums are scaled by masked / real tokens
of the batch so that the step's loss is exactly the three means combined.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from core.config import ConfigError, load_run_config
from core.task import LossSums
from lm.models import param_tree
from lm.models import transformer as model_lib
from lm.objectives import saved_run
from lm.objectives.masking import MaskedLMTask, choose_positions, corrupt
from lm.objectives.window_task import positions_from_segments


def head_logits(cfg: model_lib.TransformerConfig, params, hidden_BTD) -> jax.Array:
    """The model's output layer applied to its final hidden states (Transformer's own last step),
    so one forward pass gives both hidden states and logits."""
    if cfg.tie_embeddings:
        x_BTE = hidden_BTD @ params["embed_proj"].T if cfg.embed_dim else hidden_BTD
        return jnp.einsum("bte,ve->btv", x_BTE, params["token_embed"],
                          preferred_element_type=jnp.float32)
    return jnp.einsum("btd,dv->btv", hidden_BTD, params["unembed"],
                      preferred_element_type=jnp.float32)


def soft_cross_entropy(student_BTV, teacher_BTV, temperature: float) -> jax.Array:
    """[B, T]: T^2 * sum_v softmax(teacher / T) * -log_softmax(student / T) (Hinton et al.)."""
    targets_BTV = jax.nn.softmax(teacher_BTV / temperature, axis=-1)
    log_probs_BTV = jax.nn.log_softmax(student_BTV / temperature, axis=-1)
    return -temperature ** 2 * jnp.sum(targets_BTV * log_probs_BTV, axis=-1)


def cosine_loss(a_BTD, b_BTD, eps: float = 1e-8) -> jax.Array:
    """[B, T]: 1 - cos(a, b) per token (torch's CosineEmbeddingLoss with target 1)."""
    dot_BT = jnp.sum(a_BTD * b_BTD, axis=-1)
    norms_BT = jnp.linalg.norm(a_BTD, axis=-1) * jnp.linalg.norm(b_BTD, axis=-1)
    return 1.0 - dot_BT / jnp.maximum(norms_BT, eps)


def layer_list(params) -> list:
    """The per-layer subtrees of a stacked (scan_layers) or per-layer parameter tree."""
    if "layers" in params:
        params = param_tree.unstack_layers(params)
    return [params[f"layers_{i}"] for i in range(sum(k.startswith("layers_") for k in params))]


def student_from_teacher(teacher_params, layer_indices, stacked: bool) -> dict:
    """The student's initial parameters: every non-layer tree of the teacher (embeddings, their
    norm, output layer) and the teacher's layers at layer_indices, stacked or per layer."""
    chosen = [layer_list(teacher_params)[i] for i in layer_indices]
    params = {k: v for k, v in teacher_params.items() if not k.startswith("layers")}
    if stacked:
        params["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *chosen)
    else:
        params.update({f"layers_{i}": layer for i, layer in enumerate(chosen)})
    return params


class DistillationTask(MaskedLMTask):
    """The masked-LM task's windows and masking; self.model is the student."""
    name = "distillation"

    def __init__(self, student_cfg: model_lib.TransformerConfig, seq_len: int, mask_id: int,
                 teacher_cfg: model_lib.TransformerConfig, teacher_params,
                 teacher_layers: tuple[int, ...], rate: float = 0.15, span_p: float = 0.0,
                 max_span: int = 10, temperature: float = 2.0, alpha_ce: float = 5.0,
                 alpha_mlm: float = 2.0, alpha_cos: float = 1.0, init_from_teacher: bool = True):
        super().__init__(student_cfg, seq_len, mask_id, rate, span_p, max_span)
        if len(teacher_layers) != student_cfg.num_layers:
            raise ConfigError(f"distill.teacher_layers {teacher_layers} name "
                              f"{len(teacher_layers)} layers but model.num_layers is "
                              f"{student_cfg.num_layers}; make them agree")
        if not all(0 <= i < teacher_cfg.num_layers for i in teacher_layers):
            raise ConfigError(f"distill.teacher_layers {teacher_layers}: the teacher has layers "
                              f"0..{teacher_cfg.num_layers - 1}")
        same = dataclasses.replace(teacher_cfg, num_layers=student_cfg.num_layers,
                                   scan_layers=student_cfg.scan_layers,
                                   dropout=student_cfg.dropout, remat=student_cfg.remat)
        if same != student_cfg:
            raise ConfigError("the student must be the teacher's architecture with fewer layers "
                              f"(it starts from the teacher's weights): teacher {teacher_cfg}, "
                              f"student {student_cfg}")
        if temperature <= 0:
            raise ConfigError(f"distill.temperature must be positive, got {temperature}")
        self.teacher_cfg, self.teacher_layers = teacher_cfg, tuple(teacher_layers)
        self.teacher = model_lib.Transformer(teacher_cfg)
        self.teacher_params = jax.tree.map(_read_only, teacher_params)
        self.temperature, self.init_from_teacher = temperature, init_from_teacher
        self.alpha_ce, self.alpha_mlm, self.alpha_cos = alpha_ce, alpha_mlm, alpha_cos

    def pretrained_params(self) -> dict:
        """Top-level key -> host arrays: the student starts from the teacher's chosen layers
        (or, init=scratch, the paper's ablation, from random weights: nothing here)."""
        if not self.init_from_teacher:
            return {}
        return student_from_teacher(self.teacher_params, self.teacher_layers,
                                    self.model_cfg.scan_layers)

    def loss(self, params, batch, rng, train: bool) -> LossSums:
        tokens_BT = batch["tokens"][:, :self.seq_len]
        segments_BT = batch["segment_ids"][:, :self.seq_len]
        positions_BT = positions_from_segments(segments_BT)
        real_BT = segments_BT > 0
        choose_rng, corrupt_rng, dropout_rng = jax.random.split(rng, 3)
        chosen_BT = choose_positions(choose_rng, real_BT, self.rate, self.span_p, self.max_span)
        inputs_BT = corrupt(corrupt_rng, tokens_BT, chosen_BT, self.mask_id, self.mask_id)

        hidden_BTD = self.model.apply(
            {"params": params}, inputs_BT, positions_BT, segments_BT, deterministic=not train,
            rngs={"dropout": dropout_rng} if train else None, return_hidden=True)
        logits_BTV = head_logits(self.model_cfg, params, hidden_BTD)
        teacher_hidden_BTD = jax.lax.stop_gradient(self.teacher.apply(
            {"params": self.teacher_params}, inputs_BT, positions_BT, segments_BT,
            return_hidden=True))
        teacher_logits_BTV = head_logits(self.teacher_cfg, self.teacher_params,
                                         teacher_hidden_BTD)

        chosen_f_BT, real_f_BT = chosen_BT.astype(jnp.float32), real_BT.astype(jnp.float32)
        num_masked, num_real = jnp.sum(chosen_f_BT), jnp.maximum(jnp.sum(real_f_BT), 1.0)
        soft_BT = soft_cross_entropy(logits_BTV, teacher_logits_BTV, self.temperature)
        soft = jnp.sum(soft_BT * chosen_f_BT)
        # The part of the soft cross-entropy the student can remove: T^2 KL(teacher || student).
        kl = soft - jnp.sum(soft_cross_entropy(teacher_logits_BTV, teacher_logits_BTV,
                                               self.temperature) * chosen_f_BT)
        mlm = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits_BTV, tokens_BT)
                      * chosen_f_BT)
        cos = num_masked / num_real * jnp.sum(
            cosine_loss(hidden_BTD.astype(jnp.float32), teacher_hidden_BTD.astype(jnp.float32))
            * real_f_BT)
        correct_BT = (jnp.argmax(logits_BTV, -1) == tokens_BT).astype(jnp.float32)
        return LossSums(
            loss=self.alpha_ce * soft + self.alpha_mlm * mlm + self.alpha_cos * cos,
            weight=num_masked,
            extra={"soft_ce": soft, "soft_kl": kl, "mlm_loss": mlm, "cosine_loss": cos,
                   "accuracy": jnp.sum(correct_BT * chosen_f_BT)})

    def train_flops_per_example(self) -> float:
        """The student forward and backward plus the teacher forward (a third of 6N)."""
        return (param_tree.flops_per_token(self.model_cfg, self.seq_len)
                + param_tree.flops_per_token(self.teacher_cfg, self.seq_len) / 3) * self.seq_len

    @staticmethod
    def metrics(sums: dict[str, float], num_bytes: float) -> dict[str, float]:
        """Joint loss, each part's mean, the student's MLM perplexity and accuracy."""
        weight = max(sums["weight"], 1.0)
        out = {name: sums.get(name, 0.0) / weight
               for name in ("loss", "soft_ce", "soft_kl", "mlm_loss", "cosine_loss", "accuracy")}
        out["perplexity"] = math.exp(min(out["mlm_loss"], 50.0))
        out["masked_tokens"] = sums["weight"]
        return out


def _read_only(x) -> np.ndarray:
    array = np.array(x)  # a host copy nobody else holds
    array.setflags(write=False)
    return array


def load_teacher(workdir: str):
    """(teacher's TransformerConfig, its parameters as host arrays, its tokenizer path) from the
    newest good checkpoint of a masked-LM run; clear errors for anything missing."""
    path = pathlib.Path(workdir or "")
    if not workdir or not (path / "config.json").is_file():
        raise ConfigError(f"distill.teacher {workdir!r} is not a run directory with config.json; "
                          "train a teacher first (experiments/configs/lm/bert.py) and pass its "
                          "--workdir as teacher=WORKDIR")
    run_config = load_run_config(path)
    if run_config.task != "masked_lm":
        raise ConfigError(f"distill.teacher {workdir} is a {run_config.task!r} run; the teacher "
                          "must be a masked_lm run (experiments/configs/lm/bert.py)")
    teacher = saved_run.load_run(workdir, run_config, what="distill.teacher")
    return teacher.task.model_cfg, teacher.params, path / "tokenizer.model"


def default_teacher_layers(teacher_layers: int, student_layers: int) -> tuple[int, ...]:
    """Every k-th teacher layer from the first when the depths divide (k = 2: the paper's one in
    two), else evenly spread from the first to the last."""
    if teacher_layers % student_layers == 0:
        return tuple(range(0, teacher_layers, teacher_layers // student_layers))
    return tuple(int(i) for i in np.round(np.linspace(0, teacher_layers - 1, student_layers)))


def build_task(config, vocab_size: int) -> DistillationTask:
    """The task of a config with a `distill` section (experiments/configs/lm/distill.py);
    [MASK] is the first id past the tokenizer's vocabulary."""
    d = config.distill
    model_cfg = model_lib.config_from(config, model_lib.padded_vocab(vocab_size, 1))
    mask_id = vocab_size
    teacher_cfg, teacher_params, tokenizer_path = load_teacher(d.teacher)
    given = pathlib.Path(config.data.tokenizer.path or "")
    if not given.is_file() or given.read_bytes() != tokenizer_path.read_bytes():
        raise ConfigError(f"data.tokenizer.path {str(given)!r} is not the teacher's tokenizer; "
                          f"set it to {tokenizer_path} (the student must share its token ids)")
    layers = (tuple(int(i) for i in d.teacher_layers.split(",")) if d.teacher_layers
              else default_teacher_layers(teacher_cfg.num_layers, model_cfg.num_layers))
    if d.init not in ("teacher", "scratch"):
        raise ConfigError(f"distill.init {d.init!r} is not 'teacher' or 'scratch'")
    m = config.masking
    return DistillationTask(model_cfg, config.data.seq_len, mask_id, teacher_cfg, teacher_params,
                            layers, m.rate, m.span_p, m.max_span, d.temperature, d.alpha_ce,
                            d.alpha_mlm, d.alpha_cos, d.init == "teacher")
