"""The test run's shared compilation cache (tests/conftest.py): a process the tests start finds
the programs that an earlier one compiled, however fast they compiled, in JAX's locked,
size-limited file cache."""

import os
import pathlib
import subprocess
import sys

# Prints the cache folder JAX uses, then the persistent cache's hits and misses of one program.
_COMPILE = """
import jax, jax.numpy as jnp
from jax import monitoring
events = []
monitoring.register_event_listener(lambda name, **kwargs: events.append(name))
print(jax.config.jax_compilation_cache_dir)
x = jnp.zeros(3)
del events[:]
jax.jit(lambda x: jnp.sin(x) * 17.25)(x).block_until_ready()
print(sum(e.endswith('/cache_hits') for e in events), sum(e.endswith('/cache_misses') for e in events))
"""


def _compile_in_new_process() -> tuple[str, int, int]:
  result = subprocess.run([sys.executable, '-c', _COMPILE], check=True, capture_output=True,
                          text=True, timeout=120, env={**os.environ, 'XLA_FLAGS': ''})
  folder, hits, misses = result.stdout.split()
  return folder, int(hits), int(misses)


def test_started_processes_share_one_locked_cache():
  folder = pathlib.Path(os.environ['JAX_COMPILATION_CACHE_DIR'])
  assert folder.is_dir()
  assert int(os.environ['JAX_COMPILATION_CACHE_MAX_SIZE']) > 0  # eviction on: reads are locked
  cache_dir, hits, misses = _compile_in_new_process()
  assert pathlib.Path(cache_dir) == folder
  assert (hits, misses) == (0, 1)
  assert list(folder.glob('jit__lambda-*-cache'))
  assert (folder / '.lockfile').exists()
  # The same program in another process is read back instead of compiled.
  _, hits, misses = _compile_in_new_process()
  assert (hits, misses) == (1, 0)
