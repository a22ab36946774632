"""AdamW with linear warmup and cosine decay, global-norm clipping, decay on matrices only."""

from __future__ import annotations

import jax
import optax


def lr_schedule(peak_lr: float, total_steps: int, warmup_steps: int, final_lr_fraction: float = 0.1) -> optax.Schedule:
    """Linear warmup to `peak_lr`, then cosine decay to `final_lr_fraction · peak_lr` at `total_steps`."""
    warmup_steps = max(0, min(warmup_steps, total_steps - 1))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak_lr,
        warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1),
        end_value=peak_lr * final_lr_fraction,
    )


def make_optimizer(
    total_steps: int,
    *,
    peak_lr: float = 3e-3,
    warmup_steps: int = 100,
    final_lr_fraction: float = 0.1,
    weight_decay: float = 0.1,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    grad_clip_norm: float | None = 1.0,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer and its schedule (the schedule is also logged as `lr`).

    Weight decay applies to parameters with ≥ 2 dimensions (matrices, embeddings, expert
    tables), not to norm scales — the usual LM choice.
    """
    schedule = lr_schedule(peak_lr, total_steps, warmup_steps, final_lr_fraction)
    tx = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                     mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params))
    if grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(grad_clip_norm), tx)
    return tx, schedule
