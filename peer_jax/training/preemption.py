"""When to stop on SIGTERM (preemption, maintenance): every host after the same step.

SIGTERM reaches the hosts of a slice at different moments, seconds apart, or only some of
them. Stopping on a host's own flag makes one host enter the checkpoint's barrier while
another runs the next step's collectives: the job hangs. So:

* **Several processes:** JAX's preemption sync manager, which `jax.distributed.initialize`
  starts, catches SIGTERM in C++ and tells the coordination service; each host then reports
  the last step counter it has checked, and the sync point is the largest of them plus one. A
  host checking a counter while that is being computed waits for it, so no host can pass the
  sync point unknowingly, and `reached_preemption_sync_point` is true on every host at the
  same counter. It costs no collective per step (only a local comparison). We install **no
  Python handler** here: `signal.signal(SIGTERM, ...)` would replace the C++ one, and a
  replaced handler hangs staggered preemptions. The counter is the number of steps run by this
  process (not the global step), which starts at the same value on every host, so a notice
  that arrives during start-up stops the run after its first step.
* **One process:** a Python handler sets a flag, checked after each step.
"""

from __future__ import annotations

import signal

import jax


class Preemption:
    """`should_stop(step)` after every step; true once SIGTERM arrived (on any host)."""

    def __init__(self, start_step: int):
        self.start = start_step
        self.requested = False
        self._old = None
        self._multi = jax.process_count() > 1

    def __enter__(self):
        if not self._multi:
            try:
                self._old = signal.signal(signal.SIGTERM, self._handler)
            except ValueError:  # not the main thread
                self._old = None
        return self

    def _handler(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)

    def should_stop(self, step: int) -> bool:
        if self._multi:
            from jax.experimental import multihost_utils

            self.requested = bool(multihost_utils.reached_preemption_sync_point(step - self.start))
        return self.requested
