"""AdamW with linear warmup and cosine decay, global-norm clipping, decay on matrices only;
optionally with per-group settings for the parameters of product-key layers (PEER, PKM).

Parameter groups (``make_optimizer(param_groups=...)``; gin:
``optim.make_optimizer.param_groups = {"tables": {"weight_decay": 0.0}}``):

- ``tables``: expert / memory table rows (PEER ``u``, ``v``; PKM ``values``),
- ``keys``: product sub-keys,
- ``query``: the router's query projection and its BatchNorm scale and bias,
- ``rest``: everything else.

A parameter's group is read from the logical axis names on the parameter itself (its
``out_sharding`` metadata, see ``param_group``), not from class or attribute names, so any layer
that declares its tables with ``expert_tables.TABLE_AXES`` joins the ``tables`` group.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import optax

GROUPS = ("tables", "keys", "query", "rest")


def param_group(axes: Sequence[str | None] | None) -> str:
    """The group of a parameter with logical axis names ``axes`` (None: unnamed, e.g. a norm scale).

    ``expert_rows`` marks table rows, ``keys`` sub-key rows and ``key_dim`` (without ``keys``)
    the query projection and query BatchNorm. Membership is tested, not equality, so a leading
    axis added by scanned layers does not change the group.
    """
    names = set(axes or ())
    if "expert_rows" in names:
        return "tables"
    if "keys" in names:
        return "keys"
    if "key_dim" in names:
        return "query"
    return "rest"


@dataclasses.dataclass(frozen=True)
class GroupSettings:
    """One group's settings. ``lr_scale`` multiplies the shared schedule; ``weight_decay`` None
    keeps the global value (0 turns AdamW decay off for the group); ``clip_norm`` clips the
    group's gradient by its own global norm after the global clip (None: no extra clip)."""

    lr_scale: float = 1.0
    weight_decay: float | None = None
    clip_norm: float | None = None


def parse_groups(param_groups: Mapping[str, Mapping[str, Any]]) -> dict[str, GroupSettings]:
    """Validated settings for every group (unlisted groups get the defaults)."""
    fields = {f.name for f in dataclasses.fields(GroupSettings)}
    out = {}
    for name, opts in param_groups.items():
        if name not in GROUPS:
            raise ValueError(f"make_optimizer.param_groups has unknown group {name!r}; use some of {list(GROUPS)}.")
        if not isinstance(opts, Mapping) or set(opts) - fields:
            raise ValueError(f"make_optimizer.param_groups[{name!r}]={opts!r}: give a dict with keys among "
                             f"{sorted(fields)}.")
        s = GroupSettings(**opts)
        if s.lr_scale < 0 or (s.weight_decay is not None and s.weight_decay < 0) or (
                s.clip_norm is not None and s.clip_norm <= 0):
            raise ValueError(f"make_optimizer.param_groups[{name!r}]={opts!r}: lr_scale and weight_decay must be "
                             "≥ 0 and clip_norm > 0 (or None).")
        out[name] = s
    return {g: out.get(g, GroupSettings()) for g in GROUPS}


class ParamLabels:
    """The group label of every parameter, a pytree shaped like the parameters.

    ``step.train_state_spec`` fills it from the parameters' logical
    axes (``assign``) before the optimizer first sees them: the pure-array parameter trees the
    optimizer gets carry no metadata.
    """

    def __init__(self):
        self.tree = None

    def assign(self, labels) -> None:
        self.tree = labels

    def __call__(self, params):
        del params
        if self.tree is None:
            raise ValueError("optimizer param_groups need each parameter's logical axes: build the train state with "
                             "step.train_state_spec (which assigns them).")
        return self.tree


class GroupedTransformation(NamedTuple):
    """An ``optax.GradientTransformation`` (init, update) plus the labels its groups are read from."""

    init: Any
    update: Any
    labels: ParamLabels


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


def _matrices(params):
    return jax.tree.map(lambda p: p.ndim >= 2, params)


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
    param_groups: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer and its schedule (the schedule is also logged as `lr`).

    Weight decay applies to parameters with ≥ 2 dimensions (matrices, embeddings, expert
    tables), not to norm scales — the usual LM choice. AdamW's decay is multiplied by the
    learning rate, so a group's ``lr_scale`` scales its decay too.

    ``param_groups`` (module docstring) maps group names to ``GroupSettings`` fields; None (the
    default) builds the single AdamW without groups, whose state has the layout older checkpoints
    were written with. With groups the optimizer state is one AdamW state per group
    (``optax.multi_transform``), so such a run restores only checkpoints written with groups.
    """
    checks = {"warmup_steps": warmup_steps >= 0, "peak_lr": peak_lr > 0, "final_lr_fraction": final_lr_fraction >= 0,
              "weight_decay": weight_decay >= 0, "b1": 0 <= b1 < 1, "b2": 0 <= b2 < 1, "eps": eps > 0,
              "grad_clip_norm": grad_clip_norm is None or grad_clip_norm > 0}
    for name, ok in checks.items():
        if not ok:
            raise ValueError(f"optim.make_optimizer.{name}={locals()[name]!r} is out of range: warmup_steps ≥ 0, "
                             "peak_lr > 0, final_lr_fraction ≥ 0, weight_decay ≥ 0, 0 ≤ b1, b2 < 1, eps > 0, "
                             "grad_clip_norm > 0 or None.")
    schedule = lr_schedule(peak_lr, total_steps, warmup_steps, final_lr_fraction)
    global_clip = [optax.clip_by_global_norm(grad_clip_norm)] if grad_clip_norm else []
    if param_groups is None:
        tx = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=_matrices)
        return (optax.chain(*global_clip, tx) if global_clip else tx), schedule

    def group_tx(s: GroupSettings) -> optax.GradientTransformation:
        lr = schedule if s.lr_scale == 1.0 else (lambda count: s.lr_scale * schedule(count))
        wd = weight_decay if s.weight_decay is None else s.weight_decay
        adamw = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=wd, mask=_matrices)
        return optax.chain(optax.clip_by_global_norm(s.clip_norm), adamw) if s.clip_norm else adamw

    labels = ParamLabels()
    grouped = optax.multi_transform({g: group_tx(s) for g, s in parse_groups(param_groups).items()}, labels)
    tx = optax.chain(*global_clip, grouped)
    return GroupedTransformation(tx.init, tx.update, labels), schedule


def assign_groups(tx, labels) -> None:
    """Gives a grouped optimizer its parameter labels (a no-op for any other transformation)."""
    if isinstance(tx, GroupedTransformation):
        tx.labels.assign(labels)
