"""Functional train/eval steps over an explicit, sharded train state.

The NNX model is split once into a static `graphdef` and pure-dict states. A train state is
the pytree `{"params", "model_state", "opt_state", "step", "expert_mass"}` where
`model_state` holds non-trainable variables (query-BN running statistics) and `expert_mass`
accumulates router-score mass per expert for every PEER/PKM layer between log steps.
Parameters are created already sharded: the initialiser is jitted with `out_shardings`
derived from the logical axis names on each variable (`train_state_spec`).
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


def optimizer_shardings(opt_state, params, param_shardings, mesh):
    """Shardings of the optimizer state (`opt_state`: its shapes): a leaf that mirrors a
    parameter (same key-path suffix and shape, e.g. Adam's mu/nu) gets that parameter's
    sharding, anything else is replicated.

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

    return jax.tree_util.tree_map_with_path(one, opt_state)


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


@dataclasses.dataclass(frozen=True)
class StateSpec:
    """A train state described before it exists.

    `abstract` is the state as ShapeDtypeStructs carrying their shardings (what a checkpoint
    is restored into, and what an ahead-of-time compile lowers against); `init()` creates the
    real state, every array directly in its sharding (a jitted initialiser with
    `out_shardings`); `labels` is each parameter's optimizer group.
    """

    setup: ModelSetup
    abstract: TrainState
    shardings: TrainState
    labels: dict
    init: Any


def train_state_spec(model_factory, tx: optax.GradientTransformation, vocab_size: int, seq_len: int, seed: int,
                     mesh, rules) -> StateSpec:
    """The train state of `model_factory(vocab_size)` and `tx`, with parameters initialised from
    `seed` and the optimizer state sharded like the parameters.

    One initialiser defines the state: `jax.eval_shape` of it gives the shapes, the logical axis
    names on the model's variables the shardings, and the same initialiser jitted with those
    `out_shardings` the arrays. A grouped optimizer (``optim.make_optimizer(param_groups=...)``)
    gets its parameter labels here, before the optimizer first sees the parameters.
    """
    def build_model():
        return model_factory(vocab_size, rngs=nnx.Rngs(params=seed))

    with nnx.logical_axis_rules(rules):
        graphdef, abs_params, abs_rest = _split(nnx.eval_shape(build_model))
        p_shard = _pure(sharding.state_shardings(abs_params, mesh, rules))
        r_shard = _pure(sharding.state_shardings(abs_rest, mesh, rules))
    labels = group_labels(abs_params)
    optim.assign_groups(tx, labels)
    masses = probe_expert_mass(graphdef, _pure(abs_params), _pure(abs_rest), min(seq_len, 8))

    def init() -> TrainState:
        with nnx.logical_axis_rules(rules):
            _, params, rest = _split(build_model())
        params, rest = _pure(params), _pure(rest)
        return {
            "params": params,
            "model_state": rest,
            "opt_state": tx.init(params),
            "step": jnp.zeros((), jnp.int32),
            "expert_mass": {k: jnp.zeros(s, jnp.float32) for k, s in masses.items()},
        }

    shapes = jax.eval_shape(init)
    replicated = NamedSharding(mesh, P())
    shardings = {
        "params": p_shard,
        "model_state": r_shard,
        "opt_state": optimizer_shardings(shapes["opt_state"], shapes["params"], p_shard, mesh),
        "step": replicated,
        "expert_mass": {k: replicated for k in masses},
    }
    sds = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
    abstract = {k: jax.tree.map(sds, shapes[k], shardings[k]) for k in shardings}  # keys in the order above
    return StateSpec(ModelSetup(graphdef, mesh, rules, masses), abstract, shardings, labels,
                     jax.jit(init, out_shardings=shardings))


def create_train_state(model_factory, tx: optax.GradientTransformation, vocab_size: int, seq_len: int, seed: int,
                       mesh, rules) -> tuple[ModelSetup, TrainState, TrainState]:
    """(setup, state, state_shardings): `train_state_spec`'s state, created."""
    spec = train_state_spec(model_factory, tx, vocab_size, seq_len, seed, mesh, rules)
    return spec.setup, spec.init(), spec.shardings


def abstract_train_state(model_factory, tx: optax.GradientTransformation, vocab_size: int, seq_len: int, mesh,
                         rules) -> tuple[ModelSetup, TrainState, TrainState]:
    """(setup, ShapeDtypeStruct state, shardings): `train_state_spec`'s state, nothing allocated."""
    spec = train_state_spec(model_factory, tx, vocab_size, seq_len, 0, mesh, rules)
    return spec.setup, spec.abstract, spec.shardings


BATCH_KEYS = ("inputs", "targets", "weights", "segment_ids", "positions")


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

    With several processes `batch` holds this process's rows (see `multihost.process_row_block`) and
    `global_rows` is the global batch size.
    """
    data = batch_sharding(setup.mesh, setup.rules)
    if jax.process_count() == 1:
        return {k: jax.device_put(v, data) for k, v in batch.items()}
    return {k: jax.make_array_from_process_local_data(data, v, (global_rows or v.shape[0] * jax.process_count(),
                                                                *v.shape[1:]))
            for k, v in batch.items()}
