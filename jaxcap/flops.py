"""FLOPs of a JAX function, counted from its program the same way on every backend.

MFU needs a FLOP count that does not depend on the machine. XLA's cost analysis does: on CUDA
(jax 0.11) the lowered program's analysis answers None, the compiled one leaves out cuDNN's
convolutions, and on every backend it counts a loop's body once. This counts the jaxpr instead:
2 FLOPs per multiply-add of every matrix product (`dot_general`) and convolution, each loop body
times its trip count, the costlier branch of a `cond`. Elementwise work is left out, as in the
usual MFU (what the matrix units could have done), and so is a `while_loop`'s body, whose trip
count is not in the program: a function with one raises rather than count too little.
"""

from __future__ import annotations

from collections.abc import Callable
import math
from typing import Any

import jax
from jax.extend import core as jex_core


def _dot_general_macs(equation) -> int:
  lhs, rhs = (v.aval.shape for v in equation.invars)
  (_, rhs_contracting), (_, rhs_batch) = equation.params['dimension_numbers']
  rhs_free = [size for i, size in enumerate(rhs) if i not in (*rhs_contracting, *rhs_batch)]
  return math.prod(lhs) * math.prod(rhs_free)


def _conv_macs(equation) -> int:
  """Each output element is a sum over the kernel's inputs: in-features (of its group) x window."""
  rhs = equation.invars[1].aval.shape
  out = equation.outvars[0].aval.shape
  kernel_out_features = rhs[equation.params['dimension_numbers'].rhs_spec[0]]
  return math.prod(out) * math.prod(rhs) // kernel_out_features


def jaxpr_flops(jaxpr: jex_core.Jaxpr) -> int:
  """FLOPs of matrix products and convolutions in `jaxpr`, loops counted per iteration."""
  total = 0
  for equation in jaxpr.eqns:
    name = equation.primitive.name
    if name == 'dot_general':
      total += 2 * _dot_general_macs(equation)
    elif name == 'conv_general_dilated':
      total += 2 * _conv_macs(equation)
    elif name == 'scan':
      total += equation.params['length'] * jaxpr_flops(equation.params['jaxpr'].jaxpr)
    elif name == 'cond':
      total += max(jaxpr_flops(b.jaxpr) for b in equation.params['branches'])
    elif name == 'while':
      body = jaxpr_flops(equation.params['body_jaxpr'].jaxpr)
      if body:
        raise ValueError('a while_loop with matrix products: its trip count is not in the '
                         'program, so its FLOPs cannot be counted (use lax.scan)')
    else:  # pjit, remat, custom_jvp/vjp calls, shard_map...: their bodies, once.
      total += sum(jaxpr_flops(j) for j in jex_core.jaxprs_in_params(equation.params))
  return total


def count_flops(fn: Callable[..., Any], *args, **kwargs) -> float:
  """FLOPs of one call of `fn(*args, **kwargs)`, traced on abstract values (nothing runs). A
  jitted `fn` is traced as it is, with its own options (a jit with compiler options cannot be
  nested in another)."""
  jitted = fn if hasattr(fn, 'trace') else jax.jit(fn)
  return float(jaxpr_flops(jitted.trace(*args, **kwargs).jaxpr.jaxpr))
