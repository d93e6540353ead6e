"""Preemption (SIGTERM), non-finite losses and config changes on resume."""

import json
import logging
import os
import re
import signal
import threading
import time

import numpy as np
import pytest
import tensorflow as tf

from jaxcap import checkpoint
from jaxcap import train
from jaxcap import workdir as workdir_lib
from jaxcap.data import input_pipeline

pytestmark = pytest.mark.slow


def test_sigterm_saves_a_checkpoint_and_returns(config, tmp_path, caplog):
  workdir = tmp_path / 'workdir'
  # No regular checkpoint can happen: the only one is SIGTERM's.
  config.num_train_steps = config.checkpoint_every_steps = config.eval_every_steps = 100_000
  config.log_every_steps = 2

  def preempt_once_training_runs():
    while not (workdir / 'metrics.jsonl').exists():
      time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)

  threading.Thread(target=preempt_once_training_runs, daemon=True).start()
  previous = signal.getsignal(signal.SIGTERM)
  with caplog.at_level(logging.WARNING):
    assert train.train_and_evaluate(config, str(workdir)) == {}
  assert signal.getsignal(signal.SIGTERM) == previous  # The handler is restored.
  stopped = int(re.search(r'SIGTERM: saved the checkpoint of step (\d+)', caplog.text).group(1))
  assert checkpoint.create_manager(str(workdir), 2).all_steps() == [stopped]
  logged = [
      json.loads(line)['step'] for line in (workdir / 'metrics.jsonl').read_text().splitlines()
  ]
  assert 2 <= max(logged) <= stopped < 100_000  # Saved at the step it stopped at, then stopped.


def test_nonfinite_loss_stops_without_saving_nan(config, tmp_path, monkeypatch):
  # From the 4th step on the images hold an infinite pixel: the loss and gradients become truly
  # non-finite, and the train step's own check is what stops training.
  real_dataset = input_pipeline.train_dataset

  def poisoned_dataset(*args, start_step=0, **kwargs):
    def poison(index, batch):
      step = index + start_step + 1
      image = tf.cast(batch['image'], tf.float32) / 127.5 - 1  # The model takes float too.
      image = tf.where(step >= 4, tf.fill(tf.shape(image), np.inf), image)
      return {**batch, 'image': image}
    return real_dataset(*args, start_step=start_step, **kwargs).enumerate().map(poison)

  monkeypatch.setattr(input_pipeline, 'train_dataset', poisoned_dataset)
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


def _trained_workdir_with(config_json: str, tmp_path):
  """A folder with this config.json and a checkpoint: what the resume check reads."""
  (tmp_path / 'config.json').write_text(config_json)
  (tmp_path / 'checkpoints' / '2').mkdir(parents=True)
  return str(tmp_path)


def test_fields_added_since_a_run_are_compatible_at_their_off_values(config, tmp_path):
  # A workdir written before model.dropout, config.scst, config.trainer and small_cnn's block
  # options existed (it trained on images: features.enabled was False).
  old = json.loads(config.to_json_best_effort())
  del old['model']['dropout'], old['scst'], old['trainer']
  del old['model']['small_cnn']['pool_before_norm'], old['model']['small_cnn']['strided_first_conv']
  old['features']['enabled'] = False
  workdir = _trained_workdir_with(json.dumps(old), tmp_path)
  workdir_lib.check_resume(workdir, config)  # dropout 0, on images: as it was trained.
  for field, value, was in (('trainer', 'features', 'images'),
                            ('model.small_cnn.pool_before_norm', True, False),
                            ('model.small_cnn.strided_first_conv', True, False)):
    changed = config.copy_and_resolve_references()
    changed.update_from_flattened_dict({field: value})
    with pytest.raises(ValueError, match=rf'{field} \({field}: {was!r} -> {value!r}\)'):
      workdir_lib.check_resume(workdir, changed)


def test_compute_only_fields_may_change_on_resume(config, tmp_path):
  workdir = _trained_workdir_with(config.to_json_best_effort(), tmp_path)
  for field, value in (('dtype', 'bfloat16'), ('lstm_unroll', 4), ('loss_chunk_steps', 3),
                       ('dropout', 0.3), ('bn_momentum', 0.5)):
    changed = config.copy_and_resolve_references()
    changed.model[field] = value
    workdir_lib.check_resume(workdir, changed)  # Parameters and tokens unchanged: allowed.
  for field, value in (('lstm_size', 48), ('encoder', 'zeros'), ('train_encoder', False)):
    changed = config.copy_and_resolve_references()
    changed.model[field] = value
    with pytest.raises(ValueError, match=f'model.{field}'):
      workdir_lib.check_resume(workdir, changed)
