"""A real headless browser for the page tests: Debian's chromium and chromium-driver.

Found on the PATH, or installed with apt-get when this runs as root on a Debian-like system
(what `.ci/run`'s machines are). Nothing downloads a browser build of its own.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

_PACKAGES = ('chromium', 'chromium-driver')


def _find() -> tuple[str, str] | None:
  browser, driver = shutil.which('chromium'), shutil.which('chromedriver')
  return (browser, driver) if browser and driver else None


def find_or_install_chromium() -> tuple[str, str]:
  """(chromium, chromedriver) paths; installs Debian's packages if it can, else skips the test
  with the reason."""
  found = _find()
  if found:
    return found
  if shutil.which('apt-get') is None or os.geteuid() != 0:
    pytest.skip('no chromium/chromedriver on the PATH, and apt-get cannot install them here '
                '(needs root and apt-get): install Debian\'s chromium and chromium-driver')
  env = {**os.environ, 'DEBIAN_FRONTEND': 'noninteractive'}
  for command in (['apt-get', 'update', '-qq'], ['apt-get', 'install', '-y', '-qq', *_PACKAGES]):
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    if result.returncode:
      pytest.skip(f'`{" ".join(command)}` failed, so no Chromium for the browser tests: '
                  f'{result.stderr.strip()[-500:]}')
  found = _find()
  if not found:
    pytest.skip(f'apt-get installed {_PACKAGES} but chromium/chromedriver are not on the PATH')
  return found


def headless_chromium(width: int = 1100, height: int = 900):
  """A selenium Chrome driver on Debian's chromium, headless, at this window size."""
  from selenium import webdriver  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.chrome.service import Service  # pylint: disable=g-import-not-at-top
  browser, driver = find_or_install_chromium()
  options = webdriver.ChromeOptions()
  options.binary_location = browser
  for argument in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu',
                   f'--window-size={width},{height}'):
    options.add_argument(argument)
  return webdriver.Chrome(service=Service(executable_path=driver), options=options)
