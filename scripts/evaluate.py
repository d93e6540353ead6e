"""Evaluates a trained workdir on a whole split, the way papers report it.

  python scripts/evaluate.py --workdir workdirs/demo --split test --beam 3

Writes WORKDIR/eval/<split>_step<N>_<method>.json (COCO results format, what the COCO caption
evaluation server takes) and ..._metrics.json (BLEU-1..4, METEOR, ROUGE-L, CIDEr from
pycocoevalcap over all references), and prints a one-line summary. With --gallery, also
..._<method>.html: a page of the first --gallery_images images (by id) with their captions,
references and CIDEr-D, that opens from disk.
"""

import logging as std_logging

from absl import app
from absl import flags

from jaxcap import caption
from jaxcap import command_line
from jaxcap import evaluate
from jaxcap import host_memory
from jaxcap import predict
from jaxcap.data import sources

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Training workdir.')
flags.mark_flag_as_required('workdir')
flags.DEFINE_string('split', 'test', 'Split to evaluate.')
command_line.define_step_flag()
flags.DEFINE_integer('beam', None, "Beam size (default: the config's decoding method).")
flags.DEFINE_float('length_penalty', None, 'Beam ranking: log-probability / length ** this.')
flags.DEFINE_bool('gallery', False, 'Also write an HTML page of images, captions and scores.')
flags.DEFINE_integer('gallery_images', 500, 'Images on the gallery page (the first, by id).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  host_memory.keep_freed_memory()
  std_logging.getLogger().setLevel(std_logging.WARNING)
  trained = predict.restore_or_exit(FLAGS.workdir, FLAGS.step)
  caption.set_decoding(trained.config, beam=FLAGS.beam)
  if FLAGS.length_penalty is not None:
    trained.config.decode.length_penalty = FLAGS.length_penalty
  try:
    done = evaluate.evaluate_workdir(trained, FLAGS.workdir, FLAGS.split,
                                     gallery_images=FLAGS.gallery_images if FLAGS.gallery else None)
  except sources.DataError as error:
    raise SystemExit(str(error)) from None
  metrics = done.metrics
  summary = ' '.join(f'{k}={metrics[k]:.3f}' for k in
                     ('bleu_1', 'bleu_4', 'meteor', 'rouge_l', 'cider', 'scene_accuracy',
                      'relation_accuracy')
                     if k in metrics)
  print(f'{FLAGS.split} step {done.step} {done.method}: {summary} | {metrics["num_images"]} '
        f'images, {metrics["captions_per_sec"]:.0f} captions/s | {done.stem}.json' +
        (f' {done.stem}.html' if FLAGS.gallery else ''))


if __name__ == '__main__':
  app.run(main)
