"""Orbax checkpoints of the train state in WORKDIR/checkpoints; a checkpoint that does not
restore is moved to WORKDIR/damaged_checkpoints (never deleted)."""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import re
import shutil
import time

import flax.serialization
import jax
import ml_collections
import orbax.checkpoint as ocp

from jaxcap import parallel
from jaxcap import workdir as workdir_lib
from jaxcap.state import TrainState


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (e.g. a full disk); the earlier ones are intact."""


# config.best_checkpoint: (the validation metric a best checkpoint is chosen by, 'max' or 'min').
Best = tuple[str, str]
BEST_MODES = ('max', 'min')


def best_of(config: ml_collections.ConfigDict) -> Best | None:
  """The run's (metric, mode) of the best checkpoint, or None where config.best_checkpoint
  .metric is None (only the latest checkpoints are kept)."""
  metric, mode = config.best_checkpoint.metric, config.best_checkpoint.mode
  if metric is None:
    return None
  if mode not in BEST_MODES:
    raise ValueError(f'config.best_checkpoint.mode={mode!r} is not one of {BEST_MODES}')
  return metric, mode


def _score_fn(best: Best):
  """A checkpoint's score for Orbax (larger is better in 'max' mode); unscored ones the worst."""
  metric, mode = best
  worst = -math.inf if mode == 'max' else math.inf
  return lambda metrics: float((metrics or {}).get(metric, worst))


def create_manager(workdir: str, keep: int, best: Best | None = None) -> ocp.CheckpointManager:
  """Keeps the `keep` most recent checkpoints and, with `best`, the one whose validation
  metrics (saved with it) score best; Orbax writes each one atomically."""
  if best is None:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
  else:
    score, mode = _score_fn(best), best[1]
    policies = ocp.checkpoint_managers
    policy = policies.AnyPreservationPolicy([
        policies.LatestN(n=keep),
        policies.BestN(get_metric_fn=score, reverse=mode == 'min', n=1,
                       keep_checkpoints_without_metrics=False)])
    options = ocp.CheckpointManagerOptions(create=True, best_fn=score, best_mode=mode,
                                           preservation_policy=policy)
  return ocp.CheckpointManager(workdir_lib.checkpoint_dir(workdir), options=options)


def best_step(manager: ocp.CheckpointManager, best: Best | None) -> int | None:
  """The step whose saved validation metrics hold the best `best` metric (the latest of equal
  ones, as Orbax keeps), or None where no checkpoint has it (none evaluated yet, or a manager
  that tracks no best)."""
  step = None if best is None else manager.best_step()
  return step if step is not None and best[0] in (manager.metrics(step) or {}) else None


def choose_step(manager: ocp.CheckpointManager, best: Best | None, which: str | int | None,
                where: str) -> tuple[int, str]:
  """(step, how it was chosen) of `which`: 'best' (the best recorded validation score),
  'latest', a step number, or None (best where one is recorded, else latest). A step that is
  not there is a ValueError naming `where` and the steps there are."""
  steps = manager.all_steps()
  if not steps:
    raise FileNotFoundError(f'{where}: no checkpoint to restore')
  which = parse_step(which)
  if which in (None, 'best'):
    step = best_step(manager, best)
    if step is not None:
      value = manager.metrics(step)[best[0]]
      return step, f'step {step}, the best by validation {best[0]} ({value:.4g})'
    if which == 'best':
      raise ValueError(f'{where}: no best checkpoint is recorded (no checkpoint holds a '
                       f'validation {best[0] if best else "score"}); its steps are '
                       f'{sorted(steps)}: use latest or one of them')
  if which in (None, 'best', 'latest'):
    return steps[-1], f'step {steps[-1]}, the latest'
  if which not in steps:
    raise ValueError(f'{where}: no checkpoint of step {which}; there are {sorted(steps)}')
  return which, f'step {which}'


def parse_step(which: str | int | None) -> str | int | None:
  """'best', 'latest', a step number (int or digits) or None, checked."""
  if which is None or which in ('best', 'latest'):
    return which
  if isinstance(which, int) or str(which).isdigit():
    return int(which)
  raise ValueError(f'checkpoint step {which!r}: give best, latest or a step number')


class Checkpoints:
  """Saves the train state asynchronously: the steps go on while Orbax writes.

  `save` returns once the state is copied off the devices. A failed write is reported at the next
  `save` or at `wait` (the end of training, a preemption), whichever comes first, as a
  CheckpointWriteError naming the step that failed. Orbax writes each checkpoint to a temporary
  folder and renames it when complete, so a crash or a full disk never leaves a half-written
  checkpoint under a step's name.
  """

  def __init__(self, workdir: str, keep: int, best: Best | None = None):
    self.manager = create_manager(workdir, keep, best)
    self.best = best
    self._writing_step: int | None = None

  def save(self, state: TrainState, *, force: bool = False,
           metrics: dict[str, float] | None = None) -> None:
    """Saves `state`; `metrics` are its validation metrics, which choose the best checkpoint."""
    self.wait()
    step = int(state.step)
    if self.best is not None:  # Orbax then saves metrics with every checkpoint.
      metrics = {k: float(v) for k, v in (metrics or {}).items()}
    with _write_errors(self.manager, step):
      self.manager.save(step, args=ocp.args.StandardSave(flax.serialization.to_state_dict(state)),
                        force=force, metrics=metrics)
    self._writing_step = step

  def best_step(self) -> int | None:
    return best_step(self.manager, self.best)

  def restore(self, state: TrainState, step: int) -> TrainState:
    return restore(self.manager, state, step)

  def wait(self) -> None:
    """Waits for the write in progress; raises CheckpointWriteError if it failed."""
    if self._writing_step is None:
      return
    step, self._writing_step = self._writing_step, None
    with _write_errors(self.manager, step):
      self.manager.wait_until_finished()
      self.manager.check_for_errors()

  def restore_latest(self, state: TrainState) -> TrainState:
    return restore_latest(self.manager, state)

  def close(self) -> None:
    """Waits for the write in progress (its error, if any, is raised) and closes the manager."""
    try:
      self.wait()
    finally:
      self.manager.close()


@contextlib.contextmanager
def _write_errors(manager: ocp.CheckpointManager, step: int):
  """Turns a failed write of `step` into a CheckpointWriteError with what the user can do."""
  try:
    yield
  except (OSError, ValueError) as error:
    # TensorStore reports a failed write as ValueError, the OS error code in its message.
    code = error.errno if isinstance(error, OSError) else _os_error_code(str(error))
    if code is None and not isinstance(error, OSError):
      raise
    reason = 'the disk is full' if code == errno.ENOSPC else (
        f'{os.strerror(code)} (errno {code})' if code else str(error))
    raise CheckpointWriteError(
        code, f'could not write the checkpoint of step {step} to {manager.directory}: '
        f'{reason}. The earlier checkpoints are intact (steps {manager.all_steps()}); free some '
        'space and run the same command again to resume from the latest of them') from error


def _os_error_code(message: str) -> int | None:
  match = re.search(r"os_error_code='(\d+)'", message)
  return int(match.group(1)) if match else None


def restore(manager: ocp.CheckpointManager, state: TrainState, step: int) -> TrainState:
  """The checkpoint of `step`, laid out (shapes, dtypes, shardings) like `state`."""
  target = flax.serialization.to_state_dict(state)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
  return flax.serialization.from_state_dict(state, restored)


def restore_latest(manager: ocp.CheckpointManager, state: TrainState) -> TrainState:
  """The latest checkpoint that restores, laid out like `state`, or `state` when there is none.

  A checkpoint that fails to restore (damaged or partial files) is reported with its step and
  moved to WORKDIR/damaged_checkpoints; the one before it is tried next.
  """
  for step in reversed(manager.all_steps()):
    try:
      return restore(manager, state, step)
    except Exception as error:  # Orbax and TensorStore raise many kinds.
      logging.error('The checkpoint of step %d in %s does not restore (%s: %s); trying the one '
                    'before it', step, manager.directory, type(error).__name__, error)
      _set_aside(manager, step)
  return state


def _set_aside(manager: ocp.CheckpointManager, step: int) -> None:
  if jax.process_index() == 0:
    directory = os.fspath(manager.directory)
    damaged = os.path.join(os.path.dirname(directory), workdir_lib.DAMAGED_CHECKPOINTS)
    os.makedirs(damaged, exist_ok=True)
    destination = os.path.join(damaged, f'{step}_{time.strftime("%Y%m%d-%H%M%S")}')
    shutil.move(os.path.join(directory, str(step)), destination)
    logging.error('Moved the damaged checkpoint of step %d to %s', step, destination)
  parallel.sync_processes(f'damaged checkpoint {step} set aside')
  manager.reload()
