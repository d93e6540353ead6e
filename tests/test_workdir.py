"""A workdir's config.json read onto configs/default.py, old ones included, and the trainer
registry's one check of `config.trainer`."""

import json
import logging

import pytest

from configs import default
from jaxcap import trainers
from jaxcap import workdir as workdir_lib


def _write(tmp_path, values):
  (tmp_path / workdir_lib.CONFIG).write_text(json.dumps(values))
  return str(tmp_path)


def test_config_round_trips_with_tuples(tmp_path):
  config = default.get_config()
  config.data.eval_splits, config.model.lstm_size = ('val',), 48
  workdir_lib.write_config(str(tmp_path), config)
  loaded = workdir_lib.load_config(str(tmp_path))
  assert loaded.to_dict() == config.to_dict()
  assert loaded.data.eval_splits == ('val',) and isinstance(loaded.data.length_buckets, tuple)


@pytest.mark.parametrize('booleans, trainer', [
    ({}, 'images'),
    ({'features': {'enabled': False}}, 'images'),
    ({'features': {'enabled': True}}, 'features'),
    ({'features': {'enabled': True}, 'scst': {'enabled': True}}, 'scst'),
])
def test_old_config_json_maps_its_booleans_onto_the_trainer(tmp_path, booleans, trainer):
  """A config.json of a release with `features.enabled`/`scst.enabled` and without fields added
  since (model.dropout here) loads with today's fields: the trainer its booleans meant, the
  defaults for the rest."""
  values = json.loads(default.get_config().to_json_best_effort())
  del values['trainer'], values['model']['dropout']
  for group, fields in booleans.items():
    values[group].update(fields)
  config = workdir_lib.load_config(_write(tmp_path, values))
  assert config.trainer == trainer
  assert config.model.dropout == default.get_config().model.dropout
  assert 'enabled' not in config.features and 'enabled' not in config.scst


def test_unknown_fields_are_named_and_ignored(tmp_path, caplog):
  path = _write(tmp_path, {'model': {'lstm_size': 48, 'lstm_sise': 10}, 'batch_size': 8})
  with caplog.at_level(logging.WARNING):
    config = workdir_lib.load_config(path)
  assert 'config.model.lstm_sise' in caplog.text and 'config.json' in caplog.text
  assert config.model.lstm_size == 48 and config.batch_size == 8
  assert config.num_train_steps == default.get_config().num_train_steps


def test_a_folder_without_config_is_not_a_workdir(tmp_path):
  with pytest.raises(FileNotFoundError, match='is .* a jaxcap workdir'):
    workdir_lib.load_config(str(tmp_path))
  with pytest.raises(FileNotFoundError, match='config.scst.init_from=.*not a jaxcap workdir'):
    workdir_lib.check_is_workdir(str(tmp_path), 'config.scst.init_from')


def test_resume_check_needs_a_checkpoint(tmp_path):
  """A workdir whose run never checkpointed (it stopped in its first steps) may start over
  with another config; one with a checkpoint may not change a locked field."""
  config = default.get_config()
  workdir_lib.write_config(str(tmp_path), config)
  changed = config.copy_and_resolve_references()
  changed.model.lstm_size += 1
  workdir_lib.check_resume(str(tmp_path), changed)
  (tmp_path / workdir_lib.CHECKPOINTS / '10').mkdir(parents=True)
  with pytest.raises(ValueError, match='model.lstm_size'):
    workdir_lib.check_resume(str(tmp_path), changed)


def test_trainer_is_checked_in_one_place():
  config = default.get_config()
  assert trainers.check_trainer(config) == 'images' and not trainers.on_features(config)
  config.trainer = 'feature'
  with pytest.raises(ValueError, match="'feature' is not one of 'images', 'features', 'scst'"):
    trainers.check_trainer(config)
  config.trainer = 'features'
  config.model.train_encoder = True
  with pytest.raises(ValueError, match='set config.model.train_encoder=False'):
    trainers.check_trainer(config)
  config.model.train_encoder = False
  assert trainers.on_features(config)
