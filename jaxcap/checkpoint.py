"""Orbax checkpoints of the train state in WORKDIR/checkpoints; a checkpoint that does not
restore is moved to WORKDIR/damaged_checkpoints (never deleted)."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import time

import flax.serialization
import jax
import orbax.checkpoint as ocp

from jaxcap import parallel
from jaxcap import workdir as workdir_lib
from jaxcap.state import TrainState


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (e.g. a full disk); the earlier ones are intact."""


def create_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  """Keeps the `keep` most recent checkpoints; Orbax writes each one atomically."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
  return ocp.CheckpointManager(workdir_lib.checkpoint_dir(workdir),
                               options=options)


class Checkpoints:
  """Saves the train state asynchronously: the steps go on while Orbax writes.

  `save` returns once the state is copied off the devices. A failed write is reported at the next
  `save` or at `wait` (the end of training, a preemption), whichever comes first, as a
  CheckpointWriteError naming the step that failed. Orbax writes each checkpoint to a temporary
  folder and renames it when complete, so a crash or a full disk never leaves a half-written
  checkpoint under a step's name.
  """

  def __init__(self, workdir: str, keep: int):
    self.manager = create_manager(workdir, keep)
    self._writing_step: int | None = None

  def save(self, state: TrainState, *, force: bool = False) -> None:
    self.wait()
    step = int(state.step)
    with _write_errors(self.manager, step):
      self.manager.save(step, args=ocp.args.StandardSave(flax.serialization.to_state_dict(state)),
                        force=force)
    self._writing_step = step

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
