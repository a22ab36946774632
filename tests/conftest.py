"""Test-session set-up: 8 fake CPU devices and no network-facing services.

XLA_FLAGS must be set before jax is first imported, so it lives here (pytest imports conftest
before any test module). Single-device tests simply run on device 0.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)
