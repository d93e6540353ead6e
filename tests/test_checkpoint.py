"""Orbax checkpoints of the train state: round trip, retention, sharded restore (no TF), and a
trained workdir restored from its checkpoint alone."""

import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxcap import checkpoint
from jaxcap import parallel
from tests.conftest import SCRIPT_XLA_FLAGS
from tests.test_train_step import _jit_step
from tests.test_train_step import _random_batch
from tests.test_train_step import _state

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_save_and_restore_round_trip(config, tmp_path):
  mesh = parallel.make_mesh()
  state, step = _state(config, mesh), _jit_step(mesh)
  checkpoints = checkpoint.Checkpoints(str(tmp_path), keep=2)
  for seed in range(3):
    # Saved while the next steps run: the donated buffers are reused under the write.
    checkpoints.save(state)
    state, _ = step(state, parallel.shard_batch(_random_batch(config, 16, seed), mesh))
  checkpoints.save(state)
  written = jax.tree.map(jnp.copy, state)
  state, _ = step(state, parallel.shard_batch(_random_batch(config, 16, 7), mesh))
  checkpoints.close()
  assert checkpoints.manager.all_steps() == [2, 3]

  fresh = _state(config, mesh)
  assert checkpoint.restore_latest(checkpoint.create_manager(str(tmp_path / 'empty'), 2),
                                   fresh) is fresh
  restored = checkpoint.restore_latest(checkpoint.create_manager(str(tmp_path), 2), fresh)
  assert int(restored.step) == 3
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(written.params),
               jax.device_get(restored.params))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(written.opt_state),
               jax.device_get(restored.opt_state))
  leaf = restored.params['decoder']['bottleneck_to_logits']['kernel']
  assert leaf.sharding.is_equivalent_to(parallel.replicated(mesh), leaf.ndim)
  # Training continues from the restored state exactly as from the original.
  batch = parallel.shard_batch(_random_batch(config, 16, 9), mesh)
  _, expected = step(written, batch)
  _, actual = step(restored, batch)
  np.testing.assert_array_equal(expected['loss'], actual['loss'])


def _saved_steps(config, mesh, directory, steps):
  state, step = _state(config, mesh), _jit_step(mesh)
  checkpoints = checkpoint.Checkpoints(directory, keep=3)
  for seed in range(steps):
    state, _ = step(state, parallel.shard_batch(_random_batch(config, 16, seed), mesh))
    checkpoints.save(state)
  checkpoints.close()


def test_damaged_latest_checkpoint_falls_back_to_the_previous(config, tmp_path, caplog):
  mesh = parallel.make_mesh(jax.devices()[:1])
  _saved_steps(config, mesh, str(tmp_path), 3)
  # Damage every data file of step 3, as a crash in mid-copy or a bad disk would.
  damaged = [
      p for p in (tmp_path / 'checkpoints' / '3').rglob('*')
      if p.is_file() and p.stat().st_size > 0 and 'metadata' not in p.name
  ]
  assert damaged
  for path in damaged:
    path.write_bytes(b'\0' * 7)
  manager = checkpoint.create_manager(str(tmp_path), keep=3)
  restored = checkpoint.restore_latest(manager, _state(config, mesh))
  assert int(restored.step) == 2
  assert 'step 3' in caplog.text
  assert manager.all_steps() == [1, 2]  # Step 3 was set aside, not deleted.
  assert [p.name.split('_')[0] for p in (tmp_path / 'damaged_checkpoints').iterdir()] == ['3']


_FAILED_WRITE = """
import resource, signal, sys
import jax, numpy as np
from jaxcap import checkpoint, parallel
from tests.conftest import tiny_config
from tests.test_train_step import _jit_step, _random_batch, _state
config, mesh = tiny_config(sys.argv[2]), parallel.make_mesh(jax.devices()[:1])
state, step = _state(config, mesh), _jit_step(mesh)
checkpoints = checkpoint.Checkpoints(sys.argv[1], keep=3)
for seed in range(2):
  state, _ = step(state, parallel.shard_batch(_random_batch(config, 16, seed), mesh))
  checkpoints.save(state)
checkpoints.wait()
kernel = state.params['decoder']['bottleneck_to_logits']['kernel']
np.save(sys.argv[1] + '/kernel2.npy', jax.device_get(kernel))
state, _ = step(state, parallel.shard_batch(_random_batch(config, 16, 5), mesh))
# Files of this process may not grow past 20 kB from here on: the write fails part-way.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))
try:
  checkpoints.save(state)  # Step 3: written in the background while training goes on.
  print('SAVE RETURNED', flush=True)
  state, _ = step(state, parallel.shard_batch(_random_batch(config, 16, 6), mesh))
  checkpoints.save(state)  # Step 4: reports step 3's failure before starting.
except checkpoint.CheckpointWriteError as error:
  print('ERROR:', error)
"""


def test_a_failed_write_names_the_step_and_keeps_earlier_checkpoints(config, tmp_path):
  # A real write failing part-way (a file size limit, as a full disk would), in a process of
  # its own: the limit would hit every file this process writes.
  result = subprocess.run(
      [sys.executable, '-c', _FAILED_WRITE,
       str(tmp_path), config.data.data_dir],
      capture_output=True,
      text=True,
      timeout=600,
      cwd=ROOT,
      env={
          **os.environ, 'XLA_FLAGS': SCRIPT_XLA_FLAGS
      })
  assert result.returncode == 0, result.stderr[-3000:]
  # The failed write did not stop the step that started it; the next save reported it.
  assert 'SAVE RETURNED' in result.stdout, result.stdout + result.stderr[-3000:]
  assert re.search(
      r'ERROR: .*could not write the checkpoint of step 3 .*File too large.*'
      r'intact \(steps \[1, 2\]\)', result.stdout), result.stdout + result.stderr[-3000:]
  manager = checkpoint.create_manager(str(tmp_path), keep=3)
  assert manager.all_steps() == [1, 2]
  mesh = parallel.make_mesh(jax.devices()[:1])
  restored = checkpoint.restore_latest(manager, _state(config, mesh))
  assert int(restored.step) == 2
  np.testing.assert_array_equal(restored.params['decoder']['bottleneck_to_logits']['kernel'],
                                np.load(tmp_path / 'kernel2.npy'))


def test_a_full_workdir_restores_without_initialising_the_model(trained_workdir, monkeypatch):
  """Captioning and evaluation start from the checkpoint alone (InceptionV3's initialisation
  takes ~20 s to compile): the state equals what Orbax reads from the files by itself."""
  from jaxcap import predict
  from jaxcap import state as state_lib

  def refuse(*args, **kwargs):
    raise AssertionError('a full checkpoint was restored by initialising the model first')

  monkeypatch.setattr(state_lib, 'initial_state', refuse)
  trained = predict.restore(trained_workdir)
  manager = checkpoint.create_manager(trained_workdir, keep=2)
  latest = manager.latest_step()
  on_disk = manager.restore(latest)  # No template: the arrays as saved.
  manager.close()
  assert int(trained.state.step) == int(on_disk['step']) == latest
  restored = jax.device_get({'params': trained.state.params,
                             'batch_stats': trained.state.batch_stats})
  jax.tree.map(np.testing.assert_array_equal, restored,
               {'params': on_disk['params'], 'batch_stats': on_disk['batch_stats']})
