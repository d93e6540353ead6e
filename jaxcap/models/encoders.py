"""Image encoders by name: images (N, H, W, 3) in [-1, 1] -> pooled embedding (N, D), or with
`grid=True` the last spatial map (N, H', W', D) it is the mean of (for a decoder that attends).

Each encoder also sows its last spatial map as `intermediates/spatial_map`.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from jaxcap.models import inception_v3


def max_pool_2x2(x):
  """nn.max_pool(x, (2, 2), strides=(2, 2)) as a reshape and a max.

  The same values; the gradient is a fused comparison instead of XLA's select-and-scatter, which
  on CPU cost as much as the convolution before it (docs/benchmarks.md, "The demo on CPU").
  """
  n, h, w, c = x.shape
  h, w = h // 2, w // 2
  return x[:, :2 * h, :2 * w].reshape(n, h, 2, w, 2, c).max(axis=(2, 4))


class SmallCNN(nn.Module):
  """Blocks of 3x3 conv -> batch norm -> ReLU -> 2x2 max pool, then global average pool.

  For the CPU demo and fast tests: a few hundred steps teach it colour, shape, size and count.
  `pool_before_norm` orders a block conv -> pool -> batch norm -> ReLU instead: batch norm and
  ReLU then see a quarter of the values, which on CPU is most of a block's time after the conv.
  `strided_first_conv` makes the first conv (stride 2) downsample in place of the first block's
  pool: a quarter of the first block's work, the costliest on CPU at full resolution.
  """
  features: Sequence[int] = (32, 64, 128, 256)
  bn_momentum: float = 0.9
  pool_before_norm: bool = False
  strided_first_conv: bool = False
  # Return the last block's map (N, H', W', features[-1]) instead of its mean.
  grid: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    x = images.astype(self.dtype)
    for i, features in enumerate(self.features):
      strides = (2, 2) if i == 0 and self.strided_first_conv else (1, 1)
      pool = i < len(self.features) - 1 and strides == (1, 1)
      x = nn.Conv(features, (3, 3), strides, use_bias=False, dtype=self.dtype,
                  name=f'conv{i}')(x)
      if pool and self.pool_before_norm:
        x = max_pool_2x2(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                       dtype=self.dtype, name=f'bn{i}')(x)
      x = nn.relu(x)
      if pool and not self.pool_before_norm:
        x = max_pool_2x2(x)
    self.sow('intermediates', 'spatial_map', x)
    return x.astype(jnp.float32) if self.grid else jnp.mean(x.astype(jnp.float32), axis=(1, 2))


class ZeroEncoder(nn.Module):
  """Ignores the image: a (N, 1) zero embedding (a (N, 1, 1, 1) grid). The blind baseline."""
  grid: bool = False

  @nn.compact
  def __call__(self, images, train: bool = False):
    del train
    zeros = jnp.zeros((images.shape[0], 1, 1, 1), jnp.float32)
    self.sow('intermediates', 'spatial_map', zeros)
    return zeros if self.grid else zeros[:, 0, 0]


def _small_cnn(config: ml_collections.ConfigDict, dtype, grid: bool) -> nn.Module:
  return SmallCNN(features=tuple(config.small_cnn.features), bn_momentum=config.bn_momentum,
                  pool_before_norm=config.small_cnn.pool_before_norm,
                  strided_first_conv=config.small_cnn.strided_first_conv, grid=grid, dtype=dtype)


def _inception_v3(config: ml_collections.ConfigDict, dtype, grid: bool) -> nn.Module:
  return inception_v3.InceptionV3(include_top=False, bn_momentum=config.bn_momentum, grid=grid,
                                  dtype=dtype)


# Name in `config.model.encoder` -> constructor from the model config, compute dtype and
# whether it returns its grid.
ENCODERS: dict[str, Callable[[ml_collections.ConfigDict, Any, bool], nn.Module]] = {
    'small_cnn': _small_cnn,
    'inception_v3': _inception_v3,
    'zeros': lambda config, dtype, grid: ZeroEncoder(grid=grid),
}


def create_encoder(model_config: ml_collections.ConfigDict, dtype=jnp.float32,
                   grid: bool = False) -> nn.Module:
  if model_config.encoder not in ENCODERS:
    raise ValueError(f'config.model.encoder={model_config.encoder!r} is not one of '
                     f'{sorted(ENCODERS)}')
  return ENCODERS[model_config.encoder](model_config, dtype, grid)
