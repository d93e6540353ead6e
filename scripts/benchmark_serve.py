"""Captions/s and latency of a running scripts/serve.py under 1, 8 and 64 concurrent clients.

  python scripts/serve.py --workdir workdirs/demo &
  python scripts/benchmark_serve.py --url http://127.0.0.1:8080 --images my_images/

Each client sends its requests one after another, so N clients keep about N requests waiting.
"""

import json
import pathlib
import sys

from absl import app
from absl import flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from jaxcap import caption  # pylint: disable=g-import-not-at-top
from jaxcap import serve  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
flags.DEFINE_string('url', 'http://127.0.0.1:8080', 'The server.')
flags.DEFINE_string('images', None, 'Image file or folder the clients send.')
flags.mark_flag_as_required('images')
flags.DEFINE_list('clients', ['1', '8', '64'], 'Concurrent clients, one run each.')
flags.DEFINE_integer('requests_per_client', 8, 'Requests each client sends.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  images = [pathlib.Path(p).read_bytes() for p in caption.expand_paths([FLAGS.images])]
  for clients in map(int, FLAGS.clients):
    print(json.dumps(serve.load_test(FLAGS.url, images, clients, FLAGS.requests_per_client)),
          flush=True)


if __name__ == '__main__':
  app.run(main)
