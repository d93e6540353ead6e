"""scripts/serve.py: the caption page in a real browser, and the JSON API under concurrent
clients and bad input, against a server process on 127.0.0.1."""

import concurrent.futures
import contextlib
import io
import json
import os
import pathlib
import queue
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
from PIL import Image
import pytest

from jaxcap import predict
from tests import browser
from tests.conftest import SCRIPT_XLA_FLAGS

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
_MAX_BYTES = 300_000
_MAX_PIXELS = 1_000_000


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _images(folder: pathlib.Path, count: int) -> list[pathlib.Path]:
  """JPEG and PNG files of other sizes than the model's, each with a block of its own colour."""
  folder.mkdir()
  rng = np.random.default_rng(0)
  paths = []
  for i in range(count):
    pixels = rng.integers(0, 256, (30 + 3 * i, 40, 3), dtype=np.uint8)
    pixels[5:25, 10:35] = rng.integers(0, 256, 3, dtype=np.uint8)
    path = folder / (f'image{i}.png' if i % 2 else f'image{i}.jpg')
    Image.fromarray(pixels).save(path)
    paths.append(path)
  return paths


@pytest.fixture(scope='module')
def server(trained_workdir):
  """scripts/serve.py on a free port, default host; yields (base URL, its output so far)."""
  port = _free_port()
  process = subprocess.Popen([
      sys.executable, 'scripts/serve.py', '--workdir', trained_workdir, '--port',
      str(port), '--batch_size', '8', '--beam', '3', f'--max_bytes={_MAX_BYTES}',
      f'--max_pixels={_MAX_PIXELS}'
  ],
                             cwd=ROOT,
                             env={
                                 **os.environ, 'XLA_FLAGS': SCRIPT_XLA_FLAGS
                             },
                             stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT,
                             text=True)
  # Its output, line by line, through a thread: a server that prints nothing cannot hold the
  # fixture past its deadline.
  output: queue.Queue = queue.Queue()
  threading.Thread(target=lambda: [output.put(line) for line in process.stdout] + [output.put('')],
                   daemon=True).start()
  lines = []
  try:
    deadline = time.monotonic() + 300
    while not any('Running on' in line for line in lines):
      try:
        line = output.get(timeout=max(0.0, deadline - time.monotonic()))
      except queue.Empty:
        break
      if not line:  # The server exited.
        break
      lines.append(line)
    assert any(f'Running on http://127.0.0.1:{port}' in line for line in lines), ''.join(lines)
    yield f'http://127.0.0.1:{port}', process
  finally:
    process.kill()
    process.wait()


def _post(url: str, data: bytes, content_type: str | None) -> tuple[int, dict]:
  request = urllib.request.Request(url + '/api/caption', data=data, method='POST')
  if content_type:
    request.add_header('Content-Type', content_type)
  try:
    with urllib.request.urlopen(request, timeout=120) as response:
      return response.status, json.loads(response.read())
  except urllib.error.HTTPError as error:
    return error.code, json.loads(error.read())


def _caption_py(workdir: str, paths, *flags: str) -> list[dict]:
  """scripts/caption.py's {'caption', 'log_prob'} of each image."""
  result = subprocess.run([sys.executable, 'scripts/caption.py', '--workdir', workdir, '--json',
                           *flags, *map(str, paths)], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env={**os.environ, 'XLA_FLAGS': SCRIPT_XLA_FLAGS})
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout)


def test_batch_sizes():
  assert predict.batch_sizes(1) == (1,)
  assert predict.batch_sizes(8) == (1, 4, 8)
  assert predict.batch_sizes(64) == (1, 4, 16, 64)
  assert predict.batch_sizes(20, multiple=8) == (8, 16, 24)  # Every device gets rows.


def test_concurrent_clients_get_caption_py_captions_in_shared_batches(server, trained_workdir,
                                                                      tmp_path):
  url, process = server
  paths = _images(tmp_path / 'images', 12)
  greedy = dict(zip(paths, _caption_py(trained_workdir, paths)))
  beam = dict(zip(paths, _caption_py(trained_workdir, paths, '--beam', '3')))
  jobs = [paths[i % len(paths)] for i in range(48)]
  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    answers = list(pool.map(lambda p: _post(url, p.read_bytes(), 'image/png' if p.suffix == '.png'
                                            else 'image/jpeg'), jobs))
  # Each image its own answer: the model's log-probabilities of the images' captions differ by
  # more than the comparison's tolerance even where a 6-step model captions them alike.
  for by_path in (greedy, beam):
    assert np.diff(np.sort([by_path[p]['log_prob'] for p in paths])).min() > 2e-4, by_path
  for path, (status, answer) in zip(jobs, answers):
    assert status == 200, answer
    assert answer['greedy']['caption'] == greedy[path]['caption']
    assert answer['greedy']['log_prob'] == pytest.approx(greedy[path]['log_prob'], abs=1e-4)
    assert answer['beam'][0]['caption'] == beam[path]['caption'] and len(answer['beam']) == 3
    assert answer['beam'][0]['log_prob'] == pytest.approx(beam[path]['log_prob'], abs=1e-4)
    log_probs = [h['log_prob'] for h in answer['beam']]
    assert log_probs == sorted(log_probs, reverse=True) and answer['greedy']['log_prob'] < 0
    assert answer['step'] == 6 and answer['seconds'] > 0 and 1 <= answer['batch_size'] <= 8
  assert max(a['batch_size'] for _, a in answers) > 1  # Concurrent requests were batched.
  assert process.poll() is None


def _png(width: int, height: int) -> bytes:
  out = io.BytesIO()
  Image.new('RGB', (width, height), (200, 30, 30)).save(out, format='PNG')
  return out.getvalue()


def test_bad_input_gets_a_4xx_json_error_and_the_server_keeps_serving(server, tmp_path):
  url, process = server
  good = _images(tmp_path / 'images', 1)[0].read_bytes()
  noise = np.random.default_rng(1).integers(0, 256, (400, 400, 3), dtype=np.uint8)
  big_file = io.BytesIO()
  Image.fromarray(noise).save(big_file, format='PNG')
  assert len(big_file.getvalue()) > _MAX_BYTES and len(_png(2000, 1000)) < _MAX_BYTES
  cases = [
      (b'this is a text file, not an image', 'image/png', 400, r'not an image'),
      (b'', 'image/jpeg', 400, r'empty body'),
      (good[:len(good) // 2], 'image/jpeg', 400, r'not a readable image.*truncated'),
      (big_file.getvalue(), 'image/png', 413, rf'the limit is {_MAX_BYTES}'),
      (_png(2000, 1000), 'image/png', 413, rf'2000x1000 pixels; the limit is {_MAX_PIXELS}'),
      (good, 'text/plain', 415, r'Content-Type text/plain is not an image'),
      (good, 'application/json', 415, r'is not an image'),
  ]
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    answers = list(pool.map(lambda case: _post(url, case[0], case[1]), cases * 3))
  for (_, content_type, status, pattern), (got_status, answer) in zip(cases * 3, answers):
    assert got_status == status and re.search(pattern, answer['error']), (content_type, answer)
  status, answer = _post(url, good, 'image/jpeg')
  assert status == 200 and answer['greedy']['caption'] and process.poll() is None


def test_page_captions_an_image_chosen_in_a_real_browser(server, tmp_path):
  url, _ = server
  path = _images(tmp_path / 'images', 1)[0]
  _, expected = _post(url, path.read_bytes(), 'image/jpeg')
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import WebDriverWait
  driver = browser.headless_chromium()
  try:
    driver.get(url + '/')
    driver.find_element(By.ID, 'file').send_keys(str(path))
    WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, 'result').is_displayed())
    assert driver.find_element(By.ID, 'greedy').text == expected['greedy']['caption'].strip()
    beam = [item.text for item in driver.find_elements(By.CSS_SELECTOR, '#beam li')]
    assert len(beam) == 3 and beam[0].startswith(expected['beam'][0]['caption'].strip())
    assert 'checkpoint step 6' in driver.find_element(By.ID, 'meta').text
    with contextlib.suppress(Exception):
      driver.save_screenshot(str(tmp_path / 'caption_page.png'))
  finally:
    driver.quit()


def test_benchmark_serve_reports_each_client_count(server, tmp_path):
  url, process = server
  folder = _images(tmp_path / 'images', 3)[0].parent
  result = subprocess.run([sys.executable, 'scripts/benchmark_serve.py', '--url', url, '--images',
                           str(folder), '--clients', '1,4', '--requests_per_client', '2'],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  runs = [json.loads(line) for line in result.stdout.strip().splitlines()]
  assert [(r['clients'], r['requests']) for r in runs] == [(1, 2), (4, 8)]
  for run in runs:
    assert run['captions_per_sec'] > 0 and 1 <= run['mean_batch_size'] <= run['clients']
    assert 0 < run['latency_ms']['p50'] <= run['latency_ms']['p90'] <= run['latency_ms']['p99']
  assert process.poll() is None


def test_the_page_shows_where_an_updown_model_looked_for_each_word(updown_workdir, tmp_path):
  """The API's greedy words carry caption.py's attention maps; hovering a word on the page draws
  that word's map over the chosen image. An in-process server (one batch size) on the Up-Down
  workdir."""
  import asyncio

  from aiohttp import web
  from selenium.webdriver.common.action_chains import ActionChains
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import WebDriverWait

  from jaxcap import attention_maps
  from jaxcap import caption
  from jaxcap import serve

  trained = predict.restore(updown_workdir)
  path = _images(tmp_path / 'images', 1)[0]
  (_, expected), = caption.caption_paths(trained, [str(path)])
  expected_words = attention_maps.word_maps(attention_maps.TokenMaps(
      expected['tokens'], np.asarray(expected['attention'])))
  service = serve.CaptionService(trained, max_batch=1, beam_size=2)
  loop, port = asyncio.new_event_loop(), _free_port()
  runner = web.AppRunner(serve.make_app(service))

  def run():
    asyncio.set_event_loop(loop)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, '127.0.0.1', port).start())
    loop.run_forever()
  threading.Thread(target=run, daemon=True).start()
  url = f'http://127.0.0.1:{port}'
  try:
    deadline = time.monotonic() + 60
    while True:
      try:
        status, answer = _post(url, path.read_bytes(), 'image/jpeg')
        break
      except urllib.error.URLError:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert status == 200 and answer['greedy']['caption'] == expected['caption']
    words = answer['greedy']['words']
    assert [w['word'] for w in words] == [w for w, _ in expected_words]
    for word, (_, weights) in zip(words, expected_words):
      np.testing.assert_allclose(word['attention'], weights, atol=1e-5)

    driver = browser.headless_chromium()
    try:
      driver.get(url + '/')
      driver.find_element(By.ID, 'file').send_keys(str(path))
      WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, 'result').is_displayed())
      box = driver.find_element(By.CSS_SELECTOR, '.attended')
      spans = box.find_elements(By.CSS_SELECTOR, '#greedy .word')
      assert [s.text for s in spans] == [w['word'] for w in words]
      last = len(words) - 1
      ActionChains(driver).move_to_element(spans[last]).perform()
      weights = np.asarray(words[last]['attention'])
      np.testing.assert_allclose(browser.overlay_alpha(driver, box, weights.shape),
                                 np.round(255 * 0.75 * (1 - weights / weights.max())),
                                 atol=2)
    finally:
      driver.quit()
  finally:
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=30)
    loop.call_soon_threadsafe(loop.stop)
