"""Train state, optimizer, loss, and the pure per-step functions.

Nothing here imports TensorFlow: benchmarks and accelerator-only machines use these functions
directly. The training loop around them lives in `jaxcap.train`.
"""

from __future__ import annotations

import zlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state

from jaxcap.data.tokenizer import PAD_ID

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


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


def _dropout_rngs(state: TrainState, dropout_key: jax.Array | None) -> dict[str, jax.Array]:
  """The step's dropout rng: a pure function of (key, step), so a resumed run replays it."""
  return {} if dropout_key is None else {'dropout': jax.random.fold_in(dropout_key, state.step)}


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  opt = config.optimizer
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt.learning_rate, warmup_steps=opt.warmup_steps,
      decay_steps=max(config.num_train_steps, opt.warmup_steps + 1),
      end_value=opt.learning_rate * opt.end_learning_rate_factor)


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
      return {name: jax.tree.map(lambda _: 'frozen' if name == 'encoder' else 'trained', tree)
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


def with_encoder_variables(state: TrainState, variables: dict[str, Any]) -> TrainState:
  """The state with the encoder's parameters and batch-norm statistics replaced (pretrained).

  Adam's moments start at zero whatever the parameters, so the optimizer state stays valid.
  """
  def replace(tree, new):
    jax.tree.map(_check_same_shape, tree['encoder'], new)
    return {**tree, 'encoder': jax.tree.map(lambda old, x: jnp.asarray(x, old.dtype), tree['encoder'], new)}
  return state.replace(params=replace(state.params, variables['params']),
                       batch_stats=replace(state.batch_stats, variables['batch_stats']))


def _check_same_shape(expected, actual):
  if expected.shape != actual.shape:
    raise ValueError(f'pretrained encoder variable of shape {actual.shape}, model expects {expected.shape}')


def _teacher_forced_step(state: TrainState, tokens: jax.Array, loss_sums_fn) -> tuple[TrainState, Metrics]:
  """One optimizer step on the masked loss; `loss_sums_fn(params, inputs, targets, weights)`
  returns ((loss_sum, correct_sum), variable_updates)."""
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  weights = (targets != PAD_ID).astype(jnp.float32)
  num_tokens = jnp.maximum(jnp.sum(weights), 1.0)

  def loss_fn(params):
    (loss_sum, correct), updates = loss_sums_fn(params, inputs, targets, weights)
    return loss_sum / num_tokens, (updates, correct / num_tokens)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, (updates, accuracy)), grads = grad_fn(state.params)
  new_state = state.apply_gradients(grads=grads,
                                    batch_stats=updates.get('batch_stats', state.batch_stats))
  grad_norm = optax.global_norm(grads)
  metrics = {'loss': loss, 'token_accuracy': accuracy, 'num_tokens': num_tokens,
             'grad_norm': grad_norm,
             # Checked by the loop when it next syncs (logging, checkpoints): no sync per step.
             'finite': jnp.isfinite(loss) & jnp.isfinite(grad_norm)}
  return new_state, metrics


def train_step(state: TrainState, batch: Batch,
               dropout_key: jax.Array | None = None) -> tuple[TrainState, Metrics]:
  """One teacher-forced step on {'image': (B, H, W, 3), 'tokens': (B, L)}; loss masks PAD.
  A model with dropout needs `dropout_key`."""
  def loss_sums_fn(params, inputs, targets, weights):
    variables = {'params': params, 'batch_stats': state.batch_stats}
    return state.apply_fn(variables, batch['image'], inputs, targets, weights, train=True,
                          method='loss_sums', mutable=['batch_stats'],
                          rngs=_dropout_rngs(state, dropout_key))
  return _teacher_forced_step(state, batch['tokens'], loss_sums_fn)


def create_decoder_state(config: ml_collections.ConfigDict, model: nn.Module, rng: jax.Array,
                         embedding_dim: int) -> TrainState:
  """State of the decoder alone, for training on precomputed (cached) image embeddings."""
  embedding = jnp.zeros((1, embedding_dim), jnp.float32)
  tokens = jnp.zeros((1, config.data.max_len - 1), jnp.int32)
  variables = model.init({'params': rng}, embedding, tokens, method='caption_logits')
  return TrainState.create(apply_fn=model.apply, params=variables['params'], batch_stats={},
                           tx=make_optimizer(config))


def decoder_train_step(state: TrainState, batch: Batch,
                       dropout_key: jax.Array | None = None) -> tuple[TrainState, Metrics]:
  """One teacher-forced step on {'embedding': (B, D), 'tokens': (B, L)}: the decoder alone.

  Any caption length L works (one compilation per length): batches cut to their longest
  caption (`length_buckets`) spend no work on padding columns.
  """
  def loss_sums_fn(params, inputs, targets, weights):
    sums = state.apply_fn({'params': params}, batch['embedding'], inputs, targets, weights,
                          train=True, method='caption_loss_sums',
                          rngs=_dropout_rngs(state, dropout_key))
    return sums, {}
  return _teacher_forced_step(state, batch['tokens'], loss_sums_fn)


def eval_step(state: TrainState, batch: Batch) -> Metrics:
  """Loss sums over every caption of every image: 'tokens' is (B, C, L), 'mask' (B,)."""
  variables = state.variables
  embedding = state.apply_fn(variables, batch['image'], method='encode')
  num_images, num_captions, max_len = batch['tokens'].shape
  tokens = batch['tokens'].reshape(num_images * num_captions, max_len)
  embedding = jnp.repeat(embedding, num_captions, axis=0)
  targets = tokens[:, 1:]
  image_mask = jnp.repeat(batch['mask'], num_captions)[:, None]
  weights = ((targets != PAD_ID) & (image_mask > 0)).astype(jnp.float32)
  loss_sum, correct = state.apply_fn(variables, embedding, tokens[:, :-1], targets, weights,
                                     method='caption_loss_sums')
  num_tokens = jnp.sum(weights)
  return {'loss_sum': loss_sum, 'correct': correct, 'num_tokens': num_tokens}
