"""Converts Keras InceptionV3 weights to a directory the captioner loads.

  python scripts/convert_weights.py \
      --keras inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5 \
      --output weights/inception_v3_notop
  python scripts/convert_weights.py --keras imagenet --output weights/inception_v3_notop

`--keras imagenet` asks Keras to download its ImageNet file (needs the internet and TensorFlow).
Then train with `--config.model.encoder_weights=weights/inception_v3_notop`.
"""

import pathlib

from absl import app
from absl import flags

from jaxcap.models import inception_v3

FLAGS = flags.FLAGS
flags.DEFINE_string('keras', None, "A Keras weights file (.h5 or .weights.h5), or 'imagenet'.")
flags.DEFINE_string('output', None, 'Directory to write the converted weights to.')
flags.DEFINE_bool('include_top', False, 'Convert the 1000-way classifier too (not for captioning).')
flags.mark_flags_as_required(['keras', 'output'])


def download_imagenet_weights(include_top: bool) -> str:
  """The path of Keras' ImageNet file, downloaded into ~/.keras/models if not there yet."""
  import keras
  from keras.src.applications import inception_v3 as keras_inception
  url = keras_inception.WEIGHTS_PATH if include_top else keras_inception.WEIGHTS_PATH_NO_TOP
  try:
    return keras.utils.get_file(url.rsplit('/', 1)[-1], url, cache_subdir='models')
  except Exception as error:
    raise SystemExit(
        f'Could not download the Keras ImageNet weights from {url} ({error}).\n'
        'On a machine with internet access, run this script there, or download that file and '
        'pass its path: --keras PATH.') from error


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  source = (download_imagenet_weights(FLAGS.include_top) if FLAGS.keras == 'imagenet'
            else FLAGS.keras)
  if not pathlib.Path(source).is_file():
    raise SystemExit(f'{source}: no such weights file')
  try:
    variables = inception_v3.load_keras_weights(source, include_top=FLAGS.include_top)
  except inception_v3.WeightsError as error:
    raise SystemExit(f'Conversion failed: {error}') from error
  inception_v3.save_pretrained(
      variables, FLAGS.output, source=source, include_top=FLAGS.include_top)
  manifest = inception_v3.read_manifest(FLAGS.output)
  print(f'Wrote {FLAGS.output}: {manifest}')


if __name__ == '__main__':
  app.run(main)
