"""A caption page and JSON API over a trained workdir (scripts/serve.py), built on aiohttp.

One asyncio loop holds every connection. Requests queue their decoded images; one batcher
takes whatever is waiting (up to the batch size) and captions it in one call of the compiled
model, on a worker thread, so the more clients wait, the more images each call serves. The
model is compiled for a few batch sizes at start-up, not on a first request.

  GET  /             the page: choose or drop an image, see its captions
  POST /api/caption  body: the image's bytes (Content-Type image/* or
                     application/octet-stream) -> JSON {greedy, beam, step, seconds, batch_size}
Bad input gets a 4xx JSON {"error": ...} naming the problem; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import io
import json
import logging
import os
import time
from typing import Any
import urllib.request

from aiohttp import web
import jax
import numpy as np
from PIL import Image

from jaxcap import caption
from jaxcap import decode
from jaxcap import inference
from jaxcap import parallel

_PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'serve_page.html')
# Content types taken as image bytes; anything else is refused with 415.
_BINARY_TYPES = ('application/octet-stream',)


@dataclasses.dataclass(frozen=True)
class Limits:
  max_bytes: int = 20 * 2**20
  max_pixels: int = 50_000_000  # Width x height, read from the header before decoding.


class RequestError(Exception):
  """A problem with the request, answered with `status` and a JSON error."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


def batch_sizes(largest: int) -> tuple[int, ...]:
  """The batch shapes compiled at start-up: 1, 4, 16, ... and `largest` itself."""
  sizes, size = [], 1
  while size < largest:
    sizes.append(size)
    size *= 4
  return tuple(sizes + [largest])


class Captioner:
  """The trained model on one device: greedy caption and beam hypotheses of a batch of images,
  one jitted function, compiled for each of `batch_sizes` (a batch is padded to the next)."""

  def __init__(self, trained: inference.Trained, max_batch: int, beam_size: int):
    config = trained.config
    self.tokenizer, self.image_size = trained.tokenizer, config.data.image_size
    self.step, self.beam_size = int(trained.state.step), beam_size
    self.sizes = batch_sizes(max_batch)
    device = jax.local_devices()[0]
    state = jax.device_put(jax.device_get(trained.state), device)
    max_len, apply_fn = config.data.max_len, state.apply_fn
    greedy = config.decode.copy_and_resolve_references()
    greedy.method = 'greedy'

    @functools.partial(jax.jit, compiler_options=parallel.compiler_options(device.platform))
    def captions(variables, images):
      greedy_ids, greedy_log_probs = decode.decode_with_log_probs(
          apply_fn, variables, images, max_len, greedy)
      beam_ids, beam_log_probs = decode.beam_hypotheses(
          apply_fn, variables, images, max_len, beam_size, config.decode.length_penalty)
      return greedy_ids, greedy_log_probs, beam_ids, beam_log_probs

    self._variables = state.variables
    self._compiled = {
        size: captions.lower(self._variables, jax.ShapeDtypeStruct(
            (size, self.image_size, self.image_size, 3), np.float32)).compile()
        for size in self.sizes}

  def __call__(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
    size = next(s for s in self.sizes if s >= len(images))
    batch = np.zeros((size, self.image_size, self.image_size, 3), np.float32)
    batch[:len(images)] = images
    greedy_ids, greedy_log_probs, beam_ids, beam_log_probs = jax.device_get(
        self._compiled[size](self._variables, batch))
    n = len(images)
    greedy_texts = self.tokenizer.decode(greedy_ids[:n])
    beam_texts = self.tokenizer.decode(beam_ids[:n].reshape(n * self.beam_size, -1))
    return [{'greedy': {'caption': greedy_texts[i], 'log_prob': float(greedy_log_probs[i])},
             'beam': [{'caption': beam_texts[i * self.beam_size + k],
                       'log_prob': float(beam_log_probs[i, k])} for k in range(self.beam_size)]}
            for i in range(n)]


def check_image(data: bytes, content_type: str, limits: Limits) -> None:
  """Refuses what is not one whole image within the limits, before any decoding."""
  if not (content_type.startswith('image/') or content_type in _BINARY_TYPES):
    raise RequestError(415, f"Content-Type {content_type or '(none)'} is not an image: send the "
                       "image's bytes as image/jpeg, image/png, ... or application/octet-stream")
  if not data:
    raise RequestError(400, 'empty body: send the bytes of one image')
  if len(data) > limits.max_bytes:
    raise RequestError(413, f'{len(data)} bytes; the limit is {limits.max_bytes}')
  try:
    with Image.open(io.BytesIO(data)) as image:
      width, height = image.size
  except Image.UnidentifiedImageError:
    raise RequestError(400, 'not an image: no image format recognised in the body') from None
  except Image.DecompressionBombError as error:
    raise RequestError(413, str(error)) from None
  except (OSError, ValueError) as error:
    raise RequestError(400, f'not an image ({type(error).__name__}: {error})') from None
  if width * height > limits.max_pixels:
    raise RequestError(413, f'image is {width}x{height} pixels; the limit is '
                       f'{limits.max_pixels} pixels')


class Batcher:
  """Collects images from concurrent requests and captions them in batches."""

  def __init__(self, captioner: Captioner):
    self.captioner = captioner
    self.queue: asyncio.Queue = asyncio.Queue()

  async def caption(self, image: np.ndarray) -> tuple[dict[str, Any], int]:
    future = asyncio.get_running_loop().create_future()
    await self.queue.put((image, future))
    return await future

  async def run(self) -> None:
    loop = asyncio.get_running_loop()
    largest = self.captioner.sizes[-1]
    while True:
      waiting = [await self.queue.get()]
      while len(waiting) < largest and not self.queue.empty():
        waiting.append(self.queue.get_nowait())
      images = [image for image, _ in waiting]
      try:
        results = await loop.run_in_executor(None, self.captioner, images)
      except Exception as error:  # pylint: disable=broad-except
        logging.exception('captioning a batch of %d failed', len(images))
        for _, future in waiting:
          if not future.cancelled():  # A client that left cancels its request's future.
            future.set_exception(error)
        continue
      for (_, future), result in zip(waiting, results):
        if not future.cancelled():
          future.set_result((result, len(images)))


def _error(status: int, message: str) -> web.Response:
  return web.json_response({'error': message}, status=status)


def make_app(captioner: Captioner, limits: Limits = Limits()) -> web.Application:
  """The aiohttp application: the page, the API, and the batcher running with it."""
  batcher = Batcher(captioner)
  with open(_PAGE, encoding='utf-8') as f:
    page = f.read()

  async def index(request: web.Request) -> web.Response:
    del request
    return web.Response(text=page, content_type='text/html')

  async def api_caption(request: web.Request) -> web.Response:
    start = time.perf_counter()
    if request.content_length is not None and request.content_length > limits.max_bytes:
      return _error(413, f'{request.content_length} bytes; the limit is {limits.max_bytes}')
    try:
      data = await request.read()
    except web.HTTPRequestEntityTooLarge:
      return _error(413, f'more than {limits.max_bytes} bytes; the limit is {limits.max_bytes}')
    try:
      check_image(data, request.content_type, limits)
      image = await asyncio.get_running_loop().run_in_executor(
          None, caption.image_from_bytes, data, captioner.image_size)
    except RequestError as error:
      return _error(error.status, str(error))
    except (OSError, ValueError) as error:  # A truncated or corrupt image.
      return _error(400, f'not a readable image ({type(error).__name__}: {error})')
    result, batch_size = await batcher.caption(image)
    return web.json_response({**result, 'step': captioner.step, 'batch_size': batch_size,
                              'seconds': time.perf_counter() - start})

  async def start_batcher(app: web.Application):
    task = asyncio.create_task(batcher.run())
    yield
    task.cancel()

  app = web.Application(client_max_size=limits.max_bytes + 1)
  app.router.add_get('/', index)
  app.router.add_post('/api/caption', api_caption)
  app.cleanup_ctx.append(start_batcher)
  return app


def serve(trained: inference.Trained, workdir: str, *, host: str = '127.0.0.1', port: int = 8080,
          max_batch: int | None = None, beam_size: int | None = None,
          limits: Limits = Limits()) -> None:
  """Compiles the model restored from `workdir` and serves it until interrupted."""
  config = trained.config
  max_batch = max_batch or config.eval.batch_size
  start = time.perf_counter()
  captioner = Captioner(trained, max_batch, beam_size or config.decode.beam_size)
  print(f'Compiled for batches of {", ".join(map(str, captioner.sizes))} in '
        f'{time.perf_counter() - start:.1f} s; step {captioner.step} of {workdir}', flush=True)
  web.run_app(make_app(captioner, limits), host=host, port=port,
              print=functools.partial(print, flush=True))


def load_test(url: str, images: list[bytes], clients: int, requests_per_client: int) -> dict:
  """`clients` threads each POST `requests_per_client` images (in turn from `images`) to
  URL/api/caption, one after another: captions/s over the whole run and latency percentiles."""
  def client(index: int) -> list[tuple[float, int]]:
    timings = []
    for i in range(requests_per_client):
      request = urllib.request.Request(
          url.rstrip('/') + '/api/caption', data=images[(index + i * clients) % len(images)],
          headers={'Content-Type': 'application/octet-stream'}, method='POST')
      start = time.perf_counter()
      with urllib.request.urlopen(request, timeout=600) as response:
        batch_size = json.loads(response.read())['batch_size']
      timings.append((time.perf_counter() - start, batch_size))
    return timings

  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    timings = [t for result in pool.map(client, range(clients)) for t in result]
  elapsed = time.perf_counter() - start
  latencies = np.array([t for t, _ in timings]) * 1000
  return {'clients': clients, 'requests': len(timings), 'captions_per_sec': len(timings) / elapsed,
          'latency_ms': {f'p{q}': float(np.percentile(latencies, q)) for q in (50, 90, 99)},
          'mean_batch_size': float(np.mean([b for _, b in timings]))}
