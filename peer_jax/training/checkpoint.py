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

import contextlib
import functools
import json
import logging
import os
import sys
import tempfile

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint._src.metadata import array_metadata_store  # what orbax's default handler gets

from peer_jax import cli


class CheckpointError(RuntimeError):
    pass


# Replica-parallel saving (each replica of a replicated array copies one slice of it to host)
# compiles a slice program per array shape at the first save; for small arrays that costs more
# than copying one replica whole. Arrays with larger per-replica slices (expert tables at
# scale) keep it. orbax's own default handler, but for this threshold.
REPLICA_PARALLEL_MIN_SLICE_BYTES = 1 << 20


@functools.cache
def _register_array_handler() -> None:
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # orbax warns that the registry entry for jax.Array is replaced
    try:
        ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
            array_metadata_store=array_metadata_store.Store(),
            min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_SLICE_BYTES), override=True)
    finally:
        absl.setLevel(level)


def manager(directory: str, keep: int = 3, save_interval_steps: int = 1,
            asynchronous: bool = True) -> ocp.CheckpointManager:
    _register_array_handler()
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


def _read_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def stored_shapes(path: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """{'params/…': (shape, dtype)} of the train state saved at `path` (metadata only)."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # orbax warns that the item has no _CHECKPOINT_METADATA of its own
    try:
        tree = ocp.PyTreeCheckpointer().metadata(os.path.join(path, "state")).item_metadata.tree
    finally:
        absl.setLevel(level)
    return {_key(p): (tuple(m.shape), str(m.dtype)) for p, m in jax.tree_util.tree_leaves_with_path(tree)}


def _key(path) -> str:
    def name(k):  # DictKey.key, SequenceKey.idx, GetAttrKey.name (optax states are namedtuples)
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                return str(getattr(k, attr))
        return str(k)

    return "/".join(name(k) for k in path)


def _readable(mngr: ocp.CheckpointManager, step: int) -> bool:
    try:
        _read_meta(mngr, step)
        stored_shapes(os.path.join(str(mngr.directory), str(step)))
        return True
    except Exception:  # noqa: BLE001 - anything unreadable counts as corrupt
        return False


def _unreadable(mngr: ocp.CheckpointManager, step: int, path: str, e: Exception) -> CheckpointError:
    older = [s for s in sorted(mngr.all_steps(), reverse=True) if s < step]
    intact = next((s for s in older if _readable(mngr, s)), None)
    fix = (f"The newest intact checkpoint is step {intact}: resume from it with --restore_step={intact} (nothing is "
           "deleted; newer checkpoints are set aside), or use a new --workdir." if intact is not None else
           "No older checkpoint is intact: move it away to start over, or use a new --workdir.")
    # orbax appends a multi-line TensorStore spec to read errors; its first line is noise
    why = cli.first_line(e).split(" See full TensorStore details")[0].rstrip(".")[:300]
    return CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}: {why}). {fix}")


def _shape_diff(stored: dict, abstract) -> list[str]:
    want = {_key(p): (tuple(x.shape), str(x.dtype)) for p, x in jax.tree_util.tree_leaves_with_path(abstract)}
    out = [f"{k}: checkpoint {stored[k][0]} {stored[k][1]} vs this run {w[0]} {w[1]}"
           for k, w in want.items() if k in stored and stored[k] != w]
    out += [f"{k}: only in this run" for k in want if k not in stored]
    out += [f"{k}: only in the checkpoint" for k in stored if k not in want]
    return out


_HELD: list[int] = []  # fds that stderr was saved to while `_stderr_held` blocks run


def release_stderr() -> None:
    """Points fd 2 back at the real stderr if a `_stderr_held` block is running, so that a
    message printed right before `os._exit` (a pod's lost-host watchdog) is not held and lost."""
    while _HELD:
        os.dup2(_HELD.pop(), 2)


def _write_all(fd: int, data: bytes) -> None:
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError:  # a closed or full stderr pipe: nothing better to do with library chatter
        pass


@contextlib.contextmanager
def _stderr_held():
    """Holds what is written to file descriptor 2 during the block (metadata reads of a
    checkpoint) in a temporary file: passed on to stderr if the block succeeds, dropped if it
    raises (a corrupt checkpoint's TensorStore errors; the CheckpointError says what happened,
    in one line). `release_stderr` ends the hold early."""
    sys.stderr.flush()
    saved = os.dup(2)
    held = tempfile.TemporaryFile()
    os.dup2(held.fileno(), 2)
    _HELD.append(saved)
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        try:
            sys.stderr.flush()
            if saved in _HELD:
                _HELD.remove(saved)
                os.dup2(saved, 2)
            if not failed:
                held.seek(0)
                _write_all(2, held.read())
        finally:
            os.close(saved)
            held.close()


def _is_abandoned_read(exc: BaseException | None) -> bool:
    return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


class _AbandonedReadLog(logging.Filter):
    """asyncio's 'Task exception was never retrieved' for orbax's reads that failed after the
    restore had already failed (their errors are the one the CheckpointError reports)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not ("Task exception was never retrieved" in msg and "orbax" in msg)


@contextlib.contextmanager
def _abandoned_reads_quiet():
    """Drops the noise of array reads that outlive a failed restore, and nothing else.

    When one read of a corrupt checkpoint fails, orbax stops its event loop; reads still in
    flight then finish in TensorStore's threads, each raising 'Event loop is closed' (printed
    through sys.excepthook / sys.unraisablehook) or leaving an unretrieved task error (the
    asyncio logger), during the restore and after it has raised. These two hooks and a filter
    on the asyncio logger drop exactly those, passing everything else on. On success they are
    removed; on failure they stay (the reads print after the exception has left), and the
    process is about to stop with the CheckpointError. Nothing is redirected, so no message
    of another thread (a pod's lost-host watchdog) or of a crash is held back."""
    prev_except, prev_unraisable = sys.excepthook, sys.unraisablehook

    def excepthook(t, v, tb):
        if not _is_abandoned_read(v):
            prev_except(t, v, tb)

    def unraisablehook(u):
        if not _is_abandoned_read(u.exc_value):
            prev_unraisable(u)

    log, quiet = logging.getLogger("asyncio"), _AbandonedReadLog()
    sys.excepthook, sys.unraisablehook = excepthook, unraisablehook
    log.addFilter(quiet)
    yield  # an exception from the block leaves here: the hooks and the filter stay
    if sys.excepthook is excepthook:
        sys.excepthook = prev_except
    if sys.unraisablehook is unraisablehook:
        sys.unraisablehook = prev_unraisable
    log.removeFilter(quiet)


class close_on_error:  # noqa: N801 - used as a context manager
    """Closes the manager when a CheckpointError leaves the block (shuts orbax down cleanly)."""

    def __init__(self, mngr: ocp.CheckpointManager):
        self.mngr = mngr

    def __enter__(self):
        return self.mngr

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and issubclass(exc_type, CheckpointError):
            self.mngr.close()
        return False


def set_aside_newer(mngr: ocp.CheckpointManager, step: int) -> list[str]:
    """Renames checkpoints newer than `step` to `<n>.set_aside` (process 0; nothing is deleted),
    so that a run resumed from `step` can save those steps again. Returns the new names."""
    moved = []
    if jax.process_index() == 0:
        for s in sorted(x for x in mngr.all_steps() if x > step):
            src = epath.Path(str(mngr.directory)) / str(s)
            dst = src.parent / f"{s}.set_aside"
            k = 1
            while dst.exists():
                dst, k = src.parent / f"{s}.set_aside{k}", k + 1
            src.rename(dst)
            moved.append(dst.name)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("peer_jax_set_aside_newer")
    mngr.reload()
    return moved


def restore(mngr: ocp.CheckpointManager, state_like, shardings, step: int | None = None,
            expect_meta: dict | None = None, data_iterator=None):
    """(state, meta) of `step` (default latest), or None when there is none; also moves
    `data_iterator` (if given) to this host's saved position.

    Every failure is one CheckpointError line naming the checkpoint, what differs and the fix;
    shapes are compared from the metadata before any array is read (what libraries print then
    is held back: `_stderr_held`), and the noise of array reads abandoned by a failed restore
    is dropped (`_abandoned_reads_quiet`), so no library noise follows it (callers that stop on
    it close the manager: `close_on_error`).
    """
    steps = mngr.all_steps()
    if step is not None and step not in steps:
        raise CheckpointError(f"--restore_step={step}: {mngr.directory} has no checkpoint at that step "
                              f"(it has {sorted(steps) or 'none'}).")
    step = mngr.latest_step() if step is None else step
    if step is None:
        return None
    path = os.path.join(str(mngr.directory), str(step))
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state_like, shardings)
    with _abandoned_reads_quiet(), _stderr_held():
        try:
            meta = _read_meta(mngr, step)
            stored = stored_shapes(path)
        except Exception as e:  # noqa: BLE001 - any read failure means a corrupt checkpoint
            raise _unreadable(mngr, step, path, e) from e
    if expect_meta:
        diff = {k: (meta.get(k), v) for k, v in expect_meta.items() if meta.get(k) != v}
        if diff:
            raise CheckpointError(
                f"checkpoint {path} was written by an incompatible run: "
                + ", ".join(f"{k}: checkpoint {a!r} vs this run {b!r}" for k, (a, b) in diff.items())
                + ". Use a new --workdir, or restore the original configuration.")
    diff = _shape_diff(stored, abstract)
    if diff:
        more = f" (and {len(diff) - 3} more)" if len(diff) > 3 else ""
        raise CheckpointError(
            f"checkpoint {path} does not fit this model/optimizer state: {'; '.join(diff[:3])}{more}. Restore the "
            "configuration that wrote it (its operative_config.gin is in the run directory), or use a new --workdir.")
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
    with _abandoned_reads_quiet():
        try:
            out = mngr.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:  # noqa: BLE001
            raise _unreadable(mngr, step, path, e) from e
    return out["state"], meta
