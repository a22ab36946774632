"""Expert / memory tables ``[N, d_model]`` of PEER and PKM, and the one lookup both layers hold.

A layer describes its read-out as a *local* function over column slices,
``fn(x, tables, idx, scores, reduce) -> out``: ``x: [M, d']`` (or None), each table ``[N, d']``,
``idx, scores: [M, S]``, and ``reduce`` completing a sum whose terms are split over the column
slices (PEER's ``u_iᵀx``). ``TableLookup`` runs it on whatever layout the mesh and the logical
rules give, always as the same code:

* **single device** (no mesh, or the table columns are not split): ``fn`` on everything,
  ``reduce`` is the identity;
* **d-split** (Memory Layers at Scale, Berges et al. 2024): the columns (logical
  ``expert_embed``) are split over mesh axes that do *not* shard the tokens (``model`` in the
  default rules). Each device slices its columns out of its tokens' activations, gathers its
  column slice of every retrieved row, and ``reduce`` is a psum of the ``[tokens, h·k]``
  partial dot products (PKM needs none);
* **memory-parallel**: the columns are also split over mesh axes that shard the tokens
  (``expert`` in the ``memory_parallel`` rules: the group is ``model × expert``). Inside the same
  ``jax.shard_map`` the group's routing (indices, scores) is all-gathered over those axes, the
  activations go by all-to-all from token shards to column slices, every device runs ``fn`` over
  all tokens of its group on its column slice, and the output goes back by the inverse
  all-to-all. The table never moves: what crosses devices scales with tokens·h·k and
  tokens·d/group, not with N·d.

Tables are replicated over the mesh axes their rows are not split over; a table gradient is then
summed over those replicas (the transpose of the ``pcast`` that marks the table as varying with
the tokens). ``grad_reduce_dtype`` (e.g. bfloat16) runs that sum in a narrower dtype. If the rules
split the rows (logical ``expert_rows``: ``fsdp_expert_tables``, ``memory_parallel_fsdp``), the
shard_map's in_specs make the compiler all-gather them first and reduce-scatter their gradient.

Why columns and not rows: splitting the expert axis would send each token to the devices owning
its h·k experts, an all-to-all of d-sized vectors whose destinations are data-dependent and, with
10⁶ experts and 128 random picks per token, reach every device.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from peer_jax import sharding as shd

TABLE_AXES = ("expert_rows", "expert_embed")

Reduce = Callable[[jax.Array], jax.Array]
LocalFn = Callable[[jax.Array | None, tuple[jax.Array, ...], jax.Array, jax.Array, Reduce], jax.Array]


def default_table_init(d_model: int):
    """N(0, 1/d): ``u_iᵀx`` has unit scale for a unit-variance (pre-normed) input, so σ starts in
    its non-linear range; as output rows, each entry is O(1/√d) and with router weights summing
    to one per head the layer output starts small, like a residual branch should. (The PEER paper
    gives no initialiser; Lample et al. use N(0, d^-0.5) for PKM values.)"""
    return jax.nn.initializers.normal(stddev=1.0 / math.sqrt(d_model))


def table(key: jax.Array, init, num_experts: int, d_model: int, param_dtype) -> nnx.Param:
    """One ``[num_experts, d_model]`` table parameter with the column-split logical axes."""
    return nnx.Param(init(key, (num_experts, d_model), param_dtype), out_sharding=TABLE_AXES)


def _axes_tuple(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _entry(axes: Sequence[str]):
    return None if not axes else (axes[0] if len(axes) == 1 else tuple(axes))


def _fit(axes: Sequence[str], dim: int, mesh) -> tuple[str, ...]:
    """Drops trailing mesh axes until their product divides ``dim``."""
    axes = tuple(axes)
    while axes and dim % math.prod(mesh.shape[a] for a in axes):
        axes = axes[:-1]
    return axes


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the tokens and the table columns of one lookup live (mesh axis names).

    ``columns`` split the table columns, in their major-to-minor order; ``gathered`` are those
    of them that also shard the tokens (the memory-parallel axes, always the minor ones);
    ``batch`` / ``length`` shard the tokens' batch and sequence dims.
    """

    columns: tuple[str, ...]
    gathered: tuple[str, ...]
    batch: tuple[str, ...]
    length: tuple[str, ...]

    @property
    def sliced(self) -> tuple[str, ...]:
        """Column axes over which the tokens are replicated (sliced locally, no transfer)."""
        return tuple(a for a in self.columns if a not in self.gathered)

    @property
    def all_axes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.batch + self.length + self.columns))

    def specs(self):
        """(activation spec, routing spec, table spec) of the lookup's shard_map."""
        b, t = _entry(self.batch), _entry(self.length)
        return P(b, t, _entry(self.sliced)), P(b, t, None), P(None, _entry(self.columns))


def layout(owner: str, d_model: int, b: int, t: int) -> Layout | None:
    """The layout of a ``[b, t]`` lookup under the mesh and rules in context; None = one device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    rules = shd.current_rules() or shd.RULES_DEFAULT
    columns = shd.mesh_axes("expert_embed", mesh, rules)
    columns = tuple(a for a in columns if mesh.shape[a] > 1)
    if not columns:
        return None
    size = math.prod(mesh.shape[a] for a in columns)
    if d_model % size:
        raise ValueError(
            f"{owner} d_model={d_model} is not divisible by the size {size} of mesh axes {columns} that "
            f"split the expert tables along d_model (logical 'expert_embed'); change the mesh or set "
            f"{owner}(sharded_lookup=False)."
        )
    tok = shd.logical_to_spec(("batch", "length"), rules)
    batch = _fit(_axes_tuple(tok[0]), b, mesh)
    gathered = tuple(a for a in columns if a in batch)
    # Tokens gathered over an axis end up sliced along the minor column positions of that axis,
    # so those axes must be the minor end of the column split.
    if columns[len(columns) - len(gathered):] != gathered:
        raise ValueError(
            f"{owner}: the sharding rule expert_embed={columns} lists a batch-sharding mesh axis "
            f"({', '.join(gathered)}) before one that does not shard the batch; order it with the "
            f"batch-sharding axes last, e.g. ('model', 'expert')."
        )
    length = _fit(tuple(a for a in _axes_tuple(tok[1]) if a not in columns + batch), t, mesh)
    return Layout(columns, gathered, batch, length)


def _vary_reduced(x: jax.Array, axes: Sequence[str], reduce_dtype) -> jax.Array:
    """``sharding.vary`` whose transpose (the sum of ``x``'s gradient over ``axes``) runs in
    ``reduce_dtype``; None keeps ``x``'s dtype."""
    missing = tuple(a for a in axes if a not in shd.varying_axes(x))
    if reduce_dtype is None or not missing or jnp.dtype(reduce_dtype) == x.dtype:
        return shd.vary(x, axes)

    @jax.custom_vjp
    def cast_vary(t):
        return jax.lax.pcast(t, missing, to="varying")

    def fwd(t):
        return cast_vary(t), None

    def bwd(_, ct):
        return (jax.lax.psum(ct.astype(reduce_dtype), missing).astype(x.dtype),)

    cast_vary.defvjp(fwd, bwd)
    return shd.vary(cast_vary(x), axes)


@dataclasses.dataclass(frozen=True)
class TableLookup:
    """The lookup a PEER or PKM layer holds: runs its local read-out on the current layout.

    Args:
      owner: the layer's name, for error messages.
      d_model: table width.
      sharded: False keeps the single-device computation under any mesh (the compiler then
        partitions it along the batch).
      grad_reduce_dtype: dtype of the table-gradient sum over table replicas (None: the table's).
    """

    owner: str
    d_model: int
    sharded: bool = True
    grad_reduce_dtype: str | None = None

    def __call__(self, fn: LocalFn, tables: Sequence[jax.Array], idx: jax.Array, scores: jax.Array,
                 x: jax.Array | None = None, out_dtype=None) -> jax.Array:
        """``[B, T, d]`` in ``out_dtype`` (default: what ``fn`` returns) from ``idx, scores: [B, T, S]``
        and ``x: [B, T, d]`` (or None). The cast happens before the output leaves the device
        (memory-parallel: half the bytes of the return all-to-all for bfloat16)."""
        b, t, s = idx.shape
        lay = layout(self.owner, self.d_model, b, t) if self.sharded else None
        if lay is None:
            flat = None if x is None else x.reshape(b * t, -1)
            out = fn(flat, tuple(tables), idx.reshape(b * t, s), scores.reshape(b * t, s), lambda a: a)
            return out.reshape(b, t, -1).astype(out_dtype or out.dtype)
        return self._sharded(fn, lay, tables, idx, scores, x, out_dtype)

    def local_tokens(self, b: int, t: int) -> int:
        """How many tokens ``fn`` sees per call (its ``idx.shape[0]``) for a ``[b, t]`` lookup:
        all of them on one device, else one device's tokens plus those gathered from its
        memory-parallel group."""
        lay = layout(self.owner, self.d_model, b, t) if self.sharded else None
        if lay is None:
            return b * t
        shape = jax.sharding.get_abstract_mesh().shape
        size = lambda axes: math.prod(shape[a] for a in axes)  # noqa: E731
        return b // size(lay.batch) * size(lay.gathered) * (t // size(lay.length))

    def _sharded(self, fn: LocalFn, lay: Layout, tables, idx, scores, x, out_dtype) -> jax.Array:
        mesh = jax.sharding.get_abstract_mesh()
        x_spec, route_spec, table_spec = lay.specs()
        sizes = [mesh.shape[a] for a in lay.gathered]
        all_axes, reduce_dtype = lay.all_axes, self.grad_reduce_dtype

        def local(tables, idx, scores, *xs):
            x = xs[0] if xs else None
            lb, lt, s = idx.shape
            for a in lay.gathered:  # the group's routing, stacked along the batch in axis order
                idx = jax.lax.all_gather(idx, a, axis=0, tiled=True)
                scores = jax.lax.all_gather(scores, a, axis=0, tiled=True)
            m = idx.shape[0] * lt
            if x is not None:
                # [lb, lt, d_sliced] -> this device's column slice of every token of its group.
                x = x.reshape(lb, lt, *sizes, -1)
                for i, a in enumerate(lay.gathered):
                    x = jax.lax.all_to_all(x, a, split_axis=2 + i, concat_axis=0, tiled=True)
                x = shd.vary(x.reshape(m, -1), all_axes)
            tables = tuple(_vary_reduced(tb, all_axes, reduce_dtype) for tb in tables)
            out = fn(x, tables, shd.vary(idx.reshape(m, s), all_axes), shd.vary(scores.reshape(m, s), all_axes),
                     lambda a: jax.lax.psum(a, lay.columns))
            out = out.astype(out_dtype or out.dtype).reshape(idx.shape[0], lt, *([1] * len(sizes)), -1)
            for i, a in reversed(list(enumerate(lay.gathered))):  # back to the token shards
                out = jax.lax.all_to_all(out, a, split_axis=0, concat_axis=2 + i, tiled=True)
            return out.reshape(lb, lt, -1)

        xs = () if x is None else (x,)
        fn_sm = jax.shard_map(
            local,
            in_specs=(tuple(table_spec for _ in tables), route_spec, route_spec) + ((x_spec,) if xs else ()),
            out_specs=x_spec,
        )
        return fn_sm(tuple(tables), idx, scores, *xs)
