"""FLOPs and parameter counts per token for the decoder LM with any FFW type.

Convention (used for every budget, step count and plot of the isoFLOP study)
-----------------------------------------------------------------------------
* One multiply-add = 2 FLOPs; an addition or comparison on its own = 1 FLOP.
* Counted ("model FLOPs"): every matmul against weights (attention q/k/v/out projections,
  dense and expert MLPs, MoE router, PEER/PKM query networks), the attention score and value
  products, the product-key sub-key scoring, the h·k² candidate sums of product-key retrieval,
  PEER's expert dot products u_iᵀx and weighted sums Σ g·σ·v_i, PKM's weighted value sum, and
  the output logits matmul (d_model × vocab).
* Not counted: the input-embedding lookup (a gather), norms, activations (GELU/ReLU/SiLU and
  the gating product), softmaxes (attention, router, PEER/PKM scores), query BatchNorm,
  rotary embeddings, residual adds, top-k selections, the loss, and the optimizer update.
  These are O(d) or O(h·k) per token per layer against O(d²) or O(h·k·d) for what is counted.
* Attention scores cover the **full** T×T square (`causal=False`, the default): that is what
  `jax.nn.dot_product_attention(is_causal=True)` computes in XLA (it masks, it does not skip),
  and what Chinchilla counts. `causal=True` halves the term (a flash/splash kernel's work).
  Every isoFLOP budget, step count and committed grid (configs/isoflop/) uses the full square;
  that stays the budget convention.
* MaxText's convention (its `calculate_tflops_training_per_device`) counts causal attention
  **half**: (T+1)/2 keys per query on average, the work a causal flash/splash kernel does by
  skipping the blocks above the diagonal. `maxtext_train_flops_per_token` reports that figure
  separately (e.g. to compare an MFU with MaxText's); it never changes a budget. The two differ
  only in the attention score/value terms: 4·(T − (T+1)/2)·N·H forward FLOPs per token and layer.
* Training = 3 × forward (the backward pass costs two matmuls per forward matmul).
* MoE: the experts' MLP FLOPs times the **experts processed per token**. Expert choice
  processes E·C slots per routing group of S tokens, i.e. E·C/S = capacity_factor per token
  on average (more when the capacity's floor of 1 binds, see `MoE.capacity`); token choice
  (buffered or dropless) counts its top_k experts per token. Router: 2·d·E.
* Not counted but reported in `FlopCount.overhead` (work done by *this* implementation that is
  not model arithmetic): the one-hot dispatch/combine einsums of the MoE reference path
  (2·E·C·d each per token) and, for token choice, the unfilled capacity slots
  (E·C/S − top_k per token) that the buffered expert MLP computes anyway. Dropless routing
  has no dispatch einsums (its sort, gathers and unsort move data, they do no arithmetic);
  where `jax.lax.ragged_dot` runs as a dense masked dot over all E groups (CPU, see
  `moe_dropless.ragged_dot_is_dense`) the other E − 1 experts per routed pair are overhead.
* Rematerialisation (`Transformer.remat`) recomputes the forward pass in the backward; that
  is hardware work, not model FLOPs, and is not counted.

Per-FFW formulas (forward, per token, d = d_model):
  dense   2·d·m·(1 or 2 for SwiGLU) + 2·m·d
  MoE     2·d·E (router) + experts-per-token × dense-MLP FLOPs of one expert
  PEER    2·d·h·d_key (query) + h·2·√N·d_key (two halves of d_key/2 against √N sub-keys)
          + h·k² (candidate sums) + 2·h·k·d (u_iᵀx) + 2·h·k·d (Σ g·σ·v_i)
  PKM     2·d·h·d_key (query) + h·2·√N·d_key + h·k² + 2·h·k·d (embedding bag of values)

Each FFW layer reports its own terms (`flop_count`, see `layers/cost.py`; PEER and PKM add
their value computation to their router's `flop_terms`). `FlopCount.terms` has the counted
forward FLOPs per token by named term; `forward`, `train`
sum them. Against XLA's `cost_analysis()['flops']` of the compiled forward and of
value_and_grad (tests/test_flops.py, d_model = 256) the counted FLOPs plus `overhead` agree
to within 0.5-1.5 % (forward) and 0.5-2 % (train); XLA's excess is systematic: it also counts
one FLOP per element of every elementwise op (norms, GELU, softmaxes, BatchNorm, rotary, the
loss) and its top-k sort comparisons. Note that XLA counts a `while` loop's body once
whatever its trip count, so XLA's own figure undercounts anything inside `lax.scan` (PEER's
gather loops when slot_block < h·k, gradient accumulation), e.g. `compile_report.json`'s
flops_per_device_step_xla.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import numpy as np
from flax import nnx

from peer_jax.layers.cost import CountsFlops, FFWCount
from peer_jax.models.transformer import Transformer

TRAIN_MULTIPLIER = 3.0


@dataclasses.dataclass(frozen=True)
class FlopCount:
    """Forward FLOPs per token by term (counted) and per-token implementation overhead."""

    terms: Mapping[str, float]
    overhead: Mapping[str, float] = dataclasses.field(default_factory=dict)

    @property
    def forward(self) -> float:
        return float(sum(self.terms.values()))

    @property
    def train(self) -> float:
        return TRAIN_MULTIPLIER * self.forward

    @property
    def forward_with_overhead(self) -> float:
        return self.forward + float(sum(self.overhead.values()))


def abstract_transformer(vocab_size: int, factory: Callable = Transformer, **kwargs) -> Transformer:
    """The model with `jax.ShapeDtypeStruct` leaves: shapes and attributes, no memory."""
    return nnx.eval_shape(lambda: factory(vocab_size, rngs=nnx.Rngs(0), **kwargs))


# ----------------------------------------------------------------------------- FFW types


def ffw_count(module: nnx.Module, *, seq_len: int, batch_size: int | None = None) -> FFWCount:
    """The layer's own count (``flop_count``, the protocol of ``layers/cost.py``): a layer says
    what it computes; nothing here looks at class names."""
    if isinstance(module, CountsFlops):
        return module.flop_count(seq_len=seq_len, batch_size=batch_size)
    raise ValueError(f"flops: the FFW {type(module).__name__} has no FLOP formula: give it a "
                     "`flop_count(*, seq_len, batch_size) -> FFWCount` method (peer_jax/layers/cost.py).")


# ----------------------------------------------------------------------------- the model


def attention_terms(d_model: int, num_heads: int, head_dim: int, seq_len: int, causal: bool = False) -> dict[str, float]:
    inner = num_heads * head_dim
    ctx = (seq_len + 1) / 2 if causal else seq_len  # keys attended per query, on average
    return {
        "attn_qkv": 2.0 * d_model * 3 * inner,
        "attn_out": 2.0 * inner * d_model,
        "attn_scores": 2.0 * ctx * inner,  # q·k over the context
        "attn_values": 2.0 * ctx * inner,  # Σ p·v over the context
    }


def count(model: Transformer, seq_len: int, batch_size: int | None = None, *, causal: bool = False) -> FlopCount:
    """Forward FLOPs per token of `model` (concrete or abstract) on sequences of `seq_len`.

    `batch_size` (sequences per forward call) is needed only by MoE layers that route over the
    batch (expert choice with grouping='position').
    """
    terms: dict[str, float] = {}
    overhead: dict[str, float] = {}

    def add(dst, src):
        for k, v in src.items():
            dst[k] = dst.get(k, 0.0) + float(v)

    for ffw, n in model.ffw_layers():  # one entry per block, or per scanned run of n blocks
        attn = attention_terms(model.d_model, model.num_heads, model.head_dim, seq_len, causal)
        c = ffw_count(ffw, seq_len=seq_len, batch_size=batch_size)
        for _ in range(n):  # n separate additions: the same sums, in the same order, as unscanned
            add(terms, attn)
            add(terms, c.terms)
            add(overhead, c.overhead)
    terms["logits"] = 2.0 * model.d_model * model.vocab_size
    return FlopCount(terms, overhead)


def forward_flops_per_token(model: Transformer, seq_len: int, batch_size: int | None = None, **kw) -> float:
    return count(model, seq_len, batch_size, **kw).forward


def train_flops_per_token(model: Transformer, seq_len: int, batch_size: int | None = None, **kw) -> float:
    return count(model, seq_len, batch_size, **kw).train


def maxtext_train_flops_per_token(model: Transformer, seq_len: int, batch_size: int | None = None) -> float:
    """Training FLOPs per token in MaxText's convention: causal attention counted half (see the
    module docstring). A reported figure for MFU comparisons, never a budget."""
    return count(model, seq_len, batch_size, causal=True).train


# ----------------------------------------------------------------------------- parameters


def _size(x) -> int:
    return int(np.prod(x.shape))


def param_counts(model: Transformer, seq_len: int = 1, batch_size: int | None = None) -> dict[str, float]:
    """Parameter counts: 'total', 'embedding' (input embedding + untied output projection),
    'non_embedding', and 'active' / 'active_non_embedding': parameters used per token on
    average (all dense parameters; a sparse layer's router/query/keys plus the experts,
    memories or expert MLPs a token is routed to). `seq_len`/`batch_size` matter only for
    MoE capacity (see `count`)."""
    params = nnx.state(model, nnx.Param)
    total = sum(_size(x) for x in jax.tree.leaves(params))
    embedding = _size(model.embed) + (0 if model.tie_embeddings else _size(model.unembed))
    non_embedding = total - embedding
    active = non_embedding
    for ffw, n in model.ffw_layers():  # a scanned run's parameters hold all n layers
        ffw_params = sum(_size(x) for x in jax.tree.leaves(nnx.state(ffw, nnx.Param)))
        active += n * ffw_count(ffw, seq_len=seq_len, batch_size=batch_size).active_params - ffw_params
    return {"total": float(total), "embedding": float(embedding), "non_embedding": float(non_embedding),
            "active_non_embedding": float(active), "active": float(active + embedding)}



# ----------------------------------------------------------------------------- XLA's count


def xla_flops_per_token(model: Transformer, seq_len: int, batch_size: int, *, train: bool = False) -> float:
    """XLA's `cost_analysis()['flops']` per token of the compiled forward (train=False, eval
    mode) or of `value_and_grad` of the mean cross-entropy (train=True; no optimizer update).

    `model` may be abstract (`abstract_transformer`): only shapes are needed to compile.
    Caveat: XLA's cost analysis counts a `while` loop's body **once**, whatever its trip count
    (jax 0.10, CPU), so anything inside `lax.scan` — the efficient PEER/PKM gather loops when
    `slot_block < heads·top_k`, gradient accumulation, scanned layers — is undercounted, and
    FFI custom calls (`compute="native"`, the CPU decode kernels PEER/PKM take in eval mode up to
    `decode_gather_max_tokens` tokens) are not counted at all.
    """
    import jax.numpy as jnp
    import optax

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)

    def forward(params, rest, tokens):
        m = nnx.merge(graphdef, params, rest)
        # capture (and drop) what the layers sow, as the train step does
        logits, _ = nnx.capture(lambda m, t: m(t, mask=jnp.ones(t.shape, bool), train=train), nnx.Intermediate)(
            m, tokens)
        return logits

    def loss(params, rest, tokens):
        logits = forward(params, rest, tokens)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, tokens))

    fn = jax.value_and_grad(loss) if train else forward
    tokens = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)
    cost = jax.jit(fn).lower(params, rest, tokens).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) / (batch_size * seq_len)
