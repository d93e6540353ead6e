"""Config files load, variants change only what they say, unknown overrides are rejected."""

import pathlib
import subprocess
import sys

from configs import default
from configs import demo

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_demo_is_default_with_changes():
  base, variant = default.get_config(), demo.get_config()
  assert set(base.keys()) == set(variant.keys())
  assert variant.model.encoder == 'small_cnn' and variant.model.train_encoder
  assert variant.data.name == 'shapes_captions'


def test_train_script_rejects_unknown_config_fields(tmp_path):
  result = subprocess.run(
      [sys.executable, str(ROOT / 'scripts' / 'train.py'), '--config', str(ROOT / 'configs' / 'demo.py'),
       '--workdir', str(tmp_path), '--config.model.lstm_sise=10'],
      capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert 'lstm_sise' in result.stderr
  assert not (tmp_path / 'checkpoints').exists()
