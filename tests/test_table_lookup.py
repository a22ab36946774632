"""The sharded table lookups of PEER and PKM (layers/expert_tables.py) equal the single-device
layers in values and in every gradient, on 8 fake CPU devices, with padding masked out of the
query BatchNorm:

* the d-split (default rules: table columns over `model`, tokens stay where they are), for each
  compute mode;
* memory-parallel (`memory_parallel` rules: columns over `model` × `expert`, the tokens'
  activations and routing move to them), in training and eval mode."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from peer_jax import sharding as shd
from peer_jax.layers.peer import PEER
from peer_jax.layers.pkm import PKM

D, N, H, K, DK = 16, 64, 2, 4, 8
B, T = 8, 3
RTOL, ATOL = 1e-5, 1e-6
MP = shd.get_rules("memory_parallel")
LAYERS = {"peer": PEER, "pkm": PKM}

_rng = np.random.default_rng(0)
X = jnp.asarray(_rng.standard_normal((B, T, D)), jnp.float32)
COT = jnp.asarray(_rng.standard_normal((B, T, D)), jnp.float32)
MASK = jnp.asarray(_rng.random((B, T)) > 0.3).at[:, 0].set(True)


def make(layer: str, **kw):
    """numpy-random parameters (running BN statistics included) on an abstractly traced module."""
    gdef, state = nnx.split(nnx.eval_shape(
        lambda: LAYERS[layer](D, rngs=nnx.Rngs(0), num_experts=N, heads=H, top_k=K, d_key=DK, **kw)))
    rng = np.random.default_rng(1)

    def fill(path, leaf):
        name = [k.key for k in path if hasattr(k, "key")][-1]
        base, std = {"mean": (0.0, 0.3), "var": (1.0, 0.0), "scale": (1.0, 0.2), "bias": (0.0, 0.2)}.get(
            name, (0.0, 1 / math.sqrt(D)))
        return jnp.asarray(base + std * rng.standard_normal(leaf.shape), leaf.dtype)

    return nnx.merge(gdef, jax.tree_util.tree_map_with_path(fill, state))


def _step_fn(gdef, train: bool):
    def step(state, x, mask):
        m = nnx.merge(gdef, state)

        def loss(m, x):
            y, inter = nnx.capture(m, nnx.Intermediate)(x, mask=mask, train=train)
            return jnp.sum(y * COT * mask[..., None]), (y, inter)

        (_, (y, inter)), grads = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(m, x)
        return y, grads, inter["expert_mass"][0], nnx.state(m, nnx.BatchStat)

    return step


@functools.cache
def run_single(layer: str, train: bool, compute: str = "efficient"):
    """Single-device reference (no mesh), shared by the tests that compare against it."""
    gdef, state = nnx.split(make(layer, compute=compute))
    return jax.jit(_step_fn(gdef, train))(state, X, MASK)


def run_sharded(model, mesh_shape, rules, train=True):
    mesh = shd.make_mesh(mesh_shape, devices=jax.devices()[: math.prod(mesh_shape)])
    gdef, state = nnx.split(model)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        state = jax.device_put(state, shd.state_shardings(state, mesh, rules))
        data = NamedSharding(mesh, shd.logical_to_spec(("batch", "length"), rules))
        x = jax.device_put(X, NamedSharding(mesh, P(*data.spec, None)))
        mask = jax.device_put(MASK, data)
        step = jax.jit(_step_fn(gdef, train))
        jaxpr = str(jax.make_jaxpr(step)(state, x, mask))
        return step(state, x, mask), jaxpr, state


def assert_trees_close(a, b, rtol=RTOL, atol=ATOL):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) and la
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def _table(state, layer):
    return state["u"] if layer == "peer" else state["values"]


@pytest.mark.parametrize(
    "layer,compute,mesh_shape,kw",
    [("peer", "efficient", (2, 1, 4), {}), ("peer", "naive", (2, 1, 4), {}),
     ("peer", "efficient", (2, 2, 2), {"route_chunk_tokens": 1}), ("peer", "native", (2, 2, 2), {}),
     ("pkm", "efficient", (2, 1, 4), {}), ("pkm", "native", (2, 2, 2), {})],
    ids=["peer-efficient-d2e1m4", "peer-naive-d2e1m4", "peer-efficient-d2e2m2-chunked-routing",
         "peer-native-d2e2m2", "pkm-efficient-d2e1m4", "pkm-native-d2e2m2"],
)
def test_d_split_matches_single_device(layer, compute, mesh_shape, kw):
    """Default rules: columns over `model`, rows over `expert`, tokens over (data, expert). The
    chunked case runs the product-key search one sequence position per step on the
    batch-sharded queries, against the unchunked single-device reference."""
    got, jaxpr, placed = run_sharded(make(layer, compute=compute, **kw), mesh_shape, shd.RULES_DEFAULT)
    if compute == "native":  # the C++ kernels ran inside the shard_map
        assert "ffi_call" in jaxpr or "custom_call" in jaxpr, jaxpr
    if kw:  # the product-key search really ran as a 3-step loop (T = 3 positions)
        assert "length=3" in jaxpr
    assert "shard_map" in jaxpr and "all_to_all" not in jaxpr
    if layer == "peer":
        assert "psum" in jaxpr
    assert _table(placed, layer)[...].sharding.spec == P("expert", "model")
    assert_trees_close(got, run_single(layer, True, compute))


@pytest.mark.parametrize("compute", ["efficient", "native"])
def test_model_axis_of_size_one_uses_single_device_path(compute):
    """Pure data/expert parallelism: no shard_map; XLA partitions the efficient loops (and
    sums the scattered table grads over token shards) on its own. The native kernels are
    opaque custom calls there, which XLA runs on gathered operands."""
    got, jaxpr, _ = run_sharded(make("peer", compute=compute), (2, 2, 1), shd.RULES_DEFAULT)
    assert "shard_map" not in jaxpr
    assert_trees_close(got, run_single("peer", True, compute))


def test_sharded_lookup_can_be_disabled():
    gdef, state = nnx.split(make("peer", sharded_lookup=False))
    with jax.set_mesh(shd.make_mesh((2, 1, 4))):
        jaxpr = str(jax.make_jaxpr(_step_fn(gdef, True))(state, X, MASK))
    assert "shard_map" not in jaxpr


def test_indivisible_d_model_raises():
    model = PEER(10, rngs=nnx.Rngs(0), num_experts=N, heads=H, top_k=K, d_key=DK)
    with jax.set_mesh(shd.make_mesh((2, 1, 4))), pytest.raises(ValueError, match="d_model=10 is not divisible"):
        jax.eval_shape(lambda x: model(x), jax.ShapeDtypeStruct((B, T, 10), jnp.float32))


@pytest.mark.parametrize("layer", ["peer", "pkm"])
@pytest.mark.parametrize("mesh_shape", [(2, 4, 1), (1, 4, 2), (2, 2, 2)], ids=lambda s: "x".join(map(str, s)))
def test_memory_parallel_matches_single_device(layer, mesh_shape):
    """Output, grads of x and of every parameter (tables, sub-keys, query, BN), the sown expert
    mass and the new BN statistics, in training mode (batch statistics over valid tokens)."""
    got, jaxpr, placed = run_sharded(make(layer), mesh_shape, MP)
    # The tables stay split over the expert × model group; the tokens travel.
    assert _table(placed, layer)[...].sharding.spec == P(None, ("model", "expert"))
    assert "all_to_all" in jaxpr and "all_gather" in jaxpr, jaxpr
    if layer == "peer":
        assert "psum" in jaxpr
    assert_trees_close(got, run_single(layer, True))


@pytest.mark.parametrize("layer", ["peer", "pkm"])
def test_memory_parallel_eval_mode_matches_single_device(layer):
    """Eval mode: the query BatchNorm reads its running statistics."""
    got, jaxpr, _ = run_sharded(make(layer), (2, 2, 2), MP, train=False)
    assert "all_to_all" in jaxpr
    assert_trees_close(got, run_single(layer, False))


def test_memory_parallel_fsdp_rows_over_data():
    """`memory_parallel_fsdp`: table rows also split over `data` (all-gathered for the lookup)."""
    rules = shd.get_rules("memory_parallel_fsdp")
    got, jaxpr, placed = run_sharded(make("peer"), (2, 2, 2), rules)
    assert placed["v"][...].sharding.spec == P("data", ("model", "expert"))
    assert "all_to_all" in jaxpr
    assert_trees_close(got, run_single("peer", True))


def test_batch_not_split_over_the_group_slices_locally():
    """A batch the `expert` axis cannot split (decode of one sequence per data shard): the
    tokens are replicated over the group, so every device slices its columns locally."""
    mesh = shd.make_mesh((2, 4, 1))
    model = make("peer")
    gdef, state = nnx.split(model)
    x = X[:2]
    with jax.set_mesh(mesh), nnx.logical_axis_rules(MP):
        jaxpr = str(jax.make_jaxpr(lambda s, x: nnx.merge(gdef, s)(x))(state, x))
        out = jax.jit(lambda s, x: nnx.merge(gdef, s)(x))(state, x)
    assert "shard_map" in jaxpr and "all_to_all" not in jaxpr
    np.testing.assert_allclose(np.asarray(out), np.asarray(model(x)), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("layer", ["peer", "pkm"])
def test_bf16_table_gradient_reduction(layer):
    """`grad_reduce_dtype='bfloat16'`: the table-gradient sum over the `data` replicas runs in
    bfloat16; values and non-table gradients are unchanged, table gradients equal to bf16
    rounding of the two summed replicas."""
    got, jaxpr, _ = run_sharded(make(layer, grad_reduce_dtype="bfloat16"), (2, 2, 2), MP)
    assert "bf16" in jaxpr and "psum" in jaxpr
    want = run_single(layer, True)
    y, (g_params, g_x), mass, stats = got
    wy, (wg_params, wg_x), wmass, wstats = want
    assert_trees_close((y, g_x, mass, stats), (wy, wg_x, wmass, wstats))
    names = ("u", "v") if layer == "peer" else ("values",)
    for name in names:
        a, b = np.asarray(g_params[name][...]), np.asarray(wg_params[name][...])
        # each replica's partial is rounded to bf16 (8 bits of mantissa) before the sum
        np.testing.assert_allclose(a, b, rtol=2 ** -7, atol=2 ** -7 * np.abs(b).max())
        assert not np.array_equal(a, b)  # the narrower sum really ran
    rest = {k: v for k, v in nnx.to_flat_state(g_params) if k[0] not in names}
    wrest = {k: v for k, v in nnx.to_flat_state(wg_params) if k[0] not in names}
    assert_trees_close(rest, wrest)


def test_column_axes_order_is_checked():
    """Batch-sharding axes must be the minor end of the column split: a clear start-up error."""
    rules = tuple((n, ("expert", "model")) if n == "expert_embed" else (n, a) for n, a in MP)
    model = make("peer")
    with jax.set_mesh(shd.make_mesh((2, 2, 2))), nnx.logical_axis_rules(rules), \
            pytest.raises(ValueError, match="expert_embed=.*order it with the batch-sharding axes last"):
        jax.eval_shape(lambda x: model(x), jax.ShapeDtypeStruct((B, T, D), jnp.float32))
