"""Orbax checkpoints of the train state in WORKDIR/checkpoints."""

from __future__ import annotations

import os

import flax.serialization
import jax
import orbax.checkpoint as ocp

from jaxcap.train_step import TrainState

CHECKPOINT_DIRNAME = 'checkpoints'


def create_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  """Keeps the `keep` most recent checkpoints; Orbax writes each one atomically."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), CHECKPOINT_DIRNAME),
                               options=options)


def save(manager: ocp.CheckpointManager, state: TrainState, *, force: bool = False) -> None:
  step = int(state.step)
  manager.save(step, args=ocp.args.StandardSave(flax.serialization.to_state_dict(state)),
               force=force)


def restore(manager: ocp.CheckpointManager, state: TrainState, step: int) -> TrainState:
  """The checkpoint of `step`, laid out (shapes, dtypes, shardings) like `state`."""
  target = flax.serialization.to_state_dict(state)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
  return flax.serialization.from_state_dict(state, restored)


def restore_latest(manager: ocp.CheckpointManager, state: TrainState) -> TrainState:
  """The latest checkpoint laid out like `state`, or `state` when there is none."""
  step = manager.latest_step()
  return state if step is None else restore(manager, state, step)
