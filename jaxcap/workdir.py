"""A training workdir: the name of every artefact in it, and its config.json.

  WORKDIR/config.json            the run's config (`write_config`, `load_config`)
  WORKDIR/tokenizer.model        the sentencepiece model
  WORKDIR/checkpoints/           Orbax checkpoints (`jaxcap.checkpoint`)
  WORKDIR/damaged_checkpoints/   checkpoints that failed to restore, kept for inspection
  WORKDIR/metrics.jsonl          every logged metric (`jaxcap.metrics_writer`); TensorBoard events
  WORKDIR/features/              the feature cache, unless config.features.cache_dir says otherwise
  WORKDIR/captions/              each periodic evaluation's captions
  WORKDIR/eval/                  scripts/evaluate.py's captions, metrics and gallery pages

A config.json is read merged onto `configs/default.py`: fields a run was written without take
their defaults, and the fields of older releases map onto today's, here and nowhere else.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any

from flax import traverse_util
import ml_collections

from configs import default

CONFIG = 'config.json'
TOKENIZER = 'tokenizer.model'
CHECKPOINTS = 'checkpoints'
DAMAGED_CHECKPOINTS = 'damaged_checkpoints'
METRICS = 'metrics.jsonl'
FEATURES = 'features'
CAPTIONS = 'captions'
EVAL = 'eval'

# Fields that a resumed run may not change: they change the parameters (their shapes or how
# they were made), the optimizer state's structure or what the tokens mean. Others (steps,
# intervals, learning rate, compute dtype, unrolling, dropout, ...) may change.
RESUME_LOCKED_FIELDS = frozenset({
    'trainer', 'model.decoder', 'model.attention_size', 'model.grid_coordinates', 'model.encoder',
    'model.encoder_weights', 'model.train_encoder',
    'model.small_cnn.features', 'model.small_cnn.pool_before_norm',
    'model.small_cnn.strided_first_conv', 'model.image_bottleneck', 'model.embed_dim',
    'model.lstm_size', 'model.logit_bottleneck', 'data.name', 'data.vocab_size',
    'data.tokenizer_type', 'data.coco_dir', 'data.karpathy_json', 'optimizer.name',
    'scst.init_from'})
_RESUME_LOCKED_PREFIXES = ('data.shapes.',)  # The built-in dataset's generation.


def tokenizer_path(workdir: str) -> str:
  return os.path.join(workdir, TOKENIZER)


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINTS)


def features_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Where a run's feature cache lives: config.features.cache_dir, or WORKDIR/features."""
  return config.features.cache_dir or os.path.join(workdir, FEATURES)


def captions_path(workdir: str, split: str, step: int) -> str:
  return os.path.join(workdir, CAPTIONS, f'{split}_step{step}.json')


def eval_stem(workdir: str, split: str, step: int, method: str) -> str:
  """WORKDIR/eval/SPLIT_stepN_METHOD: the stem of an evaluation's .json, _metrics.json, .html."""
  return os.path.join(workdir, EVAL, f'{split}_step{step}_{method}')


def _flat(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return traverse_util.flatten_dict(json.loads(config.to_json_best_effort()), sep='.')


def _legacy_trainer(fields: dict[str, Any]) -> str:
  """The trainer of a config.json written with booleans instead of `trainer`."""
  if fields.pop('scst.enabled', False):
    return 'scst'
  return 'features' if fields.pop('features.enabled', False) else 'images'


def config_from_dict(values: dict[str, Any], source: str = 'config') -> ml_collections.ConfigDict:
  """`configs/default.py`'s config with the fields of `values` (a config.json's content)."""
  fields = traverse_util.flatten_dict(values, sep='.')
  legacy_trainer = _legacy_trainer(fields)
  fields.setdefault('trainer', legacy_trainer)
  config = default.get_config()
  known = _flat(config)
  for name, value in fields.items():
    if name not in known:
      logging.warning('%s: ignoring config.%s, a field jaxcap does not have', source, name)
      continue
    if isinstance(value, list):
      value = tuple(value)
    parent, _, leaf = name.rpartition('.')
    (config[parent] if parent else config)[leaf] = value
  return config


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained with."""
  path = os.path.join(workdir, CONFIG)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: no training config; is {workdir} a jaxcap workdir?')
  with open(path) as f:
    return config_from_dict(json.load(f), path)


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, CONFIG), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))


def has_checkpoint(workdir: str) -> bool:
  directory = checkpoint_dir(workdir)
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def check_resume(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Stops a run that would resume a checkpoint with a config that changes a locked field;
  logs the harmless changes. A workdir without a checkpoint constrains nothing."""
  if not has_checkpoint(workdir) or not os.path.exists(os.path.join(workdir, CONFIG)):
    return
  old, new = _flat(load_config(workdir)), _flat(config)
  changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
  locked = [k for k in changed
            if k in RESUME_LOCKED_FIELDS or k.startswith(_RESUME_LOCKED_PREFIXES)]
  if locked:
    changes = ', '.join(f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in locked)
    raise ValueError(f'{workdir} holds a run with a different {", ".join(locked)} ({changes}); '
                     'use a new workdir, or the old values, to resume')
  for key in changed:
    logging.info('Resuming with config.%s changed: %r -> %r', key, old.get(key), new.get(key))


def check_is_workdir(path: str | None, field: str) -> str:
  """`path`, if it is a trained jaxcap workdir; else a ValueError naming the config `field`."""
  if not path:
    raise ValueError(f'{field} is not set: it names the workdir of a trained run')
  if not os.path.exists(os.path.join(path, CONFIG)):
    raise FileNotFoundError(f'{field}={path}: not a jaxcap workdir (no {CONFIG}); train it first')
  return path


def copy_tokenizer(source_workdir: str, workdir: str) -> None:
  """Gives a new workdir the tokenizer of the run it starts from (its ids are that run's)."""
  destination, source = tokenizer_path(workdir), tokenizer_path(source_workdir)
  if not os.path.exists(destination) and os.path.exists(source):
    os.makedirs(workdir, exist_ok=True)
    shutil.copyfile(source, destination + '.tmp')
    os.replace(destination + '.tmp', destination)
