"""Karpathy's caption JSON plus an image folder, as a tfds dataset with `coco_captions` features.

  python scripts/train.py --config configs/flickr8k.py --workdir workdirs/flickr8k \
      --config.data.karpathy_json=/data/dataset_flickr8k.json \
      --config.data.image_dir=/data/Flicker8k_Dataset

The schema of Karpathy's caption_datasets.zip (dataset_coco.json, dataset_flickr8k.json,
dataset_flickr30k.json), extra fields ignored:

  {"images": [{"filename": "1000092795.jpg", "split": "train" (or "restval", "val", "test"),
               "sentences": [{"raw": "Two young guys ...", "sentid": 0, ...}, ...],
               "imgid": 0, "cocoid": 391895 (COCO only), "filepath": "val2014" (COCO only)}]}

The splits are the file's. Captions are each sentence's `raw`, normalised as COCO's are; their ids
are `sentid` where present, else the sentence's position in the file. Image ids are `cocoid`
where present, else `imgid` (the image's index in Karpathy's files). An image is read from
IMAGE_DIR/filepath/filename, or from IMAGE_DIR/filename when the entry has no `filepath` or the
file is not there.
"""

from __future__ import annotations

import collections
import os
from typing import Any

import tensorflow_datasets as tfds

from jaxcap.data import caption_files
from jaxcap.data.caption_files import field

WHAT = "Karpathy's caption JSON"


def read_images(path: str, skips: caption_files.Skips) -> list[tuple[int, dict[str, Any]]]:
  """(index, entry) of the file's images whose split is known; a DataError when the file is not
  in the schema (no `images` list, an entry without a string `filename` or `split`)."""
  data = caption_files.load_json(path, WHAT)
  images = field(data, 'images', list, f'{path}: the file')
  entries = []
  for index, entry in enumerate(images):
    where = f'{path}: images[{index}]'
    filename, split = field(entry, 'filename', str, where), field(entry, 'split', str, where)
    if split in caption_files.SPLITS:
      entries.append((index, entry))
    else:
      skips.add(filename, f'unknown split ({where}.split is {split!r}; the schema has '
                f'{", ".join(caption_files.SPLITS)})')
  return entries


def _image_path(image_dir: str, entry: dict[str, Any]) -> str:
  filepath = entry.get('filepath')
  if isinstance(filepath, str) and filepath:
    path = os.path.join(image_dir, filepath, entry['filename'])
    if os.path.exists(path):
      return path
  return os.path.join(image_dir, entry['filename'])


def _captions(entry: dict[str, Any], where: str, first_id: int,
              skips: caption_files.Skips) -> tuple[tuple[int, str], ...]:
  captions = []
  for k, sentence in enumerate(field(entry, 'sentences', list, where)):
    raw = sentence.get('raw') if isinstance(sentence, dict) else None
    if not isinstance(raw, str):
      skips.add(f'{entry["filename"]} sentence {k}',
                f'sentence without raw ({where}.sentences[{k}] '
                'has no "raw" string)')
      continue
    text = caption_files.normalize_caption(raw)
    if not text:
      skips.add(f'{entry["filename"]} sentence {k}', f'empty caption ({where}.sentences[{k}].raw)')
      continue
    sentid = sentence.get('sentid')
    captions.append((sentid if isinstance(sentid, int) else first_id + k, text))
  return tuple(captions)


def split_records(json_path: str, image_dir: str, skips: caption_files.Skips
                  ) -> dict[str, list[caption_files.ImageRecord]]:
  """The images of each split, in the file's order, before their files are read."""
  splits = collections.defaultdict(list)
  by_path, by_id, sentences_before = {}, {}, 0
  for index, entry in read_images(json_path, skips):
    where = f'{json_path}: images[{index}]'
    id_field = 'cocoid' if 'cocoid' in entry else 'imgid'
    image_id = field(entry, id_field, int, where)
    path = _image_path(image_dir, entry)
    captions = _captions(entry, where, sentences_before, skips)
    sentences_before += len(entry['sentences'])
    twin = by_path.get(path, by_id.get(image_id))
    if twin is not None:
      same = 'file' if path in by_path else id_field
      skips.add(path, f'listed twice (images[{index}] has the {same} of images[{twin}] in '
                f'{json_path}; the first is kept)')
      continue
    by_path[path], by_id[image_id] = index, index
    splits[entry['split']].append(
        caption_files.ImageRecord(image_id, path, captions, f'{where}.filename'))
  return dict(splits)


class KarpathyCaptions(caption_files.CaptionFilesBuilder):
  """tfds `coco_captions` features and splits from a Karpathy-schema JSON and its images."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def __init__(self, *, json_path: str, image_dir: str, **kwargs):
    self.json_path = os.path.abspath(os.path.expanduser(json_path))
    self.image_dir = os.path.abspath(os.path.expanduser(image_dir))
    super().__init__(label=os.path.splitext(os.path.basename(self.json_path))[0],
                     description=f'{self.json_path} with images in {self.image_dir}',
                     source={'karpathy_json': self.json_path, 'image_dir': self.image_dir},
                     **kwargs)

  def _split_records(self):
    if not os.path.isfile(self.json_path):
      raise caption_files.DataError(f'config.data.karpathy_json: {self.json_path} is not a file')
    if not os.path.isdir(self.image_dir):
      raise caption_files.DataError(f'config.data.image_dir: {self.image_dir} is not a folder')
    return (split_records(self.json_path, self.image_dir, self.skips),
            f'the splits of {os.path.basename(self.json_path)}')
