"""Serves a trained workdir: a caption page and a JSON API, on localhost unless told otherwise.

  python scripts/serve.py --workdir workdirs/demo --port 8080
  curl --data-binary @photo.jpg -H 'Content-Type: image/jpeg' http://127.0.0.1:8080/api/caption

Open http://127.0.0.1:8080/ and choose or drop an image. The model is compiled at start-up;
concurrent requests are captioned together, up to --batch_size images per call.
"""

import logging as std_logging

from absl import app
from absl import flags

from jaxcap import command_line
from jaxcap import host_memory
from jaxcap import predict
from jaxcap import serve

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Training workdir.')
flags.mark_flag_as_required('workdir')
flags.DEFINE_string('host', '127.0.0.1', 'Address to listen on (0.0.0.0: every interface).')
flags.DEFINE_integer('port', 8080, 'Port to listen on.')
command_line.define_step_flag()
flags.DEFINE_integer('batch_size', None, 'Most images per model call (default: eval.batch_size).')
flags.DEFINE_integer('beam', None, "Beam size of the hypotheses (default: the config's).")
flags.DEFINE_integer('max_bytes', serve.Limits.max_bytes, 'Largest image file accepted.')
flags.DEFINE_integer('max_pixels', serve.Limits.max_pixels, 'Largest width x height accepted.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  host_memory.keep_freed_memory()
  std_logging.getLogger().setLevel(std_logging.WARNING)
  trained = predict.restore_or_exit(FLAGS.workdir, FLAGS.step)
  serve.serve(trained, FLAGS.workdir, host=FLAGS.host, port=FLAGS.port,
              max_batch=FLAGS.batch_size, beam_size=FLAGS.beam,
              limits=serve.Limits(FLAGS.max_bytes, FLAGS.max_pixels))


if __name__ == '__main__':
  app.run(main)
