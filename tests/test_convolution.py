"""jaxcap.models.convolution: nn.Conv's parameters, values and gradients (the reference), and each
backend's formulation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from jaxcap.models import convolution


def _lowered(module, variables, x, platform):
  return export.export(jax.jit(module.apply), platforms=[platform])(variables, x).mlir_module()


@pytest.mark.parametrize('patches_bytes_per_chunk', [1, 1 << 30])  # An image a chunk; one chunk.
@pytest.mark.parametrize('kernel,strides,padding,batch', [
    ((1, 1), (1, 1), 'SAME', 2), ((1, 1), (1, 1), 'VALID', 2), ((1, 1), (2, 2), 'SAME', 2),
    ((3, 3), (1, 1), 'SAME', 6), ((1, 7), (1, 1), 'SAME', 2), ((3, 3), (2, 2), 'VALID', 3),
    ((5, 5), (1, 1), ((2, 1), (0, 3)), 4)])
def test_same_parameters_values_and_gradients_as_flax_conv(kernel, strides, padding, batch,
                                                           patches_bytes_per_chunk, monkeypatch):
  monkeypatch.setattr(convolution, '_PATCHES_BYTES_PER_CHUNK', patches_bytes_per_chunk)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, 9, 10, 12)), jnp.float32)
  reference = nn.Conv(8, kernel, strides, padding=padding, use_bias=False)
  ours = convolution.Conv(8, kernel, strides, padding=padding, use_bias=False)
  variables = reference.init(jax.random.key(0), x)
  assert jax.tree.map(np.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(np.shape, variables)
  np.testing.assert_allclose(ours.apply(variables, x), reference.apply(variables, x),
                             rtol=1e-5, atol=1e-5)
  loss = lambda module: lambda v, x: jnp.sum(jnp.sin(module.apply(v, x)))
  ours_grads = jax.grad(loss(ours), argnums=(0, 1))(variables, x)
  reference_grads = jax.grad(loss(reference), argnums=(0, 1))(variables, x)
  for a, b in zip(jax.tree.leaves(ours_grads), jax.tree.leaves(reference_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('batch,bytes_per_image,chunks', [
    (64, 590_000, (32, 2)), (64, 150_000, (8, 8)), (6, 1_000_000, (3, 2)), (7, 1_000_000, (7, 1)),
    (5, 10 << 20, (5, 1)), (3, 1, (1, 3))])
def test_chunks_of_images_whose_patches_fit_the_budget(batch, bytes_per_image, chunks):
  # The budget is 2 MiB: 3 images of 590 kB fit but do not divide 64, so 2; 13 of 150 kB, so 8.
  assert convolution._PATCHES_BYTES_PER_CHUNK == 2 << 20
  assert convolution._chunks(batch, bytes_per_image) == chunks


@pytest.mark.parametrize('kernel', [(1, 1), (3, 3)])
def test_a_product_on_cpu_and_a_convolution_elsewhere(kernel):
  x = jnp.ones((4, 9, 9, 12))
  module = convolution.Conv(8, kernel, use_bias=False)
  variables = module.init(jax.random.key(0), x)
  cpu, gpu = (_lowered(module, variables, x, p) for p in ('cpu', 'cuda'))
  assert 'stablehlo.dot_general' in cpu and 'stablehlo.convolution' not in cpu
  assert 'stablehlo.convolution' in gpu and 'stablehlo.dot_general' not in gpu
  # Training on a GPU: its gradients are convolutions too, none of the CPU's products.
  gradients = jax.jit(jax.grad(lambda v, x: jnp.sum(module.apply(v, x) ** 2), argnums=(0, 1)))
  gpu_gradients = export.export(gradients, platforms=['cuda'])(variables, x).mlir_module()
  assert 'stablehlo.convolution' in gpu_gradients and 'stablehlo.dot_general' not in gpu_gradients
