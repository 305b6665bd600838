"""`python -m lm.data prepare --config CFG [--config.data.x=v ...]`: tokenizes data.corpus into its
token store (one per source of a mixture) before training, which otherwise does it on first use.
Killed, it continues from the last finished shard when run again. Prints what each store holds.
"""
from __future__ import annotations

import json
import logging
import time

from core import cli


def main(argv=None) -> int:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("command", choices=("prepare",))
    parser.add_argument("--config", required=True,
                        help="config file, e.g. experiments/configs/lm/gpt.py:corpus=files:/data")
    args, overrides = parser.parse_known_args(argv)
    unknown = [r for r in overrides if not r.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from core.config import load_config
    from lm.data import mixture, token_store, windows
    config = load_config(args.config, overrides)
    windows.check_config(config.data)
    started = time.perf_counter()
    tokenizer = windows.get_tokenizer(config.data, windows.train_texts(config.data))
    stores = {}
    for spec, _ in mixture.parse(config.data.corpus):
        root = windows.prepare_store(windows.part_config(config.data, spec), tokenizer)
        meta = token_store.TokenStore(root).meta
        stores[spec] = {"store": str(root), **{split: {k: meta["splits"][split][k] for k in
                                                       ("docs", "tokens", "bytes")}
                                               for split in token_store.SPLITS}}
    print(json.dumps({"tokenizer": str(tokenizer.path), "seconds": time.perf_counter() - started,
                      "stores": stores}, indent=2))
    return 0


if __name__ == "__main__":
    cli.main_entry(main)
