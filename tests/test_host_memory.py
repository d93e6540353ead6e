"""jaxcap.host_memory: freed memory is reused (no new page faults), in a fresh process each."""

import json
import subprocess
import sys

import pytest

from jaxcap import host_memory

_ALLOCATE_AND_FREE = '''
import ctypes, json, resource, sys, threading
from jaxcap import host_memory
kept = host_memory.keep_freed_memory()
libc = ctypes.CDLL('libc.so.6')
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = (ctypes.c_void_p,)

def touch():  # 64 MiB from malloc, written, then freed: what XLA does with its temporaries.
  block = libc.malloc(64 << 20)
  ctypes.memset(block, 1, 64 << 20)
  libc.free(block)

faults = []
for _ in range(5):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  worker = threading.Thread(target=touch)  # XLA allocates on its own threads too.
  worker.start(); worker.join()
  touch()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({'kept': kept, 'faults': faults}))
'''


def _run(env_value=None):
  env = {'PATH': '/usr/bin:/bin'}
  if env_value is not None:
    env[host_memory.ENV_VARIABLE] = env_value
  result = subprocess.run([sys.executable, '-c', _ALLOCATE_AND_FREE], capture_output=True,
                          text=True, check=True, env=env)
  return json.loads(result.stdout)


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc (Linux) only')
def test_freed_memory_is_reused_without_page_faults():
  kept = _run()
  assert kept['kept'] is True
  # After the first round, the 2 x 64 MiB come from the kept heap: no fresh pages.
  assert max(kept['faults'][1:]) < 1_000, kept
  default = _run(env_value='0')
  assert default['kept'] is False
  # glibc maps each 64 MiB block afresh: 16,384 pages each.
  assert min(default['faults'][1:]) > 2 * 15_000, default
