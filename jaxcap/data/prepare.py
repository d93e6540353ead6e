"""Dataset and tokenizer preparation, shared by training and scripts/prepare_data.py."""

from __future__ import annotations

import collections
from collections.abc import Iterator
import dataclasses
import os
import time

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from jaxcap import parallel
from jaxcap.data import caption_files
from jaxcap.data import captions as captions_lib
from jaxcap.data import input_pipeline
from jaxcap.data import sources
from jaxcap.data import tokenizer as tokenizer_lib

_LENGTH_PERCENTILES = (5, 50, 95, 100)
# An evaluation split with fewer images than this is flagged in the report: its metrics are noisy.
FEW_IMAGES = 100


@dataclasses.dataclass
class PreparedData:
  builder: tfds.core.DatasetBuilder
  tokenizer: tokenizer_lib.Tokenizer
  # config.data.train_split less the splits the build left out for having no images.
  train_split: str
  train_captions: captions_lib.SplitCaptions


def prepare(config: ml_collections.ConfigDict, workdir: str) -> PreparedData:
  """Builds (or finds) the dataset, checks its splits against the config, and trains (or
  loads) the workdir's tokenizer."""
  data = config.data
  # Process 0 builds the dataset first; the others then find it (shared storage) or build their
  # own copy: two processes building into one folder at once collide.
  if jax.process_index() == 0:
    builder = sources.get_builder(data)
  parallel.sync_processes('dataset prepared')
  if jax.process_index() != 0:
    builder = sources.get_builder(data)
  train_split = sources.resolve_split(builder, data.train_split, 'config.data.train_split',
                                             drop_empty=True)
  for split in data.eval_splits:
    sources.resolve_split(builder, split, 'config.data.eval_splits')
  train_captions = captions_lib.read_captions(builder, train_split)
  # Process 0 trains the tokenizer; the others wait for it and load the same file.
  if jax.process_index() == 0:
    tokenizer = tokenizer_lib.load_or_train(
        workdir, train_captions.all_texts, data.vocab_size, data.tokenizer_type)
  parallel.sync_processes('tokenizer written')
  if jax.process_index() != 0:
    tokenizer = tokenizer_lib.Tokenizer.load(os.path.join(workdir, tokenizer_lib.MODEL_FILENAME))
  return PreparedData(builder, tokenizer, train_split, train_captions)


def split_report(captions: captions_lib.SplitCaptions,
                 tokenizer: tokenizer_lib.Tokenizer) -> dict[str, float]:
  """Counts, caption lengths in words (percentiles) and the unknown-token rate of a split."""
  texts = captions.all_texts()
  lengths = np.array([len(t.split()) for t in texts]) if texts else np.zeros(1)
  per_image = collections.Counter(len(t) for t in captions.texts)
  report = {'images': len(captions.image_ids), 'captions': len(texts),
            'unknown_token_rate': tokenizer.unknown_rate(texts),
            'captions_per_image': dict(sorted(per_image.items()))}
  for q in _LENGTH_PERCENTILES:
    report[f'words_p{q}'] = float(np.percentile(lengths, q))
  return report


def skipped_by_split(builder: tfds.core.DatasetBuilder) -> dict[str, collections.Counter]:
  """Reasons for skipped items, counted per split ('all' for items skipped before splitting)."""
  counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  for item in caption_files.read_skipped(builder):
    counts[item.get('split', 'all')][caption_files.reason_kind(item['reason'])] += 1
  return counts


def train_batches(prepared: PreparedData, config: ml_collections.ConfigDict,
                  batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """Numpy training batches of the input pipeline alone (one process's view)."""
  table = captions_lib.TokenTable.build(prepared.train_captions, prepared.tokenizer,
                                          config.data.max_len)
  ds = input_pipeline.train_dataset(prepared.builder, prepared.train_split, table, config.data,
                                    batch_size=batch_size, seed=config.seed)
  return ds.as_numpy_iterator()


def input_images_per_sec(prepared: PreparedData, config: ml_collections.ConfigDict,
                         num_batches: int) -> float:
  """Images/s of the training input pipeline alone, after one warm-up batch."""
  batches = train_batches(prepared, config, config.batch_size)
  next(batches)
  start = time.perf_counter()
  for _ in range(num_batches):
    next(batches)
  return num_batches * config.batch_size / (time.perf_counter() - start)
