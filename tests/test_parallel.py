"""jaxcap.parallel's compiler options: on CPU, convolutions stay XLA's, products go to YNNPACK."""

import re

import jax
import jax.numpy as jnp
import numpy as np

from jaxcap import parallel


def _convolution_then_product(state, images):
  """A convolution, a batch-norm-like reduction and a product: the kinds the option sorts."""
  y = jax.lax.conv_general_dilated(images, state['kernel'], (1, 1), 'SAME',
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  y = jax.nn.relu(y - y.mean(axis=(0, 1, 2)))
  return y.reshape(y.shape[0], -1, y.shape[-1]) @ state['dense']


def _inputs(batch=8):
  rng = np.random.default_rng(0)
  state = {'kernel': jnp.asarray(rng.standard_normal((3, 3, 16, 32)), jnp.float32),
           'dense': jnp.asarray(rng.standard_normal((32, 64)), jnp.float32)}
  return state, jnp.asarray(rng.standard_normal((batch, 16, 16, 16)), jnp.float32)


def _entry_computation(compiled_text: str) -> str:
  return compiled_text.split('ENTRY', 1)[1].split('\n}\n', 1)[0]


def test_cpu_programs_leave_convolutions_to_xla_and_products_to_ynnpack():
  mesh = parallel.make_mesh(jax.devices('cpu'))
  state, images = _inputs(batch=mesh.size)
  jitted = parallel.jit_data_parallel(_convolution_then_product, mesh)
  entry = _entry_computation(jitted.lower(state, images).compile().as_text())
  # XLA's own convolution is an instruction of the program; YNNPACK's would sit in a fusion.
  assert re.search(r'= f32\[[\d,]+\]\S* convolution\(', entry), entry
  assert 'ynn_fusion' in entry, entry
  # jaxlib's default (the convolution in YNNPACK too) is the independent reference.
  gradient_fn = jax.grad(lambda s, x: _convolution_then_product(s, x).sum())
  np.testing.assert_allclose(
      jitted(state, images),
      jax.jit(_convolution_then_product)(state, images),
      rtol=1e-4,
      atol=1e-3)
  expected = jax.jit(gradient_fn)(state, images)
  for name, gradient in parallel.jit_data_parallel(gradient_fn, mesh)(state, images).items():
    np.testing.assert_allclose(gradient, expected[name], rtol=1e-4, atol=1e-3)


def test_compiler_options_only_for_the_cpu():
  fusion_types = parallel.compiler_options('cpu')['xla_cpu_experimental_ynn_fusion_type']
  assert 'DOT' in fusion_types and 'CONVOLUTION' not in fusion_types
  assert parallel.compiler_options('gpu') == {}
  assert parallel.compiler_options('cuda') == {}
  assert parallel.compiler_options('tpu') == {}
