"""tf.data input pipeline: tfds caption datasets to padded numpy batches.

Every dataset jaxcap reads has the features of tfds `coco_captions` (`image`, `image/id`,
`image/filename`, `captions` = {`id`, `text`}). Captions are tokenized once per split into a
table keyed by image id; the image stream looks its rows up, so tokenization never runs per step.
Preprocessing steps are small pure functions from a feature dict to a feature dict.
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Iterator
import dataclasses
import socket

from absl import logging
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from jaxcap.data import caption_files
from jaxcap.data import coco_local
from jaxcap.data import karpathy
from jaxcap.data import shapes_captions
from jaxcap.data import tokenizer as tokenizer_lib

# TensorFlow only feeds the host; JAX owns the accelerators.
tf.config.set_visible_devices([], 'GPU')

Batch = dict[str, np.ndarray]


# --------------------------------------------------------------------------- datasets


DataError = caption_files.DataError


class DataNotFoundError(DataError):
  """The dataset is not prepared and cannot be built from what this machine has."""


# Where tfds downloads COCO from; checked before a download is attempted.
_COCO_DOWNLOAD_HOST = ('images.cocodataset.org', 80)
_NETWORK_TIMEOUT_S = 5.0

MISSING_COCO_MESSAGE = """\
COCO captions are not prepared in {data_dir}, no local copy was given, and {host} cannot be reached.
Get the data in one of two ways:
  1. COCO already on disk (no download): pass --config.data.coco_dir=PATH, a folder with the
     official layout: train2014/ (13 GB), val2014/ (6.2 GB),
     annotations/captions_{{train,val}}2014.json, and optionally Karpathy's dataset_coco.json for
     the standard splits. Building it writes about 20 GB more to the tfds data dir.
  2. Download with tfds on a machine with internet access: tfds' coco_captions fetches about
     38 GB (including test sets it never uses) and writes about 20 GB; it cannot use manually
     placed files.
Then run scripts/prepare_data.py with the same config to check the result."""

# Datasets jaxcap reads from their files only (no tfds download exists or works for them).
MISSING_FILES_MESSAGE = """\
{name} is read from its files: pass --config.data.karpathy_json=FILE --config.data.image_dir=DIR,
Karpathy's {json} (in caption_datasets.zip) and the folder of the dataset's images. Then run
scripts/prepare_data.py with the same config to check the result."""
_FROM_FILES_ONLY = {'flickr8k': 'dataset_flickr8k.json', 'flickr30k': 'dataset_flickr30k.json'}


def network_reachable(host: tuple[str, int] = _COCO_DOWNLOAD_HOST) -> bool:
  try:
    with socket.create_connection(host, timeout=_NETWORK_TIMEOUT_S):
      return True
  except OSError:
    return False


def get_builder(data_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The dataset's tfds builder, prepared (generated, built from files or downloaded).

  A Karpathy-schema JSON (`config.data.karpathy_json` with `image_dir`) is built from its files
  whatever `config.data.name` says; `coco_captions` is built from `config.data.coco_dir` when set,
  else downloaded by tfds. With neither a prepared copy nor the network, or files that cannot be
  used, this stops at once with a DataError (DataNotFoundError when nothing was given).
  """
  karpathy_json, image_dir = data_config.karpathy_json, data_config.image_dir
  if karpathy_json or image_dir:
    if not (karpathy_json and image_dir):
      raise DataError('config.data.karpathy_json and config.data.image_dir go together: the '
                      'caption JSON and the folder of its images')
    builder = karpathy.KarpathyCaptions(json_path=karpathy_json, image_dir=image_dir,
                                        data_dir=data_config.data_dir)
  elif data_config.name == 'shapes_captions':
    builder = shapes_captions.builder_from_config(data_config.shapes, data_config.data_dir)
  elif data_config.name == 'coco_captions' and data_config.coco_dir:
    builder = coco_local.CocoCaptionsLocal(coco_dir=data_config.coco_dir,
                                           files=data_config.coco_files,
                                           data_dir=data_config.data_dir)
  elif data_config.name in _FROM_FILES_ONLY:
    raise DataNotFoundError(MISSING_FILES_MESSAGE.format(
        name=data_config.name, json=_FROM_FILES_ONLY[data_config.name]))
  else:
    builder = tfds.builder(data_config.name, data_dir=data_config.data_dir)
    if not builder.is_prepared() and data_config.name == 'coco_captions':
      if not network_reachable():
        raise DataNotFoundError(MISSING_COCO_MESSAGE.format(
            data_dir=builder.data_dir, host=_COCO_DOWNLOAD_HOST[0]))
  builder.download_and_prepare()
  return builder


def resolve_split(builder: tfds.core.DatasetBuilder, split: str, field_name: str,
                  drop_empty: bool = False) -> str:
  """`split` (a tfds split expression, e.g. 'train+restval'), checked against the dataset.

  A part naming a split the build left out because it had no images is dropped with a logged
  line when `drop_empty` (training), else stops with a DataError naming the split and why it is
  empty (evaluation needs every split it names). An unknown split stops with its name.
  """
  _, empty = caption_files.split_notes(builder)
  parts, dropped = [], []
  for part in split.split('+'):
    name = part.strip().split('[')[0]
    if name in builder.info.splits:
      parts.append(part.strip())
    elif name in empty:
      if not drop_empty:
        raise DataError(f'{field_name} names split {name!r}, which has no images in '
                        f'{builder.info.full_name}: {empty[name]}. Evaluate on other splits or '
                        'add images')
      dropped.append(name)
    else:
      raise DataError(f'{field_name}={split!r}: {builder.info.full_name} has no split '
                      f'{name!r}; it has {", ".join(sorted(builder.info.splits))}')
  if not parts:
    raise DataError(f'{field_name}={split!r}: no training images in '
                    f'{builder.info.full_name}: ' + '; '.join(f'{n}: {empty[n]}' for n in dropped))
  for name in dropped:
    logging.warning('%s=%r: split %r has no images and is left out (%s)', field_name,
                    split, name, empty[name])
  return '+'.join(parts)


@dataclasses.dataclass(frozen=True)
class SplitCaptions:
  """The reference captions of one split, in the split's order."""
  image_ids: np.ndarray  # (num_images,) int64
  texts: tuple[tuple[str, ...], ...]

  def all_texts(self) -> list[str]:
    return [text for texts in self.texts for text in texts]


def read_captions(builder: tfds.core.DatasetBuilder, split: str) -> SplitCaptions:
  """Reads a split's captions without decoding its images."""
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={'image': tfds.decode.SkipDecoding()})
  ds = ds.map(lambda f: {'id': f['image/id'], 'text': f['captions']['text']},
              num_parallel_calls=tf.data.AUTOTUNE)
  image_ids, texts = [], []
  for features in ds.as_numpy_iterator():
    image_ids.append(features['id'])
    texts.append(tuple(t.decode('utf-8') for t in features['text']))
  return SplitCaptions(np.asarray(image_ids, np.int64), tuple(texts))


@dataclasses.dataclass(frozen=True)
class TokenTable:
  """Tokenized captions of a split: rows (num_images, max_captions, max_len), PAD-filled."""
  image_ids: np.ndarray
  tokens: np.ndarray
  counts: np.ndarray  # captions per image

  @classmethod
  def build(cls, captions: SplitCaptions, tokenizer: tokenizer_lib.Tokenizer,
            max_len: int) -> TokenTable:
    max_captions = max((len(t) for t in captions.texts), default=1)
    tokens = np.full((len(captions.texts), max_captions, max_len), tokenizer_lib.PAD_ID, np.int32)
    rows = tokenizer.encode(captions.all_texts(), max_len)
    counts = np.asarray([len(t) for t in captions.texts], np.int32)
    starts = np.concatenate([[0], np.cumsum(counts)])
    for i, (start, count) in enumerate(zip(starts, counts)):
      tokens[i, :count] = rows[start:start + count]
    return cls(captions.image_ids, tokens, counts)

  def lookup_fn(self):
    """A tf function: features -> features plus `tokens` (C, L) and `num_captions`."""
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(
            tf.constant(self.image_ids, tf.int64), tf.range(len(self.image_ids), dtype=tf.int64)),
        default_value=-1)
    tokens, counts = tf.constant(self.tokens), tf.constant(self.counts)

    def add_tokens(features):
      row = table.lookup(features['image/id'])
      tf.debugging.assert_non_negative(row, 'image id missing from the caption table')
      return {**features, 'tokens': tf.gather(tokens, row), 'num_captions': tf.gather(counts, row)}

    return add_tokens


# --------------------------------------------------------------------------- preprocessing


def scale_image(image: tf.Tensor) -> tf.Tensor:
  """uint8 [0, 255] -> float32 [-1, 1], as keras.applications.inception_v3.preprocess_input."""
  image = tf.cast(image, tf.float32)
  return image / 127.5 - 1.0


def center_crop(image: tf.Tensor) -> tf.Tensor:
  """The central square, its side the shorter side (as the original Show-and-Tell project)."""
  shape = tf.shape(image)
  side = tf.minimum(shape[0], shape[1])
  top, left = (shape[0] - side) // 2, (shape[1] - side) // 2
  return image[top:top + side, left:left + side]


def random_crop_and_flip(image: tf.Tensor, seed: tf.Tensor,
                         min_fraction: float) -> tf.Tensor:
  """A random square of min_fraction to 1 of the shorter side, flipped left-right half the time."""
  shape = tf.shape(image)
  shorter = tf.minimum(shape[0], shape[1])
  fraction = tf.random.stateless_uniform([], seed=seed, minval=min_fraction, maxval=1.0)
  side = tf.maximum(1, tf.cast(tf.cast(shorter, tf.float32) * fraction, tf.int32))
  image = tf.image.stateless_random_crop(image, tf.stack([side, side, 3]), seed=seed + 1)
  return tf.image.stateless_random_flip_left_right(image, seed=seed + 2)


def resize_image(image: tf.Tensor, size: int) -> tf.Tensor:
  """Bilinear, antialiased resize to (size, size); images already that size pass unchanged.

  The result's static shape says (size, size): padding batches are shaped from it."""
  shape = tf.shape(image)
  resized = tf.cond(
      tf.logical_and(shape[0] == size, shape[1] == size),
      lambda: tf.cast(image, tf.float32),
      lambda: tf.image.resize(image, (size, size), antialias=True))
  return tf.ensure_shape(resized, (size, size, image.shape[-1]))


def preprocess_image(image_size: int):
  """Centre square crop, resize, scale to [-1, 1]."""
  def fn(features):
    image = resize_image(center_crop(features['image']), image_size)
    return {**features, 'image': scale_image(image)}
  return fn


def decode_and_preprocess(encoded: tf.Tensor | bytes, image_size: int) -> tf.Tensor:
  """Encoded image bytes (JPEG, PNG, ...) -> the model input, decoded by TensorFlow as the
  dataset's images are, then `preprocess_image`. For caption.py, the server and the SavedModel."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image.set_shape((None, None, 3))
  return preprocess_image(image_size)({'image': image})['image']


def augment_image(image_size: int, seed: int, min_fraction: float):
  """Random square crop and flip per (image, position in the stream), resize, scale."""
  def fn(index, features):
    image_seed = tf.stack([tf.constant(seed, tf.int64), index])
    image = random_crop_and_flip(features['image'], image_seed, min_fraction)
    return index, {**features, 'image': scale_image(resize_image(image, image_size))}
  return fn


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


# --------------------------------------------------------------------------- streams


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
                 table: TokenTable,
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
  decoded = data_config.cache_images
  if decoded:
    ds = ds.map(_decode_image(builder), num_parallel_calls=tf.data.AUTOTUNE)
    if not data_config.augment:  # Deterministic preprocessing: done once, then cached.
      ds = ds.map(preprocess_image(data_config.image_size), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.cache()
  ds = ds.shuffle(data_config.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
  ds = ds.repeat().enumerate().skip(start)
  if not decoded:
    ds = ds.map(lambda index, features: (index, _decode_image(builder)(features)),
                num_parallel_calls=tf.data.AUTOTUNE)
  if data_config.augment:
    ds = ds.map(augment_image(data_config.image_size, seed, data_config.augment_min_crop_fraction),
                num_parallel_calls=tf.data.AUTOTUNE)
  elif not decoded:
    preprocess = preprocess_image(data_config.image_size)
    ds = ds.map(
        lambda index, features: (index, preprocess(features)), num_parallel_calls=tf.data.AUTOTUNE)
  return ds.map(pick_caption(seed), num_parallel_calls=tf.data.AUTOTUNE)


def train_dataset(builder: tfds.core.DatasetBuilder, split: str, table: TokenTable,
                  data_config: ml_collections.ConfigDict, *, batch_size: int, seed: int,
                  start_step: int = 0, process_index: int = 0,
                  process_count: int = 1) -> tf.data.Dataset:
  """Endless shuffled batches {'image': (B, H, W, 3) f32, 'tokens': (B, L) i32} of this process,
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
  ds = ds.map(preprocess_image(data_config.image_size), num_parallel_calls=tf.data.AUTOTUNE)
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


def eval_dataset(builder: tfds.core.DatasetBuilder, split: str, table: TokenTable,
                 data_config: ml_collections.ConfigDict, *, batch_size: int,
                 process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
  """One pass over this process's images in order, all captions of each image.

  Batches hold 'image', 'tokens' (B, C, L), 'image/id' and 'mask' (1 for real images); the
  last batch is padded to `batch_size` with mask 0 so every batch has one shape.
  """
  ds = _process_share(builder, split, process_index, process_count)
  ds = ds.map(keep('image', 'image/id'), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.map(table.lookup_fn(), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.map(preprocess_image(data_config.image_size), num_parallel_calls=tf.data.AUTOTUNE)
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
