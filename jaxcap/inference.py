"""A trained captioner from its workdir alone: config, tokenizer and a checkpoint."""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import ml_collections

from jaxcap import checkpoint
from jaxcap import parallel
from jaxcap import train_step as train_step_lib
from jaxcap.data import tokenizer as tokenizer_lib
from jaxcap.models import captioner

CONFIG_FILENAME = 'config.json'


@dataclasses.dataclass
class Trained:
  config: ml_collections.ConfigDict
  tokenizer: tokenizer_lib.Tokenizer
  state: train_step_lib.TrainState
  mesh: jax.sharding.Mesh


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILENAME)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: no training config; is {workdir} a jaxcap workdir?')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def restore(workdir: str, step: int | None = None) -> Trained:
  """The latest checkpoint (or `step`) of a workdir, replicated over all devices."""
  config = load_config(workdir)
  tokenizer = tokenizer_lib.Tokenizer.load(os.path.join(workdir, tokenizer_lib.MODEL_FILENAME))
  mesh = parallel.make_mesh()
  model = captioner.create_model(config.model, tokenizer.vocab_size)
  template = jax.jit(functools.partial(train_step_lib.create_train_state, config, model),
                     out_shardings=parallel.replicated(mesh))(jax.random.key(0))
  manager = checkpoint.create_manager(workdir, config.keep_checkpoints)
  steps = manager.all_steps()
  if not steps:
    raise FileNotFoundError(f'{workdir}: no checkpoint to restore')
  if step is not None and step not in steps:
    raise ValueError(f'{workdir}: no checkpoint of step {step}; there are {sorted(steps)}')
  state = checkpoint.restore(manager, template, steps[-1] if step is None else step)
  manager.close()
  return Trained(config, tokenizer, state, mesh)
