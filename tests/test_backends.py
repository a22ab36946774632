"""The backend seam (peer_jax/backends): the CPU backend's forms equal the portable reference,
and the choice follows the platform being compiled for."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from peer_jax import backends
from peer_jax.backends import cpu, portable
from peer_jax.layers.peer import PEER
from peer_jax.layers.pkm import PKM

D, N, H, K, DK = 16, 64, 2, 4, 8
B, T = 2, 5
_rng = np.random.default_rng(0)
X = jnp.asarray(_rng.standard_normal((B, T, D)), jnp.float32)
COT = jnp.asarray(_rng.standard_normal((B, T, D)), jnp.float32)


def test_current_follows_platform(monkeypatch):
    assert backends.current() is cpu  # the tests run on CPU
    monkeypatch.setattr(backends, "platform", lambda: "tpu")
    assert backends.current() is portable
    with backends.use("cpu"):
        assert backends.current() is cpu
    with pytest.raises(ValueError, match="backend 'gpu' is unknown"):
        with backends.use("gpu"):
            pass


def test_scatter_zeros_are_zeros():
    tag = jnp.asarray([jnp.nan, 1.0], jnp.float32)  # any tag value, NaN included
    got = jax.jit(lambda t: (cpu.scatter_zeros((3, 4), jnp.float32, t), portable.scatter_zeros((3, 4), jnp.float32, t)))(tag)
    for z in got:
        np.testing.assert_array_equal(np.asarray(z), np.zeros((3, 4), np.float32))


@pytest.mark.parametrize("layer", [PEER, PKM])
def test_layer_on_cpu_backend_equals_portable(layer):
    """The whole layer (efficient compute, training mode) traced with each backend: outputs and
    every gradient agree."""
    model = layer(D, rngs=nnx.Rngs(0), num_experts=N, heads=H, top_k=K, d_key=DK)
    gdef, state = nnx.split(model)

    def step(state, x):
        def loss(m, x):
            return jnp.sum(m(x, train=True) * COT)

        return nnx.value_and_grad(loss, argnums=(0, 1))(nnx.merge(gdef, state), x)

    results = {}
    for name in ("cpu", "portable"):
        with backends.use(name):
            results[name] = jax.jit(step)(state, X)
    la, lb = jax.tree.leaves(results["cpu"]), jax.tree.leaves(results["portable"])
    assert len(la) == len(lb) and la
    for a, b in zip(la, lb):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
