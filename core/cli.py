"""One error convention for every command: a mistake the user can fix ends as one line
`error: what is wrong; how to fix it` on stderr and exit status 2; a bug keeps its traceback.

Every entry point ends in `cli.main_entry(main)`, and builds its parser with `cli.ArgumentParser`
(argparse's own errors print the usage block and the message on two lines).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, NoReturn, Sequence

from core import compile_cache, xla_flags
from core.config import ConfigError, UserError

# A missing or unreadable path named on the command line is the user's to fix, wherever it is
# noticed; every other OSError (disk full, a broken mount) is not the user's input.
USER_ERRORS = (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError)
USAGE_STATUS = 2


class UsageError(ConfigError):
    """A command line argparse refused."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its errors raised as one-line `UsageError`s."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        if not args and "prog" not in kwargs:  # the command's own name, not "__main__.py"
            spec = sys._getframe(1).f_globals.get("__spec__")
            if spec is not None:
                kwargs["prog"] = "python -m " + spec.name.removesuffix(".__main__")
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}; see {self.prog} --help")


def one_line(error: BaseException) -> str:
    """The error's message on one line (a message may quote a multi-line value)."""
    text = " ".join(str(error).split())
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        text = f"{error.strerror}: {error.filename}"
    return text or type(error).__name__


def run(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> int:
    """Runs `main(argv)`; a user error becomes one stderr line and status 2. A `main` that
    returns an int returns its exit status; any other result means success."""
    try:
        result = main(argv)
    except USER_ERRORS as error:
        print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
        return USAGE_STATUS
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def main_entry(main: Callable[[Sequence[str] | None], Any]) -> NoReturn:
    """The last line of every entry point (its `__main__` block): the default XLA flags set
    before any backend starts, the compilation cache on, then the command."""
    xla_flags.apply()
    compile_cache.enable()
    sys.exit(run(main, sys.argv[1:]))
