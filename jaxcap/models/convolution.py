"""Convolutions in the formulation each backend runs fastest; the parameters are nn.Conv's.

XLA's CPU backend runs convolutions through its convolution emitter well below the speed of a
matrix product of the same size: a third to a half for 1x1 kernels, and a fifth to a half for
InceptionV3's stem and its stride-2 reductions (docs/benchmarks.md, "Convolutions on CPU"). So on
CPU a 1x1, stride-1 convolution is a dot over the channel axis, and any other is a product of
patches (the kh*kw shifted slices side by side, then one dot), two images at a time in a loop so
the patches stay in cache. GPUs and TPUs keep the convolution, which their libraries already run
as a product. `lax.platform_dependent` picks the branch when the function is lowered for its
device, so one jitted function serves both.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax


def _is_pointwise(kernel_shape, window_strides, padding) -> bool:
  """A 1x1 kernel, stride 1 and no padding: a product over channels."""
  no_padding = (padding in ('SAME', 'VALID') or
                (not isinstance(padding, str) and all(tuple(p) == (0, 0) for p in padding)))
  return (all(k == 1 for k in kernel_shape[:-2]) and all(s == 1 for s in window_strides) and
          no_padding)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None,
                         **kwargs) -> Any:
  """`lax.conv_general_dilated`, written as products on CPU for channels-last inputs and HWIO
  kernels (nn.Conv's layout) without dilation or groups; anything else is left as it is."""
  convolution = functools.partial(
      lax.conv_general_dilated, window_strides=window_strides, padding=padding,
      lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, precision=precision, **kwargs)
  ndim = lhs.ndim
  channels_last = lax.ConvDimensionNumbers(
      lhs_spec=(0, ndim - 1, *range(1, ndim - 1)), rhs_spec=(ndim - 1, ndim - 2, *range(ndim - 2)),
      out_spec=(0, ndim - 1, *range(1, ndim - 1)))
  if dimension_numbers != channels_last or lhs.ndim != 4 or feature_group_count != 1 or any(
      d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ()))):
    return convolution(lhs, rhs)
  if _is_pointwise(rhs.shape, window_strides, padding):
    def as_product(lhs, rhs):
      kernel = rhs.reshape(rhs.shape[-2:])  # (in, out)
      return jnp.einsum('...i,io->...o', lhs, kernel, precision=precision,
                        preferred_element_type=kwargs.get('preferred_element_type'))
    return lax.platform_dependent(lhs, rhs, cpu=as_product, default=convolution)

  def as_patches_product(lhs, rhs):
    return _patches_product(lhs, rhs, window_strides, padding, precision)
  return lax.platform_dependent(lhs, rhs, cpu=as_patches_product, default=convolution)


# Images per patches product: 1, 2, 4, 8 and 16 of 32 were timed; 2 was fastest overall.
_IMAGES_PER_CHUNK = 2


def _patches_product(lhs, rhs, strides, padding, precision):
  """The convolution as patches @ kernel, per chunk of images (one chunk of 1 for odd batches)."""
  kh, kw, cin, cout = rhs.shape
  n, h, w, _ = lhs.shape
  pads = lax.padtype_to_pads((h, w), (kh, kw), strides, padding) if isinstance(padding, str) else padding
  lhs = jnp.pad(lhs, ((0, 0), *pads, (0, 0)))
  h, w = lhs.shape[1:3]
  oh, ow = (h - kh) // strides[0] + 1, (w - kw) // strides[1] + 1
  kernel = rhs.reshape(kh * kw * cin, cout)

  def chunk(x):
    cols = jnp.concatenate([
        x[:, i:i + strides[0] * (oh - 1) + 1:strides[0], j:j + strides[1] * (ow - 1) + 1:strides[1]]
        for i in range(kh) for j in range(kw)], axis=-1)
    return jnp.einsum('nhwk,ko->nhwo', cols, kernel, precision=precision)

  per_chunk = _IMAGES_PER_CHUNK if n % _IMAGES_PER_CHUNK == 0 else 1
  if n <= per_chunk:
    return chunk(lhs)
  out = lax.map(chunk, lhs.reshape(n // per_chunk, per_chunk, h, w, cin))
  return out.reshape(n, oh, ow, cout)


# nn.Conv with the formulation above: the same parameters ('kernel', HWIO), names and init.
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)
