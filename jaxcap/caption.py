"""Captioning arbitrary image files with a trained model (scripts/caption.py)."""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Sequence
import concurrent.futures
import json
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


def _load(path: str, image_size: int) -> np.ndarray | str:
  """The model input of `path`, or the error message of a file that is not a whole image."""
  try:
    return load_image(path, image_size)
  except (OSError, ValueError) as error:
    return f'not a readable image ({_reason(error, path)})'


def caption_stream(trained: predict.Trained, paths: Sequence[str], *,
                   threads: int | None = None) -> Iterator[tuple[str, dict]]:
  """(path, {'caption': text, 'log_prob': the model's log-probability of it} or
  {'error': message}) for each path, in order, a batch at a time: the next batch is read and
  decoded (`threads` threads) while the devices caption this one, so memory holds two batches
  whatever the number of paths. A decoder that attends adds 'tokens' (the generated pieces, EOS
  as '</s>'), 'attention' (an H x W list of weights per token) and 'grid' ([H, W])."""
  config, mesh = trained.config, trained.mesh
  if not paths:
    return
  # Batch shapes: up to eval.batch_size, rounded up to fill every device; a short last batch
  # is padded to the next of predict.batch_sizes.
  largest = min(config.eval.batch_size, -(-len(paths) // mesh.size) * mesh.size)
  predictor = predict.Predictor(config, mesh, predict.batch_sizes(largest, mesh.size))
  grid = trained.attention_grid
  batches = [paths[i:i + largest] for i in range(0, len(paths), largest)]
  with concurrent.futures.ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
    load = lambda batch: list(pool.map(lambda p: _load(p, config.data.image_size), batch))
    pending = pool.submit(load, batches[0])
    for number, batch in enumerate(batches):
      loaded = pending.result()
      if number + 1 < len(batches):  # Read the next batch while this one is captioned.
        pending = pool.submit(load, batches[number + 1])
      images = [image for image in loaded if not isinstance(image, str)]
      outputs = predictor(trained.state, np.stack(images)) if images else {}
      texts = iter(trained.tokenizer.decode(outputs['ids']) if images else ())
      row = 0
      for path, image in zip(batch, loaded):
        if isinstance(image, str):
          yield path, {'error': image}
          continue
        result = {'caption': next(texts), 'log_prob': float(outputs['log_probs'][row])}
        if grid is not None:
          maps = attention_maps.token_maps(trained.tokenizer, outputs['ids'][row],
                                           outputs['attention'][row], grid)
          result.update(tokens=maps.tokens, attention=maps.maps.tolist(), grid=list(grid))
        row += 1
        yield path, result


def caption_paths(trained: predict.Trained, paths: Iterable[str]) -> list[tuple[str, dict]]:
  """`caption_stream`'s results as a list (a few images)."""
  return list(caption_stream(trained, list(paths)))


def output_format(path: str) -> str:
  """'jsonl' for a .jsonl or .json file, else 'tsv'."""
  return 'jsonl' if path.endswith(('.jsonl', '.json')) else 'tsv'


def done_paths(output: str) -> set[str]:
  """The paths an earlier run already wrote captions of to `output` (nothing if it is new).
  A line cut short by an interruption is not counted: that image is captioned again."""
  if not os.path.exists(output):
    return set()
  done = set()
  with open(output, encoding='utf-8') as f:
    for line in f:
      if not line.endswith('\n'):
        break
      if output_format(output) == 'jsonl':
        try:
          done.add(json.loads(line)['path'])
        except (ValueError, KeyError, TypeError):
          raise ValueError(f'{output}: not a JSON-lines file of captions (a line reads '
                           f'{line[:80]!r}); give another --output') from None
      elif '\t' in line:
        done.add(line.split('\t', 1)[0])
  return done


def open_output(output: str):
  """`output` opened to append lines, a last line cut short by an interruption removed first
  (`done_paths` did not count it)."""
  if os.path.exists(output):
    with open(output, 'rb+') as f:
      data = f.read()
      if data and not data.endswith(b'\n'):
        f.truncate(data.rfind(b'\n') + 1)
  return open(output, 'a', encoding='utf-8')


def output_line(path: str, result: dict, format_: str) -> str:
  """One image's line of an output file (ends with a newline)."""
  if format_ == 'jsonl':
    return json.dumps({'path': path, **result}) + '\n'
  return f'{path}\t{result["caption"]}\n'
