"""Rehearses the main job at COCO's counts (or a fraction) and records each phase's time and
peak memory.

  python scripts/rehearse.py --workdir workdirs/rehearsal --scale 0.1
  python scripts/rehearse.py --workdir workdirs/rehearsal_full --scale 1

Writes a COCO-like dataset of Karpathy's split sizes times --scale (jaxcap/rehearsal.py), then
runs, each as its own process with configs/rehearsal.py: the dataset build and tokenizer, the
pooled and grid feature caches, resident training of show_tell and updown with periodic
validation and the final test report (beam 3), self-critical training, evaluate.py with a
gallery of the test split, and caption.py over a folder of 50,000 images (times --scale). Prints
a table of the phases (also in WORKDIR/phases.json; each phase's log in WORKDIR/logs/).
"""

from absl import app
from absl import flags

from jaxcap import rehearsal

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Folder for the dataset, the workdirs and the logs.')
flags.mark_flag_as_required('workdir')
flags.DEFINE_float('scale', 1.0, "Fraction of COCO's image counts.")
flags.DEFINE_integer('train_steps', None, "Training steps of each run (default: the config's).")
flags.DEFINE_multi_string('set', [], 'A config override for every phase, as config.FIELD=VALUE '
                          '(e.g. --set=config.batch_size=64); repeat for more.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if any(not o.startswith('config.') for o in FLAGS.set):
    raise app.UsageError(f'--set takes config.FIELD=VALUE: {FLAGS.set}')
  phases = rehearsal.run(FLAGS.workdir, FLAGS.scale, train_steps=FLAGS.train_steps,
                         overrides=[f'--{o}' for o in FLAGS.set])
  print('| phase | wall time | peak RSS |\n|---|---|---|')
  for phase in phases:
    print(f'| {phase.name} | {phase.seconds:.0f} s | {phase.peak_rss_mb:,.0f} MB |', flush=True)


if __name__ == '__main__':
  app.run(main)
