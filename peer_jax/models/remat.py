"""Rematerialisation policies for transformer blocks, by MaxText-style names.

``Transformer.remat`` takes one of these names (or True = 'full', False = 'none'); the policy
decides which intermediates of a block's forward pass are kept for the backward pass (the rest
are recomputed). Recomputation is hardware work, not model FLOPs (see ``peer_jax/flops.py``).

============== ==================================================================================
none           no remat: everything the backward pass needs is kept (most memory, no recompute)
full           keep only the block's inputs; recompute the whole block (least memory)
minimal        MaxText's 'minimal': keep the outputs of matmuls without batch dimensions, i.e.
               the weight matmuls (q/k/v, out, FFW); recompute elementwise ops and the
               attention score/value products (``checkpoint_dots_with_no_batch_dims``)
dots           keep every matmul output, attention scores included (``dots_saveable``)
save_qkv_proj  keep only the q/k/v projection ('qkv_proj', tagged in ``layers/attention.py``)
save_out_proj  keep only the attention output projection ('out_proj')
============== ==================================================================================
"""

from __future__ import annotations

import jax

_cp = jax.checkpoint_policies

POLICIES = {
    "none": None,
    "full": None,
    "minimal": _cp.checkpoint_dots_with_no_batch_dims,
    "dots": _cp.dots_saveable,
    "save_qkv_proj": _cp.save_only_these_names("qkv_proj"),
    "save_out_proj": _cp.save_only_these_names("out_proj"),
}


def resolve(remat: bool | str) -> str:
    """The policy name ``remat`` stands for (True → 'full', False/None → 'none')."""
    if remat is True:
        return "full"
    if remat is False or remat is None:
        return "none"
    if remat not in POLICIES:
        raise ValueError(f"Transformer.remat={remat!r} is unknown; use True, False or one of {list(POLICIES)}.")
    return remat


def wrap(fn, name: str, **kw):
    """``fn`` under ``nnx.remat`` with policy ``name`` (``fn`` itself for 'none')."""
    from flax import nnx

    if name == "none":
        return fn
    return nnx.remat(fn, policy=POLICIES[name], **kw)
