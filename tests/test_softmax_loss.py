"""The chunked projection + cross-entropy equals the plain one, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcap.models import softmax_loss


def plain_loss_sums(features, kernel, bias, targets, weights):
  logits = (features @ kernel).astype(jnp.float32) + bias
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  correct = jnp.argmax(logits, -1) == targets
  return jnp.sum(losses * weights), jnp.sum(correct * weights)


@pytest.mark.parametrize('steps,chunk_steps', [(7, 2), (6, 3), (5, 8)])
def test_matches_plain_cross_entropy(steps, chunk_steps):
  keys = jax.random.split(jax.random.key(0), 4)
  features = jax.random.normal(keys[0], (4, steps, 8))
  kernel = jax.random.normal(keys[1], (8, 30))
  bias = jax.random.normal(keys[2], (30,))
  targets = jax.random.randint(keys[3], (4, steps), 0, 30)
  weights = (jnp.arange(steps)[None] < jnp.array([[steps], [3], [1], [0]])).astype(jnp.float32)

  fused = softmax_loss.projected_cross_entropy(features, kernel, bias, targets, weights,
                                               chunk_steps)
  plain = plain_loss_sums(features, kernel, bias, targets, weights)
  np.testing.assert_allclose(fused, plain, rtol=1e-5)
  assert float(fused[1]) == float(plain[1])  # Correct-argmax counts are exact.

  def scalar(fn):
    return lambda f, k, b: 0.7 * fn(f, k, b, targets, weights)[0]
  fused_grads = jax.grad(scalar(lambda *a: softmax_loss.projected_cross_entropy(*a, chunk_steps)),
                         argnums=(0, 1, 2))(features, kernel, bias)
  plain_grads = jax.grad(scalar(plain_loss_sums), argnums=(0, 1, 2))(features, kernel, bias)
  for fused_grad, plain_grad in zip(fused_grads, plain_grads):
    np.testing.assert_allclose(fused_grad, plain_grad, rtol=1e-4, atol=1e-5)
  # Positions of weight 0 (padding) get no gradient.
  assert not np.asarray(fused_grads[0][3]).any()


def test_bfloat16_features_keep_float32_parameter_gradients():
  features = jax.random.normal(jax.random.key(0), (2, 3, 8)).astype(jnp.bfloat16)
  kernel, bias = jnp.ones((8, 5)) * 0.1, jnp.zeros(5)
  targets, weights = jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 3))
  grads = jax.grad(lambda k, b: softmax_loss.projected_cross_entropy(
      features, k, b, targets, weights, 2)[0], argnums=(0, 1))(kernel, bias)
  assert [g.dtype for g in grads] == [jnp.float32, jnp.float32]
  plain = jax.grad(
      lambda k: plain_loss_sums(features.astype(jnp.float32), k, bias, targets, weights)[0])(
          kernel)
  np.testing.assert_allclose(grads[0], plain, rtol=2e-2, atol=1e-2)


def test_a_target_tied_for_the_top_logit_counts_as_correct():
  # Equal logits everywhere (a zero kernel and bias): every target ties for the top.
  features = jnp.ones((2, 3, 4))
  kernel, bias = jnp.zeros((4, 6)), jnp.zeros(6)
  targets = jnp.asarray([[0, 5, 2], [1, 1, 4]])
  weights = jnp.asarray([[1.0, 1.0, 0.0], [1.0, 0.5, 1.0]])
  loss_sum, correct = softmax_loss.projected_cross_entropy(features, kernel, bias, targets,
                                                           weights, 2)
  np.testing.assert_allclose(loss_sum, np.log(6) * 4.5, rtol=1e-6)
  assert float(correct) == 4.5
