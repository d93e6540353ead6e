"""Masked cross-entropy of a vocabulary projection, without materialising the logits.

A teacher-forced step's biggest tensor is the (B, T, vocab) logits: written by the projection,
read by the softmax, written again as its gradient and read twice more for the kernel's and the
features' gradients. On a CPU that memory traffic, not the FLOPs, sets the step time. Here the
projection, the softmax and all three gradients are computed together a few time steps at a
time (`lax.scan` over time chunks), so each chunk of logits lives only in cache. The gradients
come out of the forward pass (a `custom_vjp`), which is exact for a scalar loss.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _time_chunks(array: jax.Array, chunk_steps: int) -> jax.Array:
  """(B, T, ...) -> (T / chunk_steps, B, chunk_steps, ...), T padded with zeros to a multiple."""
  pad = -array.shape[1] % chunk_steps
  if pad:
    array = jnp.pad(array, [(0, 0), (0, pad)] + [(0, 0)] * (array.ndim - 2))
  batch, steps = array.shape[:2]
  chunks = array.reshape(batch, steps // chunk_steps, chunk_steps, *array.shape[2:])
  return jnp.moveaxis(chunks, 1, 0)


def _from_time_chunks(chunks: jax.Array, steps: int) -> jax.Array:
  chunks = jnp.moveaxis(chunks, 0, 1)
  return chunks.reshape(chunks.shape[0], -1, *chunks.shape[3:])[:, :steps]


# Logit of excluded ids: finite, so a weight-0 target among them adds 0 (not 0 * inf).
_EXCLUDED_LOGIT = -1e9


def _chunk_loss(features, kernel, bias, targets, weights, with_grads: bool,
                excluded_ids: tuple[int, ...] = (), temperature: float = 1.0):
  """Loss sum, correct-argmax sum and (optionally) the gradients of the loss sum for one chunk."""
  logits = (features @ kernel.astype(features.dtype)).astype(jnp.float32) + bias
  if temperature != 1.0:
    logits = logits / temperature
  if excluded_ids:
    logits = logits.at[..., list(excluded_ids)].set(_EXCLUDED_LOGIT)
  top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  exp = jnp.exp(logits - top)
  total = jnp.sum(exp, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  loss_sum = jnp.sum((top[..., 0] + jnp.log(total) - target_logit) * weights)
  # The target is the argmax when its logit reaches the top one (a tie counts as correct). Not
  # jnp.argmax: XLA's CPU reduction to an index took a third of this loss's time on a Zen 4.
  correct = jnp.sum((target_logit >= top[..., 0]) * weights)
  if not with_grads:
    return loss_sum, correct, None
  # d(loss)/d(logits) = weight * (softmax - one_hot(target)), in place of the one-hot tensor.
  logits_grad = exp * (weights / total)[..., None]
  rows = logits_grad.reshape(-1, logits_grad.shape[-1])
  flat_targets, flat_weights = targets.reshape(-1), weights.reshape(-1)
  rows = rows.at[jnp.arange(rows.shape[0]), flat_targets].add(-flat_weights)
  if excluded_ids:  # Constant logits: no gradient reaches the projection through them.
    rows = rows.at[:, list(excluded_ids)].set(0.0)
  if temperature != 1.0:
    rows = rows / temperature
  features_rows = features.reshape(rows.shape[0], -1)
  kernel_grad = features_rows.T.astype(jnp.float32) @ rows
  features_grad = (rows.astype(features.dtype) @ kernel.T.astype(features.dtype)).reshape(
      features.shape)
  return loss_sum, correct, (features_grad, kernel_grad, jnp.sum(rows, axis=0))


def _scan_chunks(features, kernel, bias, targets, weights, chunk_steps: int, with_grads: bool,
                 excluded_ids: tuple[int, ...] = (), temperature: float = 1.0):
  steps = features.shape[1]
  xs = tuple(_time_chunks(a, chunk_steps) for a in (features, targets, weights))

  def body(carry, chunk):
    loss_sum, correct, kernel_grad, bias_grad = carry
    chunk_features, chunk_targets, chunk_weights = chunk
    chunk_loss, chunk_correct, grads = _chunk_loss(chunk_features, kernel, bias, chunk_targets,
                                                   chunk_weights, with_grads, excluded_ids,
                                                   temperature)
    if grads is None:
      return (loss_sum + chunk_loss, correct + chunk_correct, kernel_grad, bias_grad), None
    features_grad, chunk_kernel_grad, chunk_bias_grad = grads
    return (loss_sum + chunk_loss, correct + chunk_correct, kernel_grad + chunk_kernel_grad,
            bias_grad + chunk_bias_grad), features_grad

  zero = jnp.zeros((), jnp.float32)
  init = (zero, zero, jnp.zeros(kernel.shape, jnp.float32), jnp.zeros(bias.shape, jnp.float32))
  (loss_sum, correct, kernel_grad, bias_grad), features_grad = jax.lax.scan(body, init, xs)
  if not with_grads:
    return loss_sum, correct, None
  features_grad = _from_time_chunks(features_grad, steps)
  return loss_sum, correct, (features_grad, kernel_grad.astype(kernel.dtype),
                             bias_grad.astype(bias.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def projected_cross_entropy(features: jax.Array, kernel: jax.Array, bias: jax.Array,
                            targets: jax.Array, weights: jax.Array, chunk_steps: int,
                            excluded_ids: tuple[int, ...] = (),
                            temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """Sums over (B, T) positions of weights * cross-entropy(features @ kernel + bias, targets),
  and of weights * (argmax == target), a target tied for the top logit counting as the argmax.
  Differentiable in features, kernel and bias (the correct-count's gradient is zero).

  features (B, T, F); kernel (F, vocab); bias (vocab,); targets int (B, T); weights (B, T).
  `chunk_steps` time steps are projected at a time. The distribution may leave out
  `excluded_ids` and divide the logits by `temperature`: that of a sampler that never emits
  those ids (self-critical training scores its samples under it).
  """
  loss_sum, correct, _ = _scan_chunks(features, kernel, bias, targets, weights.astype(jnp.float32),
                                      chunk_steps, False, excluded_ids, temperature)
  return loss_sum, correct


def _forward(features, kernel, bias, targets, weights, chunk_steps, excluded_ids, temperature):
  loss_sum, correct, grads = _scan_chunks(features, kernel, bias, targets,
                                          weights.astype(jnp.float32), chunk_steps, True,
                                          excluded_ids, temperature)
  return (loss_sum, correct), grads


def _backward(chunk_steps, excluded_ids, temperature, residuals, cotangents):
  del chunk_steps, excluded_ids, temperature
  features_grad, kernel_grad, bias_grad = residuals
  loss_cotangent = cotangents[0]  # The correct-count has no gradient.
  return (features_grad * loss_cotangent.astype(features_grad.dtype),
          kernel_grad * loss_cotangent, bias_grad * loss_cotangent, None, None)


projected_cross_entropy.defvjp(_forward, _backward)
