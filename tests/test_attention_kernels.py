"""The attention seam (peer_jax/backends/attention.py): the Pallas splash kernel, run in
interpret mode on CPU, equals the XLA reference in values and gradients, causal and with
packed segments, alone and inside shard_map on a (data, model) mesh; 'auto' keeps XLA on CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from peer_jax import backends, sharding
from peer_jax.backends import attention as attn

B, T, N, H = 2, 128, 2, 16  # T = 128: the kernel's smallest block
# float32 everywhere; the kernel's online softmax sums in another order than XLA's.
RTOL, ATOL = 2e-5, 2e-5


def _qkv(seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q, k, v, cot = (jax.random.normal(kk, (B, T, N, H), jnp.float32) for kk in ks)
    return q, k, v, cot


def _segments():
    seg = np.ones((B, T), np.int32)
    seg[0, 50:] = 2
    seg[0, 100:] = 0  # trailing padding
    seg[1, 70:] = 2
    return jnp.asarray(seg)


def _check(fn, ref, q, k, v, seg, cot):
    np.testing.assert_allclose(fn(q, k, v, seg), ref(q, k, v, seg), rtol=RTOL, atol=ATOL)
    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v, seg) * cot)  # noqa: E731
    g_fn = jax.grad(loss(fn), argnums=(0, 1, 2))(q, k, v)
    g_ref = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_fn, g_ref):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)


@pytest.mark.slow
@pytest.mark.parametrize("segments", [False, True], ids=["causal", "causal+segments"])
def test_splash_interpret_matches_xla(segments):
    q, k, v, cot = _qkv()
    seg = _segments() if segments else None
    splash = lambda q, k, v, s: attn.splash_attention(q, k, v, s, interpret=True)  # noqa: E731
    _check(jax.jit(splash), jax.jit(attn.xla_attention), q, k, v, seg, cot)


@pytest.mark.slow
def test_splash_under_a_mesh_matches_xla():
    """Heads split over `model`, batch over `data`: the kernel runs per shard in shard_map."""
    q, k, v, cot = _qkv(1)
    seg = _segments()
    mesh = sharding.make_mesh((2, 1, 2), devices=jax.devices()[:4])
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.RULES_DEFAULT):
        splash = jax.jit(lambda q, k, v, s: attn.splash_attention(q, k, v, s, interpret=True))
        jaxpr = str(jax.make_jaxpr(splash)(q, k, v, seg))
        assert "shard_map" in jaxpr
        _check(splash, jax.jit(attn.xla_attention), q, k, v, seg, cot)


def test_auto_is_xla_on_cpu_and_splash_on_tpu(monkeypatch):
    assert attn.resolve("auto", 128) == "xla"
    monkeypatch.setattr(backends, "platform", lambda: "tpu")
    assert attn.resolve("auto", 256) == "splash"
    assert attn.resolve("auto", 100) == "xla"  # not a multiple of the kernel's block
    assert attn.resolve("xla", 256) == "xla"
    with pytest.raises(ValueError, match="multiple of 128"):
        attn.resolve("splash", 100)
    with pytest.raises(ValueError, match="unknown"):
        attn.resolve("flash", 128)


def test_layer_default_is_the_reference_on_cpu():
    """Attention(impl='auto') on CPU is exactly the XLA path (committed CPU results unchanged)."""
    from peer_jax.layers.attention import Attention

    x = jax.random.normal(jax.random.key(3), (1, 8, 16))
    pos = jnp.arange(8)[None]
    a = Attention(16, 2, 8, rngs=nnx.Rngs(0))
    b = Attention(16, 2, 8, rngs=nnx.Rngs(0), impl="xla")
    call = nnx.jit(lambda m, x: m(x, pos, None))
    np.testing.assert_array_equal(call(a, x), call(b, x))
