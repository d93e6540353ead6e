"""A tiny COCO 2014 folder in the official layout, with every odd case the builder must handle."""

import io
import json
import os

import numpy as np
from PIL import Image

# What the builder must keep and skip for the folder below.
EXPECTED_SPLIT_SIZES = {'train': 6, 'restval': 1, 'val': 1, 'test': 1}
EXPECTED_SKIPPED = {
    'empty caption': 1,
    'listed but missing from disk': 1,
    'no captions': 1,
    'unreadable image': 2,  # Truncated and corrupt.
    'in dataset_coco.json but in neither captions_train2014.json nor captions_val2014.json': 1,
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
  for name, names, first_id in (('train2014', train_names, 1000), ('val2014', sorted(val_files), 5000)):
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
