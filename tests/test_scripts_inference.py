"""scripts/caption.py and scripts/evaluate.py on a workdir trained for a few steps."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from jaxcap import evaluate
from jaxcap import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def workdir(tmp_path_factory, data_dir):
  from tests.conftest import tiny_config
  config = tiny_config(data_dir)
  config.num_train_steps = 2
  path = str(tmp_path_factory.mktemp('trained'))
  train.train_and_evaluate(config, path)
  return path


def _run(script, *args):
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
  return subprocess.run([sys.executable, str(ROOT / 'scripts' / script), *args],
                        capture_output=True, text=True, timeout=300, env=env)


def test_caption_script_on_a_folder(workdir, tmp_path):
  folder = tmp_path / 'images'
  folder.mkdir()
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(folder / 'a.jpg')
  Image.fromarray(rng.integers(0, 256, (20, 20, 4), dtype=np.uint8)).save(folder / 'b.png')
  Image.fromarray(rng.integers(0, 256, (90, 30), dtype=np.uint8)).save(folder / 'c_gray.jpg')
  (folder / 'notes.txt').write_text('not an image')
  result = _run('caption.py', '--workdir', workdir, str(folder))
  assert result.returncode == 1, result.stderr
  lines = result.stdout.strip().split('\n')
  assert [line.split('\t')[0] for line in lines] == [
      str(folder / name) for name in ('a.jpg', 'b.png', 'c_gray.jpg')]
  assert all(len(line.split('\t')) == 2 for line in lines)
  errors = [line for line in result.stderr.split('\n') if 'notes.txt' in line]
  assert len(errors) == 1 and 'not a readable image' in errors[0]

  result = _run('caption.py', '--workdir', workdir, '--beam', '2', '--json', str(folder / 'a.jpg'))
  assert result.returncode == 0, result.stderr
  (entry,) = json.loads(result.stdout)
  assert entry['path'] == str(folder / 'a.jpg') and isinstance(entry['caption'], str)


def test_evaluate_script_writes_results_and_metrics(workdir):
  result = _run('evaluate.py', '--workdir', workdir, '--split', 'test', '--beam', '2')
  assert result.returncode == 0, result.stderr
  assert 'test step 2 beam2:' in result.stdout and 'cider=' in result.stdout
  stem = os.path.join(workdir, 'eval', 'test_step2_beam2')
  generated = json.load(open(stem + '.json'))
  metrics = json.load(open(stem + '_metrics.json'))
  assert len(generated) == 12 and set(generated[0]) == {'image_id', 'caption'}
  for key in ('bleu_1', 'bleu_2', 'bleu_3', 'bleu_4', 'meteor', 'rouge_l', 'cider', 'scene_accuracy',
              'captions_per_sec'):
    assert key in metrics
  assert metrics['decode']['method'] == 'beam' and metrics['decode']['beam_size'] == 2
  # The same scores as pycocoevalcap run directly on the results file.
  references = {int(k): v for k, v in _references(workdir).items()}
  direct = evaluate.coco_metrics(references, {g['image_id']: g['caption'] for g in generated})
  for key, value in direct.items():
    assert metrics[key] == pytest.approx(value, abs=1e-9), key


def _references(workdir):
  from jaxcap import inference
  from jaxcap.data import input_pipeline
  config = inference.load_config(workdir)
  builder = input_pipeline.get_builder(config.data)
  captions = input_pipeline.read_captions(builder, 'test')
  return dict(zip(captions.image_ids.tolist(), captions.texts))
