"""Orbax checkpoints of model, optimizer *and* data-iterator state.

Saves are atomic (orbax writes into a temporary directory and renames it on commit), so a
run killed mid-save leaves the previous checkpoint intact and the partial one is never read.
They are asynchronous by default: `save` returns once orbax has copied the arrays to host
memory (so the next step may donate and overwrite the device buffers), and the write to disk
or GCS runs in a background thread while training goes on; the next save, and the end of the
run, wait for it.
Restores go into the abstract train state with its shardings, so every array comes back
already placed on the mesh. A checkpoint that cannot be read into this run's state raises
`CheckpointError` naming the path and what differs — never a silent fresh start.
"""

from __future__ import annotations

import json
import os

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath


class CheckpointError(RuntimeError):
    pass


def manager(directory: str, keep: int = 3, save_interval_steps: int = 1,
            asynchronous: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        save_interval_steps=save_interval_steps,
        create=True,
        enable_async_checkpointing=asynchronous,
    )
    path = directory if "://" in directory else os.path.abspath(directory)
    return ocp.CheckpointManager(path, options=options, item_names=("state", "data", "meta"))


class IteratorState:
    """A data iterator as Grain's Orbax handler sees it: its JSON state, one file per process.

    Each host reads its own block of the data, so each host's position is saved
    (`data/process_<i>-of-<n>.json`); a restore with another number of processes is refused.
    """

    def __init__(self, iterator):
        self.iterator = iterator

    def get_state(self) -> bytes:
        return json.dumps(self.iterator.get_state()).encode()

    def set_state(self, state: bytes) -> None:
        self.iterator.set_state(json.loads(state))

    def start_prefetch(self) -> None:  # part of the handler's protocol; our iterators don't prefetch
        pass


def save(mngr: ocp.CheckpointManager, step: int, state, data_iterator, meta: dict, force: bool = False) -> bool:
    return mngr.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(
            IteratorState(data_iterator)), meta=ocp.args.JsonSave(meta)),
        force=force,
    )


def restore(mngr: ocp.CheckpointManager, state_like, shardings, step: int | None = None,
            expect_meta: dict | None = None, data_iterator=None):
    """(state, meta) of `step` (default latest), or None when there is none; also moves
    `data_iterator` (if given) to this host's saved position."""
    step = mngr.latest_step() if step is None else step
    if step is None:
        return None
    path = os.path.join(str(mngr.directory), str(step))
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state_like, shardings)
    try:
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # noqa: BLE001 - any read failure means a corrupt checkpoint
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e}). Move it away to "
                              "restart from the previous one, or use a new --workdir.") from e
    if expect_meta:
        diff = {k: (meta.get(k), v) for k, v in expect_meta.items() if meta.get(k) != v}
        if diff:
            raise CheckpointError(
                f"checkpoint {path} was written by an incompatible run: "
                + ", ".join(f"{k}: checkpoint {a!r} vs this run {b!r}" for k, (a, b) in diff.items())
                + ". Use a new --workdir, or restore the original configuration.")
    if data_iterator is not None:
        mine = epath.Path(path) / "data" / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if not mine.exists():
            written = sorted(p.name for p in (epath.Path(path) / "data").glob("process_*.json"))
            raise CheckpointError(
                f"checkpoint {path} holds the data position of {written or 'no'} host(s), not of this process "
                f"({mine.name}): it was written by a different number of processes. Resume with the same "
                "number of hosts, or start a new --workdir.")
    args = {"state": ocp.args.StandardRestore(abstract)}
    if data_iterator is not None:
        args["data"] = grain.checkpoint.CheckpointRestore(IteratorState(data_iterator))
    try:
        out = mngr.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {path} cannot be restored into this model/optimizer state "
                              f"({type(e).__name__}: {str(e)[:2000]}).") from e
    return out["state"], meta
