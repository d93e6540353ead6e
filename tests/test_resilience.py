"""Preemption (SIGTERM), non-finite losses and config changes on resume."""

import json
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import pytest

from jaxcap import checkpoint
from jaxcap import train
from jaxcap import train_step as train_step_lib

pytestmark = pytest.mark.slow


def test_sigterm_saves_a_checkpoint_and_returns(config, tmp_path):
  workdir = tmp_path / 'workdir'
  config.num_train_steps, config.checkpoint_every_steps = 100_000, 3
  config.log_every_steps = config.eval_every_steps = 100_000

  def preempt_after_first_checkpoint():
    while not (workdir / 'checkpoints' / '3').exists():
      time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)

  threading.Thread(target=preempt_after_first_checkpoint, daemon=True).start()
  previous = signal.getsignal(signal.SIGTERM)
  assert train.train_and_evaluate(config, str(workdir)) == {}
  assert signal.getsignal(signal.SIGTERM) == previous  # The handler is restored.
  steps = checkpoint.create_manager(str(workdir), 2).all_steps()
  assert steps[-1] > 3 and steps[-1] < 100_000  # Saved at the step it stopped at.


def test_nonfinite_loss_stops_without_saving_nan(config, tmp_path, monkeypatch):
  real_step = train_step_lib.train_step

  def poisoned_step(state, batch, dropout_key=None):  # From the 4th step on, the weights turn NaN.
    new_state, metrics = real_step(state, batch, dropout_key)
    poison = state.step >= 3
    params = jax.tree.map(lambda p: jnp.where(poison, jnp.nan, p), new_state.params)
    metrics = {**metrics, 'finite': metrics['finite'] & ~poison}
    return new_state.replace(params=params), metrics

  monkeypatch.setattr(train_step_lib, 'train_step', poisoned_step)
  config.num_train_steps, config.checkpoint_every_steps, config.log_every_steps = 8, 2, 100
  workdir = str(tmp_path / 'workdir')
  with pytest.raises(train.NonFiniteLossError, match='at step 4.*Last good checkpoint: step 2'):
    train.train_and_evaluate(config, workdir)
  manager = checkpoint.create_manager(workdir, 2)
  assert manager.all_steps() == [2]


def test_resume_rejects_locked_changes_and_allows_others(config, tmp_path):
  workdir = str(tmp_path / 'workdir')
  config.num_train_steps = 2
  train.train_and_evaluate(config, workdir)
  changed = config.copy_and_resolve_references()
  changed.model.lstm_size = 48
  with pytest.raises(ValueError, match='model.lstm_size'):
    train.train_and_evaluate(changed, workdir)
  changed = config.copy_and_resolve_references()
  changed.data.vocab_size = 99
  with pytest.raises(ValueError, match='data.vocab_size'):
    train.train_and_evaluate(changed, workdir)
  changed = config.copy_and_resolve_references()
  changed.num_train_steps, changed.eval_every_steps = 3, 50
  train.train_and_evaluate(changed, workdir)
  assert checkpoint.create_manager(workdir, 2).latest_step() == 3


def test_fields_added_since_a_run_are_compatible_at_their_off_values(config, tmp_path):
  # A workdir written before model.dropout and config.scst existed.
  old = json.loads(config.to_json_best_effort())
  del old['model']['dropout'], old['scst']
  (tmp_path / 'config.json').write_text(json.dumps(old))
  train.check_resume_config(str(tmp_path), config)  # dropout 0, scst off: as it was trained.
  config.model.dropout = 0.5
  with pytest.raises(ValueError, match=r'model.dropout \(model.dropout: None -> 0.5\)'):
    train.check_resume_config(str(tmp_path), config)
