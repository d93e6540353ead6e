"""What the 'features' and 'scst' trainers share: training data placed on the devices once, in
contiguous blocks of images along the mesh's 'data' axis (each shard picks its batch from its
own block, with no communication), and K optimizer steps per jitted call in a `lax.scan`.

Numpy and JAX only: the cached features and token tables arrive as arrays.
"""

from __future__ import annotations

from collections.abc import Callable
import functools
from typing import Any

import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import ml_collections
import numpy as np

from jaxcap import parallel


def put_sharded(array: np.ndarray, mesh: Mesh) -> jax.Array:
  """A host array (the same on every process) split along its first axis over the mesh."""
  sharding = NamedSharding(mesh, PartitionSpec(parallel.DATA_AXIS))
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def images_per_shard(num_images: int, mesh: Mesh) -> int:
  """Images in each device's block: equal contiguous blocks, the last few images dropped."""
  per_shard = num_images // mesh.size
  if per_shard == 0:
    raise ValueError(f'{num_images} images cannot be split over {mesh.size} devices')
  return per_shard


def image_blocks(array: np.ndarray, mesh: Mesh) -> jax.Array:
  """(images, ...) -> (shards, images_per_shard, ...) on the devices, one block per shard."""
  array = np.asarray(array)
  per_shard = images_per_shard(len(array), mesh)
  blocks = array[:mesh.size * per_shard].reshape(mesh.size, per_shard, *array.shape[1:])
  return put_sharded(blocks, mesh)


def per_shard_batch(config: ml_collections.ConfigDict, mesh: Mesh, available: int,
                    what: str) -> int:
  """config.batch_size // devices, if every shard holds that many `what` (per shard)."""
  if available * mesh.size < config.batch_size:
    raise ValueError(f'config.batch_size={config.batch_size} is larger than the '
                     f'{available * mesh.size} cached training {what}')
  return config.batch_size // mesh.size


def seed_key(config: ml_collections.ConfigDict, mesh: Mesh) -> jax.Array:
  """The run's seed key, replicated: each step derives its randomness from it and its step."""
  return jax.device_put(jax.random.key(config.seed), parallel.replicated(mesh))


def jit_steps(step: Callable[..., tuple[Any, Any]]) -> Callable[[int], Callable]:
  """`steps_per_call -> jitted (carry, *inputs) -> (carry, metrics stacked along the steps)`:
  that many `step(carry, *inputs) -> (carry, metrics)` in one `lax.scan`, the carry (the state
  and whatever else changes from step to step) donated. One compilation per call length (the
  last call of a run may be shorter)."""
  @functools.cache
  def steps_fn(steps_per_call: int) -> Callable:
    def steps(carry, *inputs):
      return jax.lax.scan(lambda c, _: step(c, *inputs), carry, length=steps_per_call)
    return jax.jit(steps, donate_argnums=0)
  return steps_fn


def _table_rows(image_ids: np.ndarray, table: Any) -> np.ndarray:
  table_row = {image_id: row for row, image_id in enumerate(table.image_ids.tolist())}
  return np.asarray([table_row[image_id] for image_id in image_ids.tolist()], np.int64)


def caption_rows(features: Any, table: Any) -> tuple[np.ndarray, np.ndarray]:
  """Every caption of the cached images (`features.image_ids`) as a token row (R, L), with the
  index of its image in `features.embedding` (R,)."""
  rows = _table_rows(features.image_ids, table)
  tokens = [table.tokens[row, :table.counts[row]] for row in rows]
  image_index = [np.full(table.counts[row], index) for index, row in enumerate(rows)]
  return np.concatenate(tokens), np.concatenate(image_index)


def references(features: Any, table: Any) -> tuple[np.ndarray, np.ndarray]:
  """Each cached image's captions (I, C, L) in `features.embedding`'s order, and their counts."""
  rows = _table_rows(features.image_ids, table)
  return table.tokens[rows], table.counts[rows]

