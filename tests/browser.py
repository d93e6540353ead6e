"""A real headless browser for the page tests: Debian's chromium and chromium-driver.

Found on the PATH, or installed with apt-get when this runs as root on a Debian-like system
(what `.ci/run`'s machines are). Nothing downloads a browser build of its own. Where neither
works the test skips, except in CI (`CI` set), where it fails.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile

import pytest

_PACKAGES = ('chromium', 'chromium-driver')


def _find() -> tuple[str, str] | None:
  browser, driver = shutil.which('chromium'), shutil.which('chromedriver')
  return (browser, driver) if browser and driver else None


def _unavailable(reason: str):
  """Skips the test, or fails it in CI (`CI` set), where a browser test must run."""
  if os.environ.get('CI'):
    pytest.fail(f'CI must run the browser tests: {reason}', pytrace=False)
  pytest.skip(reason)


def find_or_install_chromium() -> tuple[str, str]:
  """(chromium, chromedriver) paths; installs Debian's packages if it can, once for all test
  workers (under a file lock: a second apt-get would lose dpkg's lock), else skips the test
  with the reason (fails it in CI)."""
  found = _find()
  if found:
    return found
  if shutil.which('apt-get') is None or os.geteuid() != 0:
    _unavailable('no chromium/chromedriver on the PATH, and apt-get cannot install them here '
                 '(needs root and apt-get): install Debian\'s chromium and chromium-driver')
  with open(os.path.join(tempfile.gettempdir(), 'jaxcap-tests-chromium.lock'), 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # Released when the file closes.
    found = _find()  # Another worker may have installed them while this one waited.
    if found:
      return found
    env = {**os.environ, 'DEBIAN_FRONTEND': 'noninteractive'}
    for command in (['apt-get', 'update', '-qq'], ['apt-get', 'install', '-y', '-qq', *_PACKAGES]):
      result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
      if result.returncode:
        _unavailable(f'`{" ".join(command)}` failed, so no Chromium for the browser tests: '
                     f'{result.stderr.strip()[-500:]}')
  found = _find()
  if not found:
    _unavailable(f'apt-get installed {_PACKAGES} but chromium/chromedriver are not on the PATH')
  return found


def headless_chromium(width: int = 1100, height: int = 900):
  """A selenium Chrome driver on Debian's chromium, headless, at this window size."""
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service
  browser, driver = find_or_install_chromium()
  options = webdriver.ChromeOptions()
  options.binary_location = browser
  for argument in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu',
                   f'--window-size={width},{height}'):
    options.add_argument(argument)
  return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def overlay_alpha(driver, container, grid: tuple[int, int]):
  """The opacity (0-255) of the attention overlay (the canvas in `container`) at the centre of
  each cell of a `grid` (rows, columns) laid over it."""
  import numpy as np
  return np.array(driver.execute_script('''
      const [canvas, rows, cols] = arguments;
      const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
      const out = [];
      for (let i = 0; i < rows; i++) for (let j = 0; j < cols; j++) {
        const y = Math.floor((i + 0.5) * canvas.height / rows);
        const x = Math.floor((j + 0.5) * canvas.width / cols);
        out.push(data[(y * canvas.width + x) * 4 + 3]);
      }
      return out;''', container.find_element('css selector', 'canvas'), *grid)).reshape(grid)
