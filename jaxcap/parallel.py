"""Data parallelism over one Mesh of every device on every host.

Parameters are replicated, batches are split along the 'data' axis. The mesh uses Auto axis
types: jit propagates these shardings itself (the classic GSPMD behaviour), which is what a
data-parallel train step wants, whatever default `jax.make_mesh` has in the installed JAX.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
import glob
import itertools
import logging
import os
import shutil

import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import numpy as np
from orbax.checkpoint import multihost as orbax_multihost

DATA_AXIS = 'data'


# Cluster managers whose environment says "several processes": jax.distributed finds its
# coordinator there by itself.
_CLUSTER_SIZE_VARIABLES = ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE')


def _cluster_detected() -> bool:
  several = any(int(os.environ.get(name, '1') or 1) > 1 for name in _CLUSTER_SIZE_VARIABLES)
  tpu_hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  return several or ',' in tpu_hosts


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
  """Joins the processes of a multi-host run with `jax.distributed.initialize`.

  Explicit arguments win; otherwise JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
  JAX_PROCESS_ID; otherwise Cloud TPU, SLURM and Open MPI are detected by JAX. A single
  process with none of these does nothing. Returns whether the runtime was initialised.
  """
  coordinator_address = coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS')
  if num_processes is None and os.environ.get('JAX_NUM_PROCESSES'):
    num_processes = int(os.environ['JAX_NUM_PROCESSES'])
  if process_id is None and os.environ.get('JAX_PROCESS_ID'):
    process_id = int(os.environ['JAX_PROCESS_ID'])
  if coordinator_address is None and num_processes is None and not _cluster_detected():
    return False
  # CPU-only processes (tests, CPU clusters) exchange collectives over gloo.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  return True


# The longest a process waits at a barrier for its peers: process 0 may be downloading and
# building COCO (tens of GB) while the others wait for the dataset. A peer that dies ends the
# wait earlier: the coordination service reports it.
BARRIER_TIMEOUT_S = 12 * 3600
# Every process passes the same barriers in the same order, so the counter makes the same
# unique key on each (the coordination service needs a new key for each barrier).
_barrier_numbers = itertools.count()


def sync_processes(name: str) -> None:
  """Waits until every process reaches the barrier `name` (nothing to do with one process).

  A barrier of the coordination service, not a collective: a collective's first use sets up
  gloo with a 30 s deadline, too short for a peer that is building the dataset.
  """
  if jax.process_count() > 1:
    wait = orbax_multihost.get_barrier_sync_fn()
    wait(key=f'jaxcap: {name} #{next(_barrier_numbers)}', timeout_ms=BARRIER_TIMEOUT_S * 1000)


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh((len(devices),), (DATA_AXIS,), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


# What an accelerator leaves on a host without JAX's plugin for it, and the setup.cfg extra
# that installs that plugin.
_ACCELERATOR_SIGNS = {
    'an NVIDIA GPU': (('nvidia-smi',), ('/dev/nvidia0',), 'cuda12'),
    'a TPU': ((), ('/dev/accel0', '/dev/vfio/0'), 'tpu'),
}


def unused_accelerator(dev: str = '/dev') -> tuple[str, str] | None:
  """(what, extra) for an accelerator this host has that JAX does not use (its backend is the
  CPU), else None. `dev` stands for /dev in tests."""
  if jax.default_backend() != 'cpu':
    return None
  for what, (programs, paths, extra) in _ACCELERATOR_SIGNS.items():
    paths = [os.path.join(dev, os.path.relpath(p, '/dev')) for p in paths]
    if any(shutil.which(p) for p in programs) or any(glob.glob(p) for p in paths):
      return what, extra
  return None


def log_devices(mesh: Mesh, dev: str = '/dev') -> None:
  """Logs the backend, the devices and the mesh; warns when JAX runs on the CPU of a host with
  an accelerator (jaxcap installed without its extra)."""
  devices = mesh.devices.flat
  kinds = sorted({d.device_kind for d in devices})
  logging.info('JAX %s on %s: %d device(s) (%s) over %d process(es); mesh %s', jax.__version__,
               jax.default_backend(), mesh.size, ', '.join(kinds), jax.process_count(),
               dict(mesh.shape))
  unused = unused_accelerator(dev)
  if unused:
    what, extra = unused
    logging.warning(
        'This host has %s but JAX runs on the CPU: install jaxcap with the accelerator extra, '
        "`pip install -e '.[%s]'` (README, Quick start), and run again.", what, extra)


def data_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


# jaxlib 0.10.2 hands the CPU's convolutions to YNNPACK by default, which ran InceptionV3's at
# half the speed of XLA's own (Eigen) convolution and the demo's train step 1.6x slower on an
# AVX-512 Xeon (docs/benchmarks.md, "CPU compiler options"). Fusing only matrix products into
# YNNPACK leaves convolutions to XLA and keeps YNNPACK's products, which are the faster ones, and
# its reductions (batch norm's statistics in training: +31% on InceptionV3's fine-tuning step).
_CPU_COMPILER_OPTIONS = {
    'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE'}


def compiler_options(backend: str | None = None) -> dict[str, str]:
  """XLA options for programs with convolutions compiled for `backend` (default: JAX's default
  backend): the CPU's above, none elsewhere (GPUs and TPUs run convolutions in their libraries)."""
  return dict(_CPU_COMPILER_OPTIONS) if (backend or jax.default_backend()) == 'cpu' else {}


def jit_data_parallel(fn: Callable, mesh: Mesh, *, donate_state: bool = False) -> Callable:
  """`fn(state, batch)` jitted data-parallel: the state replicated, the batch split along 'data'
  over every device, the outputs replicated (so every process receives all of them)."""
  return jax.jit(fn, in_shardings=(replicated(mesh), data_sharding(mesh)),
                 out_shardings=replicated(mesh), donate_argnums=0 if donate_state else (),
                 compiler_options=compiler_options(mesh.devices.flat[0].platform))


def check_batch_size(global_batch_size: int, mesh: Mesh, field: str = 'batch_size') -> int:
  """The per-process batch size; the global size must split evenly over the devices."""
  if global_batch_size % mesh.size:
    raise ValueError(f'config.{field}={global_batch_size} is not divisible by the '
                     f'{mesh.size} devices of the mesh')
  return global_batch_size // jax.process_count()


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows of a global batch -> global arrays sharded along 'data'. Arrays already
  sharded so (a benchmark's fixed batch) pass through."""
  sharding = data_sharding(mesh)
  return {name: value if isinstance(value, jax.Array) and value.sharding == sharding
          else jax.make_array_from_process_local_data(sharding, np.asarray(value))
          for name, value in batch.items()}
