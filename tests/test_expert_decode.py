"""The decode path of PEER and PKM (layers/expert_decode.py): in eval mode, a lookup over few
tokens gathers all h·k rows at once instead of the training path's custom-VJP slot loops, and
its router selects with the decode ops' product-key top-k (the C++ selection on CPU).

It must equal the training read-out in values and (though meant for inference) in gradients,
with padding masked, on one device and in the 8-device memory-parallel layout; its selection
must equal XLA's top-k; it must never be taken in training mode or above its token bound
(counted per device); greedy samples must not change."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from peer_jax import backends, native, sample
from peer_jax.backends import cpu as cpu_backend
from peer_jax import sharding as shd
from peer_jax.layers.peer import PEER
from peer_jax.layers.pkm import PKM
from peer_jax.models.transformer import Transformer
from peer_jax.training import step as step_lib

D, N, H, K, DK = 16, 64, 2, 4, 8
RTOL, ATOL = 1e-5, 1e-6
LAYERS = {"peer": PEER, "pkm": PKM}
# The training read-out in a jaxpr: the slot loops of 'efficient' (the product-key search runs
# unchunked at these sizes, so it adds no scan), the C++ bag kernel of 'native'.
LOOP = {"efficient": "scan", "native": "peer_jax_embedding_bag"}
# The decode path's selection and table reads on CPU: the C++ kernels where they build, else
# XLA's top-k and gather (backends.decode_ops).
NATIVE_DECODE = native.available()
SELECT = "peer_jax_product_key_topk"  # the C++ selection in a jaxpr


def make(layer: str, **kw):
    """A tiny layer with running BN statistics away from (0, 1), so eval mode reads them."""
    model = LAYERS[layer](D, rngs=nnx.Rngs(0), num_experts=N, heads=H, top_k=K, d_key=DK, **kw)
    bn = model.router.query_bn
    bn.mean[...] = 0.3 * jnp.sin(jnp.arange(bn.mean.shape[0], dtype=jnp.float32))
    bn.var[...] = 1.0 + 0.5 * jnp.cos(jnp.arange(bn.var.shape[0], dtype=jnp.float32)) ** 2
    return model


def inputs(b: int, t: int):
    rng = np.random.default_rng(b * 100 + t)
    x = jnp.asarray(rng.standard_normal((b, t, D)), jnp.float32)
    mask = jnp.asarray(rng.random((b, t)) > 0.3).at[0, :].set(False).at[1, -1].set(True)  # row 0: all padding
    return x, mask


def forward_and_grads(model, x, mask, train=False):
    """Output, and the gradients wrt x and every parameter of a masked loss."""
    gdef, state = nnx.split(model)
    cot = jnp.cos(jnp.arange(x.size, dtype=jnp.float32)).reshape(x.shape)

    def run(state, x):
        def loss(m, x):
            y = m(x, mask=mask, train=train)
            return jnp.sum(y * cot * mask[..., None]), y

        m = nnx.merge(gdef, state)
        (_, y), grads = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(m, x)
        return y, grads

    return jax.jit(run)(state, x), str(jax.make_jaxpr(run)(state, x))


def assert_trees_close(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) and la
    for u, v in zip(la, lb):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("compute", ["efficient", "native"])
@pytest.mark.parametrize("layer", ["peer", "pkm"])
@pytest.mark.parametrize("shape", [(4, 1), (3, 5)], ids=["decode-step", "prefill"])
def test_decode_path_equals_training_read_out(layer, compute, shape):
    """Values and gradients (x and every parameter) in eval mode, padding included."""
    x, mask = inputs(*shape)
    got, jaxpr = forward_and_grads(make(layer, compute=compute), x, mask)
    want, ref_jaxpr = forward_and_grads(make(layer, compute=compute, decode_gather_max_tokens=0), x, mask)
    assert LOOP[compute] not in jaxpr and LOOP[compute] in ref_jaxpr
    assert ("peer_jax_decode_bag" in jaxpr) == NATIVE_DECODE
    # The decode path selects natively; the 'efficient' reference with XLA's top-k.
    assert (SELECT in jaxpr) == NATIVE_DECODE and (SELECT in ref_jaxpr) == (compute == "native")
    assert_trees_close(got, want)


@pytest.mark.parametrize("layer,per_head_keys", [("peer", False), ("pkm", False), ("pkm", True)])
def test_decode_router_selects_like_xla_top_k(layer, per_head_keys):
    """The decode path's selection (the C++ kernel where it builds) on the router's own eval-mode
    queries against XLA's product-key top-k: same items, same scores (random data, no ties),
    and the router weights the layer's decode path computes with it."""
    from peer_jax.layers import product_keys as pk

    model = LAYERS[layer](D, rngs=nnx.Rngs(1), num_experts=32 * 32, heads=H, top_k=8, d_key=DK,
                          per_head_keys=per_head_keys)
    router = model.router
    x = jnp.asarray(np.random.default_rng(5).standard_normal((6, 3, D)), jnp.float32)
    q, keys = router.queries(x), router.sub_keys[...]
    select = model.gather_ops.select_topk
    assert (select is cpu_backend.select_topk) == NATIVE_DECODE
    got = jax.jit(lambda q, k: select(q, k, 8))(q, keys)
    want = jax.jit(lambda q, k: pk.product_key_topk(q, k, 8))(q, keys)
    top = np.sort(np.asarray(pk.brute_force_scores(q, keys)), axis=-1)[..., ::-1][..., :9]
    assert (np.diff(top, axis=-1) < 0).all()  # no ties among the top 9 scores of any query
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=1e-6, atol=1e-6)
    # The layer's decode path routes with it: weights and items of the router call it makes.
    g, idx = jax.jit(lambda x: router(x, select_topk=select))(x)
    g_ref, idx_ref = jax.jit(lambda x: router(x))(x)
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(idx_ref))
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(not NATIVE_DECODE, reason="no C++ compiler: the decode path uses the XLA gather")
@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("layer", ["peer", "pkm"])
def test_native_decode_kernels_equal_the_xla_gather(layer, param_dtype):
    """The decode path with the C++ kernels against the same path with the XLA gather and einsum
    (backends.ops('naive')) computing in float32, on float32 and bfloat16 tables (which the
    kernels read as stored): outputs, padding rows included, and gradients (the kernels' VJP is
    the gather's)."""
    x, mask = inputs(4, 1)
    model = make(layer, param_dtype=param_dtype)
    ref = make(layer, param_dtype=param_dtype)
    assert model.gather_ops is backends.DECODE_NATIVE
    ref.gather_ops = backends.ops("naive")
    got, jaxpr = forward_and_grads(model, x, mask)
    want, ref_jaxpr = forward_and_grads(ref, x, mask)
    assert "peer_jax_decode_bag" in jaxpr and "peer_jax_decode_bag" not in ref_jaxpr
    assert_trees_close(got, want)


def test_decode_ops_fall_back_to_the_xla_gather(monkeypatch):
    """Off CPU, or where the native kernels do not build, the decode path selects and gathers
    with XLA."""
    with backends.use("portable"):
        assert backends.decode_ops().name == "naive/portable"
    monkeypatch.setattr(backends, "_native_builds", lambda: False)
    assert backends.decode_ops().name == "naive/cpu"
    model = make("pkm")
    assert model.gather_ops.name == "naive/cpu"
    x, mask = inputs(4, 1)
    jaxpr = forward_and_grads(model, x, mask)[1]
    assert "peer_jax_decode_bag" not in jaxpr and SELECT not in jaxpr  # XLA's gather and top-k


@pytest.mark.parametrize("layer", ["peer", "pkm"])
def test_never_taken_in_training_or_above_the_token_bound(layer):
    x, mask = inputs(2, 3)  # 6 tokens
    loop = LOOP["efficient"]
    for jaxpr in (forward_and_grads(make(layer), x, mask, train=True)[1],
                  forward_and_grads(make(layer, decode_gather_max_tokens=5), x, mask)[1]):
        assert loop in jaxpr and SELECT not in jaxpr  # the training ops' read-out and selection
    jaxpr = forward_and_grads(make(layer, decode_gather_max_tokens=6), x, mask)[1]
    assert loop not in jaxpr and (SELECT in jaxpr) == NATIVE_DECODE


@pytest.mark.parametrize("value", [-1, 2.5, True])
def test_bad_setting_is_one_clear_line(value):
    with pytest.raises(ValueError, match=r"PEER decode_gather_max_tokens=.* must be an int ≥ 0"):
        PEER(D, rngs=nnx.Rngs(0), num_experts=N, heads=H, top_k=K, d_key=DK, decode_gather_max_tokens=value)


@pytest.mark.parametrize("layer", ["peer", "pkm"])
def test_memory_parallel_decode_step_equals_single_device_training_read_out(layer):
    """8 fake devices, `memory_parallel` rules on a (data 2, expert 2, model 2) mesh: a decode
    step of 8 rows; each device gathers its column slice of the rows of its group's tokens."""
    x, mask = inputs(8, 1)
    mesh, rules = shd.make_mesh((2, 2, 2), devices=jax.devices()[:8]), shd.get_rules("memory_parallel")
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        local = make(layer).lookup.local_tokens(8, 1)
        runs = {}
        for max_tokens in (local, local - 1):  # the bound counts the tokens each device reads
            gdef, state = nnx.split(make(layer, decode_gather_max_tokens=max_tokens))
            state = jax.device_put(state, shd.state_shardings(state, mesh, rules))
            data = NamedSharding(mesh, shd.logical_to_spec(("batch", "length"), rules))
            runs[max_tokens] = forward_and_grads(nnx.merge(gdef, state),
                                                 jax.device_put(x, NamedSharding(mesh, P(*data.spec))),
                                                 jax.device_put(mask, data))
    assert 0 < local < 8  # its group's tokens: fewer than the batch
    (got, jaxpr), (below, below_jaxpr) = runs[local], runs[local - 1]
    assert "all_to_all" in jaxpr and LOOP["efficient"] not in jaxpr and (SELECT in jaxpr) == NATIVE_DECODE
    assert LOOP["efficient"] in below_jaxpr and SELECT not in below_jaxpr
    want = forward_and_grads(make(layer, decode_gather_max_tokens=0), x, mask)[0]
    assert_trees_close(got, want)
    assert_trees_close(below, want)


@pytest.mark.parametrize("layer", ["peer", "pkm"])
def test_greedy_samples_unchanged(layer):
    """`peer_jax.sample` (KV cache, left-padded prompts) with and without the decode path."""
    mesh, rules = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1]), shd.RULES_DEFAULT
    rows = [[5, 6, 7], [9], [10, 11, 12, 13, 14]]
    out = []
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        for max_tokens in (256, 0):
            ffw = functools.partial(LAYERS[layer], num_experts=N, heads=H, top_k=K, d_key=DK,
                                    decode_gather_max_tokens=max_tokens)
            factory = functools.partial(Transformer, num_layers=1, d_model=D, num_heads=2, sparse_ffw=ffw)
            setup, state, _ = step_lib.create_train_state(factory, optax.sgd(0.1), 64, 16, 0, mesh, rules)
            state["model_state"] = jax.tree.map(lambda a: a * 0.5 + 0.3, state["model_state"])
            out.append(sample.generate(setup, state["params"], state["model_state"], rows, 6, vocab_size=60,
                                       eos_id=1))
    (tok, lp), (ref_tok, ref_lp) = out
    assert tok == ref_tok and all(len(t) >= 1 for t in tok)
    for a, b in zip(lp, ref_lp):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert math.isfinite(sum(map(sum, lp)))
