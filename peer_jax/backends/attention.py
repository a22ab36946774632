"""The attention kernel seam: XLA's ``jax.nn.dot_product_attention`` (every platform, the
reference) or the Pallas TPU **splash** attention kernel.

``Attention(impl=...)`` (``layers/attention.py``) calls ``attend``; the layer reads the same on
every platform. Implementations:

* ``xla``: ``jax.nn.dot_product_attention(is_causal=True)`` with a segment mask. XLA
  materialises the ``[B, N, T, T]`` scores (and their gradient) and computes the full square.
* ``splash``: ``jax.experimental.pallas.ops.tpu.splash_attention``: block-sparse flash
  attention that never materialises T×T and skips the blocks above the causal diagonal (and,
  with packed segments, nothing more: segment masking is applied inside the blocks it visits).
  Runs on TPU; anywhere else it runs in Pallas *interpret* mode (slow, for correctness tests).
  Under a mesh it is wrapped in ``jax.shard_map`` over the mesh axes the rules give to
  ``batch`` and ``heads`` (a Pallas call cannot be partitioned by the compiler), so heads
  sharded over ``model`` and batch over ``data`` need no communication.
* ``auto`` (default): ``splash`` when compiling for TPU and the sequence length is a multiple
  of 128 (the kernel's smallest block), else ``xla``. CPU runs therefore keep the XLA path
  bit for bit.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from peer_jax import backends
from peer_jax import sharding as shd

IMPLS = ("auto", "xla", "splash")
SPLASH_MIN_BLOCK = 128
SPLASH_BLOCKS = (512, 256, 128)  # the largest that divides T is used for every block size


def resolve(impl: str, seq_len: int) -> str:
    """The implementation ``impl`` stands for at this sequence length on this platform."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl={impl!r} is unknown; use one of {list(IMPLS)}.")
    if impl == "auto":
        return "splash" if backends.platform() == "tpu" and seq_len % SPLASH_MIN_BLOCK == 0 else "xla"
    if impl == "splash" and seq_len % SPLASH_MIN_BLOCK:
        raise ValueError(f"attention impl='splash' needs a sequence length that is a multiple of "
                         f"{SPLASH_MIN_BLOCK}; got {seq_len}. Use impl='auto' or 'xla'.")
    return impl


def segment_mask(segment_ids: jax.Array | None) -> jax.Array | None:
    """``[B, 1, T, T]`` same-segment mask. Padding (segment 0) attends to padding, so no row
    is fully masked; its outputs never reach the loss."""
    if segment_ids is None:
        return None
    return segment_ids[:, None, :, None] == segment_ids[:, None, None, :]


def xla_attention(q, k, v, segment_ids):
    """Reference: q, k, v ``[B, T, N, H]`` → ``[B, T, N, H]``, causal within segments."""
    return jax.nn.dot_product_attention(q, k, v, mask=segment_mask(segment_ids), is_causal=True)


def cached_attention(q, k_cache, v_cache, segment_ids, cache_segment_ids, index):
    """``xla_attention`` for T queries at columns ``index .. index+T-1`` of a KV cache.

    q ``[B, T, N, H]``; k/v_cache ``[B, L, N, H]``; segment_ids ``[B, T]`` and
    cache_segment_ids ``[B, L]``. A query sees the columns up to its own within its segment,
    the mask ``xla_attention`` applies to the whole sequence (columns not yet written lie in
    the future, so the causal part hides them).
    """
    t, length = q.shape[1], k_cache.shape[1]
    causal = jnp.arange(length)[None, :] <= index + jnp.arange(t)[:, None]  # [T, L]
    same = segment_ids[:, :, None] == cache_segment_ids[:, None, :]  # [B, T, L]
    mask = (causal[None] & same)[:, None]  # [B, 1, T, L]
    return jax.nn.dot_product_attention(q, k_cache.astype(q.dtype), v_cache.astype(q.dtype), mask=mask)


def _splash_kernel(num_heads: int, seq_len: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    # Built per trace, not cached: the kernel holds mask-info arrays, which would leak tracers
    # from one jit trace into the next.
    blk = next(b for b in SPLASH_BLOCKS if seq_len % b == 0)
    sizes = sa.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk, block_kv_dkv=blk,
                          block_kv_dkv_compute=blk, block_q_dq=blk, block_kv_dq=blk)
    mask = sa.MultiHeadMask([sa.CausalMask((seq_len, seq_len)) for _ in range(num_heads)])
    return sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash_local(q, k, v, segment_ids, interpret: bool):
    """Unsharded splash over local ``[b, T, n, H]`` blocks (vmapped over the batch)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b, t, n, h = q.shape
    kernel = _splash_kernel(n, t, interpret)
    # The kernel does not scale the logits; dot_product_attention's default is 1/√H.
    q = q * jnp.asarray(h ** -0.5, q.dtype)
    qh, kh, vh = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))  # [b, n, T, H]
    if segment_ids is None:
        o = jax.vmap(kernel)(qh, kh, vh)
    else:
        o = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=sa.SegmentIds(s, s)))(qh, kh, vh, segment_ids)
    return jnp.swapaxes(o, 1, 2).astype(q.dtype)


def splash_attention(q, k, v, segment_ids, *, interpret: bool | None = None):
    """Splash attention with the semantics of ``xla_attention``.

    ``interpret`` defaults to True unless compiling for TPU. Under a mesh the kernel runs per
    shard inside ``jax.shard_map`` (batch and heads split as the rules in context say; the
    sequence axis must not be sharded).
    """
    if interpret is None:
        interpret = backends.platform() != "tpu"
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not shd.current_rules():
        return _splash_local(q, k, v, segment_ids, interpret)
    spec = shd.logical_to_spec(("batch", "length", "heads", "kv"), shd.current_rules())
    if spec[1] is not None or spec[3] is not None:
        raise ValueError(f"splash attention cannot split the sequence or head dim over the mesh (spec {spec}); "
                         "use Attention(impl='xla') with these rules.")
    qkv_spec, seg_spec = P(spec[0], None, spec[2], None), P(spec[0], None)
    # check_vma=False: a pallas_call's outputs carry no varying-axes type (as in MaxText).
    shard_map = functools.partial(jax.shard_map, check_vma=False)
    if segment_ids is None:
        fn = shard_map(lambda q, k, v: _splash_local(q, k, v, None, interpret),
                           in_specs=(qkv_spec,) * 3, out_specs=qkv_spec)
        return fn(q, k, v)
    fn = shard_map(lambda q, k, v, s: _splash_local(q, k, v, s, interpret),
                       in_specs=(qkv_spec,) * 3 + (seg_spec,), out_specs=qkv_spec)
    return fn(q, k, v, segment_ids)


def attend(q, k, v, segment_ids, impl: str = "auto"):
    """Causal (within-segment) attention of ``[B, T, N, H]`` q, k, v by implementation ``impl``."""
    if resolve(impl, q.shape[1]) == "splash":
        return splash_attention(q, k, v, segment_ids)
    return xla_attention(q, k, v, segment_ids)
