"""The backend seam (peer_jax/backends): the CPU backend's forms equal the portable reference,
and a layer's ops follow its compute setting and the platform it is built for."""

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


def test_ops_follow_compute_and_platform(monkeypatch):
    assert backends.ops("efficient") is backends.OPS["efficient", "cpu"]  # the tests run on CPU
    assert backends.ops("efficient", "tpu") is backends.OPS["efficient", "portable"]
    assert backends.ops("native").select_topk is cpu.select_topk
    monkeypatch.setattr(backends, "platform", lambda: "tpu")
    model = PEER(D, rngs=nnx.Rngs(0), num_experts=N, heads=H, top_k=K, d_key=DK, compute="naive")
    assert model.ops is model.router.ops is backends.OPS["naive", "portable"]
    assert model.ops.project is portable.project and model.ops.kernels is None
    with pytest.raises(ValueError, match="PKM compute='native' runs on CPU only.*compute='efficient'"):
        PKM(D, rngs=nnx.Rngs(0), num_experts=N, heads=H, top_k=K, d_key=DK, compute="native")
    with backends.use("cpu"):
        assert backends.ops("efficient") is backends.OPS["efficient", "cpu"]
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
    """The whole layer (efficient compute, training mode) built with each backend: outputs and
    every gradient agree."""

    def step(model, x):
        def loss(m, x):
            return jnp.sum(m(x, train=True) * COT)

        return nnx.value_and_grad(loss, argnums=(0, 1))(model, x)

    results = {}
    for name in ("cpu", "portable"):
        with backends.use(name):
            model = layer(D, rngs=nnx.Rngs(0), num_experts=N, heads=H, top_k=K, d_key=DK)
        assert model.ops is backends.OPS["efficient", name]
        results[name] = nnx.jit(step)(model, X)
    la, lb = jax.tree.leaves(results["cpu"]), jax.tree.leaves(results["portable"])
    assert len(la) == len(lb) and la
    for a, b in zip(la, lb):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
