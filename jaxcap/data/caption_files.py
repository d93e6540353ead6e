"""Caption datasets built from files on disk: what the COCO-format builder (coco_local) and the
Karpathy-JSON builder (karpathy) share.

Both write the features and split names of tfds `coco_captions` (train, restval, val, test).
Items that cannot be used (a missing or unreadable image, an image without captions, an empty
caption, an image listed twice, an unknown split) are skipped with a reason naming the file and
field, written to `skipped.json` beside the prepared dataset. Files that are not in their schema
stop the build with a DataError naming the file and field. A split left with no images is left
out of the dataset with a logged line; its reason is kept in the dataset's metadata, so training
and evaluation can say why it is missing (jaxcap.data.sources.resolve_split). tfds builds into a
temporary folder and renames it when complete: a failed build leaves nothing under the
dataset's name.
"""

from __future__ import annotations

import abc
import collections
from collections.abc import Iterator
import dataclasses
import hashlib
import io
import json
import os
import re
from typing import Any
import unicodedata

from absl import logging
import numpy as np
from PIL import Image
from PIL import ImageOps
import tensorflow_datasets as tfds

SPLITS = ('train', 'restval', 'val', 'test')
SKIPPED_FILENAME = 'skipped.json'
# Without given splits, `val` and `test` are cut from a pool of images sorted by id: each takes
# `fraction` of it, at least MIN_EVAL_IMAGES and at most MAX_EVAL_IMAGES (COCO's fixed 5,000).
MIN_EVAL_IMAGES = 1
MAX_EVAL_IMAGES = 5000
_EXIF_ORIENTATION = 0x0112
_MISSING = 'listed but missing from disk'


class DataError(ValueError):
  """The caption files are not usable as given; the message names the file and the field."""


@dataclasses.dataclass(frozen=True)
class ImageRecord:
  image_id: int
  path: str
  captions: tuple[tuple[int, str], ...]  # (caption id, text)
  source: str = ''  # Where it is listed ("FILE images[3]"), for skip reasons.


def normalize_caption(text: str) -> str:
  """NFC unicode, single spaces, no leading or trailing white space."""
  return ' '.join(unicodedata.normalize('NFC', text).split())


def load_json(path: str, what: str) -> Any:
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
    raise DataError(f'{path}: cannot read {what} ({error})') from error


def field(entry: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
  """entry[key], checked to be of `kind`; a DataError naming `where` and the key otherwise."""
  if not isinstance(entry, dict):
    raise DataError(f'{where} is a {type(entry).__name__}, not an object')
  if key not in entry:
    raise DataError(f'{where} has no "{key}" field')
  value = entry[key]
  if not isinstance(value, kind) or isinstance(value, bool):
    names = ' or '.join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
    raise DataError(f'{where}.{key} is {value!r}, not a {names}')
  return value


def read_image(path: str) -> np.ndarray | bytes:
  """The image as tfds takes it: the file's bytes when it is a plain RGB JPEG, else decoded,
  EXIF-rotated RGB pixels. Raises OSError for missing, truncated or undecodable files."""
  with open(path, 'rb') as f:
    return image_from_bytes(f.read())


def image_from_bytes(data: bytes) -> np.ndarray | bytes:
  """`read_image` of a file's contents: the bytes of a plain RGB JPEG (TensorFlow decodes
  those, in training as for captioning), else decoded, EXIF-rotated RGB pixels. Raises OSError
  (PIL's UnidentifiedImageError among them) for bytes that are not a whole image."""
  with Image.open(io.BytesIO(data)) as image:
    image.load()  # Decodes fully: truncated or corrupt files raise here.
    orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    if image.format == 'JPEG' and image.mode == 'RGB' and orientation == 1:
      return data
    return np.asarray(ImageOps.exif_transpose(image).convert('RGB'))


def cut_eval_splits(pool: list, fraction: float) -> tuple[list, list, list]:
  """(val, test, rest) of a pool sorted by id: val and test take `fraction` of it each,
  clipped to [MIN_EVAL_IMAGES, MAX_EVAL_IMAGES]; test gets what val leaves of its share."""
  size = min(MAX_EVAL_IMAGES, max(MIN_EVAL_IMAGES, int(len(pool) * fraction)))
  return pool[:size], pool[size:2 * size], pool[2 * size:]


def rule_text(pool_name: str, fraction: float, rest_name: str) -> str:
  """The split rule of cut_eval_splits, as the README and the prepare report state it."""
  return (f'{pool_name} sorted by image id: val = the first {fraction:.0%} (at least '
          f'{MIN_EVAL_IMAGES}, at most {MAX_EVAL_IMAGES:,}), test = as many again, '
          f'{rest_name} = the rest')


def reason_kind(reason: str) -> str:
  """A skip reason without its parenthesised detail: what reports count by."""
  return reason.split(' (')[0]


class Skips:
  """The skipped items of a build, each with its reason (and split, once known)."""

  def __init__(self):
    self.items: list[dict[str, str]] = []

  def add(self, item: str, reason: str, split: str | None = None) -> None:
    entry = {'item': item, 'reason': reason}
    if split is not None:
      entry['split'] = split
    self.items.append(entry)


def _slug(text: str) -> str:
  return re.sub(r'[^a-z0-9]+', '_', text.lower()).strip('_') or 'captions'


def stored_at_size(image: np.ndarray | bytes, size: int) -> np.ndarray | bytes:
  """`read_image`'s image with its shorter side brought down to `size` pixels (antialiased) and
  encoded as a JPEG of quality 90, as a prepared copy stores it for
  `config.data.stored_image_size`; an image no larger passes unchanged."""
  with (Image.open(io.BytesIO(image)) if isinstance(image, bytes) else
        Image.fromarray(image)) as original:
    width, height = original.size
    if min(width, height) <= size:
      return image
    scale = size / min(width, height)
    resized = original.convert('RGB').resize(
        (max(size, round(width * scale)), max(size, round(height * scale))), Image.BILINEAR)
  buffer = io.BytesIO()
  resized.save(buffer, format='JPEG', quality=90)
  return buffer.getvalue()


class CaptionFilesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A tfds builder of `coco_captions` features from caption files and an image folder.

  Subclasses say which images each split holds (`_split_records`). The builder config is named
  after the source (`label`, then a hash of `source`: its paths and fields, and
  `stored_image_size`), so each source gets its own prepared copy; `description` names the
  source in messages. With `stored_image_size`, images are stored with their shorter side at
  that size (`stored_at_size`), which makes each training read decode and resize fewer pixels.
  """

  def __init__(self, *, label: str, description: str, source: dict[str, Any],
               stored_image_size: int | None = None, **kwargs):
    self.description = description
    self.skips = Skips()
    self.stored_image_size = stored_image_size
    if stored_image_size is not None:
      if stored_image_size < 1:
        raise DataError(f'config.data.stored_image_size={stored_image_size}: a size in pixels '
                        '(or None to store images as they are)')
      source = {**source, 'stored_image_size': stored_image_size}
    digest = hashlib.sha1(json.dumps(source, sort_keys=True).encode()).hexdigest()[:8]
    config = tfds.core.BuilderConfig(name=f'{_slug(label)}_{digest}', description=description)
    super().__init__(config=config, **kwargs)

  @abc.abstractmethod
  def _split_records(self) -> tuple[dict[str, list[ImageRecord]], str]:
    """The images of each split in SPLITS, and how the splits were chosen (one line)."""

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=f'Captions built from {self.description}.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(encoding_format='jpeg'),
            'image/id': np.int64,
            'image/filename': tfds.features.Text(),
            'captions': tfds.features.Sequence({'id': np.int64, 'text': np.str_}),
        }),
        metadata=tfds.core.MetadataDict(),
    )

  def _usable(self, records: list[ImageRecord], split: str) -> list[ImageRecord]:
    """The records with captions and a file on disk (cheap checks, before any image is read)."""
    usable = []
    for record in records:
      if not record.captions:
        self.skips.add(record.path, f'no captions ({record.source})', split)
      elif not os.path.isfile(record.path):
        self.skips.add(record.path, f'{_MISSING} ({record.source})', split)
      else:
        usable.append(record)
    return usable

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is on disk already.
    splits, rule = self._split_records()
    self.info.metadata['split_rule'] = rule
    self.info.metadata['empty_splits'] = empty = {}
    generators = {}
    for name in SPLITS:
      records = self._usable(splits.get(name, []), name)
      if records:
        generators[name] = self._generate_examples(records, name)
        continue
      listed = len(splits.get(name, []))
      empty[name] = (f'its {listed} listed images were all skipped' if listed else
                     f'no image falls in it ({rule})')
      logging.warning('%s: split %r has no images and is left out: %s', self.name, name,
                      empty[name])
    if not generators:
      raise DataError(f'{self.description}: no usable image in any split '
                      f'({rule}); see the reasons: {self._reason_counts()}')
    return generators

  def _generate_examples(self, records: list[ImageRecord], split: str) -> Iterator:
    for record in records:
      try:
        image = read_image(record.path)
      except FileNotFoundError:
        self.skips.add(record.path, f'{_MISSING} ({record.source})', split)
        continue
      except (OSError, ValueError, Image.DecompressionBombError) as error:
        self.skips.add(record.path, f'unreadable image ({error})', split)
        continue
      if self.stored_image_size:
        image = stored_at_size(image, self.stored_image_size)
      yield record.image_id, {
          'image': image,
          'image/id': record.image_id,
          'image/filename': os.path.basename(record.path),
          'captions': [{'id': i, 'text': text} for i, text in record.captions],
      }

  def _reason_counts(self) -> dict[str, int]:
    return dict(collections.Counter(reason_kind(s['reason']) for s in self.skips.items))

  def download_and_prepare(self, *args, **kwargs):
    try:
      super().download_and_prepare(*args, **kwargs)
    except DataError:
      # tfds has removed its temporary folder; drop the empty folders named after the dataset.
      config_dir = os.path.dirname(self.data_dir)
      for folder in (config_dir, os.path.dirname(config_dir)):
        try:
          os.rmdir(folder)
        except OSError:  # Not empty (another config or version is there), or already gone.
          break
      raise

  def _download_and_prepare(self, *args, **kwargs):
    self.skips = Skips()
    try:
      super()._download_and_prepare(*args, **kwargs)
    except AssertionError as error:  # tfds cannot write a split that yielded nothing.
      if 'No examples were yielded' not in str(error):
        raise
      failed = re.search(r'split "(\w+)"', str(error))
      split = failed.group(1) if failed else 'a split'
      raise DataError(f'{self.description}: every image of split {split!r} was '
                      f'skipped ({self._reason_counts()}); nothing was written') from None
    # Written into the dataset's (still temporary) folder, so it moves with it when complete.
    with open(os.path.join(self.data_dir, SKIPPED_FILENAME), 'w') as f:
      json.dump(self.skips.items, f, indent=1)


def read_skipped(builder: tfds.core.DatasetBuilder) -> list[dict[str, str]]:
  """What the build skipped, with reasons ([] for datasets built by tfds itself)."""
  path = os.path.join(builder.data_dir, SKIPPED_FILENAME)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return json.load(f)


def split_notes(builder: tfds.core.DatasetBuilder) -> tuple[str, dict[str, str]]:
  """How the builder chose its splits, and why each left-out split is empty ('' and {} for
  datasets that give their splits: tfds' own and the built-in one)."""
  metadata = builder.info.metadata or {}
  return metadata.get('split_rule', ''), dict(metadata.get('empty_splits', {}))
