"""Throughput of jaxcap's jitted functions on synthetic inputs (`jaxcap.benchmark`): no
dataset, no TensorFlow. Prints the results as JSON.

  python scripts/benchmark.py --config configs/demo.py --mode train
  python scripts/benchmark.py --config configs/coco.py --mode encoder --batch_size 32 \
      --config.model.dtype=bfloat16 --config.model.encoder_weights=None
"""

import dataclasses
import json
import pathlib

from absl import app
from absl import flags

from jaxcap import benchmark
from jaxcap import command_line
from jaxcap import host_memory

_DEFAULTS = benchmark.Options()
FLAGS = flags.FLAGS
command_line.define_config_flag(help_string='Configuration file.')
flags.DEFINE_enum('mode', _DEFAULTS.mode, benchmark.MODES, 'What to time.')
flags.DEFINE_integer('embedding_dim', _DEFAULTS.embedding_dim,
                     'Image embedding size (grid channels for updown) of the decoder and scst '
                     'modes (InceptionV3: 2048).')
flags.DEFINE_integer('grid', _DEFAULTS.grid,
                     'Decoder and scst modes with config.model.decoder=updown: the side of the '
                     'square image grid (InceptionV3 at 299 px: 8).')
flags.DEFINE_integer('batch_size', _DEFAULTS.batch_size,
                     'Global batch (default: config.batch_size).')
flags.DEFINE_integer('vocab_size', _DEFAULTS.vocab_size, 'Vocabulary size of the synthetic model.')
flags.DEFINE_integer('max_len', _DEFAULTS.max_len,
                     'Caption length (default: config.data.max_len).')
flags.DEFINE_integer('steps', _DEFAULTS.steps,
                     'Timed steps (rounded up to whole calls; decoder: to whole cycles through '
                     'the --num_batches host batches).')
flags.DEFINE_integer('warmup', _DEFAULTS.warmup, 'Untimed calls first (compilation).')
flags.DEFINE_integer('num_batches', _DEFAULTS.num_batches,
                     'Decoder modes: distinct synthetic batches (x batch_size rows).')
flags.DEFINE_integer('peak_matmul_size', _DEFAULTS.peak_matmul_size,
                     'Side of the square matrix product timed for the peak.')
flags.DEFINE_string('workdir', _DEFAULTS.workdir,
                    'pipeline mode: where the tokenizer (and a --coco_like folder) is kept '
                    '(default: a temporary folder).')
flags.DEFINE_integer('coco_like', _DEFAULTS.coco_like,
                     'pipeline mode: train images of a COCO-like folder (640 x 480 JPEGs at '
                     'quality 90, COCO-format JSON; jaxcap/data/coco_like.py) written to '
                     '--workdir and read as config.data.coco_dir (0: the config\'s dataset).')
flags.DEFINE_integer('checkpoint_every', _DEFAULTS.checkpoint_every,
                     'checkpoint mode: train steps between checkpoints.')
flags.DEFINE_integer('checkpoint_rounds', _DEFAULTS.checkpoint_rounds,
                     'checkpoint mode: interleaved rounds of the three loops; the faster of '
                     'each loop is kept.')
flags.DEFINE_string('json', None, 'Also write the results to this JSON file.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  host_memory.keep_freed_memory()
  options = benchmark.Options(**{field.name: getattr(FLAGS, field.name)
                                 for field in dataclasses.fields(benchmark.Options)})
  results = benchmark.run(FLAGS.config, options)
  print(json.dumps(results, indent=1))
  if FLAGS.json:
    pathlib.Path(FLAGS.json).resolve().parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(FLAGS.json).write_text(json.dumps(results, indent=1))


if __name__ == '__main__':
  app.run(main)
