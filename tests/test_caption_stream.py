"""caption.py on folders of any size: a batch at a time, bounded memory, appended output that a
rerun resumes, unreadable files reported and skipped."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from jaxcap import caption
from jaxcap import predict
from tests.conftest import SCRIPT_XLA_FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _images(folder, count, bad=()):
  folder.mkdir(parents=True, exist_ok=True)
  paths = []
  for i in range(count):
    path = folder / f'{i:03d}.png'
    if i in bad:
      path.write_bytes(b'not an image')
    else:
      pixels = np.random.default_rng(i).integers(0, 256, (24 + i % 7, 30, 3), np.uint8)
      Image.fromarray(pixels).save(path)
    paths.append(str(path))
  return paths


@pytest.fixture(scope='module')
def trained(trained_workdir):
  trained = predict.restore(trained_workdir)
  trained.config.eval.batch_size = 8  # Batches of 8 over the 8 forced devices.
  return trained


def test_the_stream_holds_two_batches_and_gives_each_images_caption(trained, tmp_path,
                                                                    monkeypatch):
  """29 images (two unreadable, one of them in the first batch) in batches of 8: at each
  result at most two batches are read ahead, and every caption and log-probability is the one
  the image gets alone."""
  paths = _images(tmp_path / 'images', 29, bad=(3, 17))
  loads = []
  real_load = caption.load_image
  monkeypatch.setattr(caption, 'load_image',
                      lambda *args: loads.append(args[0]) or real_load(*args))
  results = []
  for path, result in caption.caption_stream(trained, paths, threads=2):
    results.append((path, result))
    assert len(loads) - len(results) <= 2 * 8 - 1, (len(loads), len(results))
  assert [p for p, _ in results] == paths
  assert [p for p, r in results if 'error' in r] == [paths[3], paths[17]]
  assert 'not a readable image' in results[3][1]['error']
  monkeypatch.setattr(caption, 'load_image', real_load)
  predictor = predict.Predictor(trained.config, trained.mesh, (8,))
  for path, result in results[:12:5] + results[24:]:
    if 'error' in result:
      continue
    alone = predictor(trained.state, caption.load_image(path, trained.config.data.image_size)[None])
    assert result['caption'] == trained.tokenizer.decode(alone['ids'])[0]
    assert result['log_prob'] == pytest.approx(float(alone['log_probs'][0]), abs=1e-4)
  # The captions differ between images (a stream that repeated one batch would not).
  assert len({r['log_prob'] for _, r in results if 'error' not in r}) > 10


def test_output_files_append_and_a_rerun_skips_what_they_hold(tmp_path):
  lines = ['a.png\tone caption\n', 'b.png\tanother\n', 'c.png\tcut sho']
  tsv = tmp_path / 'out.tsv'
  tsv.write_text(''.join(lines))
  assert caption.done_paths(str(tsv)) == {'a.png', 'b.png'}  # c.png's line was cut short.
  with caption.open_output(str(tsv)) as f:  # ... and is dropped before appending.
    f.write('c.png\tagain\n')
  assert tsv.read_text() == ''.join(lines[:2]) + 'c.png\tagain\n'
  jsonl = tmp_path / 'out.jsonl'
  jsonl.write_text(caption.output_line('x.png', {'caption': 'c', 'log_prob': -1.5}, 'jsonl'))
  assert caption.done_paths(str(jsonl)) == {'x.png'}
  assert json.loads(jsonl.read_text()) == {'path': 'x.png', 'caption': 'c', 'log_prob': -1.5}
  assert caption.done_paths(str(tmp_path / 'new.tsv')) == set()
  (tmp_path / 'wrong.jsonl').write_text('path\tcaption\n')
  with pytest.raises(ValueError, match='wrong.jsonl: not a JSON-lines file'):
    caption.done_paths(str(tmp_path / 'wrong.jsonl'))


@pytest.mark.slow
def test_caption_py_streams_to_an_output_that_a_rerun_completes(trained_workdir, tmp_path):
  paths = _images(tmp_path / 'images', 6, bad=(2,))
  output = tmp_path / 'captions.tsv'
  env = {**os.environ, 'XLA_FLAGS': SCRIPT_XLA_FLAGS}

  def run(*flags):
    return subprocess.run([sys.executable, 'scripts/caption.py', '--workdir', trained_workdir,
                           '--output', str(output), *flags, str(tmp_path / 'images')],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
  first = run()
  assert first.returncode == 1, first.stderr  # The unreadable file.
  printed = [line.split('\t') for line in first.stdout.splitlines()]
  assert [p for p, _ in printed] == paths[:2] + paths[3:]
  assert output.read_text() == first.stdout
  assert f'{paths[2]}: not a readable image' in first.stderr
  assert '6/6' in first.stderr and 'img/s' in first.stderr  # The progress bar.
  # Interrupted while writing the last line: the rerun captions that image (and retries the
  # unreadable one), and the file ends up with each image once.
  output.write_text(output.read_text()[:-5])
  second = run('--json')
  assert '4 image(s) already captioned, skipped' in second.stderr
  entries = json.loads(second.stdout)
  assert [e['path'] for e in entries] == [paths[2], paths[5]]
  assert 'error' in entries[0] and entries[1]['caption'] == printed[-1][1]
  rows = [line.split('\t') for line in output.read_text().splitlines()]
  assert [p for p, _ in rows if p != paths[5]] == paths[:2] + paths[3:5]
  assert rows[-1] == [paths[5], printed[-1][1]]
