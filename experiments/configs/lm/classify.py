"""Fine-tuning an encoder on the Brown corpus's genres (15 classes, 500 documents) or on SST-2,
RTE or BoolQ (dataset=...; their validation sets split into train/test; lm/objectives/classification.py).

  # the imported sentence encoder, all layers trained
  python -m experiments.main train --config experiments/configs/lm/classify.py \\
      --workdir runs/brown-minilm
  # a masked-LM run of ours (experiments/configs/lm/bert.py), pretrained or from scratch
  python -m experiments.main train \\
      --config experiments/configs/lm/classify.py:encoder=runs/bert-demo,init=scratch ...
freeze_layers=k holds the embeddings and the first k blocks fixed; head_only=true trains only the
head (a linear probe). Test documents are those the pipeline's document hash puts in validation
at test_fraction (0.2) and split_seed (0): pretrain with --config.data.val_fraction=0.2 and the
encoder never saw them. Then `python -m experiments.main evaluate --workdir RUN` repeats the test.
"""
import ml_collections

from core.config import ConfigError, distributed_config, parse_arg
from core.engine import train_config
from core.mesh import DEFAULT_RULES, mesh_config
from core.optim import optim_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    args = parse_arg(arg, dataset="brown_genres", encoder="all-minilm-l6-v2", init="pretrained",
                     freeze_layers=0,
                     head_only=False, seed=0, steps=400, lr=1e-4, seq_len=128, batch=32)
    if args.init not in ("pretrained", "scratch"):
        raise ConfigError(f"init {args.init!r} is not 'pretrained' or 'scratch'")
    if args.freeze_layers < 0:
        raise ConfigError(f"freeze_layers must be >= 0, got {args.freeze_layers}")
    config = ml_collections.ConfigDict()
    config.task = "classification"
    config.classify = ml_collections.ConfigDict({
        "dataset": args.dataset,        # brown_genres | sst2 | rte | boolq
        "encoder": args.encoder,        # packaged name, sentence-transformers dir, or our run
        "init": args.init,
        "windows_per_doc": 8,
        "test_fraction": 0.2,
        "split_seed": 0,
        "pooling": "mean",              # "mean" over real tokens | "first" ([CLS] / BOS)
        "dropout": 0.1,
    })
    config.data = ml_collections.ConfigDict({"seq_len": args.seq_len, "cache_dir": ""})
    config.train = train_config(steps=args.steps, global_batch_size=args.batch, seed=args.seed,
                                log_every=max(1, min(50, args.steps // 10)),
                                eval_every=max(1, args.steps // 4), eval_batches=0,
                                checkpoint_every=args.steps)
    freeze = ""
    if args.head_only:
        freeze = "^encoder/"
    elif args.freeze_layers:
        blocks = "|".join(f"layers_{i}" for i in range(args.freeze_layers))
        freeze = f"^encoder/(token_embed|pos_embed|type_embed|embed_norm|{blocks})(/|$)"
    config.optim = optim_config(learning_rate=args.lr, warmup_steps=max(1, args.steps // 10),
                                weight_decay=0.01, b2=0.999, freeze=freeze)
    config.mesh = mesh_config()
    config.sharding_rules = DEFAULT_RULES
    config.distributed = distributed_config()
    return config
