"""Caption datasets from COCO-format folders on disk, no download: COCO 2014 itself, a subset of
it, or your own images captioned in COCO's format.

    COCO_DIR/train2014/COCO_train2014_*.jpg          config.data.coco_files.train_images
    COCO_DIR/annotations/captions_train2014.json     config.data.coco_files.train_annotations
    COCO_DIR/val2014/COCO_val2014_*.jpg              config.data.coco_files.val_images
    COCO_DIR/annotations/captions_val2014.json       config.data.coco_files.val_annotations
    COCO_DIR/dataset_coco.json                       optional: Karpathy's splits

Paths are relative to COCO_DIR (absolute ones are kept). The dataset has the features and split
names of tfds `coco_captions` (train, restval, val, test); captions come from the annotation
files. With Karpathy's file its splits are used. Without it, the train annotations are `train`,
and the val annotations' images, sorted by id, give `val` and `test` half each (at most 5,000
each: COCO 2014's fixed cut) and `restval` the rest. Without val annotations
(`val_annotations=None`: one annotation file), val and test take 10% of its images each (at
least one) and the rest is `train`. Odd images are decoded when possible (grayscale, CMYK, PNG
content, EXIF rotation); anything unusable is skipped with a reason in `skipped.json`
(caption_files).
"""

from __future__ import annotations

import collections
import os
from typing import Any

import ml_collections
import tensorflow_datasets as tfds

from jaxcap.data import caption_files
from jaxcap.data import karpathy
from jaxcap.data.caption_files import field

KARPATHY_FILENAME = 'dataset_coco.json'
# The share of its pool that val and test each take without Karpathy's file (caption_files).
VAL_ANNOTATIONS_EVAL_FRACTION = 0.5
ONE_FILE_EVAL_FRACTION = 0.1
WHAT = 'COCO caption annotations'


def _official_records(annotations_path: str, image_dir: str, seen_ids: dict[int, str],
                      skips: caption_files.Skips) -> dict[str, caption_files.ImageRecord]:
  """file_name -> record from a COCO captions file; extra fields are ignored."""
  data = caption_files.load_json(annotations_path, WHAT)
  where = f'{annotations_path}: the file'
  images, annotations = field(data, 'images', list, where), field(data, 'annotations', list, where)
  captions = collections.defaultdict(list)
  for k, annotation in enumerate(annotations):
    where = f'{annotations_path}: annotations[{k}]'
    image_id, caption_id = field(annotation, 'image_id', int,
                                 where), field(annotation, 'id', int, where)
    text = annotation.get('caption')
    text = caption_files.normalize_caption(text) if isinstance(text, str) else ''
    if not text:
      skips.add(f'caption {caption_id} of image {image_id}', f'empty caption ({where}.caption)')
      continue
    captions[image_id].append((caption_id, text))
  records = {}
  for k, image in enumerate(images):
    where = f'{annotations_path}: images[{k}]'
    image_id, file_name = field(image, 'id', int, where), field(image, 'file_name', str, where)
    path = os.path.join(image_dir, file_name)
    if file_name in records or image_id in seen_ids:
      twin = 'file_name' if file_name in records else f'id (as {seen_ids[image_id]})'
      skips.add(path,
                f'listed twice ({where} has the {twin} of an earlier image; the first is kept)')
      continue
    seen_ids[image_id] = where
    records[file_name] = caption_files.ImageRecord(
        image_id, path, tuple(sorted(captions.get(image_id, []))), f'{where}.file_name')
  return records


def _by_id(records: dict[str, caption_files.ImageRecord]) -> list[caption_files.ImageRecord]:
  return sorted(records.values(), key=lambda r: r.image_id)


def _resolve(coco_dir: str, relative: str | None) -> str | None:
  return None if not relative else os.path.join(coco_dir, os.path.expanduser(relative))


def split_records(coco_dir: str, files: ml_collections.ConfigDict | dict[str, Any],
                  skips: caption_files.Skips) -> tuple[dict[str, list], str]:
  """The images of each split before their files are read, and the rule that chose them."""
  seen_ids: dict[int, str] = {}
  paths = {key: _resolve(coco_dir, files[key]) for key in
           ('train_annotations', 'train_images', 'val_annotations', 'val_images')}
  for key, path in paths.items():
    exists = os.path.isdir if key.endswith('images') else os.path.isfile
    if key.startswith('train') or paths['val_annotations']:
      if not path or not exists(path):
        kind = 'folder' if key.endswith('images') else 'file'
        raise caption_files.DataError(
            f'config.data.coco_files.{key}: {path} is not a {kind} (under coco_dir={coco_dir})')
  train = _official_records(paths['train_annotations'], paths['train_images'], seen_ids, skips)
  val = ({} if not paths['val_annotations'] else
         _official_records(paths['val_annotations'], paths['val_images'], seen_ids, skips))
  karpathy_path = os.path.join(coco_dir, KARPATHY_FILENAME)
  splits: dict[str, list] = {name: [] for name in caption_files.SPLITS}
  if os.path.exists(karpathy_path):
    listed: dict[str, int] = {}
    for index, entry in karpathy.read_images(karpathy_path, skips):
      record = train.get(entry['filename']) or val.get(entry['filename'])
      where = f'{karpathy_path}: images[{index}].filename'
      if record is None:
        skips.add(entry['filename'], f'in {KARPATHY_FILENAME} but in no annotation file ({where})')
      elif entry['filename'] in listed:
        skips.add(entry['filename'], f'listed twice ({where} is also images['
                  f'{listed[entry["filename"]]}]; the first is kept)')
      else:
        listed[entry['filename']] = index
        splits[entry['split']].append(record)
    return splits, f'the splits of {KARPATHY_FILENAME}'
  if val:
    splits['train'] = _by_id(train)
    splits['val'], splits['test'], splits['restval'] = caption_files.cut_eval_splits(
        _by_id(val), VAL_ANNOTATIONS_EVAL_FRACTION)
    rule = caption_files.rule_text('the val annotations\' images', VAL_ANNOTATIONS_EVAL_FRACTION,
                                   'restval')
  else:
    splits['val'], splits['test'], splits['train'] = caption_files.cut_eval_splits(
        _by_id(train), ONE_FILE_EVAL_FRACTION)
    rule = caption_files.rule_text('the train annotations\' images (no val annotations)',
                                   ONE_FILE_EVAL_FRACTION, 'train')
  return splits, f'no {KARPATHY_FILENAME}: {rule}'


class CocoCaptionsLocal(caption_files.CaptionFilesBuilder):
  """tfds `coco_captions` features and splits from a COCO-format folder on disk."""

  VERSION = tfds.core.Version('2.0.0')
  RELEASE_NOTES = {
      '1.0.0': 'Initial release.',
      '2.0.0': 'Configurable files; small folders split by rule; a builder config per folder.',
  }

  def __init__(self, *, coco_dir: str, files: ml_collections.ConfigDict | dict[str, Any],
               **kwargs):
    self.coco_dir = os.path.abspath(os.path.expanduser(coco_dir))
    self.files = dict(files)
    super().__init__(label=os.path.basename(self.coco_dir),
                     description=f'the COCO-format folder {self.coco_dir}',
                     source={'coco_dir': self.coco_dir, **self.files}, **kwargs)

  def _split_records(self):
    if not os.path.isdir(self.coco_dir):
      raise caption_files.DataError(f'config.data.coco_dir: {self.coco_dir} is not a folder')
    return split_records(self.coco_dir, self.files, self.skips)
