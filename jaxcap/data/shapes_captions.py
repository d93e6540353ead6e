"""tfds builder for the built-in shape-scene caption dataset (no downloads).

The features are those of tfds `coco_captions` (`image`, `image/id`, `image/filename`,
`captions` = Sequence of {`id`, `text`}), so one input pipeline serves both datasets.
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from jaxcap.data import shapes

_SPLITS = ('train', 'val', 'test')
# Image ids of split k start at k * _ID_STRIDE, so ids are unique across splits.
_ID_STRIDE = 10_000_000


@dataclasses.dataclass(kw_only=True)
class ShapesCaptionsConfig(tfds.core.BuilderConfig):
  image_size: int = 64
  min_objects: int = 1
  max_objects: int = 3
  seed: int = 0
  train_size: int = 8000
  val_size: int = 500
  test_size: int = 500
  relations: bool = False


class ShapesCaptions(tfds.core.GeneratorBasedBuilder):
  """Rendered shape scenes, five captions each, deterministic for a seed."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [ShapesCaptionsConfig(name='default')]

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return self.dataset_info_from_configs(
        description='Procedurally rendered shapes with COCO-style captions.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(size, size, 3), encoding_format='png'),
            'image/id': np.int64,
            'image/filename': tfds.features.Text(),
            'captions': tfds.features.Sequence({'id': np.int64, 'text': np.str_}),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {name: self._generate_examples(index, name) for index, name in enumerate(_SPLITS)}

  def _generate_examples(self, split_index: int, split: str):
    config = self.builder_config
    for index in range(getattr(config, f'{split}_size')):
      example = shapes.make_example(
          config.seed, split_index, index, image_size=config.image_size,
          min_objects=config.min_objects, max_objects=config.max_objects,
          relations=config.relations)
      image_id = split_index * _ID_STRIDE + index
      yield image_id, {
          'image': example.image,
          'image/id': image_id,
          'image/filename': f'{split}_{index:07d}.png',
          'captions': [{'id': image_id * 10 + k, 'text': text}
                       for k, text in enumerate(example.captions)],
      }


def builder_from_config(shapes_config: ml_collections.ConfigDict,
                        data_dir: str | None) -> ShapesCaptions:
  """A builder whose tfds config name encodes every generation parameter."""
  fields = {f.name: shapes_config[f.name] for f in dataclasses.fields(ShapesCaptionsConfig)
            if f.name != 'name' and f.name in shapes_config}
  config = ShapesCaptionsConfig(name='default', **fields)
  config = dataclasses.replace(config, name=(
      f'px{config.image_size}_obj{config.min_objects}to{config.max_objects}_seed{config.seed}'
      f'_n{config.train_size}_{config.val_size}_{config.test_size}'
      f'{"_relations" if config.relations else ""}'))
  return ShapesCaptions(config=config, data_dir=data_dir)
