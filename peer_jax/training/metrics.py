"""One metrics writer (process 0): JSONL, TensorBoard and wandb (disabled unless asked for).

`DIR/metrics.jsonl` gets one JSON object per logged step (`step`, `loss`, `tokens_per_sec`,
...; eval rows carry `eval/<task>/loss` and `eval/<task>/ppl`, and for the first eval task
also plain `eval_loss`/`eval_ppl`). wandb runs only when a project is configured, in
`WANDB_MODE` (default `offline`), so it never waits on the network.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import jax
import numpy as np


def _plain(v):
    if isinstance(v, (np.ndarray, jax.Array)):
        v = np.asarray(v).item() if np.asarray(v).size == 1 else np.asarray(v).tolist()
    if isinstance(v, (np.floating, np.integer, np.bool_)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drops rows after `last_step` (used on resume, so the log matches an uninterrupted run)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


class MetricsWriter:
    def __init__(self, workdir: str, *, tensorboard: bool = True, wandb_project: str | None = None,
                 config: dict | None = None, resume_step: int = 0):
        self.active = jax.process_index() == 0
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb = self._wandb = None
        if not self.active:
            return
        truncate_jsonl(self.path, resume_step)
        self._file = open(self.path, "a", buffering=1)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))
        if wandb_project:
            os.environ.setdefault("WANDB_MODE", "offline")
            import wandb

            self._wandb = wandb.init(project=wandb_project, dir=workdir, config=config or {},
                                     mode=os.environ["WANDB_MODE"], resume="allow", id=Path(workdir).name)

    def write(self, step: int, values: dict) -> None:
        if not self.active:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in values.items()}}
        self._file.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k != "step"}, step=step)

    def close(self) -> None:
        if not self.active:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
