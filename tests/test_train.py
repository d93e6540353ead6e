"""The whole training loop on the tiny built-in dataset: metrics, checkpoints, resume."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcap import checkpoint
from jaxcap import parallel
from jaxcap import train
from jaxcap import workdir as workdir_lib
from jaxcap.data import tokenizer
from tests.test_train_step import _state


@pytest.mark.slow
def test_train_and_evaluate_writes_metrics_and_resumes(config, tmp_path):
  workdir = str(tmp_path / 'workdir')
  results = train.train_and_evaluate(config, workdir)
  assert set(results) == {'val', 'test'}

  lines = [json.loads(line) for line in open(os.path.join(workdir, workdir_lib.METRICS))]
  assert [(r['step'], r['split']) for r in lines] == [(2, 'train'), (4, 'train'), (4, 'val'),
                                                      (4, 'test')]
  train_records, lines = lines[:2], lines[2:]
  assert all(
      {'train_loss', 'train_token_accuracy', 'learning_rate'} <= set(r) for r in train_records)
  assert 'steps_per_sec' in train_records[1]  # Step 2 holds the compilation, step 4 not.
  for record in lines:
    assert {'step', 'split', 'loss', 'bleu_1', 'bleu_2', 'bleu_3', 'bleu_4', 'meteor', 'rouge_l',
            'cider', 'scene_accuracy'} <= set(record)
    assert record['num_images'] == 12
    assert np.isfinite(record['loss']) and 0 <= record['scene_accuracy'] <= 1
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(workdir))
  assert os.path.exists(os.path.join(workdir, 'tokenizer.model'))

  # The checkpoint at step 4 is what a new process restores, and training continues from it.
  manager = checkpoint.create_manager(workdir, config.keep_checkpoints)
  assert manager.all_steps() == [2, 4]
  mesh = parallel.make_mesh()
  vocab_size = tokenizer.Tokenizer.load(os.path.join(workdir, 'tokenizer.model')).vocab_size
  template = _state(config, mesh, vocab_size)
  template = template.replace(params=jax.tree.map(jnp.zeros_like, template.params))
  saved = checkpoint.restore_latest(manager, template)
  assert int(saved.step) == 4
  assert all(np.abs(x).sum() > 0 for x in jax.tree.leaves(saved.params['decoder']))

  config.num_train_steps = 6
  train.train_and_evaluate(config, workdir)
  manager = checkpoint.create_manager(workdir, config.keep_checkpoints)
  assert manager.all_steps() == [4, 6]
  lines = [json.loads(line) for line in open(os.path.join(workdir, workdir_lib.METRICS))]
  assert [(r['step'], r['split']) for r in lines][-2:] == [(6, 'val'), (6, 'test')]
  # Nothing left to do: the same command again restores step 6 and returns at once.
  assert train.train_and_evaluate(config, workdir) == {}
  resumed = checkpoint.restore_latest(checkpoint.create_manager(workdir, 2), template)
  assert int(resumed.step) == 6
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), saved.params, resumed.params)
  assert any(jax.tree.leaves(changed))
