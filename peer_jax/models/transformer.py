"""Decoder-only transformer LM whose FFW per block comes from a factory.

`Transformer.ffw` builds the FFW of ordinary blocks and `Transformer.sparse_ffw` the FFW of
the blocks listed by `sparse_blocks` (default: the middle block only, as in the paper). Both
are callables ``factory(d_model, *, rngs, dtype, param_dtype) -> module``; with gin that is
one binding, e.g. ``transformer.Transformer.sparse_ffw = @peer.PEER``.

TPU-efficiency options (all off or portable by default, so CPU results are unchanged):
``attention_impl`` ('auto': Pallas splash attention on TPU, XLA elsewhere; see
``backends/attention.py``), ``scan_layers`` (ordinary blocks as ``nnx.scan``; see
``models/layer_stack.py`` for the parameter-tree change), ``remat`` (a policy name of
``models/remat.py``) and ``z_loss`` (weight of the output z-loss, 0 = off).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from peer_jax import sharding
from peer_jax.layers.attention import Attention
from peer_jax.layers.dense import DenseFFW
from peer_jax.layers.norms import RMSNorm
from peer_jax.models import layer_stack
from peer_jax.models import remat as remat_lib

FFWFactory = Callable[..., nnx.Module]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(d) -> jnp.dtype:
    if isinstance(d, str):
        if d not in DTYPES:
            raise ValueError(f"dtype {d!r} is unknown; use one of {sorted(DTYPES)}.")
        return DTYPES[d]
    return d


def resolve_sparse_blocks(spec: str | Sequence[int] | None, num_layers: int) -> tuple[int, ...]:
    """'middle' → (num_layers // 2,), 'all', 'none' or an explicit list of block indices."""
    if spec is None or spec == "none":
        return ()
    if spec == "middle":
        return (num_layers // 2,)
    if spec == "all":
        return tuple(range(num_layers))
    if isinstance(spec, str):
        raise ValueError(f"sparse_blocks={spec!r}: use 'middle', 'all', 'none' or a list of block indices.")
    blocks = tuple(sorted(set(int(i) for i in spec)))
    bad = [i for i in blocks if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"sparse_blocks={list(spec)} has indices {bad} outside [0, {num_layers}).")
    return blocks


class Block(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then x + ffw(norm(x))."""

    def __init__(self, d_model: int, num_heads: int, head_dim: int, ffw: FFWFactory, *, rngs: nnx.Rngs,
                 dtype, param_dtype, rope_base: float, attention_impl: str = "auto"):
        self.attn_norm = RMSNorm(d_model, dtype=dtype, param_dtype=param_dtype)
        self.attn = Attention(d_model, num_heads, head_dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                              rope_base=rope_base, impl=attention_impl)
        self.ffw_norm = RMSNorm(d_model, dtype=dtype, param_dtype=param_dtype)
        self.ffw = ffw(d_model, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x, positions, segment_ids, mask, train: bool):
        return self._ffw_residual(x + self.attn(self.attn_norm(x), positions, segment_ids), mask, train)

    def _ffw_residual(self, x, mask, train: bool):
        x = sharding.constrain(x, ("batch", "length", "embed"))
        x = x + self.ffw(self.ffw_norm(x), mask=mask, train=train).astype(x.dtype)
        return sharding.constrain(x, ("batch", "length", "embed"))

    def decode(self, x, positions, segment_ids, k_cache, v_cache, cache_segment_ids, index):
        """The block in eval mode over a KV cache (``Attention.decode``): (x, k_cache, v_cache)."""
        a, k_cache, v_cache = self.attn.decode(self.attn_norm(x), positions, segment_ids, k_cache, v_cache,
                                               cache_segment_ids, index)
        return self._ffw_residual(x + a, segment_ids > 0, False), k_cache, v_cache


class Transformer(nnx.Module):
    """Token embedding → blocks → RMSNorm → logits (untied output projection by default).

    ``remat``: False/'none', True/'full', or a policy of ``models/remat.py`` ('minimal', 'dots',
    'save_qkv_proj', 'save_out_proj'), applied per block. ``scan_layers``: scan runs of ordinary
    blocks (``models/layer_stack.py``). ``attention_impl``: 'auto', 'xla' or 'splash'.
    ``z_loss``: adds ``z_loss · mean(logsumexp(logits)²)`` over real tokens to the training loss
    (sown as ``z_aux_loss``; PaLM uses 1e-4); 0 (default) adds nothing.
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        rngs: nnx.Rngs,
        num_layers: int = 4,
        d_model: int = 128,
        num_heads: int = 4,
        head_dim: int | None = None,
        ffw: FFWFactory = DenseFFW,
        sparse_ffw: FFWFactory | None = None,
        sparse_blocks: str | Sequence[int] = "middle",
        dtype: str | jnp.dtype = "float32",
        param_dtype: str | jnp.dtype = "float32",
        tie_embeddings: bool = False,
        rope_base: float = 10_000.0,
        remat: bool | str = False,
        scan_layers: bool = False,
        attention_impl: str = "auto",
        z_loss: float = 0.0,
    ):
        if num_layers < 1 or d_model < 1 or num_heads < 1:
            raise ValueError(f"Transformer: num_layers={num_layers}, d_model={d_model}, num_heads={num_heads} must be ≥ 1.")
        if head_dim is None:
            if d_model % num_heads:
                raise ValueError(f"Transformer.d_model={d_model} is not divisible by num_heads={num_heads}; "
                                 "change one of them or set Transformer.head_dim.")
            head_dim = d_model // num_heads
        dtype, param_dtype = resolve_dtype(dtype), resolve_dtype(param_dtype)
        self.vocab_size, self.d_model, self.num_layers = vocab_size, d_model, num_layers
        self.num_heads, self.head_dim = num_heads, head_dim
        self.dtype, self.tie_embeddings, self.attention_impl = dtype, tie_embeddings, attention_impl
        self.remat, self.scan_layers, self.z_loss = remat_lib.resolve(remat), scan_layers, float(z_loss)
        self.sparse_blocks = resolve_sparse_blocks(sparse_blocks, num_layers) if sparse_ffw is not None else ()
        self.embed = nnx.Param(
            jax.nn.initializers.normal(1.0)(rngs.params(), (vocab_size, d_model), param_dtype),
            out_sharding=("vocab", "embed"),
        )
        blocks = [
            Block(d_model, num_heads, head_dim, sparse_ffw if i in self.sparse_blocks else ffw, rngs=rngs,
                  dtype=dtype, param_dtype=param_dtype, rope_base=rope_base, attention_impl=attention_impl)
            for i in range(num_layers)
        ]
        if scan_layers:
            self.stacks, self.blocks, self.plan = layer_stack.build(blocks, self.sparse_blocks)
        else:
            self.blocks = nnx.List(blocks)
        self.final_norm = RMSNorm(d_model, dtype=dtype, param_dtype=param_dtype)
        if not tie_embeddings:
            self.unembed = nnx.Param(
                jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")(
                    rngs.params(), (d_model, vocab_size), param_dtype),
                out_sharding=("embed", "vocab"),
            )

    def __call__(
        self,
        tokens: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        mask: jax.Array | None = None,
        train: bool = False,
    ) -> jax.Array:
        """tokens: [B, T] int → logits [B, T, vocab] float32.

        `mask` marks real (non-padding) tokens; sparse layers keep padding out of their batch
        statistics and routing. `segment_ids`/`positions` describe packed sequences.
        """
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        x = self._embed(tokens)
        call = remat_lib.wrap(lambda b, *a: b(*a), self.remat, static_argnums=(5,))
        if not self.scan_layers:
            for block in self.blocks:
                x = call(block, x, positions, segment_ids, mask, train)
        else:
            for kind, j, _, _ in self.plan:
                if kind == "stack":
                    x = layer_stack.scan_blocks(self.stacks[j], x, positions, segment_ids, mask, train, self.remat)
                else:
                    x = call(self.blocks[str(j)], x, positions, segment_ids, mask, train)
        logits = self._logits(x)
        if self.z_loss:
            self.sow(nnx.Intermediate, "z_aux_loss", self.z_loss * z_loss_term(logits, mask))
        return logits

    def _embed(self, tokens: jax.Array) -> jax.Array:
        x = jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)
        return sharding.constrain(x, ("batch", "length", "embed"))

    def _logits(self, x: jax.Array) -> jax.Array:
        x = self.final_norm(x)
        w = self.embed[...].T if self.tie_embeddings else self.unembed[...]
        # Accumulated and emitted in float32 (a bf16 output would round the logits before the loss).
        logits = jnp.einsum("btd,dv->btv", x, w.astype(self.dtype), preferred_element_type=jnp.float32)
        return sharding.constrain(logits, ("batch", "length", "vocab"))

    def init_cache(self, batch: int, length: int) -> dict[str, jax.Array]:
        """An empty KV cache for ``decode``: keys and values ``[layers, batch, length, heads,
        head_dim]`` in the compute dtype, the segment id of every column (0 = padding or not
        yet written) and the next column to write."""
        shape = (self.num_layers, batch, length, self.num_heads, self.head_dim)
        kv = sharding.constrain(jnp.zeros(shape, self.dtype), (None, "batch", None, "heads", "kv"))
        return {"k": kv, "v": kv, "segment_ids": jnp.zeros((batch, length), jnp.int32),
                "index": jnp.zeros((), jnp.int32)}

    def decode(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array, cache: dict):
        """Eval-mode forward of T new tokens [B, T] at the cache's next columns: (logits
        [B, T, vocab] float32, cache). Equal to ``__call__(train=False)`` on the whole sequence
        so far, with ``mask = segment_ids > 0``: prefill is one call with the (left-padded)
        prompts, each generated token one more call with T = 1."""
        index = cache["index"]
        seg = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids.astype(jnp.int32), (0, index))
        k, v = cache["k"], cache["v"]
        x = self._embed(tokens)
        steps = self.plan if self.scan_layers else tuple(("block", i, i, 1) for i in range(self.num_layers))
        for kind, j, first, count in steps:
            if kind == "stack":
                x, ks, vs = layer_stack.scan_decode(self.stacks[j], x, positions, segment_ids,
                                                    k[first:first + count], v[first:first + count], seg, index)
                k, v = k.at[first:first + count].set(ks), v.at[first:first + count].set(vs)
            else:
                block = self.blocks[str(j)] if self.scan_layers else self.blocks[j]
                x, kj, vj = block.decode(x, positions, segment_ids, k[first], v[first], seg, index)
                k, v = k.at[first].set(kj), v.at[first].set(vj)
        cache = {"k": k, "v": v, "segment_ids": seg, "index": index + tokens.shape[1]}
        return self._logits(x), cache

    def ffw_layers(self) -> list[tuple[nnx.Module, int]]:
        """(FFW module, number of layers it stands for) in layer order: one per block, or one
        per stacked run when ``scan_layers`` (its parameters then carry the leading axis)."""
        if not self.scan_layers:
            return [(b.ffw, 1) for b in self.blocks]
        return [(self.stacks[j].ffw, n) if kind == "stack" else (self.blocks[str(j)].ffw, 1)
                for kind, j, _, n in self.plan]


def z_loss_term(logits: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Mean over real tokens (all when ``mask`` is None) of ``logsumexp(logits)²`` (float32)."""
    lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    if mask is None:
        return jnp.mean(lse * lse)
    w = mask.astype(jnp.float32)
    return jnp.sum(lse * lse * w) / jnp.maximum(jnp.sum(w), 1.0)
