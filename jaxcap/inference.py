"""A trained captioner from its workdir alone: config, tokenizer and a checkpoint."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil

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
                  out_shardings=replicated)(train_step_lib.named_key(config.seed, 'params'))
  if encoder_weights is not None:
    state = jax.jit(train_step_lib.with_encoder_variables, out_shardings=replicated)(
        state, encoder_weights)
  return state


def initial_decoder_state(config: ml_collections.ConfigDict, model: nn.Module,
                          mesh: jax.sharding.Mesh, embedding_dim: int) -> train_step_lib.TrainState:
  """The decoder alone (training on cached embeddings), replicated over `mesh`."""
  return jax.jit(functools.partial(train_step_lib.create_decoder_state, config, model,
                                   embedding_dim=embedding_dim),
                 out_shardings=parallel.replicated(mesh))(train_step_lib.named_key(config.seed, 'params'))


def trained_on_features(config: ml_collections.ConfigDict) -> bool:
  return bool(config.get('features', {}).get('enabled', False))


def self_critical(config: ml_collections.ConfigDict) -> bool:
  return bool(config.get('scst', {}).get('enabled', False))


def _check_init_from(config: ml_collections.ConfigDict) -> str:
  init_from = config.scst.init_from
  if not init_from:
    raise ValueError('config.scst.enabled=True needs config.scst.init_from: the workdir of a '
                     'cross-entropy run to start from')
  if not os.path.exists(os.path.join(init_from, CONFIG_FILENAME)):
    raise FileNotFoundError(f'config.scst.init_from={init_from}: not a jaxcap workdir (no '
                            f'{CONFIG_FILENAME}); train it first')
  return init_from


def copy_tokenizer(init_from: str, workdir: str) -> None:
  """Gives a new self-critical workdir the tokenizer of the run it starts from."""
  destination = os.path.join(workdir, tokenizer_lib.MODEL_FILENAME)
  source = os.path.join(init_from or '', tokenizer_lib.MODEL_FILENAME)
  if not os.path.exists(destination) and os.path.exists(source):
    os.makedirs(workdir, exist_ok=True)
    shutil.copyfile(source, destination + '.tmp')
    os.replace(destination + '.tmp', destination)


def init_from_state(config: ml_collections.ConfigDict,
                    template: train_step_lib.TrainState) -> train_step_lib.TrainState:
  """`template` (this config's initial full state) with the model of the latest checkpoint of
  `config.scst.init_from`: where self-critical training starts, and where its encoder comes
  from. The optimizer state and step stay the template's (a fresh start)."""
  init_from = _check_init_from(config)
  start = restore(init_from).state
  layout = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
  if layout(start.params) != layout(template.params):
    raise ValueError(f'config.scst.init_from={init_from} holds a different model than '
                     'config.model (or another vocabulary size): use the model fields of its '
                     f'{CONFIG_FILENAME}')
  return template.replace(params=start.params, batch_stats=start.batch_stats)


def with_trained_decoder(full_state: train_step_lib.TrainState,
                         decoder_state: train_step_lib.TrainState) -> train_step_lib.TrainState:
  """`full_state` with the decoder of a state trained on cached embeddings: the full model."""
  return full_state.replace(params={**full_state.params, 'decoder': decoder_state.params['decoder']})


def restore(workdir: str, step: int | None = None) -> Trained:
  """The latest checkpoint (or `step`) of a workdir, replicated over all devices.

  A run trained on cached features checkpoints the decoder alone: its encoder comes from
  `config.model.encoder_weights` (or the seeded initialisation the cache was made with), or,
  for self-critical training, from `config.scst.init_from`'s checkpoint.
  """
  config = load_config(workdir)
  tokenizer = tokenizer_lib.Tokenizer.load(os.path.join(workdir, tokenizer_lib.MODEL_FILENAME))
  mesh = parallel.make_mesh()
  model = captioner.create_model(config.model, tokenizer.vocab_size)
  on_features = trained_on_features(config)
  full_state = initial_state(config, model, mesh, captioner.load_encoder_weights(config.model)
                             if on_features else None)
  if self_critical(config):
    full_state = init_from_state(config, full_state)
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
    state = with_trained_decoder(full_state, state).replace(step=state.step)
  return Trained(config, tokenizer, state, mesh)


def restore_or_exit(workdir: str, step: int | None = None) -> Trained:
  """`restore` for scripts: a folder that is not a trained workdir, or a step it does not
  hold, ends the program with the message (exit code 1) instead of a traceback."""
  try:
    return restore(workdir, step)
  except (FileNotFoundError, ValueError) as error:
    raise SystemExit(str(error)) from None
