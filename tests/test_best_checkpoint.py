"""The best checkpoint: kept besides the latest by its validation metric, across restarts; the
final report scores it; every script and self-critical training choose best, latest or a step."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxcap import checkpoint
from jaxcap import command_line
from jaxcap import evaluate
from jaxcap import parallel
from jaxcap import predict
from jaxcap import train
from jaxcap import workdir as workdir_lib
from jaxcap.data import sources
from tests.conftest import SCRIPT_XLA_FLAGS
from tests.test_train_step import _state


def _save(checkpoints, state, step, metrics=None):
  checkpoints.save(state.replace(step=np.int32(step)), metrics=metrics)
  checkpoints.wait()


@pytest.mark.parametrize('mode', ['max', 'min'])
def test_the_best_is_kept_besides_the_latest_across_restarts(config, tmp_path, mode):
  """Values, in both directions: the best of the scored steps survives keep=1, a new manager
  (a restart, after SIGKILL too: nothing is closed) knows it, and a better one replaces it."""
  mesh = parallel.make_mesh()
  state = _state(config, mesh)
  sign = 1 if mode == 'max' else -1
  checkpoints = checkpoint.Checkpoints(str(tmp_path), keep=1, best=('cider', mode))
  _save(checkpoints, state, 1)
  _save(checkpoints, state, 2, {'cider': sign * 3.0, 'bleu_4': 0.1})
  _save(checkpoints, state, 3)
  _save(checkpoints, state, 4, {'cider': sign * 2.0, 'bleu_4': 0.9})
  assert checkpoints.manager.all_steps() == [2, 4]
  assert checkpoints.best_step() == 2
  # A restart reads the scores from disk (the first manager is never closed, as after SIGKILL).
  restarted = checkpoint.Checkpoints(str(tmp_path), keep=1, best=('cider', mode))
  assert restarted.best_step() == 2
  _save(restarted, state, 5)
  assert restarted.manager.all_steps() == [2, 5]
  _save(restarted, state, 6, {'cider': sign * 5.0})
  assert restarted.manager.all_steps() == [6] and restarted.best_step() == 6
  _save(restarted, state, 7, {'cider': sign * 5.0})  # A tie: the later one, as Orbax keeps.
  assert restarted.best_step() == 7 and restarted.manager.all_steps() == [7]
  restarted.close()
  manager = checkpoint.create_manager(str(tmp_path), 1, ('cider', mode))
  assert checkpoint.choose_step(manager, ('cider', mode), None, 'w')[0] == 7


def test_choose_step_best_latest_or_a_number(config, tmp_path):
  mesh = parallel.make_mesh()
  state = _state(config, mesh)
  best = ('cider', 'max')
  checkpoints = checkpoint.Checkpoints(str(tmp_path), keep=3, best=best)
  _save(checkpoints, state, 2)
  manager = checkpoint.create_manager(str(tmp_path), 3, best)
  # Nothing scored: the default is the latest, and 'best' is an error that says why.
  assert checkpoint.choose_step(manager, best, None, 'w') == (2, 'step 2, the latest')
  with pytest.raises(ValueError, match='w: no best checkpoint is recorded .*steps are \\[2\\]'):
    checkpoint.choose_step(manager, best, 'best', 'w')
  _save(checkpoints, state, 4, {'cider': 1.5})
  _save(checkpoints, state, 6, {'cider': 0.5})
  manager.reload()
  assert checkpoint.choose_step(manager, best, None, 'w') == (
      4, 'step 4, the best by validation cider (1.5)')
  assert checkpoint.choose_step(manager, best, 'best', 'w')[0] == 4
  assert checkpoint.choose_step(manager, best, 'latest', 'w')[0] == 6
  assert checkpoint.choose_step(manager, best, '2', 'w') == (2, 'step 2')
  assert checkpoint.choose_step(manager, best, 6, 'w')[0] == 6
  with pytest.raises(ValueError, match=r'w: no checkpoint of step 5; there are \[2, 4, 6\]'):
    checkpoint.choose_step(manager, best, 5, 'w')
  with pytest.raises(ValueError, match="'last'.*best, latest or a step number"):
    checkpoint.choose_step(manager, best, 'last', 'w')
  # A run that tracks no best: always the latest by default.
  assert checkpoint.choose_step(manager, None, None, 'w')[0] == 6


def test_the_step_flag_takes_best_latest_or_a_number():
  from absl import flags
  for value, ok in (('best', True), ('latest', True), ('120', True), ('last', False),
                    ('-3', False)):
    values = flags.FlagValues()
    command_line.define_step_flag(values)
    if ok:
      values(['prog', f'--step={value}'])
      assert values.step == value
    else:
      with pytest.raises(flags.IllegalFlagValueError, match='best, latest or a step number'):
        values(['prog', f'--step={value}'])


def _records(workdir):
  path = os.path.join(workdir, workdir_lib.METRICS)
  return [json.loads(line) for line in open(path)]


@pytest.mark.slow
def test_training_keeps_the_best_and_reports_the_test_split_on_it(config, tmp_path, capsys):
  """Selecting on the *highest* validation loss makes the best an early step: the final test
  report must score that checkpoint, not the last step, and resume must keep it."""
  workdir = str(tmp_path / 'workdir')
  config.num_train_steps, config.eval_every_steps, config.checkpoint_every_steps = 6, 2, 100
  config.keep_checkpoints = 1
  config.best_checkpoint.metric, config.best_checkpoint.mode = 'loss', 'max'
  config.optimizer.learning_rate = 3e-3
  results = train.train_and_evaluate(config, workdir)
  val = {r['step']: r['loss'] for r in _records(workdir) if r['split'] == 'val'}
  assert sorted(val) == [2, 4, 6]  # Every evaluation step is checkpointed.
  best = max(val, key=val.get)
  assert best != 6, val  # The recipe: the loss falls, so the highest is early.
  assert checkpoint.create_manager(workdir, 1).all_steps() == sorted({best, 6})
  assert results['val']['loss'] == val[6]  # The last step's validation is still reported.
  assert results['test']['checkpoint_step'] == best
  test_record, = [r for r in _records(workdir) if r['split'] == 'test']
  assert test_record['step'] == 6 and test_record['checkpoint_step'] == best
  assert os.path.exists(workdir_lib.captions_path(workdir, 'test', best))

  # The report's values are the best checkpoint's: scored again from the workdir alone.
  trained = predict.restore(workdir)
  assert int(trained.state.step) == best
  assert trained.checkpoint == f'step {best}, the best by validation loss ({val[best]:.4g})'
  builder = sources.get_builder(trained.config.data)
  again = evaluate.SplitEvaluator(builder, trained.tokenizer, trained.config, trained.mesh)(
      trained.state, 'test')
  assert again.metrics['loss'] == pytest.approx(test_record['loss'], rel=1e-5)
  assert again.metrics['cider'] == pytest.approx(test_record['cider'], rel=1e-5)
  latest = predict.restore(workdir, 'latest')
  assert int(latest.state.step) == 6
  assert any(jax.tree.leaves(jax.tree.map(lambda a, b: not np.allclose(a, b),
                                          trained.state.params, latest.state.params)))

  # Resumed (a new process would read the same files): the best so far is still known.
  config.num_train_steps = 8
  train.train_and_evaluate(config, workdir)
  val = {r['step']: r['loss'] for r in _records(workdir) if r['split'] == 'val'}
  best = max(val, key=val.get)
  assert checkpoint.create_manager(workdir, 1).all_steps() == sorted({best, 8})
  assert _records(workdir)[-1]['checkpoint_step'] == best

  # A script names the checkpoint it loaded on stderr.
  predict.restore_or_exit(workdir, 'latest')
  assert f'{workdir}: checkpoint step 8, the latest' in capsys.readouterr().err
  with pytest.raises(SystemExit, match=r'no checkpoint of step 3; there are'):
    predict.restore_or_exit(workdir, '3')


@pytest.mark.slow
def test_scripts_take_the_step(trained_workdir, tmp_path):
  """caption.py loads the checkpoint --step names and says which on stderr."""
  image = tmp_path / 'a.png'
  from PIL import Image
  Image.new('RGB', (40, 30), (200, 30, 30)).save(image)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, 'XLA_FLAGS': SCRIPT_XLA_FLAGS}
  steps = checkpoint.create_manager(trained_workdir, 2).all_steps()
  for flag, expected in (([], f'step {steps[-1]}, the best by validation cider'),
                         (['--step=latest'], f'step {steps[-1]}, the latest'),
                         ([f'--step={steps[0]}'], f'step {steps[0]}')):
    done = subprocess.run([sys.executable, 'scripts/caption.py', '--workdir', trained_workdir,
                           *flag, str(image)], capture_output=True, text=True, cwd=root, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert f'checkpoint {expected}' in done.stderr, done.stderr
    assert done.stdout.startswith(f'{image}\t')


@pytest.mark.slow
def test_self_critical_training_starts_from_the_chosen_step(trained_workdir):
  """config.scst.init_from_step: the default (best where recorded), 'latest' and a number each
  give that checkpoint's parameters."""
  from jaxcap import state as state_lib
  from jaxcap.models import captioner
  config = workdir_lib.load_config(trained_workdir)
  config.trainer, config.model.train_encoder = 'scst', False
  config.scst.init_from = trained_workdir
  trained = predict.restore(trained_workdir)
  model = captioner.create_model(config.model, trained.tokenizer.vocab_size)
  template = state_lib.initial_state(config, model, trained.mesh)
  steps = checkpoint.create_manager(trained_workdir, 2).all_steps()
  assert len(steps) == 2
  for choice, step in ((None, int(trained.state.step)), ('latest', steps[-1]),
                       (str(steps[0]), steps[0])):
    config.scst.init_from_step = choice
    started = predict.init_from_state(config, template)
    want = predict.restore(trained_workdir, step).state.params
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(started.params),
                 jax.device_get(want))
    assert int(started.step) == 0  # A fresh start: the template's step and optimizer.
  latest = predict.restore(trained_workdir, 'latest').state.params  # The choice mattered.
  assert any(jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b),
                                          jax.device_get(latest), jax.device_get(want))))


@pytest.mark.slow
def test_device_scored_validation_chooses_the_best_and_the_report_has_every_metric(config,
                                                                                  tmp_path):
  """config.eval.periodic_metrics='device' (COCO's): validations log cider_d and no
  pycocoevalcap metric, the best checkpoint is chosen by cider_d, the test report has both."""
  workdir = str(tmp_path / 'workdir')
  config.num_train_steps, config.eval_every_steps, config.checkpoint_every_steps = 4, 2, 100
  config.eval.periodic_metrics = 'device'
  config.best_checkpoint.metric = 'bleu_4'  # Not logged by a device-scored validation.
  with pytest.raises(ValueError, match="metric='bleu_4' is not a metric of the validation .*"
                     "'device'.* cider_d"):
    train.train_and_evaluate(config, workdir)
  assert not os.path.exists(os.path.join(workdir, 'checkpoints'))
  config.best_checkpoint.metric = 'cider_d'
  train.train_and_evaluate(config, workdir)
  val = {r['step']: r for r in _records(workdir) if r['split'] == 'val'}
  assert sorted(val) == [2, 4]
  assert all('cider_d' in r and 'bleu_4' not in r and 'cider' not in r for r in val.values())
  test, = [r for r in _records(workdir) if r['split'] == 'test']
  assert {'cider_d', 'cider', 'bleu_4', 'meteor'} <= set(test)
  best = max(sorted(val), key=lambda s: (val[s]['cider_d'], s))  # Ties: the later.
  assert test['checkpoint_step'] == best
