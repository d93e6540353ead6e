"""Caption decoding with fixed shapes, for use under jit."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxcap.data.tokenizer import BOS_ID, EOS_ID, PAD_ID


def greedy_decode(apply_fn: Callable[..., Any], variables: Any, images: jax.Array,
                  max_len: int) -> jax.Array:
  """Greedy captions (B, max_len - 1): the ids after BOS, EOS included, PAD after EOS.

  A fixed-length scan: shapes never depend on when captions end, so it compiles once.
  """
  embedding = apply_fn(variables, images, method='encode')
  carry = apply_fn(variables, embedding, method='initial_state')
  batch_size = images.shape[0]

  def step(state, _):
    carry, tokens, done = state
    carry, logits = apply_fn(variables, carry, tokens, method='decode_step')
    next_tokens = jnp.where(done, PAD_ID, jnp.argmax(logits, -1).astype(jnp.int32))
    done = done | (next_tokens == EOS_ID)
    return (carry, next_tokens, done), next_tokens

  start = (carry, jnp.full((batch_size,), BOS_ID, jnp.int32), jnp.zeros((batch_size,), bool))
  _, tokens = jax.lax.scan(step, start, None, length=max_len - 1)
  return tokens.T
