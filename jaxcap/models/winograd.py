"""Winograd's minimal filtering: a stride-1 convolution with fewer multiplications, for CPUs.

F(m, r) computes m outputs of an r-tap correlation from a tile of n = m + r - 1 inputs with n
products instead of m * r: y = AT @ ((G @ g) * (BT @ d)) for a tile d and taps g (Lavin & Gray,
"Fast Algorithms for Convolutional Neural Networks", 2016). A 2-D kernel nests it per axis, so
F(2x2, 3x3) takes 16 products per 4 outputs where the direct convolution takes 36. Over
channels, the elementwise product becomes one matrix product per transformed position, which is
where the time goes; the transforms are a few fused additions. On CPU, where XLA's convolution
and our patches product both pay per multiply, InceptionV3's 3x3, 5x5, 1x7 and 7x1 convolutions
run 1.5-2.5x faster this way (docs/benchmarks.md, "Convolutions on CPU").

The matrices come from Toom-Cook interpolation at the points 0, 1, -1, 2, -2, 1/2, -1/2
and infinity, built exactly in rationals here. Relative errors in float32 stay near 1e-6 for the
tiles used (tests/test_winograd.py).
"""

from __future__ import annotations

import fractions
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Interpolation points: with the point at infinity, F(m, r) uses m + r - 1 of them. The first
# seven (and infinity) keep float32 errors near 1e-6; F(4, 7), which needs +-3 too, was 7x
# worse, so tiles are chosen to need at most these eight.
_POINTS = tuple(fractions.Fraction(p) for p in (0, 1, -1, 2, -2, '1/2', '-1/2'))
_MAX_TILE_INPUTS = len(_POINTS) + 1
# Kernel sizes along one axis that take the Winograd path; larger ones keep the patches product.
MAX_TAPS = _MAX_TILE_INPUTS - 1


def output_tile(kernel_size: tuple[int, int]) -> tuple[int, int]:
  """Outputs per tile along each axis: 2 for a 2-D kernel (larger 2-D tiles cost more in their
  transforms than they save on CPU), up to 4 along a 1-D kernel's axis within the points
  above, 1 along an axis of size 1."""
  two_dimensional = all(k > 1 for k in kernel_size)
  return tuple(1 if k == 1 else (2 if two_dimensional else min(4, _MAX_TILE_INPUTS + 1 - k))
               for k in kernel_size)


def supports(kernel_size: tuple[int, int], strides: tuple[int, int]) -> bool:
  """Stride 1 and 2..MAX_TAPS taps along at least one axis (1x1 kernels are plain products)."""
  return (all(s == 1 for s in strides) and all(k <= MAX_TAPS for k in kernel_size) and
          any(k > 1 for k in kernel_size))


def _inverse(matrix: list[list[fractions.Fraction]]) -> list[list[fractions.Fraction]]:
  """Exact inverse by Gauss-Jordan elimination (the matrices are at most 8x8)."""
  n = len(matrix)
  rows = [list(row) + [fractions.Fraction(int(i == j)) for j in range(n)]
          for i, row in enumerate(matrix)]
  for col in range(n):
    pivot = next(r for r in range(col, n) if rows[r][col] != 0)
    rows[col], rows[pivot] = rows[pivot], rows[col]
    rows[col] = [v / rows[col][col] for v in rows[col]]
    for r in range(n):
      if r != col and rows[r][col] != 0:
        factor = rows[r][col]
        rows[r] = [v - factor * w for v, w in zip(rows[r], rows[col])]
  return [row[n:] for row in rows]


@functools.lru_cache(maxsize=None)
def transforms(m: int, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(AT (m, n), G (n, r), BT (n, n)) of F(m, r), as float64 arrays.

  Correlation is the transpose of polynomial multiplication. With V_k the (n, k) matrix that
  evaluates a k-coefficient polynomial at the n points (infinity: the leading coefficient),
  Toom-Cook multiplies as c = V_n^-1 ((V_r g) * (V_m a)), so its transpose gives
  AT = V_m^T, G = V_r, BT = V_n^-T. BT's rows are then scaled to a largest entry of 1 and G's
  rows by the inverse, which keeps the input transform's sums well-conditioned.
  """
  n = m + r - 1
  if n - 1 > len(_POINTS):
    raise ValueError(f'F({m}, {r}) needs {n - 1} finite points; {len(_POINTS)} are defined')
  points = _POINTS[:n - 1]

  def evaluation(k):
    rows = [[p ** j for j in range(k)] for p in points]
    return rows + [[fractions.Fraction(int(j == k - 1)) for j in range(k)]]

  at = [list(column) for column in zip(*evaluation(m))]
  g = evaluation(r)
  bt = [list(column) for column in zip(*_inverse(evaluation(n)))]
  for k in range(n):
    scale = max(abs(v) for v in bt[k])
    bt[k] = [v / scale for v in bt[k]]
    g[k] = [v * scale for v in g[k]]
  as_array = lambda rows: np.array([[float(v) for v in row] for row in rows])
  return as_array(at), as_array(g), as_array(bt)


def _weighted_sum(terms):
  """sum(coefficient * array) over nonzero coefficients, with no product for +-1."""
  total = None
  for coefficient, array in terms:
    coefficient = float(coefficient)  # A Python float keeps the array's dtype (bfloat16).
    if coefficient == 0:
      continue
    term = array if coefficient == 1 else (-array if coefficient == -1 else array * coefficient)
    total = term if total is None else total + term
  return total


def _transform_input(x, axis: int, m: int, tiles: int, bt: np.ndarray):
  """(n, ...): along `axis`, the tiles' n inputs (stride m) mixed by BT, on a new first axis."""
  n = bt.shape[0]
  shifted = [lax.slice_in_dim(x, j, j + m * (tiles - 1) + 1, m, axis) for j in range(n)]
  return jnp.stack([_weighted_sum(zip(bt[a].tolist(), shifted)) for a in range(n)])


def valid_convolution(x: jax.Array, kernel: jax.Array, precision=None) -> jax.Array:
  """The VALID, stride-1 convolution of NHWC `x` with an HWIO `kernel`, as Winograd tiles.

  The whole batch is one product per transformed position: chunking it (as the patches product
  does) was slower on CPU once freed memory is kept (docs/benchmarks.md).
  """
  kh, kw, cin, cout = kernel.shape
  n, h, w, _ = x.shape
  oh, ow = h - kh + 1, w - kw + 1
  mh, mw = output_tile((kh, kw))
  th, tw = -(-oh // mh), -(-ow // mw)
  x = jnp.pad(x, ((0, 0), (0, th * mh + kh - 1 - h), (0, tw * mw + kw - 1 - w), (0, 0)))
  at_h, g_h, bt_h = transforms(mh, kh)
  at_w, g_w, bt_w = transforms(mw, kw)
  # (nh, nw, cin, cout): G_h K G_w^T per channel pair, in float32 whatever the kernel's dtype.
  u = jnp.einsum('ai,bj,ijco->abco', g_h, g_w, kernel.astype(jnp.float32)).astype(x.dtype)
  # (nw, nh, n, th, tw, cin): the tiles' inputs transformed along the height, then the width.
  v = _transform_input(_transform_input(x, 1, mh, th, bt_h), 3, mw, tw, bt_w)
  nh, nw = bt_h.shape[0], bt_w.shape[0]
  products = jnp.einsum('bapc,abco->bapo', v.reshape(nw, nh, n * th * tw, cin), u,
                        precision=precision).reshape(nw, nh, n, th, tw, cout)
  rows = [jnp.stack([_weighted_sum((at_h[i, a] * at_w[j, b], products[b, a])
                                   for a in range(nh) for b in range(nw))
                     for j in range(mw)], axis=3)
          for i in range(mh)]  # each (n, th, tw, mw, cout)
  y = jnp.stack(rows, axis=2).reshape(n, th * mh, tw * mw, cout)
  return y[:, :oh, :ow]
