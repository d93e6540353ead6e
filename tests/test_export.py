"""scripts/export.py: a SavedModel that captions encoded images in a process without JAX,
exactly as scripts/caption.py does, for greedy and beam decoding."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from jaxcap import export
from jaxcap.data import tokenizer as tokenizer_lib
from tests.conftest import SCRIPT_XLA_FLAGS

ROOT = pathlib.Path(__file__).resolve().parents[1]
_LOG_PROB_RTOL = 2e-5

# Runs in a fresh interpreter where importing jax (or anything of jaxcap) fails: TensorFlow
# alone loads the SavedModel and captions the files.
_SERVE_WITHOUT_JAX = '''
import importlib.abc, json, sys
class NoJax(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('jax', 'jaxlib', 'flax', 'jaxcap'):
      raise ImportError(f'{name} is blocked: serving runs without JAX')
sys.meta_path.insert(0, NoJax())
import tensorflow as tf
results = {}
for model_dir, paths in json.loads(sys.argv[1]).items():
  serve = tf.saved_model.load(model_dir).signatures['serving_default']
  out = serve(images=tf.constant([open(p, 'rb').read() for p in paths]))
  results[model_dir] = {'captions': [c.decode() for c in out['captions'].numpy()],
                        'log_probs': out['log_probs'].numpy().tolist()}
  if 'attention' in out:
    results[model_dir]['attention'] = out['attention'].numpy().tolist()
assert not any(m.split('.')[0] in ('jax', 'jaxlib') for m in sys.modules)
print(json.dumps(results))
'''


def _images(folder: pathlib.Path) -> list[str]:
  """JPEG and PNG files of other sizes and shapes than the model's input, one grayscale."""
  folder.mkdir()
  rng = np.random.default_rng(0)
  paths = []
  for i, (height, width) in enumerate([(48, 48), (40, 70), (90, 33), (32, 32), (64, 50)]):
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    pixels[height // 4:height // 2, width // 3:] = rng.integers(0, 256, 3, dtype=np.uint8)
    path = folder / (f'image{i}.png' if i % 2 else f'image{i}.jpg')
    Image.fromarray(pixels).save(path)
    paths.append(str(path))
  gray = folder / 'gray.jpg'
  Image.fromarray(rng.integers(0, 256, (45, 60), dtype=np.uint8)).save(gray)
  return paths + [str(gray)]


def _run(*argv: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=600,
                        cwd=ROOT, env={**os.environ, 'XLA_FLAGS': SCRIPT_XLA_FLAGS})


def test_piece_table_and_detokenize_match_sentencepiece(trained_workdir):
  import tensorflow as tf
  tokenizer = tokenizer_lib.Tokenizer.load(
      os.path.join(trained_workdir, tokenizer_lib.MODEL_FILENAME))
  rng = np.random.default_rng(0)
  rows = rng.integers(0, tokenizer.vocab_size, (200, 12)).astype(np.int32)
  rows[::3, 5] = tokenizer_lib.EOS_ID
  rows[1::3, 0] = tokenizer_lib.EOS_ID
  rows[2::7, :] = tokenizer_lib.PAD_ID
  texts = export.detokenize(tf.constant(rows), tf.constant(export.piece_table(tokenizer)))
  assert [t.decode() for t in texts.numpy()] == tokenizer.decode(rows)


@pytest.mark.slow
def test_saved_model_captions_as_caption_py_without_jax(trained_workdir, tmp_path):
  paths = _images(tmp_path / 'images')
  exported = {'greedy': str(tmp_path / 'greedy'), 'beam3': str(tmp_path / 'beam3')}
  for method, flags in (('greedy', ['--greedy']), ('beam3', ['--beam', '3', '--batch_size', '4'])):
    result = _run('scripts/export.py', '--workdir', trained_workdir, '--output', exported[method],
                  *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f'{method} decoding' in result.stdout
  served = _run('-c', _SERVE_WITHOUT_JAX, json.dumps({d: paths for d in exported.values()}))
  assert served.returncode == 0, served.stderr[-3000:]
  served = json.loads(served.stdout.strip().splitlines()[-1])
  for method, flags in (('greedy', []), ('beam3', ['--beam', '3'])):
    result = _run('scripts/caption.py', '--workdir', trained_workdir, '--json', *flags, *paths)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = json.loads(result.stdout)
    assert served[exported[method]]['captions'] == [e['caption'] for e in expected], method
    # Image by image (the un-padding of the last batch included): the same log-probabilities
    # (up to TensorFlow's float32 sums, and PIL's decoding of the grayscale JPEG in caption.py),
    # and the images' differ by more than that even where a 6-step model captions them alike, so
    # an answer given to the wrong image fails.
    log_probs = np.asarray(served[exported[method]]['log_probs'])
    np.testing.assert_allclose(log_probs, [e['log_prob'] for e in expected], rtol=_LOG_PROB_RTOL)
    assert np.diff(
        np.sort(log_probs)).min() > 2 * _LOG_PROB_RTOL * np.abs(log_probs).max(), log_probs
    assert (log_probs < 0).all()


@pytest.mark.slow
def test_saved_model_of_an_updown_run_returns_caption_py_s_attention(updown_workdir, tmp_path):
  paths = _images(tmp_path / 'images')[:3]
  output = str(tmp_path / 'updown')
  result = _run('scripts/export.py', '--workdir', updown_workdir, '--output', output, '--greedy')
  assert result.returncode == 0, result.stderr[-3000:]
  served = _run('-c', _SERVE_WITHOUT_JAX, json.dumps({output: paths}))
  assert served.returncode == 0, served.stderr[-3000:]
  served = json.loads(served.stdout.strip().splitlines()[-1])[output]
  result = _run('scripts/caption.py', '--workdir', updown_workdir, '--json', *paths)
  assert result.returncode == 0, result.stderr[-3000:]
  expected = json.loads(result.stdout)
  assert served['captions'] == [e['caption'] for e in expected]
  for attention, e in zip(served['attention'], expected):
    attention = np.asarray(attention)  # (max_len - 1, H, W), zero after EOS.
    assert attention.shape[1:] == tuple(e['grid'])
    np.testing.assert_allclose(attention[:len(e['tokens'])], e['attention'], atol=1e-5)
    assert not attention[len(e['tokens']):].any()


def test_export_of_a_folder_that_is_not_a_workdir(tmp_path):
  result = _run('scripts/export.py', '--workdir', str(tmp_path), '--output', str(tmp_path / 'out'))
  assert result.returncode == 1 and 'no training config' in result.stderr
  assert 'Traceback' not in result.stderr and not (tmp_path / 'out').exists()
