"""Data parallelism over one Mesh of every device on every host.

Parameters are replicated, batches are split along the 'data' axis. The mesh uses Auto axis
types: jit propagates these shardings itself (the classic GSPMD behaviour), which is what a
data-parallel train step wants, whatever default `jax.make_mesh` has in the installed JAX.
"""

from __future__ import annotations

from typing import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = 'data'


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh((len(devices),), (DATA_AXIS,), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def check_batch_size(global_batch_size: int, mesh: Mesh, field: str = 'batch_size') -> int:
  """The per-process batch size; the global size must split evenly over the devices."""
  if global_batch_size % mesh.size:
    raise ValueError(f'config.{field}={global_batch_size} is not divisible by the '
                     f'{mesh.size} devices of the mesh')
  return global_batch_size // jax.process_count()


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows of a global batch -> global arrays sharded along 'data'."""
  sharding = data_sharding(mesh)
  return {name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
          for name, value in batch.items()}
