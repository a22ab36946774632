"""Mesh construction and the logical-axis vocabulary.

Every parameter carries *logical* axis names (``out_sharding=("embed", "mlp")``); a rules
table, plain data, maps each logical name to a mesh axis (or to nothing = replicated). The
mesh always has the three axes of ``MESH_AXES``; unused ones have size 1, so the same rules
work on one CPU and on a pod.

Logical names used by the layers:

=============  ===============================================================
batch          examples in a batch (activations)
length         sequence positions (activations)
embed          d_model of weights and activations
heads, kv      attention heads and head dim
mlp            hidden dim of dense FFWs (and of each MoE expert)
vocab          vocabulary
experts        the expert axis of MoE expert weights
expert_rows    the rows (experts / memories) of PEER and PKM tables
expert_embed   d_model of PEER/PKM expert tables (the Memory-Layers-at-Scale split)
layers         the leading axis of scanned (stacked) blocks; replicated
keys, key_dim  product sub-keys and query dim
=============  ===============================================================
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as core_spmd
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "expert", "model")

LogicalRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# Data parallel everywhere, tensor parallel over `model`, expert tables over `model` along
# d_model (see layers/peer.py for why), MoE experts over `expert`.
RULES_DEFAULT: LogicalRules = (
    ("batch", ("data", "expert")),
    ("length", None),
    ("embed", None),
    ("heads", "model"),
    ("kv", None),
    ("mlp", "model"),
    ("vocab", "model"),
    ("experts", "expert"),
    ("expert_rows", "expert"),
    ("expert_embed", "model"),
    ("moe_mlp", "model"),
    ("keys", None),
    ("key_dim", None),
    ("layers", None),
)

# Pure data parallelism: every weight replicated (the single-host baseline).
RULES_DATA_PARALLEL: LogicalRules = tuple(
    (name, ("data", "expert", "model") if name == "batch" else None)
    for name, _ in RULES_DEFAULT
)

# Fully sharded data parallel: weights sharded over `data` on their embed axis as well.
RULES_FSDP: LogicalRules = tuple(
    (name, "data") if name == "embed" else (name, axes) for name, axes in RULES_DEFAULT
)

# The default, plus the rows of PEER/PKM tables split over `data` (and `expert`): the tables
# and their Adam moments (sharded like their parameter, step.optimizer_shardings) are stored
# once per model-parallel group instead of once per data-parallel device. d_model stays over
# `model`; the lookup's shard_map all-gathers the rows of its d-slice over `data` in the
# forward pass and reduce-scatters the table gradient in the backward (FSDP for the tables).
RULES_FSDP_EXPERT_TABLES: LogicalRules = tuple(
    (name, ("expert", "data")) if name == "expert_rows" else (name, axes) for name, axes in RULES_DEFAULT
)

# Memory-parallel PEER/PKM tables (layers/expert_tables.py): the columns of every table split over
# the `model` × `expert` group (PEER/PKM models have no MoE layer, so `expert` is free), its rows
# replicated over `data`. The batch stays over (`data`, `expert`): inside the lookup the tokens'
# activations and routing go to the column slices, and the tables never move.
RULES_MEMORY_PARALLEL: LogicalRules = tuple(
    (name, {"expert_rows": None, "expert_embed": ("model", "expert")}.get(name, axes)) for name, axes in RULES_DEFAULT
)

# The same with the table rows (and their Adam moments) split over `data` too, stored once per
# pod instead of once per group: all-gathered for the lookup, their gradient reduce-scattered.
RULES_MEMORY_PARALLEL_FSDP: LogicalRules = tuple(
    (name, "data") if name == "expert_rows" else (name, axes) for name, axes in RULES_MEMORY_PARALLEL
)

RULE_PRESETS: dict[str, LogicalRules] = {
    "default": RULES_DEFAULT,
    "data_parallel": RULES_DATA_PARALLEL,
    "fsdp": RULES_FSDP,
    "fsdp_expert_tables": RULES_FSDP_EXPERT_TABLES,
    "memory_parallel": RULES_MEMORY_PARALLEL,
    "memory_parallel_fsdp": RULES_MEMORY_PARALLEL_FSDP,
}


def get_rules(preset: str | LogicalRules) -> LogicalRules:
    if isinstance(preset, str):
        if preset not in RULE_PRESETS:
            raise ValueError(
                f"sharding rules preset {preset!r} is unknown; set TrainConfig.sharding_rules to one of "
                f"{sorted(RULE_PRESETS)} or to a tuple of (logical_name, mesh_axes) pairs."
            )
        return RULE_PRESETS[preset]
    return tuple(tuple(r) for r in preset)  # type: ignore[return-value]


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Fill in one ``-1`` entry and check the product equals the number of devices."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(
            f"mesh_shape={shape} must have {len(MESH_AXES)} entries, one per axis {MESH_AXES}; "
            "use 1 for unused axes and -1 for 'all remaining devices'."
        )
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh_shape={shape}: entries must be positive, with at most one -1.")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(
                f"mesh_shape={shape} cannot use {num_devices} devices{_pod_devices()}: {num_devices} is not "
                f"divisible by {known}. Change TrainConfig.mesh_shape."
            )
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(
            f"mesh_shape={shape} (axes {MESH_AXES}) needs {math.prod(shape)} devices but "
            f"{num_devices} are available{_pod_devices()}. Change TrainConfig.mesh_shape (e.g. use -1 for data)."
        )
    return shape


def _pod_devices() -> str:
    """' (N processes × M devices)' on a multi-host run, else ''."""
    if jax.process_count() == 1:
        return ""
    return f" ({jax.process_count()} processes × {jax.local_device_count()} devices)"


def make_mesh(
    mesh_shape: Sequence[int] = (-1, 1, 1),
    devices: Sequence[jax.Device] | None = None,
    axis_type: AxisType = AxisType.Auto,
) -> Mesh:
    """Builds the (data, expert, model) mesh with explicit axis types.

    Axes are `Auto`: the compiler propagates shardings from the parameter and batch
    annotations, and the layers that need explicit communication use `jax.shard_map`.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(mesh_shape, len(devices))
    if len(devices) == len(jax.devices()) and devices == list(jax.devices()):
        return physical_mesh(shape, devices, axis_type)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(axis_type,) * len(MESH_AXES))


def physical_mesh(shape: Sequence[int], devices: Sequence[jax.Device], axis_type: AxisType = AxisType.Auto) -> Mesh:
    """`jax.make_mesh` over `devices` (axes laid out along the physical torus), or, where an
    axis is no product of whole physical axes (`model` = 2 on a v5p 4x4x4 slice, whose axes
    are 4 long), the same with physical axes split (`allow_split_physical_axes`): such an axis
    then spans neighbouring chips along one physical axis."""
    types = (axis_type,) * len(MESH_AXES)
    try:
        return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=types, devices=list(devices))
    except NotImplementedError:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(tuple(shape), list(devices), allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=types)


def logical_to_spec(logical: Sequence[str | None], rules: LogicalRules) -> P:
    """Maps a tuple of logical axis names to a PartitionSpec (unknown names → replicated)."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in logical:
        axes = table.get(name) if name is not None else None
        if axes is None:
            out.append(None)
            continue
        axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
        axes_t = tuple(a for a in axes_t if a not in used)  # a mesh axis may appear once
        used.update(axes_t)
        out.append(axes_t[0] if len(axes_t) == 1 else (axes_t or None))
    return P(*out)


def state_shardings(abstract_state, mesh: Mesh, rules: LogicalRules):
    """NamedShardings for an nnx.State whose Variables carry `out_sharding` logical names."""

    def one(v):
        names = v.get_metadata().get("out_sharding") if isinstance(v, nnx.Variable) else None
        spec = logical_to_spec(names, rules) if names else P()
        return v.replace(NamedSharding(mesh, spec)) if isinstance(v, nnx.Variable) else NamedSharding(mesh, spec)

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def current_rules() -> LogicalRules:
    """The rules set by `nnx.logical_axis_rules(...)` around tracing (empty outside)."""
    return tuple(core_spmd.get_logical_axis_rules() or ())


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation by logical names; a no-op outside a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = current_rules()
    if not rules or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical, rules))


def mesh_axes(logical: str, mesh=None, rules: LogicalRules | None = None) -> tuple[str, ...]:
    """Mesh axes the rules assign to one logical name, restricted to the axes ``mesh`` has.

    ``mesh`` defaults to the (abstract) mesh in context and ``rules`` to the rules in context,
    or ``RULES_DEFAULT`` when none are set. Empty outside a mesh.
    """
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh.empty:
        return ()
    entry = logical_to_spec((logical,), rules or current_rules() or RULES_DEFAULT)[0]
    axes = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
    return tuple(a for a in axes if a in mesh.axis_names)


def data_parallel_size(mesh=None, rules: LogicalRules | None = None) -> int:
    """How many ways ``mesh`` and ``rules`` split the batch: the product of the sizes of the
    mesh axes mapped to logical ``batch`` (1 outside a mesh). Defaults as in ``mesh_axes``."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    return math.prod(mesh.shape[a] for a in mesh_axes("batch", mesh, rules))


def varying_axes(x: jax.Array) -> frozenset:
    """Manual mesh axes ``x`` varies over inside ``jax.shard_map`` (empty outside)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)
    if mat is not None:  # jax ≥ 0.9 spelling
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()))


def vary(x: jax.Array, axes: Sequence[str]) -> jax.Array:
    """Marks ``x`` as varying over ``axes`` inside shard_map (its transpose is a psum)."""
    have = varying_axes(x)
    missing = tuple(a for a in axes if a not in have)
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def vary_like(x: jax.Array, *refs: jax.Array) -> jax.Array:
    """Casts ``x`` to vary over every manual mesh axis any of ``refs`` varies over.

    Outside ``jax.shard_map`` all vma sets are empty and this is the identity. Inside, fresh
    constants (loop-carry zeros) are invariant while loop bodies produce varying values, and
    ``lax.scan`` requires carry types to match.
    """
    want = frozenset().union(*(varying_axes(r) for r in refs))
    missing = tuple(sorted(want - varying_axes(x)))
    return jax.lax.pcast(x, missing, to="varying") if missing else x
