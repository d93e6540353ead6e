"""The pure per-step functions: `(state, batch) -> (state, metrics)` and the evaluation loss.

Nothing here imports TensorFlow: benchmarks and accelerator-only machines use these functions
directly. The trainers (`jaxcap.trainers`) jit them; the loop around them is `jaxcap.train`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxcap.data.tokenizer import PAD_ID
from jaxcap.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def _dropout_rngs(state: TrainState, dropout_key: jax.Array | None) -> dict[str, jax.Array]:
  """The step's dropout rng: a pure function of (key, step), so a resumed run replays it."""
  return {} if dropout_key is None else {'dropout': jax.random.fold_in(dropout_key, state.step)}


def _teacher_forced_gradients(params, tokens: jax.Array, loss_sums_fn):
  """(grads, variable_updates, metrics) of the masked loss at `params`;
  `loss_sums_fn(params, inputs, targets, weights)` returns ((loss_sum, correct_sum),
  variable_updates)."""
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  weights = (targets != PAD_ID).astype(jnp.float32)
  num_tokens = jnp.maximum(jnp.sum(weights), 1.0)

  def loss_fn(params):
    (loss_sum, correct), updates = loss_sums_fn(params, inputs, targets, weights)
    return loss_sum / num_tokens, (updates, correct / num_tokens)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, (updates, accuracy)), grads = grad_fn(params)
  return grads, updates, {'loss': loss, 'token_accuracy': accuracy, 'num_tokens': num_tokens}


def apply_gradients(state: TrainState, grads, updates,
                    metrics: Metrics) -> tuple[TrainState, Metrics]:
  """The optimizer step on `grads` (and the variable updates, e.g. batch norm's statistics);
  the metrics gain the gradient norm and whether the step was finite."""
  new_state = state.apply_gradients(grads=grads,
                                    batch_stats=updates.get('batch_stats', state.batch_stats))
  grad_norm = optax.global_norm(grads)
  return new_state, {**metrics, 'grad_norm': grad_norm,
                     # Checked by the loop when it next syncs (logging, checkpoints): no sync
                     # per step.
                     'finite': jnp.isfinite(metrics['loss']) & jnp.isfinite(grad_norm)}


def train_step(state: TrainState, batch: Batch,
               dropout_key: jax.Array | None = None) -> tuple[TrainState, Metrics]:
  """One teacher-forced step on {'image': (B, H, W, 3), 'tokens': (B, L)}; loss masks PAD.
  A model with dropout needs `dropout_key`."""
  def loss_sums_fn(params, inputs, targets, weights):
    variables = {'params': params, 'batch_stats': state.batch_stats}
    return state.apply_fn(variables, batch['image'], inputs, targets, weights, train=True,
                          method='loss_sums', mutable=['batch_stats'],
                          rngs=_dropout_rngs(state, dropout_key))
  return apply_gradients(state, *_teacher_forced_gradients(state.params, batch['tokens'],
                                                           loss_sums_fn))


def decoder_gradients(state: TrainState, batch: Batch, dropout_key: jax.Array | None = None):
  """`decoder_train_step`'s (grads, variable_updates, metrics), before the optimizer step."""
  def loss_sums_fn(params, inputs, targets, weights):
    sums = state.apply_fn({'params': params}, batch['embedding'], inputs, targets, weights,
                          train=True, method='caption_loss_sums',
                          rngs=_dropout_rngs(state, dropout_key))
    return sums, {}
  return _teacher_forced_gradients(state.params, batch['tokens'], loss_sums_fn)


def decoder_train_step(state: TrainState, batch: Batch,
                       dropout_key: jax.Array | None = None) -> tuple[TrainState, Metrics]:
  """One teacher-forced step on {'embedding': (B, D), 'tokens': (B, L)}: the decoder alone.

  Any caption length L works (one compilation per length): batches cut to their longest
  caption (`length_buckets`) spend no work on padding columns.
  """
  return apply_gradients(state, *decoder_gradients(state, batch, dropout_key))


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
