"""What an FFW layer reports about its own cost (the protocol ``peer_jax.flops`` uses).

Every FFW layer has ``flop_count(*, seq_len, batch_size) -> FFWCount``: its forward FLOPs per
token by named term, the per-token overhead of this implementation, and its active parameters
per token, under the convention of ``peer_jax/flops.py`` (multiply-add = 2; norms, activations,
softmaxes and top-k selections are not counted). ``flops.py`` asks the layer; it never looks at
the layer's class.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, runtime_checkable


@dataclasses.dataclass(frozen=True)
class FFWCount:
    """One FFW module: counted FLOPs, overhead FLOPs and active parameters, per token."""

    terms: dict[str, float]
    overhead: dict[str, float]
    active_params: float


@runtime_checkable
class CountsFlops(Protocol):
    def flop_count(self, *, seq_len: int, batch_size: int | None) -> FFWCount: ...
