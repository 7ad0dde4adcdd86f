"""Checkpoints with orbax: the train state, the data iterator state and run metadata, keep-last-K, async.

Each step is a directory <directory>/<step>/ with three items: `state`, the array pytree (parameters, optimizer,
communication state, RNG keys), restored straight into the shardings the caller asks for, so that a run can
resume on a different mesh; `data`, the data iterator state (JSON); `extra`, run metadata (JSON).
Typed RNG keys are stored as their raw key data and wrapped again on restore.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp

PyTree = Any


class CheckpointError(RuntimeError):
    """No checkpoint in a directory could be restored."""


class Restored(NamedTuple):
    step: int
    state: PyTree
    data_state: dict
    extra: dict


class Checkpointer:
    """Saves every `every`-th step into `directory` (every=0: only forced saves), keeps the newest `keep`, and
    restores the newest checkpoint that is readable."""

    def __init__(self, directory: str | Path, *, keep: int = 3, every: int = 1, async_save: bool = True):
        if keep < 1:
            raise ValueError(f"Checkpointer keep={keep}: must keep at least one checkpoint")
        if every < 0:
            raise ValueError(f"Checkpointer every={every}: must be a number of steps >= 0 (0: only forced saves)")
        self.directory = Path(directory).absolute()
        self.every = every
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def maybe_save(
        self, step: int, state: PyTree, data_state: dict | None = None, extra: dict | None = None, *, force=False
    ) -> bool:
        """Saves when `step` is a multiple of `every`, or when `force`; returns whether it did.

        With async_save the arrays are copied to host memory before this returns and written in the background,
        so the caller may donate or overwrite `state` right away; `wait()` blocks until the write is complete.
        """
        if not force and (self.every == 0 or step % self.every):
            return False
        if step in self._manager.all_steps():  # e.g. the final forced save of a step the interval already saved
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(_keys_to_data(state)),
            data=ocp.args.JsonSave(data_state or {}),
            extra=ocp.args.JsonSave(extra or {}),
        )
        return self._manager.save(step, args=args, force=force)

    def wait(self) -> None:
        """Blocks until every save started so far is on disk."""
        self._manager.wait_until_finished()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore_latest(self, abstract_state: PyTree | Callable[[int], PyTree]) -> Restored | None:
        """The newest checkpoint that restores, into `abstract_state`'s shapes, dtypes and shardings; None if none.

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with shardings (e.g. from `jax.eval_shape` plus the
        target shardings), or a function of the step giving it (where the layout depends on the step). A checkpoint
        that fails to restore (partial or corrupt) is skipped with a warning and, when an older one restores,
        renamed to <step>.unreadable.
        """
        self.wait()
        steps = sorted(self._manager.all_steps(), reverse=True)
        if not steps:
            return None
        layout = abstract_state if callable(abstract_state) else lambda step: abstract_state

        def args(step):
            return ocp.args.Composite(
                state=ocp.args.StandardRestore(_keys_to_data(layout(step))),
                data=ocp.args.JsonRestore(),
                extra=ocp.args.JsonRestore(),
            )

        failures = []
        for position, step in enumerate(steps):
            try:
                restored = self._manager.restore(step, args=args(step))
            # orbax surfaces a damaged checkpoint as many exception types (tensorstore, JSON, missing files, ...).
            except Exception as e:  # noqa: BLE001
                failures.append(f"step {step}: {type(e).__name__}: {e}")
                if position + 1 < len(steps):
                    warnings.warn(
                        f"checkpoint step {step} in {self.directory} could not be restored "
                        f"({type(e).__name__}: {e}); falling back to step {steps[position + 1]}",
                        stacklevel=2,
                    )
                continue
            if position:
                self._set_aside(steps[:position])
            state = _data_to_keys(restored.state, layout(step))
            return Restored(step, state, dict(restored.data or {}), dict(restored.extra or {}))
        raise CheckpointError(
            f"no checkpoint in {self.directory} could be restored into the given state:\n  " + "\n  ".join(failures)
        )

    def _set_aside(self, damaged_steps: list[int]) -> None:
        """Renames unreadable steps to <step>.unreadable: orbax skips saving any step at or below its latest one,
        so leaving them would silently drop the resumed run's next checkpoints. Renamed, not deleted, to inspect."""
        if jax.process_index() == 0:
            for step in damaged_steps:
                (self.directory / str(step)).rename(self.directory / f"{step}.unreadable")
        self._manager.reload()

    def close(self) -> None:
        """Waits for pending saves and releases the manager's threads."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _is_key(leaf: Any) -> bool:
    return hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree: PyTree) -> PyTree:
    """Typed RNG keys (arrays or ShapeDtypeStructs) as their uint32 key data, which orbax can store."""

    def convert(leaf):
        if not _is_key(leaf):
            return leaf
        if isinstance(leaf, jax.ShapeDtypeStruct):
            data = jax.eval_shape(jax.random.key_data, leaf)
            # The key data has trailing dimensions the key's sharding leaves unsharded (replicated).
            return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=leaf.sharding)
        return jax.random.key_data(leaf)

    return jax.tree.map(convert, tree)


def _key_impl(abstract_key: jax.ShapeDtypeStruct):
    """The PRNG implementation of an abstract key; `jax.random.key_impl` only accepts (traced) key arrays."""
    found = []

    def record(key):
        found.append(jax.random.key_impl(key))
        return key

    jax.eval_shape(record, abstract_key)
    return found[0]


def _data_to_keys(tree: PyTree, abstract_state: PyTree) -> PyTree:
    """Wraps the restored key data back into typed keys where `abstract_state` has keys."""
    return jax.tree.map(
        lambda leaf, abstract: jax.random.wrap_key_data(leaf, impl=_key_impl(abstract)) if _is_key(abstract) else leaf,
        tree,
        abstract_state,
    )
