"""Supervised fine-tuning on conversations, loss on assistant tokens only (lm/objectives/sft.py,
docs/sft.md).

Full fine-tune of SmolLM2-135M-Instruct (its packaged GGUF) on the generated chain-of-thought tasks
(last-letter concatenation and coin flip, Wei et al. 2022), then greedy accuracy in domain and
out of domain:
  python -m experiments.main train --config experiments/configs/lm/sft.py \\
      --workdir runs/sft-smollm2
Time and result (docs/sft.md, Measured): 40 steps of 8 conversations took 28 min on a shared
2-core CPU (4.5 GiB step); greedy in-domain accuracy goes from 0% (prompted) to 62.5% (last
letters) and 100% (coin flip); out-of-domain lengths stay near chance. LoRA to 96% / 100%
with a longer recipe, and full vs LoRA vs QLoRA: docs/post-training.md. Other data:
dataset=sharegpt --config.sft.drop_untrainable=true (ShareGPT: 17,671 recovered conversations),
dataset=files:/path/chats.jsonl (`messages` or `prompt`/`completion` per line), dataset=hub:<name>.
A model of ours from scratch: model=,tokenizer=runs/gpt-demo/tokenizer.model (ChatML markers
are added to its vocabulary; without tokenizer=, one of vocab= pieces is trained on the chats),
size=small (4 x 128, RoPE/RMSNorm/SwiGLU) or tiny for tests.
"""
import dataclasses

import ml_collections

from core.config import distributed_config, parse_arg
from core.engine import train_config
from core.mesh import DEFAULT_RULES, mesh_config
from core.optim import optim_config
from lm.models import transformer as model_lib
from lm.models.lora import lora_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    args = parse_arg(arg, model="smollm2-135m-instruct", dataset="cot", tokenizer="",
                     size="smollm2", vocab=4096, examples=1000, eval_examples=32, seq_len=160,
                     batch=8, steps=40, lr=1e-4, seed=0)
    config = ml_collections.ConfigDict()
    config.task = "sft"
    config.sft = ml_collections.ConfigDict({
        "model": args.model,          # packaged name, .gguf path or a run of ours; "" = scratch
        "dataset": args.dataset,      # cot | last_letters | coin_flip | sharegpt | files: | hub:
        "max_examples": args.examples,  # generated: per task; else the first N (0: all)
        "eval_examples": args.eval_examples,  # per task and length (generated tasks)
        "val_fraction": 0.05,         # held-out conversations of files:/hub:/sharegpt
        "seed": args.seed,
        "end_of_turn": "<|im_end|>",  # what ends an assistant turn in the template
        # A conversation with no reply token within seq_len+1 tokens is an error naming it;
        # true drops such conversations instead (ShareGPT's long prompts), counted in the log.
        "drop_untrainable": False,
        # > 0: the prompt's tokens are trained too, at this weight (reading from scratch)
        "prompt_loss_weight": 0.0,
        "max_new_tokens": 80,         # greedy reply length when scoring generated tasks
    })
    if args.size in ("tiny", "small"):
        small = dict(num_layers=4, d_model=128, num_heads=4,
                     num_kv_heads=2) if args.size == "small" else {}
        model = model_lib.preset("tiny-llama", vocab_size=0, max_len=args.seq_len,
                                 scan_layers=True, **small)
    else:  # the architecture comes from the GGUF; only the runtime fields are read
        model = model_lib.preset("smollm2-135m", scan_layers=False)
    config.model = dataclasses.asdict(model)
    config.data = ml_collections.ConfigDict({
        "seq_len": args.seq_len, "cache_dir": "",
        # model="" (ours): this tokenizer, or one of vocab_size pieces trained on the chats
        "tokenizer": ml_collections.ConfigDict({"path": args.tokenizer, "kind": "bpe",
                                                "vocab_size": args.vocab,
                                                "max_train_chars": 20_000_000})})
    config.train = train_config(steps=args.steps, global_batch_size=args.batch, seed=args.seed,
                                log_every=max(1, min(25, args.steps // 10)),
                                eval_every=args.steps, eval_batches=0,
                                checkpoint_every=args.steps)
    config.optim = optim_config(learning_rate=args.lr, warmup_steps=max(1, args.steps // 10),
                                weight_decay=0.0)
    config.mesh = mesh_config()
    # rank > 0: LoRA adapters on the frozen model (docs/post-training.md), e.g. lora.rank=8
    config.lora = lora_config()
    config.sharding_rules = DEFAULT_RULES
    config.distributed = distributed_config()
    return config
