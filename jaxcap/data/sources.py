"""Where a config's captions come from: the tfds builder of `config.data` and its splits.

Every builder has the features of tfds `coco_captions` (`image`, `image/id`, `image/filename`,
`captions` = {`id`, `text`}) and its split names: the built-in `shapes_captions`, tfds'
`coco_captions`, a COCO-format folder (`coco_local`) or a Karpathy-schema JSON (`karpathy`).
A source that cannot be found stops with a message naming what to do, not a stack trace.
"""

from __future__ import annotations

import socket

from absl import logging
import ml_collections
import tensorflow as tf
import tensorflow_datasets as tfds

from jaxcap.data import caption_files
from jaxcap.data import coco_local
from jaxcap.data import karpathy
from jaxcap.data import shapes_captions

# TensorFlow only feeds the host; JAX owns the accelerators.
tf.config.set_visible_devices([], 'GPU')

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
                                        stored_image_size=data_config.stored_image_size,
                                        data_dir=data_config.data_dir)
  elif data_config.stored_image_size is not None and not (
      data_config.name == 'coco_captions' and data_config.coco_dir):
    raise DataError(f'config.data.stored_image_size={data_config.stored_image_size} applies to '
                    'datasets built from files (config.data.coco_dir, karpathy_json); '
                    f'{data_config.name!r} is stored as its builder makes it: set it to None')
  elif data_config.name == 'shapes_captions':
    builder = shapes_captions.builder_from_config(data_config.shapes, data_config.data_dir)
  elif data_config.name == 'coco_captions' and data_config.coco_dir:
    builder = coco_local.CocoCaptionsLocal(coco_dir=data_config.coco_dir,
                                           files=data_config.coco_files,
                                           stored_image_size=data_config.stored_image_size,
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
