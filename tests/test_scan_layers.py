"""Layers as nnx.scan (peer_jax/models/layer_stack.py) and remat policies (models/remat.py):
values and gradients equal the unscanned model's; parameter-tree migration and the
checkpoint layouts; FLOP and parameter counts unchanged."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from peer_jax import flops
from peer_jax.layers.peer import PEER
from peer_jax.models import layer_stack
from peer_jax.models.transformer import Transformer

V, B, T = 67, 2, 8
# float32: scanning changes only the order XLA fuses things in, so agreement is to rounding.
RTOL, ATOL = 1e-5, 1e-6
TINY_PEER = functools.partial(PEER, num_experts=64, heads=2, top_k=4, d_key=8)


def _model(scan, remat=False, **kw):
    kw = {"num_layers": 5, "d_model": 32, "num_heads": 2, "sparse_ffw": TINY_PEER, **kw}
    return Transformer(V, rngs=nnx.Rngs(0), scan_layers=scan, remat=remat, **kw)


def _batch():
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, V)
    seg = jnp.asarray([[1] * 5 + [2] * 3, [1] * 8])
    pos = jnp.asarray([list(range(5)) + list(range(3)), list(range(8))])
    return tokens, seg, pos


def _loss_and_grads(model):
    tokens, seg, pos = _batch()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def f(params, rest):
        m = nnx.merge(graphdef, params, rest)
        logits = m(tokens, positions=pos, segment_ids=seg, mask=seg > 0, train=True)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, tokens)), logits

    (loss, logits), g = jax.value_and_grad(f, has_aux=True)(params, rest)
    return loss, logits, nnx.to_pure_dict(g)


def test_plan_scans_around_the_sparse_block():
    assert layer_stack.plan(5, (2,)) == (("stack", 0, 0, 2), ("block", 2, 2, 1), ("stack", 1, 3, 2))
    assert layer_stack.plan(4, ()) == (("stack", 0, 0, 4),)
    assert layer_stack.plan(2, (0, 1)) == (("block", 0, 0, 1), ("block", 1, 1, 1))


def test_same_init_and_tree_migration_round_trip():
    a, b = _model(False), _model(True)
    pa = nnx.to_pure_dict(nnx.state(a, nnx.Param))
    pb = nnx.to_pure_dict(nnx.state(b, nnx.Param))
    assert pb["stacks"][0]["attn"]["qkv"].shape == (2, 3, 32, 2, 16)  # leading 'layers' axis
    assert b.stacks[0].attn.qkv.get_metadata()["out_sharding"][0] == "layers"
    jax.tree.map(np.testing.assert_array_equal, layer_stack.to_scanned(pa, 5, (2,)), pb)
    jax.tree.map(np.testing.assert_array_equal, layer_stack.to_unscanned(pb, 5, (2,)), pa)


@pytest.mark.parametrize("remat", ["minimal", *(pytest.param(r, marks=pytest.mark.slow)
                                                for r in ("none", "full", "dots", "save_qkv_proj"))])
def test_scanned_equals_unscanned_values_and_grads(remat):
    loss_a, logits_a, ga = _loss_and_grads(_model(False))
    loss_b, logits_b, gb = _loss_and_grads(_model(True, remat=remat))
    np.testing.assert_allclose(logits_b, logits_a, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(loss_b, loss_a, rtol=RTOL)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=RTOL, atol=ATOL),
                 layer_stack.to_unscanned(gb, 5, (2,)), ga)


@pytest.mark.parametrize("remat", [True, *(pytest.param(r, marks=pytest.mark.slow) for r in ("minimal", "save_out_proj"))])
def test_remat_policies_unscanned_equal_no_remat(remat):
    loss_a, logits_a, ga = _loss_and_grads(_model(False, num_layers=2, sparse_ffw=None))
    loss_b, logits_b, gb = _loss_and_grads(_model(False, remat=remat, num_layers=2, sparse_ffw=None))
    np.testing.assert_allclose(logits_b, logits_a, rtol=RTOL, atol=ATOL)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=RTOL, atol=ATOL), gb, ga)


def test_bad_remat_and_stateful_scanned_ffw_raise():
    with pytest.raises(ValueError, match="remat"):
        _model(True, remat="everything")
    with pytest.raises(ValueError, match="parameters only"):
        _model(True, ffw=TINY_PEER, sparse_ffw=None)  # PEER keeps BatchNorm state


def test_flops_and_params_do_not_depend_on_the_layout():
    a = flops.abstract_transformer(V, num_layers=5, d_model=32, num_heads=2, sparse_ffw=TINY_PEER)
    b = flops.abstract_transformer(V, num_layers=5, d_model=32, num_heads=2, sparse_ffw=TINY_PEER, scan_layers=True)
    assert flops.count(a, T).terms == flops.count(b, T).terms
    assert flops.param_counts(a, T) == flops.param_counts(b, T)


class _Position:
    """A data iterator's state, as checkpoints hold it."""

    def get_state(self):
        return {"pos": 0}

    def set_state(self, state):
        pass


def test_checkpoint_layouts_refuse_each_other_and_migrate(tmp_path):
    """An unscanned checkpoint cannot be restored into a scanned run (CheckpointError); restored
    in its own layout and converted with to_scanned, it gives the scanned model equal outputs."""
    from peer_jax import sharding
    from peer_jax.training import checkpoint as ckpt
    from peer_jax.training import step as step_lib

    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    rules = sharding.RULES_DEFAULT
    tx = optax.adam(1e-3)
    kw = dict(num_layers=3, d_model=16, num_heads=2)
    flat, scanned = (functools.partial(Transformer, scan_layers=s, **kw) for s in (False, True))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        _, state, shard = step_lib.create_train_state(flat, tx, V, T, 0, mesh, rules)
        mngr = ckpt.manager(str(tmp_path / "ckpt"), asynchronous=False)
        ckpt.save(mngr, 1, state, _Position(), {"m": 1}, force=True)
        setup_s, abstract_s, shard_s = step_lib.abstract_train_state(scanned, tx, V, T, mesh, rules)
        with pytest.raises(ckpt.CheckpointError, match="does not fit this model"):
            ckpt.restore(mngr, abstract_s, shard_s)
        restored, _ = ckpt.restore(mngr, state, shard)
        migrated = layer_stack.to_scanned(restored, 3, ())
        assert jax.tree.structure(migrated) == jax.tree.structure(abstract_s)
        mngr.close()
    tokens = _batch()[0]
    run = lambda gd, s: nnx.merge(gd, s["params"], s["model_state"])(tokens)  # noqa: E731
    setup_f = nnx.split(flat(V, rngs=nnx.Rngs(0)), nnx.Param, ...)[0]
    np.testing.assert_allclose(run(setup_s.graphdef, migrated), run(setup_f, restored), rtol=RTOL, atol=ATOL)
