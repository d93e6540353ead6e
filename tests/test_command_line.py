"""The --config flag: None for None-default fields, one-line errors, and first commands that
write into folders that do not exist yet."""

import pathlib

from absl import flags
import pytest

from jaxcap import command_line
from jaxcap.data import tokenizer as tokenizer_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _parse(*overrides):
  """The config of configs/coco.py after `overrides`, parsed as a script parses its flags."""
  argv = ['script', f'--config={ROOT / "configs" / "coco.py"}', *overrides]
  flag_values = flags.FlagValues()
  holder = command_line.define_config_flag(flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  return holder.value


def test_none_restores_a_none_default_field():
  assert _parse().model.encoder_weights == 'weights/inception_v3_notop'
  assert _parse('--config.model.encoder_weights=None').model.encoder_weights is None
  config = _parse('--config.model.encoder_weights', 'none', '--config.data.coco_dir=None')
  assert config.model.encoder_weights is None and config.data.coco_dir is None
  # Set and set back: a placeholder keeps its type, so a path can follow a None.
  config = _parse('--config.data.coco_dir=/data/coco', '--config.features.cache_dir=None')
  assert config.data.coco_dir == '/data/coco' and config.features.cache_dir is None


def test_other_text_stays_a_value():
  config = _parse('--config.model.encoder_weights=null', '--config.data.name=coco_captions',
                  '--config.batch_size=16', '--config.optimizer.learning_rate=0.5')
  assert config.model.encoder_weights == 'null' and config.batch_size == 16
  assert config.optimizer.learning_rate == 0.5


@pytest.mark.parametrize('override', ['--config.batch_size=None', '--config.data.name=None',
                                      '--config.optimizer.learning_rate=none'])
def test_none_is_rejected_where_the_default_is_not_none(override):
  with pytest.raises(flags.IllegalFlagValueError, match='only fields whose default is None'):
    _parse(override)


def test_a_misspelt_field_is_a_flag_error_naming_it():
  with pytest.raises(flags.IllegalFlagValueError, match="unknown field 'lstm_sise'.*lstm_size"):
    _parse('--config.model.lstm_sise=10')


def test_tokenizer_creates_the_workdir(tmp_path):
  workdir = tmp_path / 'new' / 'workdir'
  tokenizer = tokenizer_lib.load_or_train(workdir, lambda: ['a red square', 'a blue circle'] * 20,
                                          40)
  assert (workdir / tokenizer_lib.MODEL_FILENAME).exists()
  assert tokenizer_lib.load_or_train(workdir, lambda: [], 40).vocab_size == tokenizer.vocab_size
