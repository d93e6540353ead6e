"""Captions image files or folders with a trained workdir; prints `path<TAB>caption` per image.

  python scripts/caption.py --workdir workdirs/demo photo.jpg more_photos/
  python scripts/caption.py --workdir workdirs/demo --beam 3 --json photo.jpg

Needs only the workdir (config, tokenizer, checkpoint), not the dataset. An unreadable file
gets a one-line error on stderr; the others are still captioned, and the exit code is 1.
"""

import json
import logging as std_logging
import sys

from absl import app
from absl import flags

from jaxcap import caption
from jaxcap import host_memory
from jaxcap import predict

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Training workdir.')
flags.mark_flag_as_required('workdir')
flags.DEFINE_integer('step', None, 'Checkpoint step (default: latest).')
flags.DEFINE_integer('beam', None, 'Beam size (default: the config\'s decoding method).')
flags.DEFINE_float('temperature', None, 'Sample with this temperature instead.')
flags.DEFINE_bool('json', False, 'Print one JSON list of {"path", "caption" and "log_prob" (the '
                  'model\'s log-probability of the caption) | "error"}; a decoder that attends '
                  'adds "tokens", "attention" (an H x W map per token) and "grid" ([H, W]).')


def main(argv):
  host_memory.keep_freed_memory()
  paths = argv[1:]
  if not paths:
    raise app.UsageError('Give image files or folders to caption.')
  std_logging.getLogger().setLevel(std_logging.WARNING)
  trained = predict.restore_or_exit(FLAGS.workdir, FLAGS.step)
  caption.set_decoding(trained.config, beam=FLAGS.beam, temperature=FLAGS.temperature)
  results = caption.caption_paths(trained, caption.expand_paths(paths))
  if FLAGS.json:
    print(json.dumps([{'path': p, **r} for p, r in results], indent=1))
  for path, result in results:
    if 'error' in result:
      print(f'{path}: {result["error"]}', file=sys.stderr)
    elif not FLAGS.json:
      print(f'{path}\t{result["caption"]}')
  return 1 if any('error' in r for _, r in results) else 0


if __name__ == '__main__':
  app.run(main)
