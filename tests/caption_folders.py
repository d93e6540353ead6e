"""Caption folders the tests make, with real JPEG files and JSON in the real schemas: a tiny COCO
2014 folder in the official layout with every odd case the builder must handle, a plain
COCO-format folder of any size and names, and a Flickr8k-style folder (images plus Karpathy's
dataset_flickr8k.json); and scripts/prepare_data.py, which reports on them."""

import io
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

# What the builder must keep and skip for the folder below.
EXPECTED_SPLIT_SIZES = {'train': 6, 'restval': 1, 'val': 1, 'test': 1}
EXPECTED_SKIPPED = {
    'empty caption': 1,
    'listed but missing from disk': 1,
    'no captions': 1,
    'unreadable image': 2,  # Truncated and corrupt.
    'in dataset_coco.json but in no annotation file': 1,
}


def _jpeg(pixels, mode='RGB', exif=None):
  buffer = io.BytesIO()
  image = Image.fromarray(pixels).convert(mode)
  kwargs = {'exif': exif} if exif is not None else {}
  image.save(buffer, format='JPEG', quality=90, **kwargs)
  return buffer.getvalue()


def make_coco_dir(root: str, karpathy: bool = True) -> str:
  rng = np.random.default_rng(0)
  def pixels(h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)

  rotated = Image.Exif()
  rotated[0x0112] = 6  # Rotate 90 degrees clockwise to display.
  png = io.BytesIO()
  Image.fromarray(pixels(36, 36)).save(png, format='PNG')
  big = _jpeg(pixels(64, 64))
  train_files = {
      'COCO_train2014_000000000001.jpg': _jpeg(pixels(40, 60)),
      'COCO_train2014_000000000002.jpg': _jpeg(pixels(50, 50)),
      'COCO_train2014_000000000003.jpg': _jpeg(pixels(45, 30), mode='L'),
      'COCO_train2014_000000000004.jpg': _jpeg(pixels(33, 47), mode='CMYK'),
      'COCO_train2014_000000000005.jpg': png.getvalue(),  # PNG content under a .jpg name.
      'COCO_train2014_000000000006.jpg': _jpeg(pixels(30, 50), exif=rotated),
      'COCO_train2014_000000000007.jpg': big[:len(big) // 2],  # Truncated.
      'COCO_train2014_000000000008.jpg': b'this is not an image' * 10,  # Corrupt.
      # 9 is listed in the annotations but missing from disk.
      'COCO_train2014_000000000010.jpg': _jpeg(pixels(20, 20)),  # No captions.
  }
  val_files = {f'COCO_val2014_00000000010{i}.jpg': _jpeg(pixels(40, 40)) for i in range(1, 4)}
  for folder, files in (('train2014', train_files), ('val2014', val_files)):
    os.makedirs(os.path.join(root, folder), exist_ok=True)
    for name, data in files.items():
      with open(os.path.join(root, folder, name), 'wb') as f:
        f.write(data)

  def annotations(names, first_id):
    images = [{'id': int(n[-8:-4]), 'file_name': n, 'width': 0, 'height': 0, 'license': 3,
               'coco_url': 'http://example/' + n, 'unexpected_field': [1, 2]} for n in names]
    captions, next_id = [], first_id
    for image in images:
      if image['id'] == 10:
        continue  # No captions.
      count = {1: 4, 2: 6}.get(image['id'], 5)
      for k in range(count):
        text = f'a picture number {k} of image {image["id"]}'
        if image['id'] == 1 and k == 0:
          text = '  A   dog\n runs  on the   beach '
        if image['id'] == 1 and k == 1:
          text = 'Café crème ☕ on a table'
        if image['id'] == 1 and k == 2:
          text = '   '  # Empty once white space is dropped.
        captions.append({'id': next_id, 'image_id': image['id'], 'caption': text, 'extra': None})
        next_id += 1
    return {'info': {'year': 2014}, 'licenses': [], 'images': images, 'annotations': captions,
            'type': 'captions'}

  os.makedirs(os.path.join(root, 'annotations'), exist_ok=True)
  train_names = sorted(train_files) + ['COCO_train2014_000000000009.jpg']
  for name, names, first_id in (('train2014', train_names, 1000), ('val2014', sorted(val_files),
                                                                   5000)):
    with open(os.path.join(root, 'annotations', f'captions_{name}.json'), 'w') as f:
      json.dump(annotations(names, first_id), f)
  if karpathy:
    splits = {name: 'train' for name in train_names}
    splits.update(zip(sorted(val_files), ('val', 'test', 'restval')))
    splits['COCO_val2014_000000999999.jpg'] = 'train'  # Unknown to the annotations.
    images = [{'filename': n, 'split': s, 'filepath': n.split('_')[1], 'sentences': []}
              for n, s in splits.items()]
    with open(os.path.join(root, 'dataset_coco.json'), 'w') as f:
      json.dump({'images': images, 'dataset': 'coco'}, f)
  return root


def _write(path: str, data: bytes) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(data)


def _scene_caption(rng, k: int) -> tuple[int, str]:
  """A caption whose words depend on the image's colour, so a few steps can learn something."""
  colour = ('red', 'green', 'blue')[k % 3]
  return k % 3, f'a {colour} picture {rng.choice(["of a dog", "of a cat", "of a tree"])}'


def _coloured_jpeg(rng, colour_index: int, size=(48, 40)) -> bytes:
  pixels = rng.integers(0, 60, (*size, 3), dtype=np.uint8)
  pixels[..., colour_index] += 190
  return _jpeg(pixels)


def make_coco_format_dir(root: str, sizes: dict[str, int]) -> str:
  """A COCO-format folder with `sizes` = {image folder: number of images}; each folder has
  `annotations/captions_<folder>.json` (five captions per image) and clean JPEG files."""
  rng = np.random.default_rng(1)
  next_image, next_caption = 1, 1
  for folder, count in sizes.items():
    images, annotations = [], []
    for _ in range(count):
      name = f'{folder}_{next_image:06d}.jpg'
      colour = next_image % 3
      _write(os.path.join(root, folder, name), _coloured_jpeg(rng, colour))
      images.append({'id': next_image, 'file_name': name, 'width': 40, 'height': 48})
      for _ in range(5):
        _, text = _scene_caption(rng, colour)
        annotations.append({'id': next_caption, 'image_id': next_image, 'caption': text})
        next_caption += 1
      next_image += 1
    _write(os.path.join(root, 'annotations', f'captions_{folder}.json'),
           json.dumps({'images': images, 'annotations': annotations}).encode())
  return root


FLICKR8K_SPLITS = {'train': 14, 'val': 3, 'test': 3}


def flickr8k_entries(rng) -> list[dict]:
  """Image entries in the schema of Karpathy's dataset_flickr8k.json (no cocoid, no filepath)."""
  entries, sentid = [], 0
  for split, count in FLICKR8K_SPLITS.items():
    for _ in range(count):
      imgid = len(entries)
      colour = imgid % 3
      sentences = []
      for _ in range(5):
        _, raw = _scene_caption(rng, colour)
        sentences.append({'tokens': raw.split(), 'raw': raw.capitalize() + ' .', 'imgid': imgid,
                          'sentid': sentid})
        sentid += 1
      entries.append({'sentids': [s['sentid'] for s in sentences], 'imgid': imgid,
                      'sentences': sentences, 'split': split,
                      'filename': f'{1000268201 + 7919 * imgid}_{imgid:010x}.jpg'})
  return entries


def make_flickr8k_dir(root: str, json_name: str = 'dataset_flickr8k.json',
                      image_folder: str = 'Flicker8k_Dataset') -> tuple[str, str]:
  """(json path, image folder): ROOT/image_folder with one JPEG per entry of flickr8k_entries,
  and ROOT/json_name listing them (Karpathy's schema)."""
  rng = np.random.default_rng(2)
  entries = flickr8k_entries(rng)
  image_dir = os.path.join(root, image_folder)
  for entry in entries:
    _write(os.path.join(image_dir, entry['filename']), _coloured_jpeg(rng, entry['imgid'] % 3))
  json_path = os.path.join(root, json_name)
  _write(json_path, json.dumps({'images': entries, 'dataset': 'flickr8k'}).encode())
  return json_path, image_dir


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_prepare_data(workdir: str, config_name: str, *flags: str) -> subprocess.CompletedProcess:
  """scripts/prepare_data.py with configs/CONFIG_NAME, a 64-piece vocabulary and `flags`."""
  return subprocess.run(
      [sys.executable, os.path.join(_ROOT, 'scripts', 'prepare_data.py'),
       '--config', os.path.join(_ROOT, 'configs', config_name), '--workdir', workdir,
       '--config.data.vocab_size=64', *flags],
      capture_output=True, text=True, timeout=300)
