"""The 'features' trainer: the decoder alone, with the training set's cached embeddings and
caption rows resident on the devices.

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

from collections.abc import Callable
from collections.abc import Sequence
import functools
import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import ml_collections
import numpy as np

from jaxcap import state as state_lib
from jaxcap import train_step as train_step_lib
from jaxcap.data.tokenizer import PAD_ID
from jaxcap.models import captioner
from jaxcap.trainers import resident
from jaxcap.trainers.base import Setup
from jaxcap.trainers.base import Trainer

Batch = dict[str, jax.Array]


class ResidentData(NamedTuple):
  """Training rows on the devices: leading axis = device shard (split along 'data')."""
  embedding: jax.Array    # (shards, images_per_shard, ...) image features
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
    raise ValueError(
        f'config.data.length_buckets={tuple(buckets)}: a row holds at least BOS and EOS (2)')
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
  per_shard = resident.images_per_shard(len(embedding), mesh)
  image_index = np.asarray(image_index)
  shard_of_row = image_index // per_shard
  rows = [np.flatnonzero(shard_of_row == shard) for shard in range(num_shards)]
  rows_per_shard = min(len(r) for r in rows)
  rows = np.stack([r[:rows_per_shard] for r in rows])  # (shards, rows_per_shard)
  shard_tokens = np.asarray(tokens)[rows]
  put = lambda array: resident.put_sharded(array, mesh)
  bucket = bucket_index(shard_tokens.reshape(-1, shard_tokens.shape[-1]), buckets)
  return ResidentData(resident.image_blocks(np.asarray(embedding).astype(dtype), mesh),
                      put(shard_tokens), put((image_index[rows] % per_shard).astype(np.int32)),
                      put(bucket.reshape(rows.shape)))


def first_order(data: ResidentData, per_shard_batch: int) -> Order:
  steps = data.tokens.shape[1] // per_shard_batch
  indices = jnp.zeros((data.tokens.shape[0], steps, per_shard_batch), jnp.int32)
  indices = jax.device_put(indices, data.tokens.sharding)
  replicated = NamedSharding(data.tokens.sharding.mesh, PartitionSpec())
  epoch = jax.device_put(jnp.array(-1, jnp.int32), replicated)
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
  order_key = jax.random.fold_in(state_lib.rng_stream(seed_key, 'order'), epoch)
  order = jax.lax.cond(
      epoch != order.epoch,
      lambda: Order(epoch.astype(jnp.int32), epoch_order(order_key, data.bucket, per_shard_batch)),
      lambda: order)
  rows = order.indices[:, position]  # (shards, per_shard_batch)
  take = jax.vmap(lambda array, index: array[index])
  tokens, image_index, bucket = (
      take(array, rows) for array in (data.tokens, data.image_index, data.bucket))
  embedding = take(data.embedding, image_index)
  batch = {'embedding': embedding.reshape(-1, *embedding.shape[2:]).astype(jnp.float32),
           'tokens': tokens.reshape(-1, tokens.shape[-1])}
  return order, batch, jnp.max(bucket)


def make_train_step(buckets: Sequence[int], per_shard_batch: int) -> Callable:
  """`((state, order), data, seed_key) -> ((state, order), metrics)`: the decoder step of
  state.step, on the batch it picks on the devices, run up to that batch's bucket length.

  Only the gradients are computed per bucket (`lax.switch`); the optimizer step follows the
  switch. Passing the whole state through the switch made XLA copy it, optimizer moments
  included, at every step (docs/benchmarks.md)."""
  def gradients_at(length):
    def run(state, batch, dropout_key):
      return train_step_lib.decoder_gradients(
          state, {**batch, 'tokens': batch['tokens'][:, :length]}, dropout_key)
    return run

  def train_step(carry, data, seed_key):
    state, order = carry
    dropout_key = state_lib.rng_stream(seed_key, 'dropout')
    order, batch, bucket = batch_at(data, order, seed_key, state.step, per_shard_batch)
    branches = [functools.partial(gradients_at(length), state) for length in buckets]
    gradients = jax.lax.switch(bucket, branches, batch, dropout_key)
    state, metrics = train_step_lib.apply_gradients(state, *gradients)
    return (state, order), metrics

  return train_step


def make(state: state_lib.TrainState, embedding: np.ndarray, tokens: np.ndarray,
         image_index: np.ndarray, config: ml_collections.ConfigDict, mesh: Mesh,
         full_state: Callable = lambda s: s) -> Trainer:
  """The trainer of a decoder `state` on cached `embedding`s and their caption rows
  (`tokens`, each with the `image_index` of its embedding), placed on the devices."""
  buckets = check_length_buckets(config.data.length_buckets, config.data.max_len)
  data = place(embedding, tokens, image_index, buckets, mesh, captioner.DTYPES[config.model.dtype])
  per_shard_batch = resident.per_shard_batch(config, mesh, data.tokens.shape[1], 'captions')
  seed_key = resident.seed_key(config, mesh)
  steps_fn = resident.jit_steps(make_train_step(buckets, per_shard_batch))
  holder = {'order': first_order(data, per_shard_batch)}

  def run(state, num_steps):
    (state, holder['order']), metrics = steps_fn(num_steps)(
        (state, holder['order']), data, seed_key)
    return state, metrics

  return Trainer(state, run, config.resident.steps_per_call, full_state,
                 {'examples_per_sec': config.batch_size})


def build(setup: Setup) -> Trainer:
  """The decoder trained on the training split's cached embeddings."""
  config, mesh = setup.config, setup.mesh
  cached = setup.cached_features()
  tokens, image_index = resident.caption_rows(cached, setup.train_table)
  logging.info('Resident training data: %d captions of %d images, %s embeddings, on %d devices',
               len(tokens), len(cached.image_ids), config.model.dtype, mesh.size)
  state = state_lib.initial_decoder_state(config, setup.model, mesh, cached.embedding.shape[1:])
  state = setup.checkpoints.restore_latest(state)
  return make(state, cached.embedding, tokens, image_index, config, mesh,
              functools.partial(state_lib.with_trained_decoder, setup.full_state))
