"""Captions/s and latency of a running scripts/serve.py under 1, 8 and 64 concurrent clients.

  python scripts/serve.py --workdir workdirs/demo &
  python scripts/benchmark_serve.py --url http://127.0.0.1:8080 --images my_images/

Each client sends its requests one after another, so N clients keep about N requests waiting.
"""

import concurrent.futures
import json
import pathlib
import time
import urllib.request

from absl import app
from absl import flags
import numpy as np

from jaxcap import caption

FLAGS = flags.FLAGS
flags.DEFINE_string('url', 'http://127.0.0.1:8080', 'The server.')
flags.DEFINE_string('images', None, 'Image file or folder the clients send.')
flags.mark_flag_as_required('images')
flags.DEFINE_list('clients', ['1', '8', '64'], 'Concurrent clients, one run each.')
flags.DEFINE_integer('requests_per_client', 8, 'Requests each client sends.')


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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  images = [pathlib.Path(p).read_bytes() for p in caption.expand_paths([FLAGS.images])]
  for clients in map(int, FLAGS.clients):
    print(json.dumps(load_test(FLAGS.url, images, clients, FLAGS.requests_per_client)),
          flush=True)


if __name__ == '__main__':
  app.run(main)
