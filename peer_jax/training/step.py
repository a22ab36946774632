"""Functional train/eval steps over an explicit, sharded train state.

The NNX model is split once into a static `graphdef` and pure-dict states. A train state is
the pytree `{"params", "model_state", "opt_state", "step", "expert_mass"}` where
`model_state` holds non-trainable variables (query-BN running statistics) and `expert_mass`
accumulates router-score mass per expert for every PEER/PKM layer between log steps.
Parameters are created already sharded: the initialiser is jitted with `out_shardings`
derived from the logical axis names on each variable.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from peer_jax import sharding
from peer_jax.layers import expert_stats
from peer_jax.training import optim

TrainState = dict[str, Any]


def _pure(state: nnx.State) -> dict:
    return nnx.to_pure_dict(state)


def _path_name(path) -> str:
    return "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)


def flatten_intermediates(inter: nnx.State) -> dict[str, jax.Array]:
    """What the layers sowed, keyed by 'module/path/name'; repeated sows are summed."""
    out = {}
    for path, value in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(inter), is_leaf=lambda x: isinstance(x, tuple)):
        vals = value if isinstance(value, tuple) else (value,)
        out[_path_name(path)] = sum(vals[1:], vals[0])
    return out


def apply_model(model: nnx.Module, batch, train: bool):
    """(logits, intermediates) of the model on a batch; padding (segment 0) is masked."""
    fwd = nnx.capture(lambda m, b: m(b["inputs"], positions=b["positions"], segment_ids=b["segment_ids"],
                                     mask=b["segment_ids"] > 0, train=train), nnx.Intermediate)
    logits, inter = fwd(model, batch)
    return logits, flatten_intermediates(inter)


@dataclasses.dataclass(frozen=True)
class ModelSetup:
    """What the steps need to know about the model, fixed at start-up."""

    graphdef: Any
    mesh: jax.sharding.Mesh
    rules: sharding.LogicalRules
    expert_mass_shapes: dict[str, tuple[int, ...]]  # sown expert_mass entries and their shapes


def _split(model: nnx.Module):
    return nnx.split(model, nnx.Param, ...)


def group_labels(abstract_params: nnx.State) -> dict:
    """The optimizer group (``optim.param_group``) of every parameter, from its logical axes."""
    return _pure(jax.tree.map(lambda v: v.replace(optim.param_group(v.get_metadata().get("out_sharding"))),
                              abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def init_model_state(model_factory, vocab_size: int, seed: int, mesh, rules):
    """Builds the model with every variable created directly in its sharding.

    Returns (graphdef, params, model_state, param_shardings, model_state_shardings, group_labels).
    """
    def build():
        return model_factory(vocab_size, rngs=nnx.Rngs(params=seed))

    with nnx.logical_axis_rules(rules):
        abstract = nnx.eval_shape(build)
        graphdef, abs_params, abs_rest = _split(abstract)
        p_shard = _pure(sharding.state_shardings(abs_params, mesh, rules))
        r_shard = _pure(sharding.state_shardings(abs_rest, mesh, rules))

        def init():
            _, p, r = _split(build())
            return _pure(p), _pure(r)

        params, rest = jax.jit(init, out_shardings=(p_shard, r_shard))()
    return graphdef, params, rest, p_shard, r_shard, group_labels(abs_params)


def optimizer_shardings(tx: optax.GradientTransformation, params, param_shardings, mesh):
    """Shardings of the optimizer state: a leaf that mirrors a parameter (same key-path suffix and
    shape, e.g. Adam's mu/nu) gets that parameter's sharding, anything else is replicated.

    Letting the compiler choose from `jax.jit(tx.init)` replicates the moments, because
    `zeros_like(params)` carries no data dependence on the parameters' layout.
    """
    by_path = {}
    for (path, leaf), shard in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(param_shardings)):
        by_path[tuple(str(k) for k in path)] = (tuple(leaf.shape), shard)
    replicated = NamedSharding(mesh, P())

    def one(path, leaf):
        keys = tuple(str(k) for k in path)
        for n in range(len(keys)):
            hit = by_path.get(keys[n:])
            if hit is not None and hit[0] == tuple(leaf.shape):
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(one, jax.eval_shape(tx.init, params))


def probe_expert_mass(graphdef, params, model_state, seq_len: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the `expert_mass` entries the sparse layers sow (found by abstract evaluation)."""
    def run(params, model_state):
        model = nnx.merge(graphdef, params, model_state)
        tokens = jnp.zeros((1, seq_len), jnp.int32)
        batch = {"inputs": tokens, "positions": tokens, "segment_ids": tokens + 1}
        return apply_model(model, batch, train=False)[1]

    # Traced without the mesh: the shapes don't depend on it, and sharded layers (expert-
    # parallel MoE) would reject a one-sequence batch that cannot split over the mesh.
    strip = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t)  # noqa: E731
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
        out = jax.eval_shape(run, strip(params), strip(model_state))
    return {k: v.shape for k, v in out.items() if k.endswith("expert_mass")}


def create_train_state(model_factory, tx: optax.GradientTransformation, vocab_size: int, seq_len: int, seed: int,
                       mesh, rules) -> tuple[ModelSetup, TrainState, TrainState]:
    """(setup, state, state_shardings) with the optimizer state sharded like the parameters.

    A grouped optimizer (``optim.make_optimizer(param_groups=...)``) gets its parameter labels here.
    """
    graphdef, params, rest, p_shard, r_shard, labels = init_model_state(model_factory, vocab_size, seed, mesh, rules)
    optim.assign_groups(tx, labels)
    opt_shard = optimizer_shardings(tx, params, p_shard, mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_shard)(params)
    masses = probe_expert_mass(graphdef, params, rest, min(seq_len, 8))
    state = _assemble(params, rest, opt_state, masses, mesh,
                      lambda shape, dtype, s: jax.device_put(jnp.zeros(shape, dtype), s))
    shardings = jax.tree.map(lambda x: x.sharding, state)
    shardings["params"], shardings["model_state"] = p_shard, r_shard
    return ModelSetup(graphdef, mesh, rules, masses), state, shardings


def _assemble(params, model_state, opt_state, masses: dict, mesh, zeros) -> TrainState:
    """The train state pytree; `zeros(shape, dtype, sharding)` makes the step counter and the
    expert-mass accumulators (arrays, or ShapeDtypeStructs for an abstract state)."""
    replicated = NamedSharding(mesh, P())
    return {
        "params": params,
        "model_state": model_state,
        "opt_state": opt_state,
        "step": zeros((), jnp.int32, replicated),
        "expert_mass": {k: zeros(s, jnp.float32, replicated) for k, s in masses.items()},
    }


BATCH_KEYS = ("inputs", "targets", "weights", "segment_ids", "positions")


def abstract_train_state(model_factory, tx: optax.GradientTransformation, vocab_size: int, seq_len: int, mesh,
                         rules) -> tuple[ModelSetup, TrainState, TrainState]:
    """Like `create_train_state` but allocates nothing: (setup, ShapeDtypeStruct state, shardings).

    Used to restore a checkpoint straight into its shardings (eval, AOT compilation).
    """
    with nnx.logical_axis_rules(rules):
        abstract = nnx.eval_shape(lambda: model_factory(vocab_size, rngs=nnx.Rngs(0)))
        graphdef, abs_params, abs_rest = _split(abstract)
        p_shard = _pure(sharding.state_shardings(abs_params, mesh, rules))
        r_shard = _pure(sharding.state_shardings(abs_rest, mesh, rules))
    optim.assign_groups(tx, group_labels(abs_params))
    sds = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
    params = jax.tree.map(sds, _pure(abs_params), p_shard)
    rest = jax.tree.map(sds, _pure(abs_rest), r_shard)
    opt_shard = optimizer_shardings(tx, params, p_shard, mesh)
    opt_state = jax.tree.map(sds, jax.eval_shape(tx.init, params), opt_shard)
    masses = probe_expert_mass(graphdef, params, rest, min(seq_len, 8))
    state = _assemble(params, rest, opt_state, masses, mesh,
                      lambda shape, dtype, s: jax.ShapeDtypeStruct(shape, dtype, sharding=s))
    shardings = jax.tree.map(lambda x: x.sharding, state)
    return ModelSetup(graphdef, mesh, rules, masses), state, shardings


def batch_sharding(mesh, rules) -> NamedSharding:
    return NamedSharding(mesh, sharding.logical_to_spec(("batch", "length"), rules))


def _forward(setup: ModelSetup, params, model_state, batch, train: bool):
    model = nnx.merge(setup.graphdef, params, model_state)
    logits, inter = apply_model(model, batch, train)
    _, _, new_model_state = _split(model)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return ce, inter, _pure(new_model_state)


def make_train_step(setup: ModelSetup, tx: optax.GradientTransformation, grad_accum_steps: int = 1,
                    skip_nonfinite: bool = False):
    """step(state, batch) -> (state, metrics). batch arrays: [grad_accum·micro, T]."""

    def micro_loss(params, model_state, micro, total_tokens):
        ce, inter, new_ms = _forward(setup, params, model_state, micro, train=True)
        ce_sum = jnp.sum(ce * micro["weights"])
        aux = sum((v for k, v in inter.items() if k.endswith("aux_loss")), jnp.zeros((), jnp.float32))
        # The token-mean over the *whole* batch, so accumulated grads equal one big batch.
        loss = ce_sum / total_tokens + aux / grad_accum_steps
        return loss, (ce_sum, aux, inter, new_ms)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def step(state: TrainState, batch):
        total_tokens = jnp.maximum(jnp.sum(batch["weights"]), 1.0)
        micro = jax.tree.map(lambda x: x.reshape(grad_accum_steps, -1, *x.shape[1:]), batch)
        zeros_g = jax.tree.map(jnp.zeros_like, state["params"])

        def body(carry, mb):
            grads, model_state, ce_sum, aux, masses = carry
            (_, (ce_mb, aux_mb, inter, model_state)), g = grad_fn(state["params"], model_state, mb, total_tokens)
            masses = {k: masses[k] + inter[k] for k in masses}
            return (jax.tree.map(jnp.add, grads, g), model_state, ce_sum + ce_mb, aux + aux_mb, masses), {
                k: v for k, v in inter.items() if not k.endswith("expert_mass")}

        zero_mass = {k: jnp.zeros(s, jnp.float32) for k, s in setup.expert_mass_shapes.items()}
        init = (zeros_g, state["model_state"], jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zero_mass)
        (grads, model_state, ce_sum, aux, masses), per_micro = jax.lax.scan(body, init, micro)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        loss = ce_sum / total_tokens + aux / grad_accum_steps
        finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
        new = {
            "params": params,
            "model_state": model_state,
            "opt_state": opt_state,
            "step": state["step"] + 1,
            "expert_mass": {k: state["expert_mass"][k] + masses[k] for k in masses},
        }
        if skip_nonfinite:
            new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, {**state, "step": state["step"] + 1})
        metrics = {
            "loss": loss,
            "ce_loss": ce_sum / total_tokens,
            "aux_loss": aux / grad_accum_steps,
            "grad_norm": optax.tree.norm(grads),
            "param_norm": optax.tree.norm(state["params"]),
            "tokens": total_tokens,
            "finite": finite,
            **{k: jnp.mean(v) for k, v in per_micro.items()},
            **{k.replace("expert_mass", "batch_usage"): expert_stats.usage(m) for k, m in masses.items()},
            **{k.replace("expert_mass", "batch_unevenness"): expert_stats.unevenness(m) for k, m in masses.items()},
        }
        return new, metrics

    return step


def make_eval_step(setup: ModelSetup):
    """eval_step(params, model_state, batch) -> sums (loss, tokens, expert masses); uses running BN stats."""

    def step(params, model_state, batch):
        ce, inter, _ = _forward(setup, params, model_state, batch, train=False)
        w = batch["weights"]
        return {"loss_sum": jnp.sum(ce * w), "tokens": jnp.sum(w),
                **{k: v for k, v in inter.items() if k.endswith(("expert_mass", "expert_load"))}}

    return step


def jit_train_step(step_fn, state_shardings, setup: ModelSetup):
    batch_shardings = {k: batch_sharding(setup.mesh, setup.rules) for k in BATCH_KEYS}
    return jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings), out_shardings=(state_shardings, None),
                   donate_argnums=(0,))


def jit_eval_step(eval_fn, state_shardings, setup: ModelSetup):
    batch_shardings = {k: batch_sharding(setup.mesh, setup.rules) for k in BATCH_KEYS}
    return jax.jit(eval_fn, in_shardings=(state_shardings["params"], state_shardings["model_state"], batch_shardings))


def host_batch(batch: dict[str, np.ndarray], setup: ModelSetup, global_rows: int | None = None) -> dict[str, jax.Array]:
    """Places this process's block of a batch on the mesh (one process: a plain sharded device_put).

    With several processes `batch` holds this process's rows (see `multihost.batch_rows`) and
    `global_rows` is the global batch size.
    """
    data = batch_sharding(setup.mesh, setup.rules)
    if jax.process_count() == 1:
        return {k: jax.device_put(v, data) for k, v in batch.items()}
    return {k: jax.make_array_from_process_local_data(data, v, (global_rows or v.shape[0] * jax.process_count(),
                                                                *v.shape[1:]))
            for k, v in batch.items()}
