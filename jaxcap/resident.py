"""Decoder training with the whole training set resident on the devices.

Cached image embeddings and their token rows are placed on the devices once, split along the
mesh's 'data' axis. One jitted call then runs K optimizer steps in a `lax.scan`: each step picks
its batch on the device, so nothing crosses from the host between calls.

Batch order is a pure function of (seed, step): epoch e's order is drawn from
`fold_in(seed, e)`, so a restarted run replays the same batches from its checkpointed step.
Rows are grouped by length within an epoch (random order inside each length bucket, then the
batches shuffled), and each step runs the decoder only up to its batch's bucket length
(`lax.switch` over one compiled branch per bucket): no LSTM or vocabulary work on padding
columns.

Each image's embedding is stored once; a caption row points at its image. Every device shard
keeps its own images and their caption rows: a shard's batch comes from its own rows, so
picking a batch needs no communication.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxcap import parallel
from jaxcap import train_step as train_step_lib
from jaxcap.data.tokenizer import PAD_ID

Batch = dict[str, jax.Array]


class ResidentData(NamedTuple):
  """Training rows on the devices: leading axis = device shard (split along 'data')."""
  embedding: jax.Array    # (shards, images_per_shard, D)
  tokens: jax.Array       # (shards, rows_per_shard, L) one caption per row
  image_index: jax.Array  # (shards, rows_per_shard) the row's image in its shard
  bucket: jax.Array       # (shards, rows_per_shard) index into the length buckets


class Order(NamedTuple):
  """The current epoch's batch order, carried from call to call on the devices."""
  epoch: jax.Array    # () int32; -1 before the first epoch is drawn
  indices: jax.Array  # (shards, steps_per_epoch, per_shard_batch) row indices


def check_length_buckets(buckets: Sequence[int], max_len: int) -> tuple[int, ...]:
  """Sorted token-row lengths to cut batches to, ending with max_len (longer ones dropped)."""
  if any(int(b) < 2 for b in buckets):
    raise ValueError(f'config.data.length_buckets={tuple(buckets)}: a row holds at least BOS and EOS (2)')
  return tuple(sorted(set(int(b) for b in buckets if b < max_len))) + (max_len,)


def row_lengths(tokens: np.ndarray) -> np.ndarray:
  """Ids up to and including the last non-PAD id of each row."""
  nonpad = np.asarray(tokens) != PAD_ID
  return np.where(nonpad.any(-1), nonpad.shape[-1] - np.argmax(nonpad[:, ::-1], axis=-1), 0)


def bucket_index(tokens: np.ndarray, buckets: Sequence[int]) -> np.ndarray:
  """The smallest bucket holding each row."""
  return np.searchsorted(np.asarray(buckets), row_lengths(tokens), side='left').astype(np.int32)


def trim_to_bucket(batch: dict[str, np.ndarray], buckets: Sequence[int]) -> dict[str, np.ndarray]:
  """The batch with token columns cut to the smallest bucket holding every row (host batches)."""
  length = buckets[int(bucket_index(batch['tokens'], buckets).max())]
  return {**batch, 'tokens': batch['tokens'][:, :length]}


def place(embedding: np.ndarray, tokens: np.ndarray, image_index: np.ndarray,
          buckets: Sequence[int], mesh: Mesh, dtype=jnp.float32) -> ResidentData:
  """Whole-training-set arrays (the same on every process) -> device shards.

  Images are split into equal contiguous blocks, one per device (the last few dropped); each
  shard keeps the caption rows of its images, cut to the smallest shard's count so every shard
  has the same shape (for COCO a handful of captions).
  """
  num_shards = mesh.size
  images_per_shard = len(embedding) // num_shards
  if images_per_shard == 0:
    raise ValueError(f'{len(embedding)} images cannot be split over {num_shards} devices')
  image_index = np.asarray(image_index)
  shard_of_row = image_index // images_per_shard
  rows = [np.flatnonzero(shard_of_row == shard) for shard in range(num_shards)]
  rows_per_shard = min(len(r) for r in rows)
  rows = np.stack([r[:rows_per_shard] for r in rows])  # (shards, rows_per_shard)
  shard_tokens = np.asarray(tokens)[rows]
  shard_images = np.asarray(embedding)[:num_shards * images_per_shard].reshape(
      num_shards, images_per_shard, -1)
  put = lambda array: put_sharded(array, mesh)
  return ResidentData(put(shard_images.astype(dtype)), put(shard_tokens),
                      put((image_index[rows] % images_per_shard).astype(np.int32)),
                      put(bucket_index(shard_tokens.reshape(-1, shard_tokens.shape[-1]), buckets)
                          .reshape(rows.shape)))


def put_sharded(array: np.ndarray, mesh: Mesh) -> jax.Array:
  """A host array (the same on every process) split along its first axis over the mesh."""
  sharding = NamedSharding(mesh, PartitionSpec(parallel.DATA_AXIS))
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def first_order(data: ResidentData, per_shard_batch: int) -> Order:
  steps = data.tokens.shape[1] // per_shard_batch
  indices = jnp.zeros((data.tokens.shape[0], steps, per_shard_batch), jnp.int32)
  indices = jax.device_put(indices, data.tokens.sharding)
  epoch = jax.device_put(jnp.array(-1, jnp.int32), NamedSharding(data.tokens.sharding.mesh, PartitionSpec()))
  return Order(epoch=epoch, indices=indices)


def epoch_order(key: jax.Array, bucket: jax.Array, per_shard_batch: int) -> jax.Array:
  """(shards, steps, per_shard_batch) row indices of one epoch, grouped by length bucket.

  Within each shard: random order inside each bucket, then cut into batches. The batches'
  order is shuffled with one permutation shared by all shards, so a global batch holds rows of
  the same position in every shard's length ranking: of similar length everywhere.
  """
  shards, rows = bucket.shape
  steps = rows // per_shard_batch
  shard_keys = jax.random.split(jax.random.fold_in(key, 0), shards)
  ranks = jax.vmap(lambda k, b: jnp.argsort(b + jax.random.uniform(k, b.shape)))(shard_keys, bucket)
  batches = ranks[:, :steps * per_shard_batch].reshape(shards, steps, per_shard_batch)
  batch_order = jax.random.permutation(jax.random.fold_in(key, 1), steps)
  return batches[:, batch_order].astype(jnp.int32)


def batch_at(data: ResidentData, order: Order, seed_key: jax.Array, step: jax.Array,
             per_shard_batch: int) -> tuple[Order, Batch, jax.Array]:
  """The order (redrawn at an epoch boundary), the batch of `step` and its bucket index."""
  steps_per_epoch = order.indices.shape[1]
  epoch, position = jnp.divmod(step, steps_per_epoch)
  order = jax.lax.cond(
      epoch != order.epoch,
      lambda: Order(epoch.astype(jnp.int32),
                    epoch_order(jax.random.fold_in(train_step_lib.rng_stream(seed_key, 'order'), epoch), data.bucket, per_shard_batch)),
      lambda: order)
  rows = order.indices[:, position]  # (shards, per_shard_batch)
  take = jax.vmap(lambda array, index: array[index])
  tokens, image_index, bucket = (take(array, rows) for array in (data.tokens, data.image_index, data.bucket))
  embedding = take(data.embedding, image_index)
  batch = {'embedding': embedding.reshape(-1, embedding.shape[-1]).astype(jnp.float32),
           'tokens': tokens.reshape(-1, tokens.shape[-1])}
  return order, batch, jnp.max(bucket)


def make_train_steps(buckets: Sequence[int], per_shard_batch: int,
                     steps_per_call: int) -> Callable:
  """`(state, order, data, seed_key) -> (state, order, metrics)`: `steps_per_call` decoder
  steps in one `lax.scan`; metrics are stacked along a leading axis of that length."""
  def step_at(length):
    def run(state, batch, dropout_key):
      return train_step_lib.decoder_train_step(
          state, {**batch, 'tokens': batch['tokens'][:, :length]}, dropout_key)
    return run

  branches = [step_at(length) for length in buckets]

  def train_steps(state, order, data, seed_key):
    dropout_key = train_step_lib.rng_stream(seed_key, 'dropout')

    def body(carry, _):
      state, order = carry
      order, batch, bucket = batch_at(data, order, seed_key, state.step, per_shard_batch)
      state, metrics = jax.lax.switch(bucket, branches, state, batch, dropout_key)
      return (state, order), metrics
    (state, order), metrics = jax.lax.scan(body, (state, order), length=steps_per_call)
    return state, order, metrics

  return train_steps


def jit_train_steps(buckets: Sequence[int], per_shard_batch: int, steps_per_call: int):
  """`make_train_steps` jitted, the state and order donated."""
  return jax.jit(make_train_steps(buckets, per_shard_batch, steps_per_call), donate_argnums=(0, 1))
