"""A folder shaped like COCO 2014 for timing the input pipeline where COCO cannot be downloaded.

640 x 480 JPEG files at quality 90, whose content (smooth colour fields with grain) makes them
about COCO's average file size (~160 KB), in the official layout: train2014/, val2014/ and
annotations/captions_{train,val}2014.json in COCO's schema, five captions per image.
`data.coco_dir` pointed at it builds the dataset as from COCO itself (`jaxcap/data/coco_local.py`).
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
from PIL import Image

_WORDS = ('a man', 'a woman', 'a dog', 'two cats', 'a red bus', 'a plate of food', 'a train',
          'a group of people', 'a bird', 'a kitchen')
_PLACES = ('on a street', 'in a field', 'next to a table', 'near the water', 'in a room',
           'under a tree', 'at the station', 'on a beach')


def _jpeg(rng: np.random.Generator, width: int, height: int, quality: int) -> bytes:
  low = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
  pixels = np.asarray(low.resize((width, height), Image.BICUBIC), np.float32)
  pixels = np.clip(pixels + rng.normal(0, 18, pixels.shape), 0, 255).astype(np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format='JPEG', quality=quality)
  return buffer.getvalue()


def write_coco_like_folder(root: str, train_images: int, val_images: int = 8, width: int = 640,
                           height: int = 480, quality: int = 90, seed: int = 0) -> dict[str, float]:
  """Writes the folder (existing files are replaced) and returns its image count and the mean
  JPEG size in bytes."""
  rng = np.random.default_rng(seed)
  sizes, next_caption = [], 1
  for folder, count, first_id in (('train2014', train_images, 1),
                                  ('val2014', val_images, 1 + train_images)):
    os.makedirs(os.path.join(root, folder), exist_ok=True)
    images, annotations = [], []
    for image_id in range(first_id, first_id + count):
      name = f'COCO_{folder}_{image_id:012d}.jpg'
      data = _jpeg(rng, width, height, quality)
      sizes.append(len(data))
      with open(os.path.join(root, folder, name), 'wb') as f:
        f.write(data)
      images.append({'id': image_id, 'file_name': name, 'width': width, 'height': height})
      for _ in range(5):
        text = f'{rng.choice(_WORDS)} {rng.choice(_PLACES)}'
        annotations.append({'id': next_caption, 'image_id': image_id, 'caption': text})
        next_caption += 1
    os.makedirs(os.path.join(root, 'annotations'), exist_ok=True)
    with open(os.path.join(root, 'annotations', f'captions_{folder}.json'), 'w') as f:
      json.dump({'info': {'year': 2014}, 'licenses': [], 'images': images,
                 'annotations': annotations, 'type': 'captions'}, f)
  return {'images': len(sizes), 'mean_jpeg_bytes': float(np.mean(sizes))}
