"""Transformer shapes, dtypes, causality and packing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from peer_jax.layers.dense import DenseFFW
from peer_jax.models.transformer import Transformer, resolve_sparse_blocks

V = 67


def tiny(**kw):
    return Transformer(V, rngs=nnx.Rngs(0), **{"num_layers": 2, "d_model": 32, "num_heads": 2, **kw})


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shapes_and_dtypes(dtype):
    m = tiny(dtype=dtype)
    tokens = jax.random.randint(jax.random.key(1), (3, 10), 0, V)
    logits = m(tokens)
    assert logits.shape == (3, 10, V) and logits.dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(m, nnx.Param)))
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_causal_future_tokens_never_change_earlier_outputs():
    m = tiny()
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, V)
    changed = tokens.at[:, 7:].set((tokens[:, 7:] + 5) % V)
    a, b = m(tokens), m(changed)
    np.testing.assert_array_equal(np.asarray(a[:, :7]), np.asarray(b[:, :7]))
    assert not np.allclose(np.asarray(a[:, 7:]), np.asarray(b[:, 7:]))


def test_packed_segments_are_independent():
    """Two packed documents give the same logits as each document on its own."""
    m = tiny()
    d1 = jax.random.randint(jax.random.key(3), (5,), 0, V)
    d2 = jax.random.randint(jax.random.key(4), (7,), 0, V)
    packed = jnp.concatenate([d1, d2])[None]
    seg = jnp.array([[1] * 5 + [2] * 7])
    pos = jnp.array([list(range(5)) + list(range(7))])
    out = m(packed, positions=pos, segment_ids=seg)
    np.testing.assert_allclose(out[0, :5], m(d1[None])[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[0, 5:], m(d2[None])[0], rtol=1e-5, atol=1e-5)


def test_sparse_ffw_goes_to_middle_block_only():
    m = tiny(sparse_ffw=lambda d, **kw: DenseFFW(d, mlp_dim=8, **kw))
    assert [b.ffw.mlp_dim for b in m.blocks] == [128, 8]  # block 1 of 2 is the middle
    assert resolve_sparse_blocks("middle", 12) == (6,)
    assert resolve_sparse_blocks([0, 3], 4) == (0, 3)


@pytest.mark.parametrize("kw, match", [
    (dict(num_heads=3), "not divisible by num_heads"),
    (dict(sparse_ffw=DenseFFW, sparse_blocks=[5]), "outside"),
    (dict(dtype="float8"), "unknown"),
])
def test_invalid_configs_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kw)


def test_swiglu_ffw():
    f = DenseFFW(16, rngs=nnx.Rngs(0), activation="swiglu")
    assert f.mlp_dim % 8 == 0 and f(jnp.ones((1, 3, 16))).shape == (1, 3, 16)
    with pytest.raises(ValueError, match="activation"):
        DenseFFW(16, rngs=nnx.Rngs(0), activation="tanh")
