"""Collective bytes per device per train step of one PEER / PKM layer, by table layout.

A closed-form model of what ``layers/expert_tables.py``'s lookup sends, counted the way
``hlo_stats.collective_bytes`` reads a compiled program (each collective counts
max(operand, result) bytes on each device), so the two can be compared
(``scripts/memory_parallel_table.py`` does, in docs/pod_scale.md).

Symbols: ``tokens`` per step (whole pod), ``slots`` = h·k retrievals per token, ``d`` the table
width, ``rows`` = N, ``tables`` = 2 (PEER: u, v) or 1 (PKM), a mesh of ``data`` × ``expert`` ×
``model`` devices with the memory-parallel group G = expert · model and R = data replicas of each
table column slice. Per device the group's tokens are tokens / R.

* routing all-gather over ``expert`` (forward): indices int32 + scores float32, 8 bytes a slot;
* the score gradient (backward): every device of the group holds a partial sum for every token of
  the group; one reduce-scatter over the group (an all-reduce over ``model`` where ``expert`` = 1),
  4 bytes a slot;
* PEER only: the ``u·x`` partial sums over the group (forward) and their gradient's sum over
  ``expert`` (backward): 4 bytes a slot each;
* activations in, output back, and both gradients: all-to-alls over ``expert`` of the device's
  own tokens' ``d / model`` columns (input and output in the compute dtype);
* the table gradients' all-reduce over the R replicas: ``tables · rows · d / G`` values.

Not modelled: the rest of the model (attention, dense blocks, embeddings: their gradient
all-reduce is the dense model's traffic) and recomputation under remat policies that
rematerialise the lookup (each recomputed forward collective counts again).
"""

from __future__ import annotations

import dataclasses

# Per-chip interconnect (ICI) bandwidth, one direction, bytes/s. Cloud TPU system architecture
# pages (cloud.google.com/tpu/docs/v5e, /v5p): v5e 400 GB/s bidirectional per chip over 4 ports
# (2D torus), v5p 1200 GB/s bidirectional per chip over 6 ports (3D torus).
ICI_BYTES_PER_S = {"v5e": {"all_ports": 200e9, "ports": 4}, "v5p": {"all_ports": 600e9, "ports": 6}}


@dataclasses.dataclass(frozen=True)
class LookupTraffic:
    routing_all_gather: float
    score_grad: float
    partial_sums: float
    activations_all_to_all: float
    table_grad_all_reduce: float

    @property
    def total(self) -> float:
        return sum(dataclasses.astuple(self))


def lookup_bytes(*, tokens: int, slots: int, d: int, rows: int, tables: int, data: int, expert: int, model: int,
                 act_bytes: int = 2, grad_bytes: int = 4) -> LookupTraffic:
    """Bytes per device per step of one sparse layer's memory-parallel lookup (see module doc)."""
    group_tokens = tokens / data
    own_tokens = group_tokens / expert
    gathered = expert > 1
    routing = 8 * slots * group_tokens if gathered else 0.0
    score_grad = 4 * slots * group_tokens * int(gathered or model > 1)
    partial = 4 * slots * group_tokens * (int(expert * model > 1) + int(gathered)) if tables == 2 else 0.0
    acts = 2 * tables * own_tokens * (d / model) * act_bytes if gathered else 0.0
    grads = tables * rows * d / (expert * model) * grad_bytes if data > 1 else 0.0
    return LookupTraffic(routing, score_grad, partial, acts, grads)


def wire_bytes(by_kind: dict) -> float:
    """Bytes a device sends for ``hlo_stats.collective_bytes(...)["by_kind"]``: a ring all-reduce
    sends about twice its size (a reduce-scatter, then an all-gather), every other kind about once."""
    return sum(v["bytes"] * (2 if k == "all-reduce" else 1) for k, v in by_kind.items())


def comm_time_s(bytes_per_device: float, chip: str) -> tuple[float, float]:
    """(optimistic, pessimistic) seconds to send ``bytes_per_device``: every ICI port of the chip
    busy in one direction, or only the two ports of one torus axis (a ring along one axis). No
    latency, no overlap with compute."""
    ici = ICI_BYTES_PER_S[chip]
    return bytes_per_device / ici["all_ports"], bytes_per_device / (ici["all_ports"] * 2 / ici["ports"])
