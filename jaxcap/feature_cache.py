"""Feature cache: every image of a split through the frozen encoder once, kept on disk.

Layout of CACHE_DIR/SPLIT/: `fingerprint.json` (what made the embeddings: encoder name and a
hash of its variables, image size, preprocessing, compute dtype, dataset and split),
`part-00000.npz`, ... (image ids and features, each part written atomically: pooled
embeddings, or the encoder's grids for a decoder that attends) and
`complete.json` once every part is there. A cache whose fingerprint differs is rebuilt; an
interrupted extraction resumes after its last complete part.

Extraction is data-parallel over every device of every process (each process reads its share
of the split); the embeddings are gathered, and process 0 writes them.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import time
from typing import Any

import jax
import ml_collections
import ml_dtypes
import numpy as np
import tensorflow_datasets as tfds

from jaxcap import parallel
from jaxcap import predict
from jaxcap import workdir as workdir_lib
from jaxcap.data import input_pipeline
from jaxcap.data import prepare
from jaxcap.data import sources
from jaxcap.models import captioner

FINGERPRINT_FILENAME = 'fingerprint.json'
COMPLETE_FILENAME = 'complete.json'
# Bump when preprocess_lib.preprocess_image changes what the encoder sees.
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
PREPROCESSING = 'centre square crop, antialiased bilinear resize, scale to [-1, 1] (v1)'


@dataclasses.dataclass(frozen=True)
class SplitFeatures:
  image_ids: np.ndarray  # (N,) int64
  embedding: np.ndarray  # (N, D) pooled embeddings, or (N, H, W, C) grids (model.decoder)


def split_dir(cache_dir: str, split: str) -> str:
  return os.path.join(cache_dir, split.replace('+', '_plus_').replace('[', '_').replace(']', '_'))


def variables_digest(variables: Any) -> str:
  """sha256 of every array of a variables tree, with its path, shape and dtype."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(variables))[0]:
    leaf = np.asarray(leaf)
    digest.update(f'{jax.tree_util.keystr(path)}:{leaf.shape}:{leaf.dtype}'.encode())
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()


def fingerprint(config: ml_collections.ConfigDict, encoder_variables: Any,
                builder: tfds.core.DatasetBuilder, split: str) -> dict[str, Any]:
  grid = {'grid': True} if captioner.DECODERS[config.model.decoder] else {}
  return {'encoder': config.model.encoder, **grid,
          'encoder_sha256': variables_digest(encoder_variables),
          'image_size': config.data.image_size, 'preprocessing': PREPROCESSING,
          'compute_dtype': config.model.dtype, 'storage_dtype': config.features.storage_dtype,
          'dataset': builder.info.full_name, 'data_dir': os.path.abspath(builder.data_dir),
          'split': split, 'num_examples': builder.info.splits[split].num_examples}


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def _part_path(directory: str, index: int) -> str:
  return os.path.join(directory, f'part-{index:05d}.npz')


def _complete_parts(directory: str) -> int:
  count = 0
  while os.path.exists(_part_path(directory, count)):
    count += 1
  return count


def _write_atomically(path: str, write) -> None:
  tmp_path = f'{path}.tmp'
  with open(tmp_path, 'wb') as f:
    write(f)
  os.replace(tmp_path, path)


def _write_part(f, image_ids: np.ndarray, embedding: np.ndarray) -> None:
  """npz has no bfloat16: such features are stored as their bits (uint16), with the dtype."""
  np.savez(f, image_ids=image_ids, embedding_dtype=np.array(embedding.dtype.name),
           embedding=embedding.view(np.uint16) if embedding.dtype == BFLOAT16 else embedding)


def _read_part(path: str, name: str = 'embedding') -> np.ndarray:
  """One array of a part file (npz reads each array alone)."""
  part = np.load(path)
  if name != 'embedding':
    return part[name]
  embedding = part['embedding']
  if 'embedding_dtype' in part and str(part['embedding_dtype']) == BFLOAT16.name:
    embedding = embedding.view(BFLOAT16)
  return embedding


def _read_parts(directory: str) -> SplitFeatures:
  """The parts' ids and embeddings, the embeddings read into one array part by part: memory
  holds the split once (a concatenation of the parts would hold it twice)."""
  paths = [_part_path(directory, i) for i in range(_complete_parts(directory))]
  image_ids = np.concatenate([_read_part(p, 'image_ids') for p in paths]).astype(np.int64)
  embedding, start = None, 0
  for path in paths:
    part = _read_part(path)
    if embedding is None:
      embedding = np.empty((len(image_ids), *part.shape[1:]), part.dtype)
    embedding[start:start + len(part)] = part
    start += len(part)
  return SplitFeatures(image_ids, embedding)


def load(directory: str) -> SplitFeatures:
  """A complete cache folder's image ids and embeddings, in extraction order."""
  if not os.path.exists(os.path.join(directory, COMPLETE_FILENAME)):
    raise FileNotFoundError(
        f'{directory}: no complete feature cache (run scripts/extract_features.py)')
  return _read_parts(directory)


def summary(directory: str) -> dict[str, Any]:
  """A complete cache's {'images': count, 'features_shape': per image, 'bytes': on disk}."""
  with open(os.path.join(directory, COMPLETE_FILENAME)) as f:
    found = json.load(f)
  size = sum(os.path.getsize(_part_path(directory, i)) for i in range(_complete_parts(directory)))
  return {**found, 'bytes': size}


def extract(builder: tfds.core.DatasetBuilder, split: str, config: ml_collections.ConfigDict,
            state: Any, mesh: jax.sharding.Mesh, cache_dir: str) -> str:
  """The folder of the split's cached embeddings (`load` reads them), computed (or completed,
  or rebuilt) first if needed; memory holds one part at a time.

  `state` is a replicated train state whose `variables` hold the (frozen) encoder.
  """
  directory = split_dir(cache_dir, split)
  expected = fingerprint(config, state.variables['params']['encoder'], builder, split)
  fingerprint_path = os.path.join(directory, FINGERPRINT_FILENAME)
  is_chief = jax.process_index() == 0
  if os.path.exists(fingerprint_path):
    with open(fingerprint_path) as f:
      found = json.load(f)
    if found != expected:
      logging.warning('Feature cache %s is stale (%s changed): rebuilding it', directory,
                      ', '.join(_differences(found, expected)))
      if is_chief:
        shutil.rmtree(directory)
      parallel.sync_processes(f'feature cache {directory} cleared')
  if os.path.exists(os.path.join(directory, COMPLETE_FILENAME)):
    return directory
  if is_chief:
    os.makedirs(directory, exist_ok=True)
    _write_atomically(fingerprint_path, lambda f: f.write(json.dumps(expected, indent=1).encode()))
  parallel.sync_processes(f'feature cache {directory} started')

  features = config.features
  batch_size = parallel.check_batch_size(features.batch_size, mesh, 'features.batch_size')
  num_batches = input_pipeline.batches_per_process(builder, split, batch_size, jax.process_count())
  num_parts = -(-num_batches // features.batches_per_part)
  done_parts = _complete_parts(directory)
  if done_parts:
    logging.info('Feature cache %s: resuming after %d of %d parts', directory, done_parts,
                 num_parts)
  start_batch = done_parts * features.batches_per_part
  ds = input_pipeline.image_dataset(
      builder, split, config.data, batch_size=batch_size, start=start_batch * batch_size,
      process_index=jax.process_index(), process_count=jax.process_count())
  batches = input_pipeline.eval_batches(ds, batch_size, num_batches - start_batch)
  encode = parallel.jit_data_parallel(
      lambda s, batch: (s.apply_fn(s.variables, batch['image'], method='encode'),
                        batch['image/id'], batch['mask']), mesh)
  storage_dtype = np.dtype(features.storage_dtype)
  start = time.perf_counter()
  for part in range(done_parts, num_parts):
    embeddings, image_ids = [], []
    for _ in range(min(features.batches_per_part, num_batches - part * features.batches_per_part)):
      embedding, ids, mask = jax.device_get(
          encode(state, parallel.shard_batch(next(batches), mesh)))
      real = np.asarray(mask) > 0
      embeddings.append(np.asarray(embedding)[real].astype(storage_dtype))
      image_ids.append(np.asarray(ids)[real].astype(np.int64))
    if is_chief:
      _write_atomically(_part_path(directory, part), functools.partial(
          _write_part, image_ids=np.concatenate(image_ids), embedding=np.concatenate(embeddings)))
    logging.info('Feature cache %s: part %d/%d (%.0f images/s)', directory, part + 1, num_parts,
                 sum(len(i) for i in image_ids) / max(time.perf_counter() - start, 1e-9))
    start = time.perf_counter()
  if is_chief:
    _mark_complete(directory, expected['num_examples'])
  parallel.sync_processes(f'feature cache {directory} complete')
  return directory


def _mark_complete(directory: str, num_examples: int) -> None:
  """Checks the parts hold every image once (their ids alone are read), then marks the cache
  complete."""
  paths = [_part_path(directory, i) for i in range(_complete_parts(directory))]
  image_ids = np.concatenate([_read_part(p, 'image_ids') for p in paths])
  if len(image_ids) != num_examples or len(np.unique(image_ids)) != num_examples:
    raise RuntimeError(f'{directory}: {len(image_ids)} embeddings '
                       f'({len(np.unique(image_ids))} distinct images) for {num_examples} '
                       'images; delete the folder to rebuild it')
  shape = list(_read_part(paths[-1]).shape[1:]) if paths else []
  _write_atomically(os.path.join(directory, COMPLETE_FILENAME), lambda f: f.write(json.dumps(
      {'images': num_examples, 'features_shape': shape}).encode()))


def extract_splits(config: ml_collections.ConfigDict, workdir: str,
                   splits: Sequence[str] | None = None) -> dict[str, str]:
  """Fills the feature cache of `splits` (default: the training split and the eval splits)
  with the config's (frozen) encoder, as training would; returns each split's cache folder.
  Complete, current caches are left as they are."""
  encoder_weights = captioner.load_encoder_weights(config.model)
  prepared = prepare.prepare(config, workdir)
  if splits is None:
    splits = [prepared.train_split, *config.data.eval_splits]
  splits = [sources.resolve_split(prepared.builder, split, 'splits') for split in splits]
  mesh = parallel.make_mesh()
  model = captioner.create_model(config.model, prepared.tokenizer.vocab_size)
  full_state = predict.full_model_state(config, model, mesh, encoder_weights)
  return {split: extract(prepared.builder, split, config, full_state, mesh,
                         workdir_lib.features_dir(config, workdir)) for split in splits}
