"""A caption page and JSON API over a trained workdir (scripts/serve.py), built on aiohttp.

One asyncio loop holds every connection. Requests queue their decoded images; one batcher
takes whatever is waiting (up to the batch size) and captions it in one call of the compiled
model, on a worker thread, so the more clients wait, the more images each call serves. The
model is compiled for a few batch sizes at start-up, not on a first request.

  GET  /             the page: choose or drop an image, see its captions
  POST /api/caption  body: the image's bytes (Content-Type image/* or
                     application/octet-stream) -> JSON {greedy, beam, step, seconds, batch_size};
                     a decoder that attends adds greedy.words: [{word, attention (H x W)}]
Bad input gets a 4xx JSON {"error": ...} naming the problem; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import io
import logging
import os
import time
from typing import Any

from aiohttp import web
import jax
import numpy as np
from PIL import Image

from jaxcap import attention_maps
from jaxcap import caption
from jaxcap import parallel
from jaxcap import predict

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


class CaptionService:
  """The trained model on one device: the greedy caption and the beam hypotheses of a batch of
  images, compiled at start-up for each of `predict.batch_sizes(max_batch)`."""

  def __init__(self, trained: predict.Trained, max_batch: int, beam_size: int):
    self.tokenizer, self.image_size = trained.tokenizer, trained.config.data.image_size
    self.step, self.beam_size = int(trained.state.step), beam_size
    self.grid = trained.attention_grid
    self.sizes = predict.batch_sizes(max_batch)
    self._predictor = predict.Predictor(
        trained.config, parallel.make_mesh(jax.local_devices()[:1]), self.sizes,
        method='greedy', beam_hypotheses=beam_size)
    self._state = self._predictor.place(jax.device_get(trained.state))
    self._predictor.compile(self._state)

  def __call__(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
    outputs = self._predictor(self._state, np.stack(images))
    n, k = len(images), self.beam_size
    greedy_texts = self.tokenizer.decode(outputs['ids'])
    beam_texts = self.tokenizer.decode(outputs['beam_ids'].reshape(n * k, -1))
    results = [{'greedy': {'caption': greedy_texts[i],
                           'log_prob': float(outputs['log_probs'][i])},
                'beam': [{'caption': beam_texts[i * k + j],
                          'log_prob': float(outputs['beam_log_probs'][i, j])} for j in range(k)]}
               for i in range(n)]
    if self.grid is not None:
      for i, result in enumerate(results):
        maps = attention_maps.token_maps(self.tokenizer, outputs['ids'][i],
                                         outputs['attention'][i], self.grid)
        result['greedy']['words'] = [{'word': word, 'attention': weights.tolist()}
                                     for word, weights in attention_maps.word_maps(maps)]
    return results


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

  def __init__(self, service: CaptionService):
    self.service = service
    self.queue: asyncio.Queue = asyncio.Queue()

  async def caption(self, image: np.ndarray) -> tuple[dict[str, Any], int]:
    future = asyncio.get_running_loop().create_future()
    await self.queue.put((image, future))
    return await future

  async def run(self) -> None:
    loop = asyncio.get_running_loop()
    largest = self.service.sizes[-1]
    while True:
      waiting = [await self.queue.get()]
      while len(waiting) < largest and not self.queue.empty():
        waiting.append(self.queue.get_nowait())
      images = [image for image, _ in waiting]
      try:
        results = await loop.run_in_executor(None, self.service, images)
      except Exception as error:
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


def make_app(service: CaptionService, limits: Limits = Limits()) -> web.Application:
  """The aiohttp application: the page, the API, and the batcher running with it."""
  batcher = Batcher(service)
  with open(_PAGE, encoding='utf-8') as f:
    page = f.read().replace('/* attention_overlay.js */', attention_maps.overlay_script())

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
          None, caption.image_from_bytes, data, service.image_size)
    except RequestError as error:
      return _error(error.status, str(error))
    except (OSError, ValueError) as error:  # A truncated or corrupt image.
      return _error(400, f'not a readable image ({type(error).__name__}: {error})')
    result, batch_size = await batcher.caption(image)
    return web.json_response({**result, 'step': service.step, 'batch_size': batch_size,
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


def serve(trained: predict.Trained, workdir: str, *, host: str = '127.0.0.1', port: int = 8080,
          max_batch: int | None = None, beam_size: int | None = None,
          limits: Limits = Limits()) -> None:
  """Compiles the model restored from `workdir` and serves it until interrupted."""
  config = trained.config
  max_batch = max_batch or config.eval.batch_size
  start = time.perf_counter()
  service = CaptionService(trained, max_batch, beam_size or config.decode.beam_size)
  print(f'Compiled for batches of {", ".join(map(str, service.sizes))} in '
        f'{time.perf_counter() - start:.1f} s; step {service.step} of {workdir}', flush=True)
  web.run_app(make_app(service, limits), host=host, port=port,
              print=functools.partial(print, flush=True))
