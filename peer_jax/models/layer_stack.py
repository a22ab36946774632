"""Layers as ``nnx.scan``: runs of identical blocks stacked along a leading 'layers' axis.

With ``Transformer(scan_layers=True)`` every maximal run of consecutive *ordinary* blocks (FFW
from ``Transformer.ffw``) becomes one ``Block`` whose parameters carry a leading axis of the
run's length (logical name ``layers``, replicated by every rules preset) and is applied with
``nnx.scan``, so the compiler sees one block body per run instead of one per layer (compile
time no longer grows with depth). The sparse blocks (``sparse_blocks``, e.g. PEER in the
middle) stay unscanned: they differ from their neighbours, sow expert statistics and keep
BatchNorm state. The paper layout, L blocks with the sparse one at L/2, is therefore
``scan(blocks 0..L/2-1) → sparse block L/2 → scan(blocks L/2+1..L-1)``.

Parameter tree (what checkpoints hold):

* unscanned: ``blocks/<i>/...`` for i in 0..L-1 (an ``nnx.List``);
* scanned:   ``stacks/<j>/...`` with a leading axis per run j, and the sparse blocks at the same
  paths as unscanned, ``blocks/<i>/...`` (an ``nnx.Dict`` keyed by ``str(i)``), so their
  metric names (``blocks/<i>/ffw/usage``) do not change.

A checkpoint of one layout cannot be restored into the other (orbax refuses: the trees
differ; ``training/checkpoint.py`` raises ``CheckpointError``). To switch, restore it with the
layout it was written in and convert with ``to_scanned`` / ``to_unscanned``; they map any tree
that mirrors the parameters (params, Adam's mu and nu, a whole train state). Initial values
do not depend on the layout: the blocks are built one by one, exactly as unscanned, then
stacked, so a seed gives the same model either way.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from peer_jax.models import remat as remat_lib

LAYERS_AXIS = "layers"


def plan(num_layers: int, sparse_blocks: Sequence[int]) -> tuple[tuple[str, int, int], ...]:
    """Execution order: ``("stack", j, first_layer, count)`` runs and ``("block", i)`` sparse
    blocks, as ``(kind, index, first, count)`` tuples (``count`` 1 for a block)."""
    out, j, i = [], 0, 0
    sparse = set(sparse_blocks)
    while i < num_layers:
        if i in sparse:
            out.append(("block", i, i, 1))
            i += 1
            continue
        start = i
        while i < num_layers and i not in sparse:
            i += 1
        out.append(("stack", j, start, i - start))
        j += 1
    return tuple(out)


def stack_modules(blocks: Sequence[nnx.Module]) -> nnx.Module:
    """One module whose every variable stacks the blocks' along a new leading 'layers' axis."""
    graphdef, _ = nnx.split(blocks[0])
    states = [nnx.state(b) for b in blocks]

    def stack(*vs):
        names = vs[0].get_metadata().get("out_sharding")
        meta = {"out_sharding": (LAYERS_AXIS, *names)} if names else {}
        return vs[0].replace(jnp.stack([v[...] for v in vs]), **meta)

    stacked = jax.tree.map(stack, *states, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, stacked)


def build(blocks: Sequence[nnx.Module], sparse_blocks: Sequence[int]):
    """(stacks, sparse blocks by str(index), plan) from the L blocks built unscanned."""
    steps = plan(len(blocks), sparse_blocks)
    for kind, _, first, count in steps:
        if kind == "stack":
            rest = nnx.state(blocks[first], nnx.Not(nnx.Param))
            if jax.tree.leaves(rest):
                raise ValueError("Transformer(scan_layers=True) stacks the blocks of `Transformer.ffw`, which must "
                                 "hold parameters only; this FFW keeps other state "
                                 f"({type(blocks[first].ffw).__name__}). Put it in `sparse_ffw` or scan_layers=False.")
    stacks = nnx.List([stack_modules(blocks[first:first + count]) for kind, _, first, count in steps
                       if kind == "stack"])
    sparse = nnx.Dict({str(i): blocks[i] for kind, i, _, _ in steps if kind == "block"})
    return stacks, sparse, steps


def scan_blocks(stack: nnx.Module, x, positions, segment_ids, mask, train: bool, policy: str):
    """Applies a stacked block to ``x`` layer by layer with ``nnx.scan`` (remat per layer)."""

    def body(x, block):
        y = block(x, positions, segment_ids, mask, train)
        if jax.tree.leaves(nnx.state(block, nnx.Intermediate)):
            raise ValueError("Transformer(scan_layers=True): a scanned block sowed intermediates (e.g. an MoE "
                             "aux loss); scanned blocks must not. Use sparse_ffw for such layers.")
        return y

    body = remat_lib.wrap(body, policy)
    scan = nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry,
                    transform_metadata={nnx.PARTITION_NAME: LAYERS_AXIS})
    return scan(x, stack)


def scan_decode(stack: nnx.Module, x, positions, segment_ids, k_cache, v_cache, cache_segment_ids, index):
    """``Block.decode`` of a stacked block, layer by layer over the stack and its cache slices
    ``[count, B, L, N, H]``: (x, k_cache, v_cache)."""

    def body(x, block, kc, vc):
        x, kc, vc = block.decode(x, positions, segment_ids, kc, vc, cache_segment_ids, index)
        return x, (kc, vc)

    scan = nnx.scan(body, in_axes=(nnx.Carry, 0, 0, 0), out_axes=(nnx.Carry, 0),
                    transform_metadata={nnx.PARTITION_NAME: LAYERS_AXIS})
    x, (k_cache, v_cache) = scan(x, stack, k_cache, v_cache)
    return x, k_cache, v_cache


# ----------------------------------------------------------------------------- checkpoint migration


def _is_unscanned_blocks(d) -> bool:
    return isinstance(d, dict) and "blocks" in d and "stacks" not in d and isinstance(d["blocks"], dict)


def _map_param_dicts(tree, fn):
    """Applies ``fn`` to every dict with a 'blocks' or 'stacks' entry (the model's params or a
    mirror of them)."""
    if isinstance(tree, dict):
        if "blocks" in tree or "stacks" in tree:
            return fn(tree)
        return {k: _map_param_dicts(v, fn) for k, v in tree.items()}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(_map_param_dicts(v, fn) for v in tree))
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map_param_dicts(v, fn) for v in tree)
    return tree


def _block(blocks: dict, i: int):
    return blocks[i] if i in blocks else blocks[str(i)]


def to_scanned(tree, num_layers: int, sparse_blocks: Sequence[int]):
    """An unscanned parameter tree (or any tree mirroring it) in the scanned layout."""
    steps = plan(num_layers, sparse_blocks)

    def one(d):
        if not _is_unscanned_blocks(d):
            raise ValueError("to_scanned: the tree is not in the unscanned layout (it has 'stacks').")
        blocks = d["blocks"]
        stacks, sparse = {}, {}
        for kind, j, first, count in steps:
            if kind == "stack":
                stacks[j] = jax.tree.map(lambda *xs: jnp.stack(xs), *[_block(blocks, i)
                                                                      for i in range(first, first + count)])
            else:
                sparse[str(j)] = _block(blocks, j)
        out = {k: v for k, v in d.items() if k != "blocks"}
        out["stacks"] = stacks
        if sparse:  # an empty nnx.Dict has no entry in the state
            out["blocks"] = sparse
        return out

    return _map_param_dicts(tree, one)


def to_unscanned(tree, num_layers: int, sparse_blocks: Sequence[int]):
    """The inverse of ``to_scanned``."""
    steps = plan(num_layers, sparse_blocks)

    def one(d):
        if "stacks" not in d:
            raise ValueError("to_unscanned: the tree is not in the scanned layout (no 'stacks').")
        blocks = {}
        for kind, j, first, count in steps:
            if kind == "stack":
                st = _block(d["stacks"], j)
                for n in range(count):
                    blocks[first + n] = jax.tree.map(lambda x, n=n: x[n], st)
            else:
                blocks[j] = _block(d.get("blocks", {}), j)
        out = {k: v for k, v in d.items() if k not in ("stacks", "blocks")}
        out["blocks"] = dict(sorted(blocks.items()))
        return out

    return _map_param_dicts(tree, one)
