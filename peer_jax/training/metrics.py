"""One metrics writer (process 0): JSONL, TensorBoard and wandb (disabled unless asked for).

TensorBoard events go through `clu.metric_writers.SummaryWriter` (tf.summary, the T5X /
big_vision convention), so a gs:// run directory works through tf.io.gfile with no extra
dependency.

`DIR/metrics.jsonl` gets one JSON object per logged step (`step`, `loss`, `tokens_per_sec`,
...). Eval rows (training/loop.py) carry `eval_subset/<task>/{loss,ppl,tokens,split_tokens}`
(the fixed subset) and, at the final step only, `eval/<task>/...` over the whole split and,
for the first eval task, plain `eval_loss`/`eval_ppl`. wandb runs only when a project is
configured, in `WANDB_MODE` (default `offline`), so it never waits on the network.
"""

from __future__ import annotations

import json
import math
import os
from etils import epath

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


def read_jsonl(path: epath.Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def truncate_jsonl(path: epath.Path, last_step: int) -> list[str]:
    """Drops rows after `last_step` (used on resume, so the log matches an uninterrupted run)."""
    keep = [line for line in read_jsonl(path) if json.loads(line)["step"] <= last_step]
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)
    return keep


class MetricsWriter:
    def __init__(self, workdir: str, *, tensorboard: bool = True, wandb_project: str | None = None,
                 config: dict | None = None, resume_step: int = 0):
        self.active = jax.process_index() == 0
        self.path = epath.Path(workdir) / "metrics.jsonl"
        self._tb = self._wandb = None
        if not self.active:
            return
        self._rows = truncate_jsonl(self.path, resume_step)
        # Object stores (gs://) cannot append: there the whole file is rewritten on each write.
        self._remote = "://" in str(workdir)
        self._file = None if self._remote else open(self.path, "a", buffering=1)
        if tensorboard:
            from clu import metric_writers

            self._tb = metric_writers.SummaryWriter(str(epath.Path(workdir) / "tensorboard"))
        if wandb_project:
            os.environ.setdefault("WANDB_MODE", "offline")
            import wandb

            self._wandb = wandb.init(project=wandb_project, dir=workdir, config=config or {},
                                     mode=os.environ["WANDB_MODE"], resume="allow", id=epath.Path(workdir).name)

    def write(self, step: int, values: dict) -> None:
        if not self.active:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in values.items()}}
        line = json.dumps(row)
        if self._remote:
            self._rows.append(line)
            self.path.write_text("".join(x + "\n" for x in self._rows))
        else:
            self._file.write(line + "\n")
        if self._tb is not None:
            scalars = {k: v for k, v in row.items()
                       if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
            if scalars:
                self._tb.write_scalars(step, scalars)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k != "step"}, step=step)

    def close(self) -> None:
        if not self.active:
            return
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
