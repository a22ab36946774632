"""The decode path of PEER and PKM: every retrieved row of a step gathered at once.

The training read-out (the layer's ``ops.gather_dot`` / ``embedding_bag``) walks the h·k slots
of each token in a ``lax.scan`` under a custom VJP, so that the backward pass never keeps the
``[tokens, h·k, d]`` gathered rows. A decode step has a handful of tokens and no backward pass;
there, the loop's h·k sequential small gathers are pure overhead, and on XLA:CPU a loop over a
bfloat16 table is far worse: the compiler hoists the float32 up-cast of the *whole* table out
of the loop (two 1024²×1280 float32 copies, 10.7 GB of temporaries per PEER call at paper size,
read from the compiled ``memory_analysis``). Here all ``M · h·k`` rows of each table are read
at once, with no slot loop: the layer's ``gather_ops`` (``backends.decode_ops``), which on CPU,
where the native kernels build, are token-centric C++ kernels (each token's rows read straight
from the float32 or bfloat16 table, no gathered copy; their gradient is the gather's), and
elsewhere the plain gather form of the backend ops (``backends.ops('naive')``: one XLA gather
of all rows and one einsum). Taken automatically by the layers in eval mode (``train=False``)
when the lookup's local token count ``M`` is at most ``decode_gather_max_tokens``: decode steps
of up to that many rows, and short prefills. Meant for
inference, but not wrong under a gradient: the gradient is the plain gather's (exact); it keeps
the gathered rows (``2·M·h·k·d`` values for PEER), which the token bound keeps small.

The same choice picks the router's product-key selection: the decode ops' ``select_topk`` (on
CPU, where the native kernels build, the C++ selection, a fraction of the cost of XLA:CPU's
top-k at decode sizes; else XLA's top-k). The layer makes the choice once per
call (``ProductKeyLayer._route_and_read``) from ``M`` as the lookup's local read-out sees it
(``TableLookup.local_tokens``, ``layers/expert_tables.py``): per device, the tokens that device
reads (in the memory-parallel layout: all tokens of its group) on its column slice of the tables.
"""

from __future__ import annotations

# Decode steps up to batch 256 and prefills up to 256 tokens take the decode path: on XLA:CPU
# the training loop is unusable on bfloat16 tables (above), and on float32 tables the two
# paths are compared per batch in docs/inference.md. What a gradient through it
# keeps, 2·M·h·k·d values (PEER at paper size: 335 MB in float32 at M = 256), stays small next
# to the tables; longer evals keep the training path's O(M·d) temporaries.
DEFAULT_MAX_TOKENS = 256


def check_max_tokens(owner: str, max_tokens: int) -> None:
    """Start-up validation of the ``decode_gather_max_tokens`` setting."""
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
        raise ValueError(f"{owner} decode_gather_max_tokens={max_tokens!r} must be an int ≥ 0 "
                         f"(0 = never use the decode gather path; default {DEFAULT_MAX_TOKENS}).")


def uses_gather(train: bool, tokens: int, max_tokens: int) -> bool:
    """Whether a lookup over ``tokens`` local tokens takes the decode path (its router then
    selects with the decode ops too)."""
    return not train and 0 < tokens <= max_tokens
