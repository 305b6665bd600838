"""The study's measures of one generalist or specialist run: `python -m multimodal.evaluate`.

  text      bits per byte on the corpus's validation documents
  captions  Fashion-MNIST test images: the greedy caption names a class with its first class word
            (class-word accuracy); zero-shot, the class whose one caption (first synonym, first
            held-out template, no attribute) is most likely after the image
  control   live episodes, all of a task's at once: the context starts with a piece of an expert
            episode of the task (validation seeds), then the agent acts; each step feeds the last
            action, the observation and the separator through the KV cache and takes the most
            likely of the task's action ids. A full context keeps its newest half and goes on.
            Mean return with its standard error, and the expert-normalised score
            (agent - random) / (expert - random), the expert and a random policy measured on the
            same reset seeds.
Only the domains the run trained on are measured. The result goes to <workdir>/gato_eval.json.
"""
from __future__ import annotations

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from core import cli
from core.config import load_run_config
from core.engine import restore_params
from core.packages import atomic_write
from multimodal import data as data_lib, environments, sequences, setup as setup_lib, tokens
from vision import captions as captions_lib

EVAL_SEED = 2_000_000  # live episodes' reset seeds (training: 0.., validation: 1_000_000..)


def init_cache(model, batch: int, length: int, pixels: int):
    def create(tokens_BS):
        return model.init(jax.random.key(0), tokens_BS,
                          jnp.zeros((*tokens_BS.shape, pixels)), jnp.zeros_like(tokens_BS),
                          decode=True)["cache"]
    shapes = jax.eval_shape(create, jax.ShapeDtypeStruct((batch, length), jnp.int32))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


@functools.partial(jax.jit, static_argnums=0)
def forward_cached(model, params, cache, tokens_BC, patches_BCP, local_BC, positions_BC):
    """(logits of each row's last token [B, V], the cache with these C tokens written)."""
    B, C = tokens_BC.shape
    logits_B1V, variables = model.apply(
        {"params": params, "cache": cache}, tokens_BC, patches_BCP, local_BC, positions_BC,
        decode=True, mutable=["cache"], logits_at_BK=jnp.full((B, 1), C - 1))
    return logits_B1V[:, 0], variables["cache"]


class CachedContext:
    """Rows of a context fed to the decoder chunk by chunk; `restart` refills an empty cache."""

    def __init__(self, model, params, batch: int, length: int, pixels: int):
        self.model, self.params, self.pixels = model, params, pixels
        self.batch, self.length = batch, length
        self.cache, self.used = None, 0

    def restart(self, tokens_BN, local_BN, patches_BNP=None) -> jax.Array:
        self.cache, self.used = init_cache(self.model, self.batch, self.length, self.pixels), 0
        return self.feed(tokens_BN, local_BN, patches_BNP)

    def feed(self, tokens_BC, local_BC, patches_BCP=None) -> jax.Array:
        B, C = tokens_BC.shape
        if self.used + C > self.length:
            raise ValueError(f"{self.used} + {C} tokens exceed the cache's {self.length}")
        if patches_BCP is None:
            patches_BCP = np.zeros((B, C, self.pixels), np.float32)
        positions_BC = np.broadcast_to(np.arange(self.used, self.used + C), (B, C))
        logits_BV, self.cache = forward_cached(
            self.model, self.params, self.cache, jnp.asarray(tokens_BC, jnp.int32),
            jnp.asarray(patches_BCP), jnp.asarray(local_BC, jnp.int32),
            jnp.asarray(positions_BC, jnp.int32))
        self.used += C
        return logits_BV


# ------------------------------------------------------------------------------ control


def play_live(setup, params, name: str, episodes: int, seq_len: int,
              demo_fraction: float = 0.5) -> np.ndarray:
    """The returns of `episodes` live episodes (reset seeds EVAL_SEED + i), played together."""
    control, vocab = environments.task(name), setup.vocab
    O = sequences.observation_length(control)
    per_step = O + 2
    demos = setup.validation[name].episodes
    want = max(1, int(seq_len * demo_fraction) // per_step)
    steps = min(want, max(len(e.actions) for e in demos))
    demos = [e for e in demos if len(e.actions) >= steps]
    demo = [sequences.control_example(control, vocab, demos[i % len(demos)], 0, steps)
            for i in range(episodes)]
    hist_ids = np.stack([d.ids for d in demo])
    hist_local = np.stack([d.local for d in demo])
    context = CachedContext(setup.task.model, params, episodes, seq_len, setup.task.pixels)
    context.restart(hist_ids[:, :-1], hist_local[:, :-1])  # its last action opens each chunk
    envs = [control.make() for _ in range(episodes)]
    obs = [env.reset(seed=EVAL_SEED + i)[0] for i, env in enumerate(envs)]
    returns, done = np.zeros(episodes), np.zeros(episodes, bool)
    first_action = vocab.discrete_ids(0)
    chunk_local = np.concatenate([[O + 1], np.arange(O + 1)])  # action, observation, separator
    while not done.all():
        if context.used + per_step > seq_len:  # keep the newest half of the steps
            keep = max(1, (seq_len // 2) // per_step) * per_step
            context.restart(hist_ids[:, -keep:-1], hist_local[:, -keep:-1])
        observed = [control.observe(o) for o in obs]
        obs_EO = sequences.step_ids(control, vocab, np.stack([c for c, _ in observed]),
                                    np.stack([d for _, d in observed]))
        chunk = np.concatenate([hist_ids[:, -1:], obs_EO, np.full((episodes, 1), vocab.separator)],
                               axis=1)
        logits_EV = np.asarray(context.feed(chunk, np.broadcast_to(chunk_local, chunk.shape)))
        actions = np.argmax(logits_EV[:, first_action:first_action + control.actions], axis=1)
        step_EW = sequences.step_tokens(vocab, obs_EO, actions)
        hist_ids = np.concatenate([hist_ids, step_EW], axis=1)
        hist_local = np.concatenate([hist_local, np.broadcast_to(np.arange(per_step),
                                                                  step_EW.shape)], axis=1)
        for i in np.flatnonzero(~done):
            obs[i], reward, terminated, truncated, _ = envs[i].step(int(actions[i]))
            returns[i] += reward
            done[i] = terminated or truncated
    return returns


def control_scores(setup, params, name: str, episodes: int, seq_len: int) -> dict:
    agent = play_live(setup, params, name, episodes, seq_len)
    control = environments.task(name)
    expert = environments.returns(control, control.expert, episodes, EVAL_SEED)
    randomly = environments.returns(control, environments.random_policy(EVAL_SEED), episodes,
                                    EVAL_SEED)
    normalised = (agent - randomly.mean()) / (expert.mean() - randomly.mean())
    stderr = environments.standard_error
    return {"episodes": episodes, "mean_return": float(agent.mean()), "stderr": stderr(agent),
            "expert": float(expert.mean()), "random": float(randomly.mean()),
            "normalised": float(normalised.mean()), "normalised_stderr": stderr(normalised)}


# ------------------------------------------------------------------------------ captions


def caption_scores(setup, params, count: int, max_tokens: int = 24) -> dict:
    """Class-word accuracy of greedy captions and zero-shot class accuracy on test images."""
    source = setup.validation["captions"]
    table, tokenizer, vocab = source.table, setup.tokenizer, setup.vocab
    images, labels = source.images[:count], np.asarray(source.labels[:count])
    P, N = source.num_patches, len(images)
    patches_NPX = np.stack([tokens.patches(image, source.patch_side) for image in images])
    context = CachedContext(setup.task.model, params, N, P + max_tokens, setup.task.pixels)
    logits = context.restart(np.full((N, P), vocab.image), np.broadcast_to(np.arange(P), (N, P)),
                             patches_NPX)
    out = np.zeros((N, max_tokens), np.int64)
    for t in range(max_tokens):
        out[:, t] = np.argmax(np.asarray(logits)[:, :vocab.text], axis=1)
        if t + 1 < max_tokens:
            logits = context.feed(out[:, t:t + 1], np.full((N, 1), sequences.NO_PLACE))
    named = []
    for row in out:
        ids = list(row[:list(row).index(tokenizer.eos_id)] if tokenizer.eos_id in row else row)
        named.append(_named_class(tokenizer.decode(ids), table))
    # zero-shot: one caption per class, scored after every image
    template = captions_lib.template_range("heldout")[0]
    class_ids = [tokenizer.encode([table.text(c, 0, template, 0)])[0]
                 for c in range(table.num_classes)]
    scores = np.stack([_caption_logprob(setup, params, patches_NPX, ids) for ids in class_ids], 1)
    return {"images": N, "class_word_accuracy": float(np.mean(np.array(named) == labels)),
            "zero_shot_accuracy": float(np.mean(np.argmax(scores, 1) == labels)),
            "example_caption": tokenizer.decode(list(out[0][out[0] != tokenizer.eos_id]))}


def _named_class(text: str, table) -> int:
    for word in text.split():
        i = table.tokenizer.ids.get(word)
        if i is not None and table.keyword_class_V[i] >= 0:
            return int(table.keyword_class_V[i])
    return -1


def _caption_logprob(setup, params, patches_NPX, caption_ids) -> np.ndarray:
    """log p(caption, end-of-text | image) for every image."""
    N, P, X = patches_NPX.shape
    vocab, eos = setup.vocab, setup.tokenizer.eos_id
    ids = np.array([vocab.image] * P + list(caption_ids) + [eos])
    L = len(ids) - 1
    tokens = np.broadcast_to(ids[:-1], (N, L))
    local = np.broadcast_to(np.where(np.arange(L) < P, np.arange(L), sequences.NO_PLACE), (N, L))
    patches = np.zeros((N, L, X), np.float32)
    patches[:, :P] = patches_NPX
    logits_NLV = _logits(setup.task.model, params, jnp.asarray(tokens), jnp.asarray(patches),
                         jnp.asarray(local))
    logp_NLV = jax.nn.log_softmax(logits_NLV, axis=-1)
    targets = ids[1:]
    picked_NL = np.asarray(logp_NLV)[:, np.arange(L), targets]
    return picked_NL[:, P - 1:].sum(1)  # the caption's tokens and end-of-text


@functools.partial(jax.jit, static_argnums=0)
def _logits(model, params, tokens_BT, patches_BTP, local_BT):
    return model.apply({"params": params}, tokens_BT, patches_BTP, local_BT)


# ------------------------------------------------------------------------------ command


def evaluate(workdir: str, episodes: int = 100, images: int = 1000) -> dict:
    config = load_run_config(workdir)
    setup = setup_lib.build(config, workdir, need_train=False)
    engine, params, step = restore_params(config, setup.task, workdir, setup.data.check_meta)
    params = jax.device_get(params)
    mix = setup_lib.weights(config)
    result: dict = {"workdir": str(workdir), "step": step,
                    "specialist": config.gato.get("specialist", "")}
    run = engine.eval_runner(setup.data.eval_batch_size)
    losses = setup.data.evaluate(lambda b: run(params, b), 0)
    result["validation"] = losses
    if "text" in mix:
        result["text"] = {"bits_per_byte": losses["text_bits_per_byte"]}
    if "captions" in mix:
        result["captions"] = caption_scores(setup, params, images)
    for name in data_lib.CONTROL:
        if name in mix:
            result[name] = control_scores(setup, params, name, episodes, config.data.seq_len)
    path = pathlib.Path(workdir) / "gato_eval.json"
    atomic_write(path, lambda f: json.dump(result, f, indent=1))
    return result


def main(argv=None) -> None:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--episodes", type=int, default=100, help="live episodes per task")
    parser.add_argument("--images", type=int, default=1000, help="test images to caption")
    args = parser.parse_args(argv)
    print(json.dumps(evaluate(args.workdir, args.episodes, args.images), indent=1))


if __name__ == "__main__":
    cli.main_entry(main)
