"""Evaluates a trained workdir on a whole split, the way papers report it.

  python scripts/evaluate.py --workdir workdirs/demo --split test --beam 3

Writes WORKDIR/eval/<split>_step<N>_<method>.json (COCO results format, what the COCO caption
evaluation server takes) and ..._metrics.json (BLEU-1..4, METEOR, ROUGE-L, CIDEr from
pycocoevalcap over all references), and prints a one-line summary. With --gallery, also
..._<method>.html: a page of the first --gallery_images images (by id) with their captions,
references and CIDEr-D, that opens from disk.
"""

import json
import logging as std_logging
import os
import pathlib
import sys

from absl import app
from absl import flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from jaxcap import caption  # pylint: disable=g-import-not-at-top
from jaxcap import evaluate  # pylint: disable=g-import-not-at-top
from jaxcap import gallery  # pylint: disable=g-import-not-at-top
from jaxcap import host_memory  # pylint: disable=g-import-not-at-top
from jaxcap import inference  # pylint: disable=g-import-not-at-top
from jaxcap.data import input_pipeline  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Training workdir.')
flags.mark_flag_as_required('workdir')
flags.DEFINE_string('split', 'test', 'Split to evaluate.')
flags.DEFINE_integer('step', None, 'Checkpoint step (default: latest).')
flags.DEFINE_integer('beam', None, "Beam size (default: the config's decoding method).")
flags.DEFINE_float('length_penalty', None, 'Beam ranking: log-probability / length ** this.')
flags.DEFINE_bool('gallery', False, 'Also write an HTML page of images, captions and scores.')
flags.DEFINE_integer('gallery_images', 500, 'Images on the gallery page (the first, by id).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  host_memory.keep_freed_memory()
  std_logging.getLogger().setLevel(std_logging.WARNING)
  trained = inference.restore_or_exit(FLAGS.workdir, FLAGS.step)
  config = trained.config
  caption.set_decoding(config, beam=FLAGS.beam)
  if FLAGS.length_penalty is not None:
    config.decode.length_penalty = FLAGS.length_penalty
  try:
    builder = input_pipeline.get_builder(config.data)
    split = input_pipeline.resolve_split(builder, FLAGS.split, '--split')
  except input_pipeline.DataError as error:
    raise SystemExit(str(error)) from None
  evaluator = evaluate.SplitEvaluator(builder, trained.tokenizer, config, trained.mesh)
  result = evaluator(trained.state, split)
  step = int(trained.state.step)
  method = config.decode.method + (str(config.decode.beam_size) if config.decode.method == 'beam' else '')
  stem = os.path.join(FLAGS.workdir, 'eval', f'{FLAGS.split}_step{step}_{method}')
  evaluate.write_results_file(stem + '.json', result.generated)
  record = {'step': step, 'split': FLAGS.split, 'decode': config.decode.to_dict(), **result.metrics}
  with open(stem + '_metrics.json', 'w') as f:
    json.dump(record, f, indent=1)
  metrics = result.metrics
  if FLAGS.gallery:
    shown = sorted(result.generated)[:max(FLAGS.gallery_images, 0)]
    entries = gallery.entries(result.generated, result.cider_d, evaluator.references(split),
                              input_pipeline.encoded_images(builder, split, shown),
                              scene_check=config.data.name == 'shapes_captions')
    gallery.write(stem + '.html', f'{FLAGS.split} · step {step} · {method} · {config.data.name}',
                  metrics, entries, len(result.generated))
  summary = ' '.join(f'{k}={metrics[k]:.3f}' for k in
                     ('bleu_1', 'bleu_4', 'meteor', 'rouge_l', 'cider', 'scene_accuracy') if k in metrics)
  print(f'{FLAGS.split} step {step} {method}: {summary} | {metrics["num_images"]} images, '
        f'{metrics["captions_per_sec"]:.0f} captions/s | {stem}.json' +
        (f' {stem}.html' if FLAGS.gallery else ''))


if __name__ == '__main__':
  app.run(main)
