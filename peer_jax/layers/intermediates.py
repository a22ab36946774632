"""Recording layer statistics (expert mass, aux losses) for the train/eval steps."""

from __future__ import annotations

import jax
from flax import nnx

from peer_jax.layers import expert_stats


def sow(module: nnx.Module, name: str, value: jax.Array) -> None:
    """Records `value` as an `nnx.Intermediate` when the call runs under `nnx.capture`.

    The train and eval steps always call the model under `nnx.capture(..., nnx.Intermediate)`
    and sum what was sown. A plain call (tests, interactive use) records nothing: sowing outside
    `capture` is deprecated in Flax and would grow the module's state on every call.
    """
    if hasattr(module, "__captures__"):
        module.sow(nnx.Intermediate, name, value)


def sow_expert_mass(module: nnx.Module, idx: jax.Array, scores: jax.Array, num_experts: int,
                    mask: jax.Array | None) -> None:
    """Sows float32 ``[num_experts]`` router mass per expert over valid tokens and heads as
    ``'expert_mass'`` (under ``nnx.capture`` only: the scatter is skipped otherwise)."""
    if not hasattr(module, "__captures__"):
        return
    mass = expert_stats.expert_mass(idx, jax.lax.stop_gradient(scores), num_experts, mask)
    module.sow(nnx.Intermediate, "expert_mass", mass)
