"""The product-key router shared by PEER and PKM: query projection, query BatchNorm,
product-key top-k and router scores. Each layer *holds* one and adds its own value computation.

For an input ``x: [B, T, d]`` the router returns, per token and head, the ``top_k`` retrieved
items ``idx`` among ``N = n²`` and their weights ``g`` (softmax over the head's top-k, or a
sigmoid per item): ``q = BN(x W_q)`` split into ``heads`` queries of ``d_key``, then the exact
top-k of ``layers/product_keys.py`` against the sub-keys. The projection and the top-k run in
the forms of the layer's ``backends.ops`` (handed to the router by the layer).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from peer_jax import backends
from peer_jax import sharding as shd

SCORE_FNS = ("softmax", "sigmoid")

# The query kernel's initialiser: nnx.Linear's default (LeCun normal), so the query's initial
# values equal those of an nnx.Linear query (committed runs re-run bit for bit).
QUERY_INIT = jax.nn.initializers.lecun_normal()


def default_key_init(d_key: int, scale: float = 1.0):
    """Sub-keys ~ N(0, scale²/(d_key/2)): O(1) half-scores for a BatchNormed query at scale 1.
    ``scale`` (gin: ``product_key_router.default_key_init.scale``) sets the score scale the
    router starts from, and how far an update of a given size moves a sub-key relative to its norm."""
    return jax.nn.initializers.normal(stddev=scale / math.sqrt(d_key // 2))


def check_config(owner: str, *, num_experts: int, heads: int, top_k: int, d_key: int, score_fn: str,
                 route_chunk_tokens: int | None) -> int:
    """Validates the routing settings of layer ``owner``; returns ``n = √num_experts``."""
    n = math.isqrt(num_experts) if num_experts > 0 else 0
    if num_experts < 1 or n * n != num_experts:
        raise ValueError(
            f"{owner} num_experts={num_experts} must be a perfect square (product keys pair "
            f"√N × √N sub-keys); use e.g. {max(n, 1) ** 2} or {(n + 1) ** 2}."
        )
    if d_key < 2 or d_key % 2:
        raise ValueError(f"{owner} d_key={d_key} must be a positive even number (it is split in halves).")
    if heads < 1:
        raise ValueError(f"{owner} heads={heads} must be ≥ 1.")
    if not 1 <= top_k <= n:
        raise ValueError(
            f"{owner} top_k={top_k} must be between 1 and √num_experts={n}: each half of the "
            f"product key contributes its top-k of {n} sub-keys. Lower top_k or raise num_experts."
        )
    if score_fn not in SCORE_FNS:
        raise ValueError(f"{owner} score_fn={score_fn!r} is unknown; use one of {list(SCORE_FNS)}.")
    if route_chunk_tokens is not None and route_chunk_tokens < 1:
        raise ValueError(f"{owner} route_chunk_tokens={route_chunk_tokens} must be ≥ 1 or None.")
    return n


class ProductKeyRouter(nnx.Module):
    """``__call__(x [B,T,d], *, mask, train) -> (g, idx)``, each ``[B, T, heads, top_k]``
    (float32 weights, int32 item indices ``a·n + b``).

    Args (the routing arguments of PEER and PKM, which document them):
      d_model, rngs, num_experts, heads, top_k, d_key, query_batchnorm, score_fn,
      per_head_keys, approx_topk, route_chunk_tokens, bn_momentum, bn_epsilon, key_init,
      dtype, param_dtype.
      ops: the layer's ``backends.ops(compute)``: the forms of the query projection and the top-k.
      owner: the layer's name in error messages.

    Parameters (``rngs.params`` keys drawn in this order): ``sub_keys`` ``[(heads,) 2, n,
    d_key/2]``, ``query`` ``[d_model, heads·d_key]`` (logical ``embed, key_dim``) and, with
    query BatchNorm, ``query_bn`` (scale and bias; running mean and variance as BatchStats).
    """

    def __init__(
        self,
        d_model: int,
        *,
        rngs: nnx.Rngs,
        num_experts: int,
        heads: int,
        top_k: int,
        d_key: int,
        query_batchnorm: bool = True,
        score_fn: str = "softmax",
        per_head_keys: bool = False,
        approx_topk: bool = False,
        route_chunk_tokens: int | None = 512,
        ops: backends.Ops,
        bn_momentum: float = 0.99,
        bn_epsilon: float = 1e-5,
        key_init=None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        owner: str = "ProductKeyRouter",
    ):
        n = check_config(owner, num_experts=num_experts, heads=heads, top_k=top_k, d_key=d_key, score_fn=score_fn,
                         route_chunk_tokens=route_chunk_tokens)
        self.d_model, self.num_experts, self.n_sub = d_model, num_experts, n
        self.heads, self.top_k, self.d_key = heads, top_k, d_key
        self.score_fn, self.per_head_keys, self.approx_topk = score_fn, per_head_keys, approx_topk
        self.route_chunk_tokens, self.ops = route_chunk_tokens, ops
        self.dtype = dtype

        key_shape = (2, n, d_key // 2)
        key_names: tuple[str | None, ...] = (None, "keys", "key_dim")
        if per_head_keys:
            key_shape, key_names = (heads, *key_shape), (None, *key_names)
        key_init = key_init or default_key_init(d_key)
        self.sub_keys = nnx.Param(key_init(rngs.params(), key_shape, param_dtype), out_sharding=key_names)
        self.query = nnx.Param(QUERY_INIT(rngs.params(), (d_model, heads * d_key), param_dtype),
                               out_sharding=("embed", "key_dim"))
        self.query_bn = (
            nnx.BatchNorm(
                heads * d_key, momentum=bn_momentum, epsilon=bn_epsilon, dtype=jnp.float32,
                param_dtype=param_dtype, rngs=rngs,
                scale_metadata={"out_sharding": ("key_dim",)}, bias_metadata={"out_sharding": ("key_dim",)},
            )
            if query_batchnorm
            else None
        )

    def queries(self, x: jax.Array, *, mask: jax.Array | None = None, train: bool = False) -> jax.Array:
        """``[B, T, heads, d_key]`` float32 queries: projection (inputs in the compute dtype,
        accumulated and emitted in float32), then BatchNorm (float32). They stay float32 for the
        sub-key scores and the top-k: in bf16 the rounding of q and of the sub-keys reorders
        near-tied candidates (tests/test_numerics.py measures how often)."""
        b, t, _ = x.shape
        q = self.ops.project(x.astype(self.dtype), self.query[...].astype(self.dtype))
        if self.query_bn is not None:
            bn_mask = None
            if train and mask is not None:
                # An all-padding batch would give 0/0 statistics and poison the running
                # averages; fall back to all tokens then (their outputs are discarded anyway).
                bn_mask = (mask | ~jnp.any(mask))[..., None]
            q = self.query_bn(q, use_running_average=not train, mask=bn_mask)
        return q.astype(jnp.float32).reshape(b, t, self.heads, self.d_key)

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None, train: bool = False, select_topk=None):
        """Router weights and item indices, each ``[B, T, heads, top_k]`` (float32, int32).
        ``select_topk``: the selection to run instead of ``ops.select_topk`` (the layer's decode
        path hands its own, ``layers/expert_decode.py``); same results up to ties."""
        q = self.queries(x, mask=mask, train=train)
        # The search runs over chunks of about route_chunk_tokens tokens *per device*.
        chunk = None if self.route_chunk_tokens is None else self.route_chunk_tokens * shd.data_parallel_size()
        select_topk = select_topk or self.ops.select_topk
        scores, idx = select_topk(q, self.sub_keys[...].astype(jnp.float32), self.top_k, approx=self.approx_topk,
                                  chunk_tokens=chunk)
        g = jax.nn.softmax(scores, axis=-1) if self.score_fn == "softmax" else jax.nn.sigmoid(scores)
        return g, idx

    def flop_terms(self) -> dict[str, float]:
        """Forward FLOPs per token: query projection, sub-key scoring (two halves of d_key/2
        against n rows each) and the h·k² candidate sums (BN, top-k and scores not counted)."""
        h, dk = self.heads, self.d_key
        return {
            "query": 2.0 * self.d_model * h * dk,
            "key_scores": h * 2 * (2.0 * self.n_sub * (dk // 2)),
            "candidate_sums": float(h * self.top_k * self.top_k),
        }

    def num_params(self) -> int:
        """Query kernel, query BatchNorm (scale, bias) and sub-keys: all active for every token."""
        key_params = (self.heads if self.per_head_keys else 1) * 2 * self.n_sub * (self.d_key // 2)
        bn_params = 2 * self.heads * self.d_key if self.query_bn is not None else 0
        return self.d_model * self.heads * self.d_key + bn_params + key_params
