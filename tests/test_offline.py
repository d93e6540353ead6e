"""The tests run offline: tests/conftest.py loads tests/offline/sitecustomize.py here and puts
it on the PYTHONPATH of every process a test starts."""

import socket
import subprocess
import sys

import pytest


def test_connections_outside_this_machine_fail_here_and_in_subprocesses():
  with pytest.raises(OSError, match='run offline'):
    socket.create_connection(('93.184.216.34', 80), timeout=5)
  code = "import socket; socket.create_connection(('8.8.8.8', 53), timeout=5)"
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=60)
  assert result.returncode != 0 and 'run offline' in result.stderr, result.stderr


def test_this_machine_stays_reachable():
  with socket.socket() as server:
    server.bind(('127.0.0.1', 0))
    server.listen(1)
    with socket.create_connection(server.getsockname(), timeout=5):
      pass


def test_names_are_not_looked_up():
  with pytest.raises(OSError, match='run offline'):
    socket.getaddrinfo('images.cocodataset.org', 80)
