"""PKM: brute-force reference, efficient == naive (sharded lookups: test_table_lookup.py)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from peer_jax.layers.pkm import PKM
from peer_jax.layers.product_keys import brute_force_scores

D, N, H, K, DK = 16, 64, 2, 4, 8
B, T = 4, 3
_rng = np.random.default_rng(0)
X = jnp.asarray(_rng.standard_normal((B, T, D)), jnp.float32)
COT = jnp.asarray(_rng.standard_normal((B, T, D)), jnp.float32)
MASK = jnp.asarray(_rng.random((B, T)) > 0.3).at[:, 0].set(True)


def make(**kw) -> PKM:
    return PKM(D, rngs=nnx.Rngs(0), num_experts=N, heads=H, top_k=K, d_key=DK, **kw)


def loss_and_grads(model, x):
    def loss(m, x):
        y, inter = nnx.capture(m, nnx.Intermediate)(x, mask=MASK, train=True)
        return jnp.sum(y * COT * MASK[..., None]), (y, inter["expert_mass"][0])

    (_, (y, mass)), grads = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(model, x)
    return y, grads, mass


def test_pkm_equals_brute_force_memory_read():
    model = make(query_batchnorm=False)
    y = np.asarray(model(X), np.float64)
    q = np.asarray(X @ model.router.query[...], np.float64).reshape(B, T, H, DK)
    scores = np.asarray(brute_force_scores(jnp.asarray(q), model.router.sub_keys[...]), np.float64)  # [B,T,H,N]
    values = np.asarray(model.values[...], np.float64)
    want = np.zeros((B, T, D))
    for b in range(B):
        for t in range(T):
            for h in range(H):
                top = np.argsort(-scores[b, t, h])[:K]
                w = np.exp(scores[b, t, h, top] - scores[b, t, h, top].max())
                want[b, t] += (w / w.sum()) @ values[top]
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compute", ["efficient", "native"])
def test_optimised_paths_equal_naive_values_and_grads(compute):
    ye, ge, me = loss_and_grads(make(compute=compute), X)
    yn, gn, mn = loss_and_grads(make(compute="naive"), X)
    np.testing.assert_allclose(ye, yn, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(me, mn, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), ge, gn)
    assert float(jnp.sum(me)) == pytest.approx(H * float(jnp.sum(MASK)), rel=1e-5)  # softmax mass per head


def test_paper_defaults_and_validation():
    m = nnx.eval_shape(lambda: PKM(32, rngs=nnx.Rngs(0)))
    assert (m.num_experts, m.heads, m.top_k, m.values.shape) == (1024**2, 8, 32, (1024**2, 32))
    with pytest.raises(ValueError, match="PKM top_k=9 must be between 1 and"):
        PKM(D, rngs=nnx.Rngs(0), num_experts=N, top_k=9)
    with pytest.raises(ValueError, match="perfect square"):
        PKM(D, rngs=nnx.Rngs(0), num_experts=50)
    assert not hasattr(m, "u") and math.isqrt(m.num_experts) == 1024
