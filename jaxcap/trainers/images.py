"""The 'images' trainer: encoder and decoder on host batches of images, one jitted step each.

Batches come from tf.data on the host (`Setup.train_batches`), a pure function of (seed,
step), so a resumed run continues the same sequence.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import ml_collections
import numpy as np

from jaxcap import parallel
from jaxcap import state as state_lib
from jaxcap import train_step as train_step_lib
from jaxcap.trainers.base import Setup
from jaxcap.trainers.base import Trainer


def make(state: state_lib.TrainState, batches: Iterator[dict[str, np.ndarray]],
         config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Trainer:
  """The trainer of a full-model `state` on host `batches` (each this process's share)."""
  dropout_key = state_lib.named_key(config.seed, 'dropout')

  def one_step(state, batch):
    state, metrics = train_step_lib.train_step(state, batch, dropout_key)
    return state, jax.tree.map(lambda x: x[None], metrics)  # One step per call.

  step_fn = parallel.jit_data_parallel(one_step, mesh, donate_state=True)

  def run(state, num_steps):
    del num_steps  # Always one.
    return step_fn(state, parallel.shard_batch(next(batches), mesh))

  return Trainer(state, run, 1, lambda s: s, {'examples_per_sec': config.batch_size})


def build(setup: Setup) -> Trainer:
  state = setup.checkpoints.restore_latest(setup.full_state)
  return make(state, setup.train_batches(int(state.step)), setup.config, setup.mesh)
