"""Orbax checkpoints of the train state: round trip, retention, sharded restore (no TF)."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxcap import checkpoint
from jaxcap import parallel
from tests.test_train_step import _jit_step, _random_batch, _state


def test_save_and_restore_round_trip(config, tmp_path):
  mesh = parallel.make_mesh()
  state, step = _state(config, mesh), _jit_step(mesh)
  manager = checkpoint.create_manager(str(tmp_path), keep=2)
  for seed in range(3):
    state, _ = step(state, parallel.shard_batch(_random_batch(config, 16, seed), mesh))
    checkpoint.save(manager, state)
  manager.wait_until_finished()
  assert manager.all_steps() == [2, 3]

  fresh = _state(config, mesh)
  assert checkpoint.restore_latest(checkpoint.create_manager(str(tmp_path / 'empty'), 2), fresh) is fresh
  restored = checkpoint.restore_latest(checkpoint.create_manager(str(tmp_path), 2), fresh)
  assert int(restored.step) == 3
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params),
               jax.device_get(restored.params))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.opt_state),
               jax.device_get(restored.opt_state))
  leaf = restored.params['decoder']['bottleneck_to_logits']['kernel']
  assert leaf.sharding.is_equivalent_to(parallel.replicated(mesh), leaf.ndim)
  # Training continues from the restored state exactly as from the original.
  batch = parallel.shard_batch(_random_batch(config, 16, 9), mesh)
  _, expected = step(jax.tree.map(jnp.copy, state), batch)
  _, actual = step(restored, batch)
  np.testing.assert_array_equal(expected['loss'], actual['loss'])
