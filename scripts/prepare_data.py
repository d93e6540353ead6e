"""Builds or checks a config's dataset and tokenizer, and reports on every split.

  python scripts/prepare_data.py --config configs/coco.py --workdir workdirs/coco \
      --config.data.coco_dir=/data/coco --input_speed_batches=50
  python scripts/prepare_data.py --config configs/flickr8k.py --workdir workdirs/flickr8k \
      --config.data.karpathy_json=/data/dataset_flickr8k.json \
      --config.data.image_dir=/data/Flicker8k_Dataset

Training runs the same preparation; this shows what it found before any model is built.
"""

import logging as std_logging

from absl import app
from absl import flags

from jaxcap import command_line
from jaxcap.data import caption_files
from jaxcap.data import captions as captions_lib
from jaxcap.data import prepare
from jaxcap.data import sources

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Workdir whose tokenizer to train or check.')
flags.mark_flag_as_required('workdir')
command_line.define_config_flag(help_string='Training configuration file.')
flags.DEFINE_integer('input_speed_batches', 0,
                     'Also time this many training batches of the input pipeline alone.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  std_logging.getLogger().setLevel(std_logging.WARNING)
  config = FLAGS.config
  try:
    prepared = prepare.prepare(config, FLAGS.workdir)
  except sources.DataError as error:
    raise SystemExit(str(error)) from None
  skipped = prepare.skipped_by_split(prepared.builder)
  print(f'Dataset {prepared.builder.info.full_name} in {prepared.builder.data_dir}')
  rule, empty = caption_files.split_notes(prepared.builder)
  if rule:
    print(f'Splits: {rule}')
  for split, reason in empty.items():
    print(f'{split}: no images, left out ({reason})')
  print(f'Tokenizer: {prepared.tokenizer.vocab_size} ids in {FLAGS.workdir}')
  splits = dict.fromkeys([prepared.train_split, *config.data.eval_splits])
  for split in splits:
    captions = (prepared.train_captions if split == prepared.train_split
                else captions_lib.read_captions(prepared.builder, split))
    report = prepare.split_report(captions, prepared.tokenizer)
    small = (f' (fewer than {prepare.FEW_IMAGES}: its metrics will be noisy)'
             if split != prepared.train_split and report['images'] < prepare.FEW_IMAGES else '')
    print(f'{split}: {report["images"]} images{small}, {report["captions"]} captions '
          f'(per image: {report["captions_per_image"]}), words per caption '
          f'p5/p50/p95/max {report["words_p5"]:.0f}/{report["words_p50"]:.0f}/'
          f'{report["words_p95"]:.0f}/{report["words_p100"]:.0f}, '
          f'unknown tokens {100 * report["unknown_token_rate"]:.2f}%')
  for split, reasons in sorted(skipped.items()):
    for reason, count in reasons.most_common():
      print(f'skipped ({split}): {count} x {reason}')
  if not skipped:
    print('skipped: nothing')
  if FLAGS.input_speed_batches:
    speed = prepare.input_images_per_sec(prepared, config, FLAGS.input_speed_batches)
    print(f'input pipeline: {speed:.0f} images/s ({config.batch_size} per batch, '
          f'{FLAGS.input_speed_batches} batches)')


if __name__ == '__main__':
  app.run(main)
