"""A trained captioner from its workdir alone: config, tokenizer and a checkpoint."""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
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


def initial_state(config: ml_collections.ConfigDict, model: nn.Module, mesh: jax.sharding.Mesh,
                  encoder_weights: dict | None = None) -> train_step_lib.TrainState:
  """The full model's state initialised from `config.seed`, replicated over `mesh`, with the
  pretrained encoder variables when given."""
  replicated = parallel.replicated(mesh)
  state = jax.jit(functools.partial(train_step_lib.create_train_state, config, model),
                  out_shardings=replicated)(jax.random.key(config.seed))
  if encoder_weights is not None:
    state = jax.jit(train_step_lib.with_encoder_variables, out_shardings=replicated)(
        state, encoder_weights)
  return state


def initial_decoder_state(config: ml_collections.ConfigDict, model: nn.Module,
                          mesh: jax.sharding.Mesh, embedding_dim: int) -> train_step_lib.TrainState:
  """The decoder alone (training on cached embeddings), replicated over `mesh`."""
  return jax.jit(functools.partial(train_step_lib.create_decoder_state, config, model,
                                   embedding_dim=embedding_dim),
                 out_shardings=parallel.replicated(mesh))(jax.random.key(config.seed))


def trained_on_features(config: ml_collections.ConfigDict) -> bool:
  return bool(config.get('features', {}).get('enabled', False))


def restore(workdir: str, step: int | None = None) -> Trained:
  """The latest checkpoint (or `step`) of a workdir, replicated over all devices.

  A run trained on cached features checkpoints the decoder alone: its encoder comes from
  `config.model.encoder_weights` (or the seeded initialisation the cache was made with).
  """
  config = load_config(workdir)
  tokenizer = tokenizer_lib.Tokenizer.load(os.path.join(workdir, tokenizer_lib.MODEL_FILENAME))
  mesh = parallel.make_mesh()
  model = captioner.create_model(config.model, tokenizer.vocab_size)
  on_features = trained_on_features(config)
  full_state = initial_state(config, model, mesh, captioner.load_encoder_weights(config.model)
                             if on_features else None)
  template = full_state
  if on_features:
    size = config.data.image_size
    embedding_dim = jax.eval_shape(lambda s: s.apply_fn(
        s.variables, jnp.zeros((1, size, size, 3)), method='encode'), full_state).shape[-1]
    template = initial_decoder_state(config, model, mesh, embedding_dim)
  manager = checkpoint.create_manager(workdir, config.keep_checkpoints)
  steps = manager.all_steps()
  if not steps:
    raise FileNotFoundError(f'{workdir}: no checkpoint to restore')
  if step is not None and step not in steps:
    raise ValueError(f'{workdir}: no checkpoint of step {step}; there are {sorted(steps)}')
  state = checkpoint.restore(manager, template, steps[-1] if step is None else step)
  manager.close()
  if on_features:
    state = full_state.replace(step=state.step,
                               params={**full_state.params, 'decoder': state.params['decoder']})
  return Trained(config, tokenizer, state, mesh)
