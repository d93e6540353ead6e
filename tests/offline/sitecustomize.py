"""Loaded by every Python process the tests start (this folder is on their PYTHONPATH), and by
the test process itself (tests/conftest.py): IP connections may only go to this machine."""

import errno
import ipaddress
import socket

_connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex
_getaddrinfo = socket.getaddrinfo


def _is_local(host) -> bool:
  if host in (None, 'localhost', b'localhost'):
    return True
  try:
    return ipaddress.ip_address(host.decode() if isinstance(host, bytes) else host).is_loopback
  except ValueError:
    return False


def _check(sock: socket.socket, address) -> None:
  if sock.family not in (socket.AF_INET, socket.AF_INET6):
    return
  if not _is_local(address[0]):
    raise OSError(errno.ENETUNREACH, f'the tests run offline: no connection to {address}')


def _guarded_connect(self, address):
  _check(self, address)
  return _connect(self, address)


def _guarded_connect_ex(self, address):
  _check(self, address)
  return _connect_ex(self, address)


def _guarded_getaddrinfo(host, *args, **kwargs):
  """Names are not looked up either (no DNS wait); IP literals pass on to `connect`."""
  try:
    ipaddress.ip_address(host.decode() if isinstance(host, bytes) else host)
  except (ValueError, AttributeError):
    if not _is_local(host):
      raise socket.gaierror(socket.EAI_NONAME,
                            f'the tests run offline: no lookup of {host}') from None
  return _getaddrinfo(host, *args, **kwargs)


socket.getaddrinfo = _guarded_getaddrinfo
socket.socket.connect = _guarded_connect
socket.socket.connect_ex = _guarded_connect_ex
