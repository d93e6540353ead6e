"""Gallery pages: per-image CIDEr-D, the page's content and escaping, and scripts/evaluate.py
--gallery opened from disk in a real browser, ordered worst-first by its own control."""

import base64
import html.parser
import io
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from jaxcap import attention_maps
from jaxcap import evaluate
from jaxcap import gallery
from jaxcap import predict
from tests import browser
from tests.conftest import SCRIPT_XLA_FLAGS

ROOT = pathlib.Path(__file__).resolve().parents[1]
REFERENCES = {
    1: ['a red circle', 'one red circle'],
    2: ['two blue squares', 'a pair of blue squares'],
    3: ['a small green triangle', 'one little green triangle']
}


class _Page(html.parser.HTMLParser):
  """The figures of a gallery page: their data attributes, image sources and caption text."""

  def __init__(self):
    super().__init__()
    self.figures, self.sources, self._in_caption = [], [], False

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    if tag == 'figure':
      self.figures.append({'id': int(attrs['data-id']), 'cider': float(attrs['data-cider']),
                           'caption': ''})
    elif tag == 'img':
      self.sources.append(attrs['src'])
    elif tag == 'div' and attrs.get('class') == 'caption':
      self._in_caption = True

  def handle_endtag(self, tag):
    if tag == 'div':
      self._in_caption = False

  def handle_data(self, data):
    if self._in_caption:
      self.figures[-1]['caption'] += data


def test_per_image_cider_d_averages_to_the_split_and_follows_the_image_ids():
  """Captions whose scores are known in rank: no shared word (0), a reference word for word
  (the highest), part of one (between). Each image's score must sit at its own id, under the
  given ids and under others ordered neither like them nor like the dicts' insertion."""
  generated = {1: 'zebra zebra', 2: 'two blue squares', 3: 'a small green square'}
  for ids, order in (({1: 1, 2: 2, 3: 3}, (1, 2, 3)), ({1: 30, 2: 10, 3: 20}, (3, 1, 2))):
    metrics, cider_d = evaluate.score_captions({ids[i]: REFERENCES[i] for i in order},
                                               {ids[i]: generated[i] for i in reversed(order)})
    assert set(cider_d) == set(ids.values())
    assert np.mean(list(cider_d.values())) == pytest.approx(metrics['cider'])
    assert cider_d[ids[1]] == 0 and cider_d[ids[2]] > cider_d[ids[3]] > 0, (ids, cider_d)


def test_page_holds_every_entry_escaped_with_inline_thumbnails():
  rng = np.random.default_rng(0)
  images = {i: rng.integers(0, 256, (40 + 100 * i, 300, 3), dtype=np.uint8) for i in (1, 2, 3)}
  generated = {1: 'a red circle', 2: '<script>alert(1)</script> & co', 3: 'a green triangle'}
  entries = gallery.entries(generated, {1: 2.5, 2: 0.0, 3: 1.25}, REFERENCES, images,
                            scene_check=True)
  page = gallery.render('test split', {'cider': 1.25, 'num_images': 7}, entries, num_images=7)
  parser = _Page()
  parser.feed(page)
  assert [f['id'] for f in parser.figures] == [1, 2, 3]
  assert [f['cider'] for f in parser.figures] == [2.5, 0.0, 1.25]
  assert parser.figures[1]['caption'] == generated[2] and '<script>alert' not in page
  assert 'the first 3 of 7 images' in page and 'scene right' in page and 'scene wrong' in page
  assert not re.search(r'(src|href)="(?!data:)', page)  # Nothing fetched: opens offline.
  for source, (_, pixels) in zip(parser.sources, sorted(images.items())):
    thumbnail = Image.open(io.BytesIO(base64.b64decode(source.split(',', 1)[1])))
    assert thumbnail.format == 'JPEG' and max(thumbnail.size) == gallery.THUMBNAIL_SIDE
    assert thumbnail.size[0] / thumbnail.size[1] == pytest.approx(300 / pixels.shape[0], rel=0.05)


@pytest.mark.slow
def test_evaluate_gallery_opens_from_disk_and_orders_worst_first(trained_workdir, tmp_path):
  result = subprocess.run(
      [sys.executable, 'scripts/evaluate.py', '--workdir', trained_workdir, '--split', 'val',
       '--gallery', '--gallery_images', '5'], capture_output=True, text=True, timeout=600,
      cwd=ROOT, env={**os.environ, 'XLA_FLAGS': SCRIPT_XLA_FLAGS})
  assert result.returncode == 0, result.stderr[-3000:]
  page_path = pathlib.Path(result.stdout.split()[-1])
  assert page_path.name == 'val_step6_greedy.html' and page_path.parent.name == 'eval'
  parser = _Page()
  parser.feed(page_path.read_text())
  assert len(parser.figures) == 5 and 'the first 5 of 12 images' in page_path.read_text()

  # The page's control on a page with known scores, out of id order (two equal: by id).
  scores = {1: 2.0, 2: 0.5, 3: 3.0, 4: 0.5, 5: 1.0}
  rng = np.random.default_rng(1)
  images = {i: rng.integers(0, 256, (40, 50, 3), dtype=np.uint8) for i in scores}
  generated = {i: f'caption {i}' for i in scores}
  known = tmp_path / 'known.html'
  known.write_text(gallery.render('val', {'cider': 1.4, 'num_images': 5}, gallery.entries(
      generated, scores, {i: [f'reference {i}'] for i in scores}, images, scene_check=False),
      num_images=5))

  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import Select
  driver = browser.headless_chromium()
  try:
    shown = lambda: [(int(f.get_attribute('data-id')), float(f.get_attribute('data-cider')))
                     for f in driver.find_elements(By.CSS_SELECTOR, '#entries figure')]
    driver.get(page_path.as_uri())  # evaluate.py's page, from disk: its thumbnails load.
    assert len(shown()) == 5
    assert all(img.get_attribute('naturalWidth') != '0'
               for img in driver.find_elements(By.CSS_SELECTOR, 'figure img'))
    driver.get(known.as_uri())
    assert [i for i, _ in shown()] == [1, 2, 3, 4, 5]
    Select(driver.find_element(By.ID, 'order')).select_by_value('worst')
    assert shown() == [(2, 0.5), (4, 0.5), (5, 1.0), (1, 2.0), (3, 3.0)]
    captions = [f.text for f in driver.find_elements(By.CSS_SELECTOR, '#entries figure .caption')]
    assert [c.split('\n')[0] for c in captions] == [f'caption {i}' for i in (2, 4, 5, 1, 3)]
  finally:
    driver.quit()


@pytest.mark.slow
def test_hovering_a_word_draws_its_attention_map_over_the_image(updown_workdir, tmp_path):
  from selenium.webdriver.common.action_chains import ActionChains
  from selenium.webdriver.common.by import By

  # evaluate.py's gallery of the Up-Down run: every word carries its map over the 16 x 16 grid.
  trained = predict.restore(updown_workdir)
  evaluation = evaluate.evaluate_workdir(trained, updown_workdir, 'val', gallery_images=3)
  parser = _Page()
  page = pathlib.Path(evaluation.stem + '.html').read_text()
  parser.feed(page)
  assert len(parser.figures) == 3 and page.count('class="word"') >= 3
  # A page with known maps: where each weight is drawn.
  rng = np.random.default_rng(2)
  maps = {'red': rng.random((4, 5)), 'circle': rng.random((4, 5))}
  token_maps = attention_maps.TokenMaps(['▁red', '▁cir', 'cle', attention_maps.END],
                                        np.stack([maps['red'], maps['circle'] * 0.5,
                                                  maps['circle'] * 1.5, np.ones((4, 5))]))
  known = tmp_path / 'known.html'
  known.write_text(gallery.render('val', {'cider': 1.0, 'num_images': 1}, gallery.entries(
      {7: 'red circle'}, {7: 1.0}, {7: ['a red circle']},
      {7: rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)}, scene_check=False,
      token_maps={7: token_maps}), num_images=1))
  expected = {w: np.round(255 * 0.75 * (1 - m / m.max())) for w, m in maps.items()}

  driver = browser.headless_chromium()
  try:
    driver.get(pathlib.Path(evaluation.stem + '.html').as_uri())
    figure = driver.find_element(By.CSS_SELECTOR, '#entries figure')
    word = figure.find_element(By.CSS_SELECTOR, '.word')
    ActionChains(driver).move_to_element(word).perform()
    drawn = browser.overlay_alpha(driver, figure, (16, 16))
    weights = np.array(json.loads(word.get_attribute('data-map')))
    np.testing.assert_allclose(drawn, np.round(255 * 0.75 * (1 - weights / weights.max())),
                               atol=2)

    driver.get(known.as_uri())
    figure = driver.find_element(By.CSS_SELECTOR, '#entries figure')
    words = {w.text: w for w in figure.find_elements(By.CSS_SELECTOR, '.word')}
    assert list(words) == ['red', 'circle']
    # Nothing is drawn before a hover.
    assert not browser.overlay_alpha(driver, figure, (4, 5)).any()
    ActionChains(driver).move_to_element(words['circle']).perform()
    np.testing.assert_allclose(browser.overlay_alpha(driver, figure, (4, 5)), expected['circle'],
                               atol=2)
    words['red'].click()  # Pinned: it stays after the pointer leaves for another word.
    ActionChains(driver).move_to_element(words['circle']).perform()
    ActionChains(driver).move_to_element(driver.find_element(By.TAG_NAME, 'h1')).perform()
    np.testing.assert_allclose(browser.overlay_alpha(driver, figure, (4, 5)), expected['red'],
                               atol=2)
  finally:
    driver.quit()
