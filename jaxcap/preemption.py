"""Stopping for a preemption notice (SIGTERM) at a step that every process agrees on.

On a pod or a SLURM job the hosts get the notice at different moments, or only some of them get
it. Orbax's save is collective, so every process must save the same step: with several processes
JAX's preemption sync manager (started by `jax.distributed.initialize`, which catches SIGTERM)
picks the first step that every process reaches after any of them got the notice. It exchanges
nothing until a notice arrives, so checking it costs no host sync per step. A single process
without `jax.distributed` stops at the step it is on.
"""

from __future__ import annotations

from collections.abc import Iterable
import signal
import threading

import jax
from jax.experimental import multihost_utils


class PreemptionWatch:
  """A context manager; `reached_stop(steps)` says whether to checkpoint and stop after `steps`.

  It must be called with every step, in order, on every process: the sync manager counts steps.
  """

  def __init__(self):
    self._notified = threading.Event()
    self._previous_handler = None
    # With jax.distributed, the sync manager's own SIGTERM handler must stay installed.
    self._synced = jax.distributed.is_initialized()
    self._handles_signal = (not self._synced and
                            threading.current_thread() is threading.main_thread())

  def __enter__(self) -> PreemptionWatch:
    if self._handles_signal:
      self._previous_handler = signal.signal(signal.SIGTERM, lambda *_: self._notified.set())
    return self

  def __exit__(self, *exc_info) -> None:
    if self._handles_signal:
      signal.signal(signal.SIGTERM, self._previous_handler)

  def reached_stop(self, steps: Iterable[int]) -> bool:
    """Whether the run must stop after the last of `steps` (the steps one call just ran)."""
    if not self._synced:
      return self._notified.is_set()
    # Every step, not only the last: the sync point is (latest step of any process) + 1.
    return any([multihost_utils.reached_preemption_sync_point(step) for step in steps])
