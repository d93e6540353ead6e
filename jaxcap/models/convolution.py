"""Convolutions in the formulation each backend runs fastest; the parameters are nn.Conv's.

XLA's CPU backend runs convolutions through its convolution emitter well below the speed of a
matrix product of the same size: a third to a half for 1x1 kernels, and a fifth to a half for
InceptionV3's stem and its stride-2 reductions (docs/benchmarks.md, "Convolutions on CPU"). So on
CPU a 1x1, stride-1 convolution is a dot over the channel axis; other stride-1 convolutions of
up to 7 taps per axis use Winograd's minimal filtering (`winograd.py`: 1.75-2.8x fewer
products); the rest (the strided ones) are a product of patches (the kh*kw shifted slices side
by side, then one dot), a few images at a time in a loop so the patches stay in cache. The
gradient of both is written by hand: the kernel's as patches^T @ output gradient in the same
chunks, the input's as XLA's own transposed convolution, which runs well on CPU where the
kernel's gradient through XLA's convolution (or autodiff of the loop) does not.
GPUs and TPUs keep the convolution, which their libraries already run as a product.
`lax.platform_dependent` picks the branch when the function is lowered for its device, so one
jitted function serves both.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxcap.models import winograd


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


# Bytes of patches per product: the images of a chunk are as many as keep their patches within
# about this much (L2-sized), at least one. Chunks of 1-16 images were timed (docs/benchmarks.md).
_PATCHES_BYTES_PER_CHUNK = 2 << 20


def _chunks(n: int, patches_bytes_per_image: int) -> tuple[int, int]:
  """(chunks, images per chunk) for a batch of `n`: as many images per chunk as keep their
  patches within `_PATCHES_BYTES_PER_CHUNK` (at least one), dividing `n`."""
  fit = max(1, _PATCHES_BYTES_PER_CHUNK // max(1, patches_bytes_per_image))
  per_chunk = max(d for d in range(1, min(n, fit) + 1) if n % d == 0)
  return n // per_chunk, per_chunk


def _patch_chunks(x, kernel_shape, oh, ow) -> tuple[int, int]:
  """`_chunks` for the (oh, ow) patches of the images in `x` under a kernel of `kernel_shape`."""
  kh, kw, cin, _ = kernel_shape
  return _chunks(x.shape[0], oh * ow * kh * kw * cin * x.dtype.itemsize)


def _patches(x, kh, kw, strides, oh, ow):
  """(n, oh, ow, kh*kw*c): the kh*kw shifted (strided) windows of `x`, side by side."""
  return jnp.concatenate([
      x[:, i:i + strides[0] * (oh - 1) + 1:strides[0], j:j + strides[1] * (ow - 1) + 1:strides[1]]
      for i in range(kh) for j in range(kw)], axis=-1)


def _output_size(x_shape, kernel_shape, strides):
  return tuple((x_shape[1 + d] - kernel_shape[d]) // strides[d] + 1 for d in range(2))


def _valid_product(x, kernel, strides, precision):
  """A VALID convolution of padded `x`: Winograd tiles where they apply, else patches @ kernel,
  chunk by chunk of images."""
  if winograd.supports(kernel.shape[:2], strides):
    return winograd.valid_convolution(x, kernel, precision)
  kh, kw, cin, cout = kernel.shape
  n, h, w, _ = x.shape
  oh, ow = _output_size(x.shape, kernel.shape, strides)
  flat_kernel = kernel.reshape(kh * kw * cin, cout)

  def chunk(x):
    return jnp.einsum('nhwk,ko->nhwo', _patches(x, kh, kw, strides, oh, ow), flat_kernel,
                      precision=precision)

  num_chunks, per_chunk = _patch_chunks(x, kernel.shape, oh, ow)
  if num_chunks == 1:
    return chunk(x)
  out = lax.map(chunk, x.reshape(num_chunks, per_chunk, h, w, cin))
  return out.reshape(n, oh, ow, cout)


def _kernel_gradient(x, output_gradient, kernel_shape, strides, precision):
  """d loss / d kernel = patches^T @ output gradient, summed in float32 chunk by chunk."""
  kh, kw, cin, cout = kernel_shape
  n, h, w, _ = x.shape
  _, oh, ow, _ = output_gradient.shape
  num_chunks, per_chunk = _patch_chunks(x, kernel_shape, oh, ow)

  def add_chunk(total, chunk):
    x, dy = chunk
    return total + jnp.einsum('nhwk,nhwo->ko', _patches(x, kh, kw, strides, oh, ow), dy,
                              precision=precision, preferred_element_type=jnp.float32), None
  chunks = (x.reshape(num_chunks, per_chunk, h, w, cin),
            output_gradient.reshape(num_chunks, per_chunk, oh, ow, cout))
  total, _ = lax.scan(add_chunk, jnp.zeros((kh * kw * cin, cout), jnp.float32), chunks)
  return total.reshape(kernel_shape)  # float32: the caller casts to the kernel's dtype.


def _input_gradient(output_gradient, kernel, x, strides, precision):
  """d loss / d x: the transpose of the VALID convolution, which XLA's CPU convolution runs as
  fast as a product here (unlike the kernel's gradient)."""
  def convolution(x):
    return lax.conv_general_dilated(x, kernel, strides, 'VALID', precision=precision,
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  transpose = jax.linear_transpose(convolution, jax.ShapeDtypeStruct(x.shape, x.dtype))
  return transpose(output_gradient)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _valid_convolution(x, kernel, strides, precision):
  return _valid_product(x, kernel, strides, precision)


def _valid_convolution_forward(x, kernel, strides, precision):
  return _valid_product(x, kernel, strides, precision), (x, kernel)


def _valid_convolution_backward(strides, precision, residuals, output_gradient):
  # Written by hand: autodiff of the chunked product keeps every chunk's patches for the
  # backward pass and sums their gradients slice by slice (2-4x slower on CPU).
  x, kernel = residuals
  kernel_gradient = _kernel_gradient(x, output_gradient, kernel.shape, strides, precision)
  return (_input_gradient(output_gradient, kernel, x, strides, precision),
          kernel_gradient.astype(kernel.dtype))


_valid_convolution.defvjp(_valid_convolution_forward, _valid_convolution_backward)


def _patches_product(lhs, rhs, strides, padding, precision):
  """The convolution as patches @ kernel, per chunk of images, with its own gradient."""
  kh, kw = rhs.shape[:2]
  pads = (lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), strides, padding)
          if isinstance(padding, str) else padding)
  lhs = jnp.pad(lhs, ((0, 0), *pads, (0, 0)))
  return _valid_convolution(lhs, rhs, tuple(strides), precision)


# nn.Conv with the formulation above: the same parameters ('kernel', HWIO), names and init.
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)
