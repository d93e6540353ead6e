"""Model shapes: encoders from the registry, decoder, captioner."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcap import workdir as workdir_lib
from jaxcap.models import captioner
from jaxcap.models import encoders
from jaxcap.models import inception_v3


def test_captioner_output_shapes(config):
  model = captioner.create_model(config.model, vocab_size=50)
  images = jnp.zeros((3, 32, 32, 3))
  tokens = jnp.zeros((3, 23), jnp.int32)
  variables = model.init(jax.random.key(0), images, tokens)
  assert set(variables) == {'params', 'batch_stats'}
  logits = model.apply(variables, images, tokens)
  assert logits.shape == (3, 23, 50) and logits.dtype == jnp.float32
  embedding = model.apply(variables, images, method='encode')
  assert embedding.shape == (3, 16)
  carry, memory = model.apply(variables, embedding, method='initial_state')
  assert [c.shape for c in carry] == [(3, 32), (3, 32)]
  carry, step_logits, attention = model.apply(variables, carry, tokens[:, 0], memory,
                                              method='decode_step')
  assert step_logits.shape == (3, 50) and attention.shape == (3, 0)
  # The step-by-step decoder equals teacher forcing.
  assert jnp.allclose(step_logits, logits[:, 0], atol=1e-5)


def test_small_cnn_exposes_spatial_map(config):
  encoder = encoders.create_encoder(config.model)
  images = jnp.zeros((2, 32, 32, 3))
  variables = encoder.init(jax.random.key(0), images)
  pooled, state = encoder.apply(variables, images, mutable=['intermediates'])
  spatial, = state['intermediates']['spatial_map']
  assert pooled.shape == (2, 16) and spatial.shape == (2, 16, 16, 16)


@pytest.mark.parametrize('pool_before_norm,strided_first_conv', [
    (False, False), (True, False), (True, True), (False, True)])
def test_small_cnn_blocks_in_their_order(config, pool_before_norm, strided_first_conv):
  # The reference: conv -> BN -> ReLU -> pool or conv -> pool -> BN -> ReLU from lax and Flax's
  # max pool, in training (batch statistics: with a positive scale the two orders differ only
  # there, since a max commutes with an increasing function); a strided first conv, no first pool.
  config.model.small_cnn.pool_before_norm = pool_before_norm
  config.model.small_cnn.strided_first_conv = strided_first_conv
  encoder = encoders.create_encoder(config.model)
  images = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
  variables = encoder.init(jax.random.key(1), images)
  params = jax.tree.map(lambda v: v + 0.1 * jax.random.normal(jax.random.key(2), v.shape),
                        variables['params'])  # Scales and biases other than 1 and 0.

  def reference(x):
    features = config.model.small_cnn.features
    for i, _ in enumerate(features):
      strided = i == 0 and strided_first_conv
      pool = i < len(features) - 1 and not strided
      strides = (2, 2) if strided else (1, 1)
      x = jax.lax.conv_general_dilated(x, params[f'conv{i}']['kernel'], strides, 'SAME',
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      if pool and pool_before_norm:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
      x = (x - mean) / jnp.sqrt(var + 1e-5) * params[f'bn{i}']['scale'] + params[f'bn{i}']['bias']
      x = jnp.maximum(x, 0)
      if pool and not pool_before_norm:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    return x.mean(axis=(1, 2))
  ours, _ = encoder.apply({**variables, 'params': params}, images, train=True,
                          mutable=['batch_stats'])
  np.testing.assert_allclose(ours, reference(images), rtol=1e-4, atol=1e-4)


def test_small_cnn_of_a_run_saved_before_its_block_options(config, tmp_path):
  values = json.loads(config.to_json_best_effort())
  del values['model']['small_cnn']['pool_before_norm']
  del values['model']['small_cnn']['strided_first_conv']
  (tmp_path / 'config.json').write_text(json.dumps(values))
  encoder = encoders.create_encoder(workdir_lib.load_config(str(tmp_path)).model)
  assert not encoder.pool_before_norm and not encoder.strided_first_conv


@pytest.mark.parametrize('height,width', [(8, 8), (7, 10)])
def test_max_pool_2x2_equals_flax_max_pool_in_value_and_gradient(height, width):
  x = jax.random.normal(jax.random.key(0), (3, height, width, 5))  # No ties.
  reference = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))
  np.testing.assert_array_equal(encoders.max_pool_2x2(x), reference(x))
  weights = jax.random.normal(jax.random.key(1), reference(x).shape)
  gradient = lambda pool: jax.grad(lambda x: jnp.sum(pool(x) * weights))(x)
  np.testing.assert_allclose(gradient(encoders.max_pool_2x2), gradient(reference), atol=1e-6)


def test_unknown_encoder_is_named(config):
  config.model.encoder = 'resnet'
  with pytest.raises(ValueError, match="config.model.encoder='resnet'"):
    encoders.create_encoder(config.model)


def test_frozen_encoder_gets_no_gradient(config):
  config.model.train_encoder = False
  model = captioner.create_model(config.model, vocab_size=50)
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  tokens = jnp.ones((2, 5), jnp.int32)
  variables = model.init(jax.random.key(0), images, tokens)
  grads = jax.grad(lambda p: model.apply({
      **variables, 'params': p
  }, images, tokens, train=True).sum())(
      variables['params'])
  assert all((g == 0).all() for g in jax.tree.leaves(grads['encoder']))
  assert any((g != 0).any() for g in jax.tree.leaves(grads['decoder']))


@pytest.mark.slow
def test_inception_v3_shapes():
  model = inception_v3.InceptionV3()
  images = jnp.zeros((1, 75, 75, 3))
  variables = jax.jit(model.init)(jax.random.key(0), images)
  assert set(variables) == {'params', 'batch_stats'}
  assert len(variables['params']) == 94  # Keras InceptionV3 has 94 conv2d_bn layers.
  pooled, state = jax.jit(lambda v, x: model.apply(v, x, mutable=['intermediates']))(variables,
                                                                                     images)
  assert pooled.shape == (1, 2048)
  assert state['intermediates']['spatial_map'][0].shape == (1, 1, 1, 2048)
  assert state['intermediates']['mixed0'][0].shape == (1, 7, 7, 256)
  assert sum(
      x.size
      for x in jax.tree.leaves(variables['params'])) == 21_768_352  # As Keras: trainable params.


@pytest.mark.parametrize('height,width', [(1, 1), (2, 3), (5, 4), (35, 35)])
def test_inception_pools_equal_flax_pools_in_value_and_gradient(height, width):
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, height, width, 3)), jnp.float32)
  average = lambda x: nn.avg_pool(x, (3, 3), strides=(1, 1), padding='SAME',
                                  count_include_pad=False)
  gradient = lambda pool: jax.grad(lambda x: jnp.sum(jnp.sin(pool(x))))(x)
  np.testing.assert_allclose(inception_v3.average_pool_3x3(x), average(x), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(gradient(inception_v3.average_pool_3x3), gradient(average),
                             rtol=1e-5, atol=1e-6)
  if min(height, width) >= 3:
    maximum = lambda x: nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')
    np.testing.assert_array_equal(inception_v3.max_pool_3x3_stride_2(x), maximum(x))
    np.testing.assert_array_equal(gradient(inception_v3.max_pool_3x3_stride_2), gradient(maximum))


def test_inception_pool_branch_pools_after_its_convolution():
  # Keras pools, then convolves; ConvBN(average_pooled=True) convolves, then pools: the same.
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 6, 7, 5)), jnp.float32)
  block = inception_v3.ConvBN(4, (1, 1), average_pooled=True)
  variables = block.init(jax.random.key(0), x, train=False)
  plain = inception_v3.ConvBN(4, (1, 1))
  expected = plain.apply(variables, nn.avg_pool(x, (3, 3), strides=(1, 1), padding='SAME',
                                                count_include_pad=False), train=False)
  np.testing.assert_allclose(block.apply(variables, x, train=False), expected,
                             rtol=1e-5, atol=1e-6)
