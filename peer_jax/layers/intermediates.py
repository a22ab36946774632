"""Recording layer statistics (expert mass, aux losses) for the train/eval steps."""

from __future__ import annotations

import jax
from flax import nnx


def sow(module: nnx.Module, name: str, value: jax.Array) -> None:
    """Records `value` as an `nnx.Intermediate` when the call runs under `nnx.capture`.

    The train and eval steps always call the model under `nnx.capture(..., nnx.Intermediate)`
    and sum what was sown. A plain call (tests, interactive use) records nothing: sowing outside
    `capture` is deprecated in Flax and would grow the module's state on every call.
    """
    if hasattr(module, "__captures__"):
        module.sow(nnx.Intermediate, name, value)
