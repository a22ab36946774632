"""Test-session set-up: 8 fake CPU devices and no network-facing services.

XLA_FLAGS must be set before jax is first imported, so it lives here (pytest imports conftest
before any test module). Single-device tests simply run on device 0.

Unless XLA_FLAGS is set, XLA:CPU generates code at LLVM -O0: the suite compiles hundreds of
small programs and runs each for a few steps, so compiling is a large part of its time, and
every comparison in it (reference vs optimised path, resumed vs uninterrupted run) compiles
both sides under the same flags. The tests that pin what a user's run computes
(test_reproducible) start their processes with XLA's default flags; to run everything at the
default level: `XLA_FLAGS=--xla_force_host_platform_device_count=8 make test`. Subprocesses
(simulated pods, launches) inherit these flags with their own device count
(`simulated_pod.xla_flags`).

The CLIs that tests start as subprocesses (simulated pods, launches, kill-and-resume) compile
the same tiny programs again and again, so they share one persistent compilation cache for the
session (made by the pytest controller, handed to the xdist workers in PEER_JAX_TEST_XLA_CACHE,
removed at the end). The test processes themselves never use one: some tests count compiles.
Every process shares the user's packed-data cache, also the simulated TPU workers, whose HOME
is their own folder (launch/sim/gcloud): otherwise each would pack the corpus again.
"""
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("PEER_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "peer_jax"))

os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)  # not even the user's own, in-process
import jax  # noqa: E402

_MADE_CACHE = None
if "PEER_JAX_TEST_XLA_CACHE" not in os.environ:
    _MADE_CACHE = os.environ["PEER_JAX_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="peer_jax_test_xla_cache_")
# Read by the subprocesses' jax at import; this process's jax has read its config already.
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["PEER_JAX_TEST_XLA_CACHE"]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # whatever the load, the same programs cached

jax.config.update("jax_threefry_partitionable", True)


def pytest_sessionfinish(session):
    if _MADE_CACHE and not hasattr(session.config, "workerinput"):  # the controller, after its workers
        shutil.rmtree(_MADE_CACHE, ignore_errors=True)
