"""``TrainConfig.profile_steps``: a ``jax.profiler`` trace of a range of training steps.

``profile_steps = (first, last)`` traces steps ``first`` to ``last`` (1-based step numbers,
inclusive) into ``<workdir>/profile`` (TensorBoard's profile plugin or Perfetto read it). The
loop needs two calls: build a ``StepProfiler`` once before its first step, and call
``after_step`` after each step. The trace starts once step ``first - 1`` is done (at build
time for ``first`` ≤ the step the run starts after) and stops after step ``last``, or after
the run's final step if that comes first. Only process 0 traces.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger("peer_jax")


class StepProfiler:
    def __init__(self, profile_steps, workdir, *, start_step: int, num_steps: int):
        self.active = False
        self.range = None
        if profile_steps is None or jax.process_index() != 0:
            return
        first, last = (int(s) for s in profile_steps)  # checked by training.build.validate
        self.range, self.num_steps = (first, last), num_steps
        self.logdir = os.path.join(str(workdir), "profile")
        if first - 1 <= start_step < last:
            self._start(start_step + 1)

    def _start(self, step: int) -> None:
        log.info("profiler: tracing from step %d into %s", step, self.logdir)
        jax.profiler.start_trace(self.logdir)
        self.active = True

    def after_step(self, step: int, outputs=None) -> None:
        """Call after step ``step`` (1-based) ran; ``outputs`` (e.g. its metrics) are waited
        for before a trace stops, so the traced steps' device work is in it."""
        if self.range is None:
            return
        first, last = self.range
        if not self.active and step == first - 1 and step < self.num_steps:
            self._start(step + 1)
        elif self.active and (step >= last or step >= self.num_steps):
            if outputs is not None:
                jax.block_until_ready(outputs)
            jax.profiler.stop_trace()
            self.active = False
            log.info("profiler: trace of steps %d-%d written to %s", first, step, self.logdir)
