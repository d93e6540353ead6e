"""Captions image files or folders with a trained workdir; prints `path<TAB>caption` per image.

  python scripts/caption.py --workdir workdirs/demo photo.jpg more_photos/
  python scripts/caption.py --workdir workdirs/demo --beam 3 --json photo.jpg
  python scripts/caption.py --workdir workdirs/demo --output captions.tsv big_folder/

Needs only the workdir (config, tokenizer, checkpoint), not the dataset. Images are read and
captioned a batch at a time, each caption printed as soon as its batch is done; memory holds two
batches, whatever the folder's size. A progress bar on stderr shows images/s and the time left.
An unreadable file gets a one-line error on stderr; the others are still captioned, and the exit
code is 1. `--output FILE` also appends each caption to FILE (TSV, or JSON lines for .jsonl or
.json); run again with the same FILE, it skips the images already there.
"""

import json
import logging as std_logging
import sys

from absl import app
from absl import flags
import tqdm

from jaxcap import caption
from jaxcap import command_line
from jaxcap import host_memory
from jaxcap import predict

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Training workdir.')
flags.mark_flag_as_required('workdir')
command_line.define_step_flag()
flags.DEFINE_integer('beam', None, 'Beam size (default: the config\'s decoding method).')
flags.DEFINE_float('temperature', None, 'Sample with this temperature instead.')
flags.DEFINE_bool('json', False, 'Print one JSON list of {"path", "caption" and "log_prob" (the '
                  'model\'s log-probability of the caption) | "error"}; a decoder that attends '
                  'adds "tokens", "attention" (an H x W map per token) and "grid" ([H, W]).')
flags.DEFINE_string('output', None, 'Also append each caption to this file: TSV (path, caption), '
                    'or JSON lines for a .jsonl or .json name (the --json fields). Images it '
                    'already holds are skipped.')


def main(argv):
  host_memory.keep_freed_memory()
  paths = argv[1:]
  if not paths:
    raise app.UsageError('Give image files or folders to caption.')
  std_logging.getLogger().setLevel(std_logging.WARNING)
  paths = caption.expand_paths(paths)
  output = None
  if FLAGS.output:
    try:
      done = caption.done_paths(FLAGS.output)
    except (OSError, ValueError) as error:
      raise SystemExit(str(error)) from None
    if done:
      print(f'{FLAGS.output}: {len(done)} image(s) already captioned, skipped', file=sys.stderr)
      paths = [p for p in paths if p not in done]
    output = caption.open_output(FLAGS.output)
  trained = predict.restore_or_exit(FLAGS.workdir, FLAGS.step)
  caption.set_decoding(trained.config, beam=FLAGS.beam, temperature=FLAGS.temperature)
  failed = 0
  progress = tqdm.tqdm(total=len(paths), unit='img', file=sys.stderr, mininterval=1.0,
                       dynamic_ncols=True)
  if FLAGS.json:
    print('[', end='', flush=True)
  for number, (path, result) in enumerate(caption.caption_stream(trained, paths)):
    progress.update()
    if 'error' in result:
      failed += 1
      progress.write(f'{path}: {result["error"]}', file=sys.stderr)
    elif output:
      output.write(caption.output_line(path, result, caption.output_format(FLAGS.output)))
      output.flush()
    if FLAGS.json:  # The entries of one JSON list, each printed as soon as it is made.
      entry = json.dumps([{'path': path, **result}], indent=1)[2:-2]
      progress.write((',\n' if number else '\n') + entry, file=sys.stdout, end='')
    elif 'error' not in result:
      progress.write(f'{path}\t{result["caption"]}', file=sys.stdout)
    sys.stdout.flush()
  progress.close()
  if FLAGS.json:
    print('\n]' if paths else ']', flush=True)
  if output:
    output.close()
  return 1 if failed else 0


if __name__ == '__main__':
  app.run(main)
