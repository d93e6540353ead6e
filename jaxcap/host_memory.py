"""Keeps the process's freed host memory for reuse: XLA's CPU programs allocate their
temporaries afresh at every call.

A jitted CPU step asks for its temporary buffer (InceptionV3 at batch 32: 1.2 GB) at each call
and frees it after. glibc's malloc serves such sizes with fresh mmap'd pages and returns them
on free, so every call pays a page fault per 4 KiB it touches; on the 2-core VMs we measure on
that is ~290,000 faults and 0.7 s of system time per InceptionV3 call, and memory-bound
operations run 2-5x slower (docs/benchmarks.md, "Convolutions on CPU"). TensorFlow's BFC
allocator avoids this by keeping its pool; here glibc is asked to do the same: no mmap for
large blocks, one arena (other arenas would fall back to mmap for blocks beyond their 64 MiB
heaps), and no trimming of the heap's top. The process then holds its peak heap until it exits.

Scripts call `keep_freed_memory()` first thing in `main`, before XLA starts its threads.
`JAXCAP_KEEP_FREED_MEMORY=0` turns it off (for a process that must give memory back).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt(3) parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER_TRIM = -1  # Read by glibc as the largest size_t.

ENV_VARIABLE = 'JAXCAP_KEEP_FREED_MEMORY'


def keep_freed_memory() -> bool:
  """Asks glibc's malloc to keep freed memory in the process; True if it took effect.

  False, doing nothing, where the C library is not glibc (musl, macOS) or where
  $JAXCAP_KEEP_FREED_MEMORY is 0."""
  if os.environ.get(ENV_VARIABLE, '1') == '0':
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  return all(mallopt(parameter, value) == 1 for parameter, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM)))
