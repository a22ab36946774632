"""Expert / memory tables ``[N, d_model]`` of PEER and PKM and their d-split sharded lookup.

Sharding (Memory Layers at Scale, Berges et al. 2024): under a mesh whose ``model`` axis has
size > 1, the tables are split along **d_model** (logical ``expert_embed``), not along experts.
Inside ``jax.shard_map`` every device gathers *its d-slice* of every retrieved row for *its*
tokens, so every gather is local and every device equally loaded whichever experts were picked;
what crosses devices depends only on the layer (PEER: a psum of ``[tokens, h·k]`` scalars; PKM:
nothing). Sharding the expert axis instead would route each token to the devices owning its
h·k experts: an all-to-all of d-sized token vectors whose destinations are data-dependent and,
with 10⁶ experts and h·k = 128 random picks, effectively hit every device. If the rules also
shard the expert rows (logical ``expert_rows``: over ``expert`` by default, over ``expert`` and
``data`` in the ``fsdp_expert_tables`` preset), the shard_map's in_specs make the compiler
all-gather those rows first (FSDP style; the backward pass reduce-scatters the gradient).

Outside a mesh, or when the mesh axes the rules assign to ``expert_embed`` have size 1, the
layers use their single-device computation and the compiler partitions it along the batch.
"""

from __future__ import annotations

import math

import jax
from flax import nnx
from jax.sharding import PartitionSpec as P

from peer_jax import sharding as shd

TABLE_AXES = ("expert_rows", "expert_embed")


def default_table_init(d_model: int):
    """N(0, 1/d): ``u_iᵀx`` has unit scale for a unit-variance (pre-normed) input, so σ starts in
    its non-linear range; as output rows, each entry is O(1/√d) and with router weights summing
    to one per head the layer output starts small, like a residual branch should. (The PEER paper
    gives no initialiser; Lample et al. use N(0, d^-0.5) for PKM values.)"""
    return jax.nn.initializers.normal(stddev=1.0 / math.sqrt(d_model))


def table(key: jax.Array, init, num_experts: int, d_model: int, param_dtype) -> nnx.Param:
    """One ``[num_experts, d_model]`` table parameter with the d-split logical axes."""
    return nnx.Param(init(key, (num_experts, d_model), param_dtype), out_sharding=TABLE_AXES)


def _axes_tuple(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _fit(entry, dim: int, mesh) -> str | tuple[str, ...] | None:
    """Drops trailing mesh axes from a spec entry until their product divides ``dim``."""
    axes = _axes_tuple(entry)
    while axes and dim % math.prod(mesh.shape[a] for a in axes):
        axes = axes[:-1]
    return None if not axes else (axes[0] if len(axes) == 1 else axes)


def lookup_axes(owner: str, d_model: int, sharded_lookup: bool) -> tuple[tuple[str, ...], shd.LogicalRules] | None:
    """(mesh axes that split d_model of the tables, rules), or None for the single-device path."""
    if not sharded_lookup:
        return None
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    rules = shd.current_rules() or shd.RULES_DEFAULT
    axes = shd.mesh_axes("expert_embed", mesh, rules)
    size = math.prod(mesh.shape[a] for a in axes)
    if size == 1:
        return None
    if d_model % size:
        raise ValueError(
            f"{owner} d_model={d_model} is not divisible by the size {size} of mesh axes "
            f"{axes} that shard the expert tables along d_model; change the mesh or set "
            f"{owner}(sharded_lookup=False)."
        )
    return axes, rules


def lookup_specs(b: int, t: int, model_axes: tuple[str, ...], rules):
    """(activation spec, routing spec, table spec, all axes) of the d-split shard_map."""
    mesh = jax.sharding.get_abstract_mesh()
    tok_spec = shd.logical_to_spec(("batch", "length"), rules)
    # Axes already used for d may not shard tokens too; also require even splits.
    batch_e = _fit(tuple(a for a in _axes_tuple(tok_spec[0]) if a not in model_axes), b, mesh)
    length_e = _fit(
        tuple(a for a in _axes_tuple(tok_spec[1]) if a not in model_axes + _axes_tuple(batch_e)), t, mesh
    )
    model_e = model_axes[0] if len(model_axes) == 1 else model_axes
    token_axes = _axes_tuple(batch_e) + _axes_tuple(length_e)
    all_axes = token_axes + model_axes
    return P(batch_e, length_e, model_e), P(batch_e, length_e, None), P(None, model_e), all_axes
