"""Feedback tuning: reward model, DPO, PPO (RLHF) and GRPO on programmatic rewards
(lm/objectives/preference.py, lm/objectives/online_rl.py, docs/post-training.md).

One config, the objective chosen by `task`:
  python -m experiments.main train --config experiments/configs/lm/feedback.py:task=grpo,\\
      init=runs/sft-lora --workdir runs/grpo
  task=dpo     preference pairs sampled from the start and judged by the task's checker
               (or pairs=/path/pairs.jsonl), then DPO (dpo.kind: sigmoid | ipo | hinge)
  task=reward  a reward model on the same pairs (full fine-tune: its head is trained whole)
  task=ppo     PPO with a value head
  task=grpo    GRPO, groups of grpo.group_size replies per prompt
               (ppo and grpo: reward_model=<a reward run> scores replies with that model's
               head instead of the task's checker: the RLHF loop)
The policy starts from init=<an SFT run's workdir> (its newest checkpoint, LoRA merged) or
model=<packaged name or .gguf>; model=,tokenizer=...,size=tiny is a model of ours from scratch
(tests). The reference is the start unless reference=<a run>. lora=8 trains DPO or GRPO through
rank-8 adapters, whose base with the adapters off is the reference.
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
    args = parse_arg(arg, task="grpo", model="smollm2-135m-instruct", init="", reference="",
                     tasks="last_letters", tokenizer="", size="smollm2", prompts=256,
                     eval_prompts=50, prompt_tokens=64, new_tokens=64, eval_tokens=112,
                     temperature=1.0, beta=0.04, batch=16, steps=40, lr=1e-5, seed=0, lora=0,
                     pairs="", reward_model="")
    config = ml_collections.ConfigDict()
    config.task = args.task
    config.feedback = ml_collections.ConfigDict({
        "model": args.model,          # packaged name or .gguf; "" = the model section
        "init_from": args.init,       # an sft run's workdir: the starting policy
        "reference": args.reference,  # another run as the reference; "" = the start
        "end_of_turn": "<|im_end|>",
        "tasks": args.tasks,          # last_letters, coin_flip, arithmetic, ifbench (comma list)
        "prompts": args.prompts,      # training prompts per task
        "eval_prompts": args.eval_prompts,  # held-out prompts per task and length (scores)
        "seed": args.seed,
        "max_prompt_tokens": args.prompt_tokens,
        "max_new_tokens": args.new_tokens,
        "drop_long_prompts": False,   # true: drop (and count) prompts over max_prompt_tokens
        "eval_max_new_tokens": args.eval_tokens,  # scores' replies; 0 = max_new_tokens
        "temperature": args.temperature,  # sampling (rollouts, pairs) and the log-probs
        "beta": args.beta,            # KL strength: DPO's beta, PPO's (initial) kl_coef, GRPO's
        "pairs": args.pairs,          # dpo/reward: a pairs JSONL; "" = sample and judge them
        "pair_samples": 4,            # replies per prompt when sampling pairs
        "reward_model": args.reward_model,  # ppo/grpo: a reward run scores; "" = the checker
        "val_fraction": 0.1,          # pairs held out for evaluation
    })
    config.dpo = ml_collections.ConfigDict({"kind": "sigmoid", "label_smoothing": 0.0})
    config.reward = ml_collections.ConfigDict({"margin": 0.0, "center_coef": 0.0})
    config.ppo = ml_collections.ConfigDict({
        "epochs": 4, "minibatches": 2, "gamma": 1.0, "lam": 0.95, "clip": 0.2,
        "value_clip": 0.2, "vf_coef": 0.1, "kl_estimator": "k1",
        "kl_target": 0.0,             # > 0: the adaptive KL controller's target (nats)
        "kl_horizon": 10000.0})
    config.grpo = ml_collections.ConfigDict({
        "group_size": 4, "epochs": 1, "minibatches": 1, "clip": 0.2,
        "aggregation": "sequence_mean",  # | token_mean | token_sum
        "scale_rewards": True})
    if args.size == "tiny":
        longest = args.prompt_tokens + max(args.new_tokens, args.eval_tokens)
        model = model_lib.preset("tiny-llama", vocab_size=0, max_len=longest, scan_layers=True)
    else:  # the architecture comes from the GGUF or the run; only the runtime fields are read
        model = model_lib.preset("smollm2-135m", scan_layers=False)
    config.model = dataclasses.asdict(model)
    config.data = ml_collections.ConfigDict({
        "cache_dir": "", "tokenizer": ml_collections.ConfigDict({"path": args.tokenizer})})
    config.train = train_config(steps=args.steps, global_batch_size=args.batch, seed=args.seed,
                                log_every=1, eval_every=0, eval_batches=0,
                                checkpoint_every=max(1, args.steps // 4))
    config.optim = optim_config(learning_rate=args.lr, warmup_steps=0, weight_decay=0.0)
    config.mesh = mesh_config()
    config.lora = lora_config(rank=args.lora)
    config.sharding_rules = DEFAULT_RULES
    config.distributed = distributed_config()
    return config
