"""Checkpoints with orbax: periodic, the last N kept, restorable onto another mesh.

Each checkpoint holds the train state and a JSON `meta` item (the data iterator's position,
the config, and whatever the task needs to check compatibility, e.g. the tokenizer's
fingerprint). A checkpoint that fails to restore is never deleted: it is renamed aside to
`<step>.corrupt` and the previous one is used, with a warning saying so.
"""
from __future__ import annotations

import logging
import pathlib
import time
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from core.config import UserError

log = logging.getLogger(__name__)


class CheckpointError(UserError, RuntimeError):
    """No checkpoint could be restored where one was required."""


class CheckpointMismatchError(UserError, ValueError):
    """A readable checkpoint that belongs to another configuration (kept untouched)."""


def _shapes_by_name(tree) -> dict[str, tuple[int, ...]]:
    """Leaf shapes keyed by a path that reads the same for dicts, dataclasses and tuples."""
    def name(path) -> str:
        return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                        for k in path)
    return {name(path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


class Checkpointer:
    def __init__(self, directory: str | pathlib.Path, keep: int = 3, async_save: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=async_save),
            item_names=("state", "meta"),
        )

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        if step in self._manager.all_steps():
            return
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                    meta=ocp.args.JsonSave(meta)),
            force=True,
        )

    def restore_meta(self, step: int) -> dict[str, Any]:
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return restored.meta

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restores onto the shardings carried by `abstract_state` (any mesh shape)."""
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return restored.state, restored.meta

    def restore_latest_good(self, abstract_state: Any,
                            check_meta: Callable[[dict], None] | None = None
                            ) -> tuple[Any, dict[str, Any], int] | None:
        """The newest checkpoint that restores; broken ones are moved aside, never deleted.

        A checkpoint that reads fine but does not fit this run (another tokenizer, other shapes)
        is an error, not damage: it is left exactly where it is.
        """
        steps, moved = self.steps(), []
        for step in reversed(steps):
            try:
                meta = self.restore_meta(step)
                saved = self._saved_shapes(step)
            except Exception as error:  # orbax raises many types for damaged files
                moved.append(self._report_damage(step, error))
                continue
            if check_meta is not None:
                check_meta(meta)
            self._check_shapes(step, saved, abstract_state)
            try:
                state, meta = self.restore(step, abstract_state)
                return state, meta, step
            except Exception as error:
                moved.append(self._report_damage(step, error))
        if steps:
            # Never start from scratch silently over a run's history: the cause may be this
            # machine (memory, I/O) rather than the files, which are all kept.
            raise CheckpointError(
                f"none of the {len(steps)} checkpoints in {self.directory} could be restored; "
                f"they were moved aside, not deleted ({', '.join(p.name for p in moved)}). See "
                "the warnings above; rename one back to its step number to retry it, or run "
                "again to start this run from step 0.")
        return None

    def _saved_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
        metadata = ocp.StandardCheckpointer().metadata(self.directory / str(step) / "state")
        tree = metadata.item_metadata.tree
        return _shapes_by_name(tree)

    def _check_shapes(self, step: int, saved: dict, abstract_state: Any) -> None:
        wanted = _shapes_by_name(abstract_state)
        differ = [f"{name}: checkpoint {saved.get(name)} vs run {shape}"
                  for name, shape in wanted.items() if saved.get(name, shape) != shape]
        missing = sorted(set(wanted) - set(saved))
        if differ or missing:
            raise CheckpointMismatchError(
                f"checkpoint step {step} in {self.directory} was saved by another configuration "
                f"({'; '.join(differ[:3]) or 'missing ' + ', '.join(missing[:3])}); use the "
                "run's own config (its workdir has config.json) or a new --workdir")

    def _report_damage(self, step: int, error: Exception) -> pathlib.Path:
        moved = self._set_aside(step)
        log.warning("checkpoint at step %d could not be restored (%s: %s); moved it to %s and "
                    "falling back to the previous checkpoint",
                    step, type(error).__name__, str(error)[:300], moved)
        return moved

    def _set_aside(self, step: int) -> pathlib.Path:
        source = self.directory / str(step)
        target = self.directory / f"{step}.corrupt-{int(time.time())}"
        if jax.process_index() == 0 and source.exists():
            source.rename(target)
        self._manager.reload()
        return target

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
