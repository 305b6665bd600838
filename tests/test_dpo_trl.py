"""DPO (lm/objectives/preference.py) against TRL 1.16's DPOTrainer on the same weights, in fp32.

A tiny LLaMA of ours reads preference pairs of generated last-letter questions (the worked
answer chosen, a wrong final answer rejected) as pair_rows; TRL gets the same weights through our
Hugging Face export (LlamaForCausalLM) and a real DPOTrainer (DPOConfig on CPU, built offline in
a fraction of a second): it tokenizes the pairs itself, through the ChatML template and our
tokenizer, collates them with its DataCollatorForPreference, and scores them with its own
compute_ref_log_probs (summed completion log-probs) and compute_loss (policy and reference
forwards, then the loss). Expected values all come from TRL at test time.

What differs, pinned below: TRL's completion of a conversational pair is the whole rendering
minus the prompt's, so it ends with the newline ChatML writes after <|im_end|>; ours ends at
<|im_end|> (lm/data/chat.py: that newline is never generated, so it is not trained). On the same
token ids the log-probs, losses and gradients agree.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import tiny_chat_files
from lm.data import chat, instructions, preferences
from lm.data.tokenizer import Tokenizer
from lm.models import transformer as model_lib
from lm.objectives import policy_model, preference
from lm.weights import hf_checkpoint, hf_llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

ROW = 128  # tokens of a pair's row; the longest pair here is ~110
PAIRS = 4
BETA = 0.1


def _pairs() -> list[preferences.Pair]:
    """Last-letter questions: the worked answer chosen; rejected, the same steps ending in a
    wrong answer (the letters reversed, one added: a different length, too)."""
    out = []
    for c in instructions.generate("last_letters", PAIRS, (2, 3), 7):
        reply = c.messages[-1]["content"]
        wrong = reply.replace(f"answer is {c.answer}.", f"answer is {c.answer[::-1]}x.")
        assert wrong != reply
        out.append(preferences.Pair(c.messages[:-1], reply, wrong, "last_letters", c.where))
    return out


def _hf_tokenizer(tokenizer: chat.ChatTokenizer):
    """Our ChatTokenizer as the transformers tokenizer TRL asks for: apply_chat_template renders
    the Jinja template, then each stretch of text between ChatML's markers is encoded by ours."""
    from tokenizers import AddedToken
    from transformers.tokenization_python import PythonBackend
    base = tokenizer.base
    pieces = {base.id_to_piece(i): i for i in range(base.vocab_size)}

    class ChatTokenizerForHF(PythonBackend):
        vocab_size = base.vocab_size

        def get_vocab(self):
            return dict(pieces)

        def _tokenize(self, text, **kwargs):
            return [base.id_to_piece(i) for i in tokenizer.encode([text])[0]]

        def _convert_token_to_id(self, token):
            return pieces[token]

        def _convert_id_to_token(self, index):
            return base.id_to_piece(index)

        def convert_tokens_to_string(self, tokens):
            return tokenizer.decode([self.convert_tokens_to_ids(t) for t in tokens])

    markers = {tokenizer.token_id(m): AddedToken(m, special=True)
               for m in (chat.IM_START, chat.IM_END)}
    hf = ChatTokenizerForHF(chat_template=chat.CHATML, added_tokens_decoder=markers,
                            eos_token=chat.IM_END, pad_token=base.id_to_piece(tokenizer.pad_id))
    assert (hf.pad_token_id, hf.eos_token_id) == (tokenizer.pad_id, tokenizer.eos_id)
    return hf


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tokenizer, pairs and rows; the reference (our initialisation) and the policy after one of
    our DPO steps (Adam, lr 1e-2), each exported as a Hugging Face LLaMA directory."""
    root = tmp_path_factory.mktemp("dpo_trl")
    tokenizer = chat.ChatTokenizer(Tokenizer.load(tiny_chat_files(root)[0]))
    pairs = _pairs()
    rows = {k: jnp.asarray(v) for k, v in
            preference.pair_rows(pairs, chat.ChatTemplate(), tokenizer, ROW).fields.items()}
    cfg = model_lib.preset("tiny-llama", vocab_size=tokenizer.vocab_size, max_len=ROW)
    task = preference.DPOTask(cfg, ROW, beta=BETA)
    reference = jax.device_get(nn.unbox(task.init_params(jax.random.key(0))))
    assert 1e5 < sum(x.size for x in jax.tree_util.tree_leaves(reference)) < 1e6

    def mean_loss(policy, ref, batch):
        sums = task.loss(policy_model.WithReference(policy, ref), batch, None, train=False)
        return sums.loss / sums.weight

    grad = jax.jit(jax.value_and_grad(mean_loss))
    loss0, g = grad(reference, reference, rows)
    assert float(loss0) == pytest.approx(math.log(2), abs=1e-6)  # policy == reference
    adam = optax.adam(1e-2)
    updates, _ = adam.update(g, adam.init(reference), reference)
    policy = jax.device_get(optax.apply_updates(reference, updates))
    dirs = {name: hf_checkpoint.save_pretrained(root / name, params, cfg)
            for name, params in (("policy", policy), ("reference", reference))}
    return dict(root=root, tokenizer=tokenizer, hf_tokenizer=_hf_tokenizer(tokenizer),
                pairs=pairs, rows=rows, cfg=cfg, task=task, policy=policy, reference=reference,
                dirs=dirs, grad=grad)


def _trainer(setup, **config):
    """A DPOTrainer on fresh fp32 copies of the exported policy and reference."""
    load = lambda name: transformers.LlamaForCausalLM.from_pretrained(  # noqa: E731
        setup["dirs"][name], dtype=torch.float32)
    args = trl.DPOConfig(output_dir=str(setup["root"] / "trl"), report_to="none", use_cpu=True,
                         bf16=False, beta=BETA, per_device_train_batch_size=PAIRS, **config)
    train = datasets.Dataset.from_list([
        {"prompt": list(p.prompt), "chosen": [{"role": "assistant", "content": p.chosen}],
         "rejected": [{"role": "assistant", "content": p.rejected}]} for p in setup["pairs"]])
    return trl.DPOTrainer(model=load("policy"), ref_model=load("reference"), args=args,
                          train_dataset=train, processing_class=setup["hf_tokenizer"])


def _our_ids(rows):
    """Per pair: the prompt, and the chosen and rejected completions, read off our rows."""
    out = []
    for n in range(PAIRS):
        sides = []
        for side in range(2):
            tokens = np.asarray(rows["tokens"][n, side])
            where = np.nonzero(np.asarray(rows["completion_mask"][n, side]))[0]
            sides.append((tokens[:where[0]].tolist(), tokens[where[0]:where[-1] + 1].tolist()))
        assert sides[0][0] == sides[1][0]  # one prompt, two replies
        out.append({"prompt_ids": sides[0][0], "chosen_ids": sides[0][1],
                    "rejected_ids": sides[1][1]})
    return out


def _trl_batch(trainer, examples):
    keys = ("prompt_ids", "chosen_ids", "rejected_ids")
    return trainer.data_collator([{k: e[k] for k in keys} for e in examples])


def _rows_of(examples, pad_id):
    """[B, 2, ROW] rows of given prompt and completion ids (policy_model.rows, per side)."""
    sides = [policy_model.rows([e["prompt_ids"] for e in examples],
                               [e[key] for e in examples], ROW, pad_id)
             for key in ("chosen_ids", "rejected_ids")]
    return {k: jnp.stack([sides[0][k], sides[1][k]], axis=1) for k in sides[0]}


@pytest.fixture(scope="module")
def trl_sigmoid(setup):
    return _trainer(setup)


def test_trl_tokenizes_our_pairs_as_we_do_plus_the_newline_after_end_of_turn(setup,
                                                                               trl_sigmoid):
    tokenizer, rows = setup["tokenizer"], setup["rows"]
    ours = _our_ids(rows)
    newline = tokenizer.encode(["\n"])[0]
    for example, mine in zip(trl_sigmoid.train_dataset, ours):
        assert example["prompt_ids"] == mine["prompt_ids"]  # no BOS on either side
        for key in ("chosen_ids", "rejected_ids"):
            assert mine[key][-1] == tokenizer.eos_id  # both score the end-of-turn ...
            assert example[key] == mine[key] + newline  # ... TRL the template's newline after it
    # TRL's collator on our ids gives our rows: ids, attention and completion masks (chosen
    # rows first, then rejected, right-padded with our pad id), up to its batch's width.
    batch = _trl_batch(trl_sigmoid, ours)
    L = batch["input_ids"].shape[1]
    flat = {k: np.concatenate([np.asarray(rows[k][:, 0]), np.asarray(rows[k][:, 1])])
            for k in policy_model.ROW_FIELDS}
    assert L == int(flat["segment_ids"].sum(1).max()) and not np.any(flat["tokens"][:, L:])
    np.testing.assert_array_equal(batch["input_ids"].numpy(), flat["tokens"][:, :L])
    np.testing.assert_array_equal(batch["attention_mask"].numpy(), flat["segment_ids"][:, :L])
    np.testing.assert_array_equal(batch["completion_mask"].numpy(),
                                  flat["completion_mask"][:, :L])


def test_sequence_logprobs_match_trl(setup, trl_sigmoid):
    """Summed completion log-probs of chosen and rejected, policy and reference, on the same
    batch; then on TRL's own tokenization (the newline in), read by our task as rows."""
    task, rows = setup["task"], setup["rows"]
    logprobs = jax.jit(task.sequence_logprobs)
    ours_batch = _trl_batch(trl_sigmoid, _our_ids(rows))
    theirs_examples = list(trl_sigmoid.train_dataset)
    theirs_batch = _trl_batch(trl_sigmoid, theirs_examples)
    theirs_rows = _rows_of(theirs_examples, setup["tokenizer"].pad_id)
    for name, model in (("policy", trl_sigmoid.model), ("reference", trl_sigmoid.ref_model)):
        params = setup[name]
        for our_rows, batch in ((rows, ours_batch), (theirs_rows, theirs_batch)):
            logp_2B, tokens_2B = logprobs(params, our_rows)
            chosen, rejected = trl_sigmoid.compute_ref_log_probs(model, batch)
            expected = torch.cat([chosen, rejected]).numpy()
            np.testing.assert_allclose(np.asarray(logp_2B), expected, rtol=0, atol=1e-4,
                                       err_msg=name)
            np.testing.assert_array_equal(np.asarray(tokens_2B),
                                          batch["completion_mask"].sum(1).numpy())
            assert np.all(expected < -100)  # sums over dozens of tokens, not zeros


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "hinge"])
def test_dpo_loss_matches_trl(setup, trl_sigmoid, kind):
    """DPOTask.loss with WithReference(policy, reference) equals TRL's compute_loss with
    model=policy and ref_model=reference (its own forwards and loss code), metrics too; for the
    sigmoid loss, its gradient equals TRL's backward through LlamaForCausalLM."""
    rows, cfg = setup["rows"], setup["cfg"]
    task = preference.DPOTask(cfg, ROW, beta=BETA, kind=kind)
    trainer = trl_sigmoid if kind == "sigmoid" else _trainer(setup, loss_type=[kind])
    assert trainer.loss_types == [kind] and trainer.ref_model is not None
    batch = _trl_batch(trainer, _our_ids(rows))
    trainer.model.zero_grad()
    expected = trainer.compute_loss(trainer.model, batch)
    both = policy_model.WithReference(setup["policy"], setup["reference"])
    sums = jax.jit(lambda p, b: task.loss(p, b, None, train=False))(both, rows)
    ours = float(sums.loss / sums.weight)
    # 1e-5 absolute; IPO's loss is ~24 here, 1e-6 relative to it (a few fp32 ulps)
    assert ours == pytest.approx(expected.item(), rel=1e-6, abs=1e-5), kind
    if kind == "ipo":
        assert ours > 1.0  # (d' - 1 / (2 beta))^2: far from the sigmoid's log 2
    if kind != "sigmoid":
        return
    assert abs(ours - math.log(2)) > 1e-3  # the policy moved away from the reference
    metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}  # eval mode: not training
    for name, trl_name in (("rewards_chosen", "rewards/chosen"),
                           ("rewards_rejected", "rewards/rejected"),
                           ("margin", "rewards/margins"), ("accuracy", "rewards/accuracies")):
        assert float(sums.extra[name] / sums.weight) == pytest.approx(
            metrics[trl_name], rel=1e-4, abs=1e-6), name
    # The gradient: ours through our export's names, TRL's from loss.backward().
    expected.backward()
    _, grads = setup["grad"](setup["policy"], setup["reference"], rows)
    theirs = {name: p.grad.numpy() for name, p in trainer.model.named_parameters()}
    mapped = hf_llama.to_hf_tensors(grads, cfg)
    assert set(mapped) == set(theirs)
    for name, g in mapped.items():
        scale = float(np.abs(theirs[name]).max())
        assert scale > 0, name
        np.testing.assert_allclose(g, theirs[name], rtol=0, atol=1e-4 * scale, err_msg=name)
