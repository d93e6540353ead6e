"""Exports a trained workdir as a TensorFlow SavedModel that captions encoded images without JAX.

  python scripts/export.py --workdir workdirs/demo --output exported/demo
  python scripts/export.py --workdir workdirs/demo --output exported/demo_beam3 --beam 3

The serving signature 'serving_default' takes `images`, a batch of JPEG or PNG bytes, and
returns `captions` (strings) and `log_probs`; decoding the bytes, the preprocessing of
training, the model and its decoding method (the config's, or --beam/--greedy) are in the graph.
"""

import logging as std_logging

from absl import app
from absl import flags

from jaxcap import caption
from jaxcap import command_line
from jaxcap import evaluate
from jaxcap import export
from jaxcap import predict

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Training workdir.')
flags.DEFINE_string('output', None, 'SavedModel directory to write (replaced if it exists).')
flags.mark_flags_as_required(['workdir', 'output'])
command_line.define_step_flag()
flags.DEFINE_integer('beam', None, "Beam size (default: the config's decoding method).")
flags.DEFINE_bool('greedy', False, "Greedy decoding, whatever the config's method.")
flags.DEFINE_integer('batch_size', 8, 'The SavedModel runs the model on chunks of this many '
                     'images (a request of fewer is padded).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  std_logging.getLogger().setLevel(std_logging.WARNING)
  trained = predict.restore_or_exit(FLAGS.workdir, FLAGS.step)
  if FLAGS.greedy:
    trained.config.decode.method = 'greedy'
  caption.set_decoding(trained.config, beam=FLAGS.beam)
  export.export(trained, FLAGS.output, FLAGS.batch_size)
  method = evaluate.decoding_name(trained.config.decode)
  print(f'{FLAGS.output}: SavedModel of step {int(trained.state.step)}, {method} decoding; '
        f"signature '{export.SIGNATURE}': images (encoded bytes) -> captions, log_probs")


if __name__ == '__main__':
  app.run(main)
