"""Device-resident decoder training: K steps in one call equal K single steps, no transfers."""

import functools

import jax
import numpy as np
import pytest

from jaxcap import parallel
from jaxcap import state as state_lib
from jaxcap import train_step as train_step_lib
from jaxcap.data.tokenizer import BOS_ID
from jaxcap.data.tokenizer import EOS_ID
from jaxcap.data.tokenizer import PAD_ID
from jaxcap.models import captioner
from jaxcap.trainers import features
from jaxcap.trainers import resident

VOCAB, EMBEDDING_DIM, ROWS = 40, 12, 96
BUCKETS = (6, 9, 12)


def _rows(max_len=12, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(4, VOCAB, (ROWS, max_len)).astype(np.int32)
  tokens[:, 0] = BOS_ID
  for row, length in zip(tokens, rng.integers(3, max_len + 1, ROWS)):
    row[length - 1], row[length:] = EOS_ID, PAD_ID
  return rng.normal(size=(ROWS, EMBEDDING_DIM)).astype(np.float32), tokens


def _decoder_state(config, mesh, vocab_size=VOCAB):
  model = captioner.create_model(config.model, vocab_size)
  return state_lib.initial_decoder_state(config, model, mesh, EMBEDDING_DIM)


def test_buckets_and_trimming():
  tokens = np.array([[2, 5, 3, 0, 0, 0], [2, 5, 6, 7, 3, 0], [2, 3, 0, 0, 0, 0]])
  np.testing.assert_array_equal(features.row_lengths(tokens), [3, 5, 2])
  np.testing.assert_array_equal(features.bucket_index(tokens, (3, 4, 6)), [0, 2, 0])
  assert features.trim_to_bucket({'tokens': tokens[[0, 2]]}, (3, 4, 6))['tokens'].shape == (2, 3)
  assert features.check_length_buckets((9, 4, 30), 12) == (4, 9, 12)
  with pytest.raises(ValueError, match='length_buckets'):
    features.check_length_buckets((1, 8), 12)


def test_epoch_order_visits_rows_once_grouped_by_length(config):
  mesh = parallel.make_mesh()  # 8 forced CPU devices.
  embedding, tokens = _rows()
  data = features.place(embedding, tokens, np.arange(ROWS), BUCKETS, mesh)
  indices = np.asarray(features.epoch_order(jax.random.key(3), data.bucket, 4))
  assert indices.shape == (8, 3, 4)  # 12 rows per shard, 3 batches of 4.
  for shard in indices:
    assert len(np.unique(shard)) == shard.size
  # Grouped by length: in each shard, batches ranked by length do not overlap in buckets.
  buckets = np.asarray(data.bucket)
  for shard_buckets, shard in zip(buckets, indices):
    batches = sorted((shard_buckets[batch] for batch in shard), key=np.mean)
    assert all(a.max() <= b.min() for a, b in zip(batches, batches[1:]))
  # A pure function of the key: the same order again, another one for another epoch's key.
  np.testing.assert_array_equal(indices, features.epoch_order(jax.random.key(3), data.bucket, 4))
  assert not np.array_equal(indices, features.epoch_order(jax.random.key(4), data.bucket, 4))


def test_caption_rows_point_at_their_image_embedding():
  mesh = parallel.make_mesh()
  num_images, captions = 16, 3
  embedding = np.repeat(np.arange(num_images, dtype=np.float32)[:, None], EMBEDDING_DIM, 1)
  image_index = np.repeat(np.arange(num_images), captions)
  tokens = np.full((len(image_index), 6), PAD_ID, np.int32)
  tokens[:, 0], tokens[:, 1], tokens[:, 2] = BOS_ID, 4 + image_index, EOS_ID
  data = features.place(embedding, tokens, image_index, BUCKETS, mesh)
  assert data.embedding.shape == (8, 2, EMBEDDING_DIM) and data.tokens.shape == (8, 6, 6)
  order = features.first_order(data, 3)
  for step in range(4):
    order, batch, _ = jax.jit(
        features.batch_at, static_argnums=4)(data, order, jax.random.key(0), step, 3)
    np.testing.assert_array_equal(
        np.asarray(batch['embedding'])[:, 0] + 4,
        np.asarray(batch['tokens'])[:, 1])


def test_resident_steps_equal_single_steps_without_transfers(config):
  config.data.max_len = 12
  config.optimizer.learning_rate = 1e-2
  mesh = parallel.make_mesh()
  embedding, tokens = _rows()
  data = features.place(embedding, tokens, np.arange(ROWS), BUCKETS, mesh)
  seed_key = jax.device_put(jax.random.key(7), parallel.replicated(mesh))
  per_shard_batch, steps_per_call = 2, 4  # Global batch 16; 6 steps per epoch: calls cross one.

  train_steps = resident.jit_steps(features.make_train_step(BUCKETS, per_shard_batch))(
      steps_per_call)
  state, order = _decoder_state(config, mesh), features.first_order(data, per_shard_batch)
  (state, order), first_metrics = train_steps((state, order), data, seed_key)
  with jax.transfer_guard('disallow'):  # Nothing moves from the host between calls.
    (state, order), second_metrics = train_steps((state, order), data, seed_key)
  resident_losses = np.concatenate([first_metrics['loss'], second_metrics['loss']])
  assert int(state.step) == 8 and int(order.epoch) == 1

  # The same steps one at a time, on host-trimmed batches.
  reference = _decoder_state(config, mesh)
  reference_order = features.first_order(data, per_shard_batch)
  pick = jax.jit(functools.partial(features.batch_at, per_shard_batch=per_shard_batch))
  step_fn = jax.jit(train_step_lib.decoder_train_step)
  losses, lengths = [], []
  for _ in range(8):
    reference_order, batch, bucket = pick(data, reference_order, seed_key, reference.step)
    length = BUCKETS[int(bucket)]
    assert (np.asarray(batch['tokens'])[:, length:] == PAD_ID).all()
    lengths.append(length)
    reference, metrics = step_fn(reference, {**batch, 'tokens': batch['tokens'][:, :length]})
    losses.append(float(metrics['loss']))
  assert len(set(lengths)) > 1  # Several buckets were exercised.
  np.testing.assert_allclose(resident_losses, losses, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(reference.params)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
