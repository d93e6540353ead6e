"""Train states: the optimizer and its schedule, the full model's state and the decoder's alone,
and the ways one is made from another (pretrained encoder, trained decoder, another run's model).

Nothing here imports TensorFlow: benchmarks and accelerator-only machines build states too.
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
from typing import Any
import zlib

import flax.linen as nn
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxcap import parallel


class TrainState(train_state.TrainState):
  batch_stats: Any

  @property
  def variables(self) -> dict[str, Any]:
    """The model variables for `apply_fn` outside training: parameters and batch statistics."""
    return {'params': self.params, 'batch_stats': self.batch_stats}


def rng_stream(seed_key: jax.Array, name: str) -> jax.Array:
  """A key of its own for one use of randomness (`name`), derived from the run's seed key."""
  return jax.random.fold_in(seed_key, zlib.crc32(name.encode()))


def named_key(seed: int, name: str) -> jax.Array:
  """The key of one use of randomness (`name`: 'params', 'dropout', 'order', 'decode', ...)
  for a run seeded with `seed`, as the Flax examples split one key per use."""
  return rng_stream(jax.random.key(seed), name)


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  opt = config.optimizer
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt.learning_rate, warmup_steps=opt.warmup_steps,
      decay_steps=max(config.num_train_steps, opt.warmup_steps + 1),
      end_value=opt.learning_rate * opt.end_learning_rate_factor)


def _label_leaves(tree, label: str):
  return jax.tree.map(lambda _: label, tree)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam or AdamW on a warmup + cosine schedule, with global-norm clipping.

  A frozen encoder (`config.model.train_encoder=False`) gets no updates at all, so AdamW's
  weight decay cannot move pretrained weights either.
  """
  opt = config.optimizer
  schedule = learning_rate_schedule(config)
  if opt.name == 'adam':
    tx = optax.adam(schedule)
  elif opt.name == 'adamw':
    tx = optax.adamw(schedule, weight_decay=opt.weight_decay)
  else:
    raise ValueError(f"config.optimizer.name={opt.name!r} is not 'adam' or 'adamw'")
  if opt.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), tx)
  if not config.model.train_encoder:
    def labels(params):
      return {name: _label_leaves(tree, 'frozen' if name == 'encoder' else 'trained')
              for name, tree in params.items()}
    tx = optax.multi_transform({'trained': tx, 'frozen': optax.set_to_zero()}, labels)
  return tx


def create_train_state(config: ml_collections.ConfigDict, model: nn.Module,
                       rng: jax.Array) -> TrainState:
  """Randomly initialised state; call under jit to build it directly on the devices."""
  size = config.data.image_size
  images = jnp.zeros((1, size, size, 3), jnp.float32)
  tokens = jnp.zeros((1, config.data.max_len - 1), jnp.int32)
  variables = model.init({'params': rng}, images, tokens, train=False)
  return TrainState.create(apply_fn=model.apply, params=variables['params'],
                           batch_stats=variables.get('batch_stats', {}),
                           tx=make_optimizer(config))


def create_decoder_state(config: ml_collections.ConfigDict, model: nn.Module, rng: jax.Array,
                         features_shape: int | Sequence[int]) -> TrainState:
  """State of the decoder alone, for training on precomputed (cached) image features of one
  image's `features_shape` ((D,) embeddings, or (H, W, C) grids; an int is (D,))."""
  if isinstance(features_shape, int):
    features_shape = (features_shape,)
  embedding = jnp.zeros((1, *features_shape), jnp.float32)
  tokens = jnp.zeros((1, config.data.max_len - 1), jnp.int32)
  variables = model.init({'params': rng}, embedding, tokens, method='caption_logits')
  return TrainState.create(apply_fn=model.apply, params=variables['params'], batch_stats={},
                           tx=make_optimizer(config))


def with_encoder_variables(state: TrainState, variables: dict[str, Any]) -> TrainState:
  """The state with the encoder's parameters and batch-norm statistics replaced (pretrained).

  Adam's moments start at zero whatever the parameters, so the optimizer state stays valid.
  """
  def replace(tree, new):
    jax.tree.map(_check_same_shape, tree['encoder'], new)
    encoder = jax.tree.map(lambda old, x: jnp.asarray(x, old.dtype), tree['encoder'], new)
    return {**tree, 'encoder': encoder}
  return state.replace(params=replace(state.params, variables['params']),
                       batch_stats=replace(state.batch_stats, variables['batch_stats']))


def _check_same_shape(expected, actual):
  if expected.shape != actual.shape:
    raise ValueError(f'pretrained encoder variable of shape {actual.shape}, model expects '
                     f'{expected.shape}')


def initial_state(config: ml_collections.ConfigDict, model: nn.Module, mesh: jax.sharding.Mesh,
                  encoder_weights: dict | None = None) -> TrainState:
  """The full model's state initialised from `config.seed`, replicated over `mesh`, with the
  pretrained encoder variables when given.

  One program: the random encoder that the pretrained one replaces is never computed (XLA drops
  it), which leaves InceptionV3's initialisation out of the compilation."""
  def create(rng, encoder_weights):
    state = create_train_state(config, model, rng)
    return state if encoder_weights is None else with_encoder_variables(state, encoder_weights)
  return jax.jit(create, out_shardings=parallel.replicated(mesh))(
      named_key(config.seed, 'params'), encoder_weights)


def abstract_state(config: ml_collections.ConfigDict, model: nn.Module,
                   mesh: jax.sharding.Mesh) -> TrainState:
  """The full model's state as shapes, dtypes and (replicated) shardings, computing nothing:
  what a full checkpoint restores into without initialising the model first."""
  replicated = parallel.replicated(mesh)
  shapes = jax.eval_shape(functools.partial(create_train_state, config, model),
                          named_key(config.seed, 'params'))
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                      shapes)


def initial_decoder_state(config: ml_collections.ConfigDict, model: nn.Module,
                          mesh: jax.sharding.Mesh,
                          features_shape: int | Sequence[int]) -> TrainState:
  """The decoder alone (training on cached image features), replicated over `mesh`."""
  create = functools.partial(create_decoder_state, config, model,
                             features_shape=tuple(np.atleast_1d(features_shape).tolist()))
  return jax.jit(create, out_shardings=parallel.replicated(mesh))(
      named_key(config.seed, 'params'))


def features_shape(config: ml_collections.ConfigDict, full_state: TrainState) -> tuple[int, ...]:
  """One image's features from the encoder ((D,) or (H, W, C)): what the decoder-only state is
  built for."""
  size = config.data.image_size
  return jax.eval_shape(lambda s: s.apply_fn(
      s.variables, jnp.zeros((1, size, size, 3)), method='encode'), full_state).shape[1:]


def with_trained_decoder(full_state: TrainState, decoder_state: TrainState) -> TrainState:
  """`full_state` with the decoder of a state trained on cached embeddings: the full model."""
  return full_state.replace(
      params={**full_state.params, 'decoder': decoder_state.params['decoder']})


def with_model_of(template: TrainState, source: TrainState, where: str) -> TrainState:
  """`template` with the parameters and batch statistics of `source` (another run's model,
  from `where`); the optimizer state and step stay the template's (a fresh start)."""
  layout = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
  if layout(source.params) != layout(template.params):
    raise ValueError(f'{where} holds a different model than config.model (or another '
                     'vocabulary size): use the model fields of its config.json')
  return template.replace(params=source.params, batch_stats=source.batch_stats)
