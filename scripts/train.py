"""Trains a captioner and evaluates it; resumes from WORKDIR's latest checkpoint.

  python scripts/train.py --config configs/demo.py --workdir workdirs/demo
  python scripts/train.py --config configs/default.py --workdir DIR --config.batch_size=64
  # Two hosts (run on each, same workdir on shared storage; process_id 0 on the first):
  python scripts/train.py --config configs/coco.py --workdir /shared/coco \
      --coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=0
"""

import logging as std_logging

from absl import app
from absl import flags
from absl import logging

from jaxcap import checkpoint
from jaxcap import command_line
from jaxcap import host_memory
from jaxcap import parallel
from jaxcap import train
from jaxcap.data import sources
from jaxcap.models import inception_v3

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, tokenizer, metrics and logs.')
flags.mark_flag_as_required('workdir')
command_line.define_config_flag(help_string='Training configuration file.')
flags.DEFINE_string('coordinator_address', None,
                    'Multi-host: host:port of process 0 (or $JAX_COORDINATOR_ADDRESS). Not needed '
                    'on Cloud TPU, SLURM or Open MPI, which JAX detects.')
flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes ($JAX_NUM_PROCESSES).')
flags.DEFINE_integer('process_id', None,
                     'Multi-host: this process, 0 to num_processes - 1 ($JAX_PROCESS_ID).')


# Libraries whose INFO lines (checkpoint and dataset internals) are hidden; jaxcap's metric
# writer (clu) logs the metrics and the progress.
_QUIET_LIBRARIES = ('/orbax/', '/tensorflow_datasets/')


class _QuietLibraries(std_logging.Filter):

  def filter(self, record):
    return (record.levelno >= std_logging.WARNING or
            not any(name in record.pathname for name in _QUIET_LIBRARIES))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  host_memory.keep_freed_memory()
  logging.get_absl_handler().addFilter(_QuietLibraries())
  parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (sources.DataError, inception_v3.WeightsError,
          checkpoint.CheckpointWriteError) as error:
    raise SystemExit(str(error)) from None  # A message for the user, not a stack trace.


if __name__ == '__main__':
  app.run(main)
