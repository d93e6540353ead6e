"""jaxcap.models.winograd against the definitions: a correlation written as sums, and XLA's
convolution at the highest precision in float64-accurate terms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxcap.models import winograd


@pytest.mark.parametrize('m,r', [(1, 1), (2, 3), (4, 3), (2, 5), (4, 5), (2, 7), (3, 3)])
def test_transforms_compute_the_correlation(m, r):
  at, g, bt = winograd.transforms(m, r)
  assert at.shape == (m, m + r - 1) and g.shape == (m + r - 1, r) and bt.shape == (m + r - 1,) * 2
  rng = np.random.default_rng(0)
  for _ in range(5):
    d, taps = rng.standard_normal(m + r - 1), rng.standard_normal(r)
    expected = [sum(taps[j] * d[i + j] for j in range(r)) for i in range(m)]
    np.testing.assert_allclose(at @ ((g @ taps) * (bt @ d)), expected, rtol=1e-12, atol=1e-12)


def test_tiles_use_only_the_well_conditioned_points():
  assert winograd.output_tile((3, 3)) == (2, 2) and winograd.output_tile((5, 5)) == (2, 2)
  assert winograd.output_tile((1, 7)) == (1, 2) and winograd.output_tile((7, 1)) == (2, 1)
  assert winograd.output_tile((1, 3)) == (1, 4) and winograd.output_tile((3, 1)) == (4, 1)
  for kernel in ((3, 3), (5, 5), (7, 7), (1, 3), (1, 5), (7, 1)):
    tile = winograd.output_tile(kernel)
    assert all(m + k - 1 <= 8 for m, k in zip(tile, kernel))
  assert winograd.supports((3, 3), (1, 1)) and winograd.supports((1, 7), (1, 1))
  assert not winograd.supports((3, 3), (2, 2)) and not winograd.supports((1, 1), (1, 1))
  assert not winograd.supports((9, 9), (1, 1))
  with pytest.raises(ValueError, match='points'):
    winograd.transforms(4, 7)


@pytest.mark.parametrize('kernel,height,width', [
    ((3, 3), 9, 11), ((3, 3), 4, 4), ((5, 5), 12, 9), ((7, 7), 8, 10), ((1, 7), 6, 17),
    ((7, 1), 17, 5), ((1, 3), 8, 8), ((3, 1), 5, 3), ((3, 5), 7, 9)])
def test_valid_convolution_matches_xla(kernel, height, width):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((3, height, width, 5)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((*kernel, 5, 4)) / np.sqrt(5 * kernel[0] * kernel[1]),
                  jnp.float32)
  expected = lax.conv_general_dilated(x, k, (1, 1), 'VALID', precision='highest',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  actual = jax.jit(winograd.valid_convolution)(x, k)
  assert actual.shape == expected.shape and actual.dtype == jnp.float32
  np.testing.assert_allclose(actual, expected, rtol=2e-5, atol=2e-5)
  relative = np.linalg.norm(actual - expected) / np.linalg.norm(expected)
  assert relative < 3e-6, relative


def test_bfloat16_stays_bfloat16_and_close():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((2, 10, 10, 8)), jnp.bfloat16)
  k = jnp.asarray(rng.standard_normal((3, 3, 8, 6)) / 8, jnp.bfloat16)
  actual = winograd.valid_convolution(x, k)
  expected = lax.conv_general_dilated(x.astype(jnp.float32), k.astype(jnp.float32), (1, 1),
                                      'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  assert actual.dtype == jnp.bfloat16
  relative = np.linalg.norm(actual.astype(np.float32) - expected) / np.linalg.norm(expected)
  assert relative < 2e-2, relative
