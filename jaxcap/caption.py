"""Captioning arbitrary image files with a trained model (scripts/caption.py)."""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Sequence
import os
import re

import ml_collections
import numpy as np

from jaxcap import attention_maps
from jaxcap import predict
from jaxcap.data import caption_files
from jaxcap.data import preprocess as preprocess_lib


def set_decoding(config: ml_collections.ConfigDict, *, beam: int | None = None,
                 temperature: float | None = None) -> None:
  """Command-line decoding choices override the config's."""
  if beam is not None:
    config.decode.method, config.decode.beam_size = 'beam', beam
  if temperature is not None:
    config.decode.method, config.decode.temperature = 'sample', temperature


def expand_paths(paths: Sequence[str]) -> list[str]:
  """Files as given; folders replaced by the files inside them, sorted."""
  expanded = []
  for path in paths:
    if os.path.isdir(path):
      expanded += sorted(os.path.join(root, name) for root, _, names in os.walk(path)
                         for name in names)
    else:
      expanded.append(path)
  return expanded


def load_image(path: str, image_size: int) -> np.ndarray:
  """Any image file PIL reads (grayscale, PNG, EXIF-rotated, any size) -> model input."""
  with open(path, 'rb') as f:
    return image_from_bytes(f.read(), image_size)


def image_from_bytes(data: bytes, image_size: int) -> np.ndarray:
  """Encoded image -> model input, as the training data is decoded and prepared: a plain RGB
  JPEG by TensorFlow, any other image by PIL (EXIF-rotated); then centre square crop, resize,
  [-1, 1]. Raises OSError or ValueError for bytes that are not a whole image."""
  image = caption_files.image_from_bytes(data)
  if isinstance(image, bytes):
    return preprocess_lib.decode_and_preprocess(image, image_size).numpy()
  return preprocess_lib.preprocess_image(image_size)({'image': image})['image'].numpy()


def _reason(error: Exception, path: str) -> str:
  """The error's type and message, naming `path` where PIL names the in-memory file it read."""
  message = re.sub(r'<_io\.BytesIO object at 0x[0-9a-f]+>', repr(path), str(error))
  return f'{type(error).__name__}: {message}'


def caption_paths(trained: predict.Trained, paths: Iterable[str]) -> list[tuple[str, dict]]:
  """(path, {'caption': text, 'log_prob': the model's log-probability of it} or
  {'error': message}) for each path, in order. A decoder that attends adds 'tokens' (the
  generated pieces, EOS as '</s>'), 'attention' (an H x W list of weights per token) and 'grid'
  ([H, W])."""
  config, mesh = trained.config, trained.mesh
  results: dict[str, dict] = {}
  loaded: list[tuple[str, np.ndarray]] = []
  paths = list(paths)
  for path in paths:
    try:
      loaded.append((path, load_image(path, config.data.image_size)))
    except (OSError, ValueError) as error:
      results[path] = {'error': f'not a readable image ({_reason(error, path)})'}
  # One batch shape: all images up to eval.batch_size, rounded up to fill every device.
  batch_size = min(config.eval.batch_size, -(-max(len(loaded), 1) // mesh.size) * mesh.size)
  predictor = predict.Predictor(config, mesh, (batch_size,))
  grid = trained.attention_grid
  for start in range(0, len(loaded), batch_size):
    chunk = loaded[start:start + batch_size]
    outputs = predictor(trained.state, np.stack([image for _, image in chunk]))
    texts = trained.tokenizer.decode(outputs['ids'])
    for i, ((path, _), text) in enumerate(zip(chunk, texts)):
      results[path] = {'caption': text, 'log_prob': float(outputs['log_probs'][i])}
      if grid is not None:
        maps = attention_maps.token_maps(trained.tokenizer, outputs['ids'][i],
                                         outputs['attention'][i], grid)
        results[path].update(tokens=maps.tokens, attention=maps.maps.tolist(), grid=list(grid))
  return [(path, results[path]) for path in paths]
