"""tf.data streams: a split's images and token rows to padded numpy batches.

Training batches are a pure function of (seed, step): each input shard is a seeded,
deterministic stream, and a run that starts at step N skips the first N batches' records before
decoding any image. Preprocessing steps are small pure functions from a feature dict to a
feature dict (`jaxcap.data.preprocess`).
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Iterator

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from jaxcap.data import captions as captions_lib
from jaxcap.data import preprocess as preprocess_lib

Batch = dict[str, np.ndarray]


def pick_caption(seed: int):
  """Chooses one caption per (image, position in the stream): a new pick every epoch."""
  def fn(index, features):
    choice = tf.random.stateless_uniform(
        [], seed=tf.stack([tf.constant(seed, tf.int64), index]),
        maxval=tf.cast(features['num_captions'], tf.int32), dtype=tf.int32)
    return {'image': features['image'], 'tokens': features['tokens'][choice]}
  return fn


def keep(*names: str):
  return lambda features: {name: features[name] for name in names}


def _process_share(builder: tfds.core.DatasetBuilder, split: str, process_index: int,
                   process_count: int, **as_dataset_kwargs) -> tf.data.Dataset:
  """This process's even share of `split`, in order. A split smaller than the number of
  processes leaves some shares empty: tfds refuses to read those, so they are the split cut to
  nothing (same features)."""
  share = tfds.even_splits(split, n=process_count)[process_index]
  if builder.info.splits[share].num_examples == 0:
    return builder.as_dataset(split=split, shuffle_files=False, **as_dataset_kwargs).take(0)
  return builder.as_dataset(split=share, shuffle_files=False, **as_dataset_kwargs)


def input_shards(num_shards: int, process_index: int, process_count: int) -> list[int]:
  """The input shards this process reads: shard s goes to process s % process_count."""
  num_shards = num_shards or process_count
  if num_shards % process_count:
    raise ValueError(f'config.data.input_shards={num_shards} is not a multiple of the '
                     f'{process_count} processes')
  return list(range(process_index, num_shards, process_count))


def _decode_image(builder: tfds.core.DatasetBuilder):
  """Decodes the encoded image of a record read with SkipDecoding (decoded ones pass)."""
  image_feature = builder.info.features['image']

  def decode(features):
    image = features['image']
    if image.dtype != tf.string:  # A source that yields decoded images (e.g. tfds mock data).
      return features
    return {**features, 'image': image_feature.decode_example(image)}
  return decode


def shard_stream(builder: tfds.core.DatasetBuilder,
                 split: str,
                 table: captions_lib.TokenTable,
                 data_config: ml_collections.ConfigDict,
                 *,
                 seed: int,
                 start: int = 0) -> tf.data.Dataset:
  """An endless stream of {'image', 'tokens'} examples of `split`, a pure function of `seed`,
  from its `start`-th example on.

  Images stay encoded until after the skip (unless cached decoded), so starting late costs
  reading records, not decoding them. Augmentation and the caption pick depend on (seed,
  position in the stream) only.
  """
  ds = builder.as_dataset(split=split, shuffle_files=True,
                          read_config=tfds.ReadConfig(shuffle_seed=seed),
                          decoders={'image': tfds.decode.SkipDecoding()})
  ds = ds.map(keep('image', 'image/id'), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.map(table.lookup_fn(), num_parallel_calls=tf.data.AUTOTUNE)
  # Images become uint8 squares at image_size: an encoded JPEG decodes only its square. Cached:
  # decoded once (whole, for random squares; else the resized square).
  square = preprocess_lib.training_square(seed if data_config.augment else None,
                                          data_config.augment_min_crop_fraction)
  resize = preprocess_lib.training_resize(data_config.image_size)
  prepare = lambda ds: ds.map(square, num_parallel_calls=tf.data.AUTOTUNE).map(
      resize, num_parallel_calls=tf.data.AUTOTUNE)
  if data_config.cache_images:
    if data_config.augment:
      ds = ds.map(_decode_image(builder), num_parallel_calls=tf.data.AUTOTUNE)
    else:  # Deterministic: done once, then cached.
      ds = prepare(ds.enumerate()).map(lambda index, features: features)
    ds = ds.cache()
  ds = ds.shuffle(data_config.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
  ds = ds.repeat().enumerate().skip(start)
  if data_config.augment or not data_config.cache_images:
    ds = prepare(ds)
  return ds.map(pick_caption(seed), num_parallel_calls=tf.data.AUTOTUNE)


def train_dataset(builder: tfds.core.DatasetBuilder, split: str, table: captions_lib.TokenTable,
                  data_config: ml_collections.ConfigDict, *, batch_size: int, seed: int,
                  start_step: int = 0, process_index: int = 0,
                  process_count: int = 1) -> tf.data.Dataset:
  """Endless shuffled batches {'image': (B, H, W, 3) uint8, 'tokens': (B, L) i32} of this process,
  from global step `start_step` on.

  The split is cut into `data_config.input_shards` shards (0: one per process); each shard is
  its own seeded stream, and a global batch is every shard's next rows, in shard order. So the
  batches are a pure function of (seed, step, input_shards), whatever the number of processes
  reading them: a resumed run, or one on another number of hosts, sees the same batches.
  `batch_size` is the per-process batch.
  """
  shards = input_shards(data_config.input_shards, process_index, process_count)
  num_shards = len(shards) * process_count
  if batch_size % len(shards):
    raise ValueError(f'the per-process batch {batch_size} does not split over this process\'s '
                     f'{len(shards)} input shards (config.data.input_shards)')
  rows = batch_size // len(shards)
  streams = [shard_stream(builder, tfds.even_splits(split, n=num_shards)[shard], table, data_config,
                          seed=seed * num_shards + shard, start=start_step * rows).batch(rows)
             for shard in shards]
  if len(streams) == 1:
    ds = streams[0]
  else:
    ds = tf.data.Dataset.zip(tuple(streams)).map(
        lambda *batches: {key: tf.concat([b[key] for b in batches], 0) for key in batches[0]})
  return ds.prefetch(tf.data.AUTOTUNE)


def batches_per_process(builder: tfds.core.DatasetBuilder, split: str, batch_size: int,
                        process_count: int) -> int:
  """Batches of `batch_size` of the largest process's share of `split`: what every process runs,
  padding the rest, so that the collective calls of all processes match."""
  per_process = -(-builder.info.splits[split].num_examples // process_count)
  return -(-per_process // batch_size)


def _with_id_and_mask(*names: str):
  """Keeps `names`, adds the image id as int32 (COCO's fit: it travels through the devices)
  and a mask of 1 (real image; padding rows get 0)."""
  return lambda features: {**keep(*names)(features),
                           'image/id': tf.cast(features['image/id'], tf.int32),
                           'mask': tf.constant(1, tf.int32)}


def image_dataset(builder: tfds.core.DatasetBuilder, split: str,
                  data_config: ml_collections.ConfigDict, *, batch_size: int, start: int = 0,
                  process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
  """This process's images of `split` in order from its `start`-th, preprocessed as for
  evaluation: batches of 'image', 'image/id' (int32) and 'mask'. Images before `start` are
  read but not decoded."""
  ds = _process_share(builder, split, process_index, process_count,
                      decoders={'image': tfds.decode.SkipDecoding()})
  ds = ds.map(keep('image', 'image/id')).skip(start)
  ds = ds.map(_decode_image(builder), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.map(
      preprocess_lib.preprocess_image(data_config.image_size), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.map(_with_id_and_mask('image'))
  return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def encoded_images(builder: tfds.core.DatasetBuilder, split: str,
                   image_ids: Iterable[int]) -> dict[int, bytes]:
  """The stored (encoded) image of each of `image_ids` in `split`; nothing else is decoded."""
  wanted = set(image_ids)
  found: dict[int, bytes] = {}
  ds = builder.as_dataset(split=split, decoders={'image': tfds.decode.SkipDecoding()})
  for example in ds.map(keep('image', 'image/id')).as_numpy_iterator():
    image_id = int(example['image/id'])
    if image_id in wanted:
      found[image_id] = example['image']
      if len(found) == len(wanted):
        break
  return found


def eval_dataset(builder: tfds.core.DatasetBuilder, split: str, table: captions_lib.TokenTable,
                 data_config: ml_collections.ConfigDict, *, batch_size: int,
                 process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
  """One pass over this process's images in order, all captions of each image.

  Batches hold 'image', 'tokens' (B, C, L), 'image/id' and 'mask' (1 for real images); the
  last batch is padded to `batch_size` with mask 0 so every batch has one shape.
  """
  ds = _process_share(builder, split, process_index, process_count)
  ds = ds.map(keep('image', 'image/id'), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.map(table.lookup_fn(), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.map(
      preprocess_lib.preprocess_image(data_config.image_size), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.map(_with_id_and_mask('image', 'tokens'))
  return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def pad_batch(batch: Batch, batch_size: int) -> Batch:
  """Pads every array of a short final batch with zeros up to `batch_size` rows."""
  missing = batch_size - len(batch['mask'])
  if missing == 0:
    return batch
  return {
      k: np.concatenate([v, np.zeros((missing, *v.shape[1:]), v.dtype)]) for k, v in batch.items()
  }


def eval_batches(ds: tf.data.Dataset,
                 batch_size: int,
                 num_batches: int | None = None) -> Iterator[Batch]:
  """Batches padded to `batch_size`, then (to `num_batches`) batches of padding only.

  A process whose share of a split is empty (a split smaller than the number of processes)
  still yields `num_batches` padding batches, shaped from `ds.element_spec`: every process must
  make the same collective calls."""
  count = 0
  for batch in ds.as_numpy_iterator():
    count += 1
    yield pad_batch(batch, batch_size)
  if count < (num_batches or 0):
    empty = {k: np.zeros((batch_size, *spec.shape[1:]), spec.dtype.as_numpy_dtype)
             for k, spec in ds.element_spec.items()}
    for _ in range(count, num_batches):
      yield empty
