"""Orbax checkpoints of the train state in WORKDIR/checkpoints."""

from __future__ import annotations

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
from jaxcap.train_step import TrainState

CHECKPOINT_DIRNAME = 'checkpoints'
# Checkpoints that failed to restore are moved here (never deleted) for inspection.
DAMAGED_DIRNAME = 'damaged_checkpoints'


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (e.g. a full disk); the earlier ones are intact."""


def create_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  """Keeps the `keep` most recent checkpoints; Orbax writes each one atomically."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), CHECKPOINT_DIRNAME),
                               options=options)


def save(manager: ocp.CheckpointManager, state: TrainState, *, force: bool = False) -> None:
  """Saves `state` at its step and waits for the write, so a failure is reported at its step.
  Orbax writes to a temporary folder and renames it when complete, so a crash or a full disk
  never leaves a half-written checkpoint under a step's name."""
  step = int(state.step)
  try:
    manager.save(step, args=ocp.args.StandardSave(flax.serialization.to_state_dict(state)),
                 force=force)
    manager.wait_until_finished()
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
    except Exception as error:  # pylint: disable=broad-except  # Orbax/TensorStore raise many kinds.
      logging.error('The checkpoint of step %d in %s does not restore (%s: %s); trying the one '
                    'before it', step, manager.directory, type(error).__name__, error)
      _set_aside(manager, step)
  return state


def _set_aside(manager: ocp.CheckpointManager, step: int) -> None:
  if jax.process_index() == 0:
    directory = os.fspath(manager.directory)
    damaged = os.path.join(os.path.dirname(directory), DAMAGED_DIRNAME)
    os.makedirs(damaged, exist_ok=True)
    destination = os.path.join(damaged, f'{step}_{time.strftime("%Y%m%d-%H%M%S")}')
    shutil.move(os.path.join(directory, str(step)), destination)
    logging.error('Moved the damaged checkpoint of step %d to %s', step, destination)
  parallel.sync_processes(f'damaged checkpoint {step} set aside')
  manager.reload()
