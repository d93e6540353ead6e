"""COCO captions 2014 built from a copy already on disk (the official folder layout), no download.

    COCO_DIR/train2014/COCO_train2014_*.jpg
    COCO_DIR/val2014/COCO_val2014_*.jpg
    COCO_DIR/annotations/captions_train2014.json
    COCO_DIR/annotations/captions_val2014.json
    COCO_DIR/dataset_coco.json          (optional: Karpathy's splits)

The dataset has the features and split names of tfds `coco_captions` (train, restval, val,
test). With Karpathy's file its splits are used; without it, official train2014 is `train` and
val2014, sorted by image id, gives `val` (first 5,000), `test` (next 5,000) and `restval` (rest).
Captions come from the official annotation files. Odd inputs are decoded when possible
(grayscale, CMYK, PNG content, EXIF rotation) and skipped with a reason otherwise; the reasons
are written to `skipped.json` beside the prepared dataset.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
import unicodedata
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image
from PIL import ImageOps

SPLITS = ('train', 'restval', 'val', 'test')
# Without Karpathy's file: val2014 images (sorted by id) [0, 5000) are val, [5000, 10000) test.
FALLBACK_EVAL_IMAGES = 5000
SKIPPED_FILENAME = 'skipped.json'
_EXIF_ORIENTATION = 0x0112


@dataclasses.dataclass(frozen=True)
class ImageRecord:
  image_id: int
  path: str
  captions: tuple[tuple[int, str], ...]  # (annotation id, text)


def normalize_caption(text: str) -> str:
  """NFC unicode, single spaces, no leading or trailing white space."""
  return ' '.join(unicodedata.normalize('NFC', text).split())


def _load_json(path: str) -> dict:
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as error:
    raise ValueError(f'{path}: cannot read COCO annotations ({error})') from error


def _official_records(coco_dir: str, year_split: str, skipped: list) -> dict[str, ImageRecord]:
  """file_name -> record from annotations/captions_{year_split}.json; extra fields are ignored."""
  path = os.path.join(coco_dir, 'annotations', f'captions_{year_split}.json')
  data = _load_json(path)
  for key in ('images', 'annotations'):
    if key not in data:
      raise ValueError(f'{path}: no "{key}" field; not a COCO captions file')
  captions = collections.defaultdict(list)
  for annotation in data['annotations']:
    text = normalize_caption(str(annotation.get('caption', '')))
    if not text:
      skipped.append({'item': f'caption {annotation.get("id")} of image {annotation.get("image_id")}',
                      'reason': 'empty caption'})
      continue
    captions[annotation['image_id']].append((int(annotation['id']), text))
  records = {}
  for image in data['images']:
    file_name = image['file_name']
    records[file_name] = ImageRecord(int(image['id']), os.path.join(coco_dir, year_split, file_name),
                                     tuple(sorted(captions.get(image['id'], []))))
  return records


def split_records(coco_dir: str, skipped: list) -> dict[str, list[ImageRecord]]:
  """The images of each split, before their files are read."""
  train = _official_records(coco_dir, 'train2014', skipped)
  val = _official_records(coco_dir, 'val2014', skipped)
  karpathy_path = os.path.join(coco_dir, 'dataset_coco.json')
  splits: dict[str, list[ImageRecord]] = {name: [] for name in SPLITS}
  if os.path.exists(karpathy_path):
    for image in _load_json(karpathy_path)['images']:
      record = train.get(image['filename']) or val.get(image['filename'])
      if record is None:
        skipped.append({'item': image['filename'], 'reason': 'in dataset_coco.json but in neither '
                        'captions_train2014.json nor captions_val2014.json'})
      elif image['split'] in splits:
        splits[image['split']].append(record)
  else:
    splits['train'] = sorted(train.values(), key=lambda r: r.image_id)
    ordered = sorted(val.values(), key=lambda r: r.image_id)
    splits['val'] = ordered[:FALLBACK_EVAL_IMAGES]
    splits['test'] = ordered[FALLBACK_EVAL_IMAGES:2 * FALLBACK_EVAL_IMAGES]
    splits['restval'] = ordered[2 * FALLBACK_EVAL_IMAGES:]
  return splits


def read_image(path: str) -> np.ndarray | bytes:
  """The image as tfds takes it: the file's bytes when it is a plain RGB JPEG, else decoded,
  EXIF-rotated RGB pixels. Raises OSError for missing, truncated or undecodable files."""
  with open(path, 'rb') as f:
    data = f.read()
  with Image.open(io.BytesIO(data)) as image:
    image.load()  # Decodes fully: truncated or corrupt files raise here.
    orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    if image.format == 'JPEG' and image.mode == 'RGB' and orientation == 1:
      return data
    return np.asarray(ImageOps.exif_transpose(image).convert('RGB'))


class CocoCaptionsLocal(tfds.core.GeneratorBasedBuilder):
  """tfds `coco_captions` features and splits, from COCO 2014 on disk."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def __init__(self, *, coco_dir: str, **kwargs):
    self.coco_dir = os.path.abspath(os.path.expanduser(coco_dir))
    self.skipped: list[dict[str, str]] = []
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=f'COCO captions 2014 built from {self.coco_dir}.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(encoding_format='jpeg'),
            'image/id': np.int64,
            'image/filename': tfds.features.Text(),
            'captions': tfds.features.Sequence({'id': np.int64, 'text': np.str_}),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is on disk already.
    for required in ('train2014', 'val2014', 'annotations'):
      if not os.path.isdir(os.path.join(self.coco_dir, required)):
        raise FileNotFoundError(f'{self.coco_dir}: no {required}/ folder; expected the official '
                                'COCO 2014 layout (train2014/, val2014/, annotations/)')
    splits = split_records(self.coco_dir, self.skipped)
    return {name: self._generate_examples(records, name) for name, records in splits.items()}

  def _generate_examples(self, records: list[ImageRecord], split: str) -> Iterator:
    def skip(record, reason):
      self.skipped.append({'item': record.path, 'reason': reason, 'split': split})
    for record in records:
      if not record.captions:
        skip(record, 'no captions')
        continue
      try:
        image = read_image(record.path)
      except FileNotFoundError:
        skip(record, 'listed but missing from disk')
        continue
      except (OSError, ValueError, Image.DecompressionBombError) as error:
        skip(record, f'unreadable image ({error})')
        continue
      yield record.image_id, {
          'image': image,
          'image/id': record.image_id,
          'image/filename': os.path.basename(record.path),
          'captions': [{'id': i, 'text': text} for i, text in record.captions],
      }

  def _download_and_prepare(self, *args, **kwargs):
    self.skipped.clear()
    super()._download_and_prepare(*args, **kwargs)
    # Written into the dataset's (still temporary) folder, so it moves with it when complete.
    with open(os.path.join(self.data_dir, SKIPPED_FILENAME), 'w') as f:
      json.dump(self.skipped, f, indent=1)


def read_skipped(builder: tfds.core.DatasetBuilder) -> list[dict[str, str]]:
  """What the build skipped, with reasons ([] for datasets built by tfds itself)."""
  path = os.path.join(builder.data_dir, SKIPPED_FILENAME)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return json.load(f)
