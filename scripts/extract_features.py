"""Encodes every image of the training and evaluation splits once into the feature cache.

  python scripts/extract_features.py --config configs/coco_features.py \
      --workdir workdirs/coco_features

Training with `config.trainer='features'` (or 'scst') does this itself when the cache is
missing; running it first lets you size and time it. Interrupted, it resumes after its last
complete part; a cache made by another encoder, image size or preprocessing is rebuilt.
"""


from absl import app
from absl import flags

from jaxcap import command_line
from jaxcap import feature_cache
from jaxcap import host_memory
from jaxcap import parallel
from jaxcap.data import sources
from jaxcap.models import inception_v3

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None,
                    'Training workdir (tokenizer; cache in WORKDIR/features by default).')
flags.mark_flag_as_required('workdir')
command_line.define_config_flag(help_string='Training configuration file.')
flags.DEFINE_list('splits', None,
                  'Splits to encode (default: the training split and the eval splits).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  host_memory.keep_freed_memory()
  parallel.initialize_distributed()
  config = FLAGS.config
  try:
    cached = feature_cache.extract_splits(config, FLAGS.workdir, FLAGS.splits)
  except (sources.DataError, inception_v3.WeightsError) as error:
    raise SystemExit(str(error)) from None
  for split, directory in cached.items():
    found = feature_cache.summary(directory)
    print(f'{split}: {found["images"]} images, features {tuple(found["features_shape"])} '
          f'{config.features.storage_dtype}, {found["bytes"] / 2**20:.1f} MB in {directory}')


if __name__ == '__main__':
  app.run(main)
