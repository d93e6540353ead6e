"""The ways a model trains, one module each, chosen by `config.trainer`:

  'images'    encoder and decoder on batches of images from tf.data, one jitted step per batch
  'features'  the decoder alone on cached embeddings of a frozen encoder, resident on the
              devices, `config.resident.steps_per_call` steps per jitted call
  'scst'      self-critical fine-tuning of `config.scst.init_from`'s decoder on cached
              embeddings, with its CIDEr-D reward computed in the step

Each module's `build(setup)` returns the `Trainer` the loop (`jaxcap.train`) drives; `make(...)`
builds the same trainer from arrays (what `jaxcap/benchmark.py` times). None imports TensorFlow.
"""

from __future__ import annotations

import ml_collections

from jaxcap.trainers import features
from jaxcap.trainers import images
from jaxcap.trainers import scst
from jaxcap.trainers.base import Setup
from jaxcap.trainers.base import Trainer

TRAINERS = {'images': images, 'features': features, 'scst': scst}

__all__ = ['TRAINERS', 'Setup', 'Trainer', 'build', 'check_trainer', 'on_features']


def check_trainer(config: ml_collections.ConfigDict) -> str:
  """`config.trainer`, after checking it names a trainer the rest of the config allows."""
  name = config.trainer
  if name not in TRAINERS:
    raise ValueError(f'config.trainer={name!r} is not one of {", ".join(map(repr, TRAINERS))}')
  if name != 'images' and config.model.train_encoder:
    raise ValueError(f"config.trainer={name!r} trains on cached embeddings of a frozen encoder: "
                     'set config.model.train_encoder=False')
  return name


def on_features(config: ml_collections.ConfigDict) -> bool:
  """Whether the run trains the decoder alone on cached embeddings (its checkpoints hold the
  decoder; the encoder is the frozen one the cache was made with)."""
  return check_trainer(config) != 'images'


def build(setup: Setup) -> Trainer:
  """The trainer `setup.config` asks for, from the latest checkpoint if there is one."""
  config = setup.config
  trainer = TRAINERS[check_trainer(config)].build(setup)
  for field in ('log_every_steps', 'eval_every_steps', 'checkpoint_every_steps'):
    if config[field] % trainer.steps_per_call:
      raise ValueError(f'config.{field}={config[field]} is not a multiple of '
                       f'config.resident.steps_per_call={trainer.steps_per_call}')
  return trainer
