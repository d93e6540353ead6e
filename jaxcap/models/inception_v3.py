"""InceptionV3 in Flax linen, layer for layer the topology of `keras.applications.InceptionV3`.

Every convolution is Keras' `conv2d_bn`: a bias-free convolution, batch norm without scale
(epsilon 1e-3), ReLU. Padding follows Keras ('valid' stems and reductions, 'same' elsewhere;
'same' average pooling does not count padded cells). Inputs are NHWC images in [-1, 1].
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

_BN_EPSILON = 1e-3


class ConvBN(nn.Module):
  """Keras' conv2d_bn: Conv (no bias) -> BatchNorm (no scale) -> ReLU."""
  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: str = 'SAME'
  bn_momentum: float = 0.99
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(self.features, self.kernel_size, self.strides, padding=self.padding,
                use_bias=False, dtype=self.dtype, name='conv')(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                     epsilon=_BN_EPSILON, use_scale=False, dtype=self.dtype, name='bn')(x)
    return nn.relu(x)


def _max_pool(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')


def _avg_pool_same(x):
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding='SAME', count_include_pad=False)


class InceptionV3(nn.Module):
  """Returns the (N, 2048) average-pooled embedding, or (N, 1000) logits with `include_top`.

  The last spatial map (N, H/32-ish, W/32-ish, 2048) and each mixed block's output are sown
  into the 'intermediates' collection as `spatial_map` and `mixed0` ... `mixed10`.
  """
  include_top: bool = False
  num_classes: int = 1000
  bn_momentum: float = 0.99
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    counter = iter(range(1000))

    def conv(x, features, kernel, strides=(1, 1), padding='SAME'):
      # Named in creation order, as Keras numbers conv2d_bn layers: that order maps weights.
      return ConvBN(features, kernel, strides, padding, self.bn_momentum, self.dtype,
                    name=f'conv2d_bn_{next(counter)}')(x, train)

    x = images.astype(self.dtype)
    x = conv(x, 32, (3, 3), (2, 2), 'VALID')
    x = conv(x, 32, (3, 3), padding='VALID')
    x = conv(x, 64, (3, 3))
    x = _max_pool(x)
    x = conv(x, 80, (1, 1), padding='VALID')
    x = conv(x, 192, (3, 3), padding='VALID')
    x = _max_pool(x)

    # mixed0..2: 35 x 35 x 256/288/288.
    for block, pool_features in enumerate((32, 64, 64)):
      branch1x1 = conv(x, 64, (1, 1))
      branch5x5 = conv(conv(x, 48, (1, 1)), 64, (5, 5))
      branch3x3dbl = conv(conv(conv(x, 64, (1, 1)), 96, (3, 3)), 96, (3, 3))
      branch_pool = conv(_avg_pool_same(x), pool_features, (1, 1))
      x = self._mixed(block, [branch1x1, branch5x5, branch3x3dbl, branch_pool])

    # mixed3: 17 x 17 x 768.
    branch3x3 = conv(x, 384, (3, 3), (2, 2), 'VALID')
    branch3x3dbl = conv(conv(conv(x, 64, (1, 1)), 96, (3, 3)), 96, (3, 3), (2, 2), 'VALID')
    x = self._mixed(3, [branch3x3, branch3x3dbl, _max_pool(x)])

    # mixed4..7: 17 x 17 x 768, factorised 7x7 convolutions.
    for block, width in zip(range(4, 8), (128, 160, 160, 192)):
      branch1x1 = conv(x, 192, (1, 1))
      branch7x7 = conv(conv(conv(x, width, (1, 1)), width, (1, 7)), 192, (7, 1))
      branch7x7dbl = conv(x, width, (1, 1))
      for kernel in ((7, 1), (1, 7), (7, 1)):
        branch7x7dbl = conv(branch7x7dbl, width, kernel)
      branch7x7dbl = conv(branch7x7dbl, 192, (1, 7))
      branch_pool = conv(_avg_pool_same(x), 192, (1, 1))
      x = self._mixed(block, [branch1x1, branch7x7, branch7x7dbl, branch_pool])

    # mixed8: 8 x 8 x 1280.
    branch3x3 = conv(conv(x, 192, (1, 1)), 320, (3, 3), (2, 2), 'VALID')
    branch7x7x3 = conv(conv(conv(x, 192, (1, 1)), 192, (1, 7)), 192, (7, 1))
    branch7x7x3 = conv(branch7x7x3, 192, (3, 3), (2, 2), 'VALID')
    x = self._mixed(8, [branch3x3, branch7x7x3, _max_pool(x)])

    # mixed9, mixed10: 8 x 8 x 2048.
    for block in (9, 10):
      branch1x1 = conv(x, 320, (1, 1))
      branch3x3 = conv(x, 384, (1, 1))
      branch3x3 = jnp.concatenate([conv(branch3x3, 384, (1, 3)), conv(branch3x3, 384, (3, 1))], -1)
      branch3x3dbl = conv(conv(x, 448, (1, 1)), 384, (3, 3))
      branch3x3dbl = jnp.concatenate(
          [conv(branch3x3dbl, 384, (1, 3)), conv(branch3x3dbl, 384, (3, 1))], -1)
      branch_pool = conv(_avg_pool_same(x), 192, (1, 1))
      x = self._mixed(block, [branch1x1, branch3x3, branch3x3dbl, branch_pool])

    self.sow('intermediates', 'spatial_map', x)
    embedding = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    if not self.include_top:
      return embedding
    return nn.Dense(self.num_classes, dtype=self.dtype, name='predictions')(embedding).astype(jnp.float32)

  def _mixed(self, block: int, branches: Sequence[jnp.ndarray]) -> jnp.ndarray:
    x = jnp.concatenate(branches, axis=-1)
    self.sow('intermediates', f'mixed{block}', x)
    return x
