"""Checkpoint saving on a mesh with replicated arrays (8 fake CPU devices)."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from peer_jax import sharding
from peer_jax.training import checkpoint as ckpt


class _Iterator:
    def get_state(self):
        return {"step": 0}

    def set_state(self, state):
        pass


class _CompileNames(logging.Handler):
    def __init__(self):
        super().__init__()
        self.names = []

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith("Finished XLA compilation of "):
            self.names.append(msg.split(" of ", 1)[1].split(" in ", 1)[0])


def test_small_replicated_arrays_save_whole_large_ones_replica_parallel(tmp_path):
    """Below REPLICA_PARALLEL_MIN_SLICE_BYTES per replica slice an array replicated over 8
    devices is copied from one replica (no slice program is compiled); above it, each of the 8
    replicas copies its slice (a slice program each). All restore to the saved values."""
    mesh = sharding.make_mesh((8, 1, 1))
    replicated = NamedSharding(mesh, P())
    big_rows = 8 * ckpt.REPLICA_PARALLEL_MIN_SLICE_BYTES // (4 * 16)  # 8 slices of exactly the threshold
    state = {"small": jax.device_put(jnp.arange(4096, dtype=jnp.float32).reshape(256, 16), replicated),
             "other_small": jax.device_put(jnp.ones((64, 8), jnp.float32), replicated),
             "large": jax.device_put(jnp.arange(big_rows * 16, dtype=jnp.float32).reshape(big_rows, 16), replicated)}
    seen = _CompileNames()
    logger = logging.getLogger("jax")
    old_level = logger.level
    logger.addHandler(seen)
    logger.setLevel(logging.DEBUG)
    try:
        with jax.log_compiles(True):
            mngr = ckpt.manager(str(tmp_path / "ckpt"))
            ckpt.save(mngr, 1, state, _Iterator(), {"run": "test"}, force=True)
            mngr.wait_until_finished()
    finally:
        logger.removeHandler(seen)
        logger.setLevel(old_level)
    assert seen.names.count("jit(slice)") == 8, seen.names  # the large array's only: 8 more per sliced small one
    restored, meta = ckpt.restore(mngr, state, jax.tree.map(lambda x: x.sharding, state))
    mngr.close()
    assert meta == {"run": "test"}
    for k in state:
        np.testing.assert_array_equal(np.asarray(restored[k]), np.asarray(state[k]), err_msg=k)


def test_stderr_held_passes_on_success_drops_on_failure_and_can_be_released(capfd):
    """What reaches fd 2 during a checkpoint's metadata reads is passed on when they succeed and
    dropped when they fail; `release_stderr` (a dying pod host's watchdog) ends the hold."""
    import os

    import pytest

    with ckpt._stderr_held():
        os.write(2, b"warning kept\n")
    assert capfd.readouterr().err == "warning kept\n"
    with pytest.raises(ckpt.CheckpointError):
        with ckpt._stderr_held():
            os.write(2, b"tensorstore noise\n")
            raise ckpt.CheckpointError("unreadable")
    assert capfd.readouterr().err == ""
    with pytest.raises(ckpt.CheckpointError):
        with ckpt._stderr_held():
            ckpt.release_stderr()
            os.write(2, b"error: lost a host\n")
            raise ckpt.CheckpointError("unreadable")
    assert capfd.readouterr().err == "error: lost a host\n"


def test_abandoned_read_noise_is_dropped_during_and_after_a_failed_restore_and_nothing_else(capsys):
    """Reads that outlive a failed restore raise 'Event loop is closed' in TensorStore's threads
    (printed through sys.excepthook) and leave unretrieved asyncio task errors, also after the
    restore has raised: those are dropped, other errors still print, and a successful restore
    leaves the hooks as they were."""
    import logging
    import sys

    import pytest

    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    asyncio_log = logging.getLogger("asyncio")
    handler = Keep()
    asyncio_log.addHandler(handler)
    before = sys.excepthook, sys.unraisablehook
    try:
        with ckpt._abandoned_reads_quiet():
            pass
        assert (sys.excepthook, sys.unraisablehook) == before and not asyncio_log.filters
        with pytest.raises(ckpt.CheckpointError):
            with ckpt._abandoned_reads_quiet():
                raise ckpt.CheckpointError("unreadable")
        # after the restore raised: a late read's callback, an unretrieved task, and real errors
        sys.excepthook(RuntimeError, RuntimeError("Event loop is closed"), None)
        sys.excepthook(ValueError, ValueError("a real error"), None)
        asyncio_log.error("Task exception was never retrieved\nfuture: <Task coro=<async_deserialize() at "
                          "orbax/checkpoint/_src/serialization/serialization.py:394>>")
        asyncio_log.error("Task exception was never retrieved\nfuture: <Task coro=<user_code()>>")
        err = capsys.readouterr().err
        assert "Event loop is closed" not in err and "ValueError: a real error" in err
        assert seen == ["Task exception was never retrieved\nfuture: <Task coro=<user_code()>>"]
    finally:
        sys.excepthook, sys.unraisablehook = before
        asyncio_log.removeHandler(handler)
        for f in list(asyncio_log.filters):
            asyncio_log.removeFilter(f)
