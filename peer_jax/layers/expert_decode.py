"""The decode path of PEER and PKM: every retrieved row of a step gathered at once.

The training read-out (the layer's ``ops.gather_dot`` / ``embedding_bag``) walks the h·k slots
of each token in a ``lax.scan`` under a custom VJP, so that the backward pass never keeps the
``[tokens, h·k, d]`` gathered rows. A decode step has a handful of tokens and no backward pass;
there, the loop's h·k sequential small gathers are pure overhead, and on XLA:CPU a loop over a
bfloat16 table is far worse: the compiler hoists the float32 up-cast of the *whole* table out
of the loop (two 1024²×1280 float32 copies, 10.7 GB of temporaries per PEER call at paper size,
read from the compiled ``memory_analysis``). Here all ``M · h·k`` rows of each table are
gathered by one gather and contracted by one einsum: no loop, no custom VJP.

It is the plain gather form of the backend ops (``backends.ops('naive')``), taken automatically by
the layers in eval mode (``train=False``) when the lookup's local token count ``M`` is at most
``decode_gather_max_tokens``: decode steps of up to that many rows, and short prefills. Meant for
inference, but not wrong under a gradient: plain autodiff of a gather is exact; it keeps the
gathered rows (``2·M·h·k·d`` values for PEER), which the token bound keeps small.

Under ``TableLookup`` (``layers/expert_tables.py``) the choice is made inside the local read-out
the lookup runs, so it applies per device to the tokens that device reads (in the
memory-parallel layout: all tokens of its group) on its column slice of the tables.
"""

from __future__ import annotations

import functools

# Decode steps up to batch 256 and prefills up to 256 tokens take the gather path: on XLA:CPU
# it is the only usable path for bfloat16 tables (above), while on float32 tables the two paths
# stay within a few tens of percent of each other up to batch 64 either way (docs/inference.md).
# The rows it keeps, 2·M·h·k·d values (PEER at paper size: 335 MB in float32 at M = 256), stay
# small next to the tables; longer evals keep the training path's O(M·d) temporaries.
DEFAULT_MAX_TOKENS = 256


def check_max_tokens(owner: str, max_tokens: int) -> None:
    """Start-up validation of the ``decode_gather_max_tokens`` setting."""
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
        raise ValueError(f"{owner} decode_gather_max_tokens={max_tokens!r} must be an int ≥ 0 "
                         f"(0 = never use the decode gather path; default {DEFAULT_MAX_TOKENS}).")


def uses_gather(train: bool, tokens: int, max_tokens: int) -> bool:
    """Whether a lookup over ``tokens`` local tokens takes the decode gather path."""
    return not train and 0 < tokens <= max_tokens


def select(fn, *, train: bool, max_tokens: int):
    """The local read-out ``TableLookup`` runs: ``fn(x, tables, idx, scores, reduce, gather=...)``
    with ``gather=True`` (the layer's ``compute='naive'`` ops: one gather of all rows) when
    ``uses_gather`` holds for the local token count ``idx.shape[0]``, else with its own ops."""
    if train or max_tokens == 0:
        return fn

    def read_out(x, tables, idx, scores, reduce):
        return fn(x, tables, idx, scores, reduce, gather=uses_gather(train, idx.shape[0], max_tokens))

    return functools.wraps(fn)(read_out)
