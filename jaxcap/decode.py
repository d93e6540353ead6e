"""Caption decoding with fixed shapes, for use under jit."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxcap.data.tokenizer import BOS_ID
from jaxcap.data.tokenizer import EOS_ID
from jaxcap.data.tokenizer import PAD_ID


def _forbid_specials(logits: jax.Array) -> jax.Array:
  """A caption never contains PAD or BOS: they are not candidates (PAD only follows EOS)."""
  return logits.astype(jnp.float32).at[..., PAD_ID].set(-jnp.inf).at[..., BOS_ID].set(-jnp.inf)


class Captions(NamedTuple):
  """Decoded captions: ids after BOS (EOS included, PAD after it), each caption's
  log-probability under the model (EOS included), and each generated id's attention weights
  over the N grid positions (zero after EOS; N = 0 for a decoder that does not attend)."""
  tokens: jax.Array     # (..., max_len - 1) int32
  log_probs: jax.Array  # (...,) float32
  attention: jax.Array  # (..., max_len - 1, N) float32


def _token_by_token(apply_fn: Callable[..., Any], variables: Any, features: jax.Array,
                    max_len: int, choose: Callable[[jax.Array, jax.Array], jax.Array],
                    rng: jax.Array) -> Captions:
  """Captions of (B, ...) image features, each step's `choose(logits, key)` fed back.

  A fixed-length scan: shapes never depend on when captions end, so it compiles once.
  """
  carry, memory = apply_fn(variables, features, method='initial_state')
  batch_size = features.shape[0]

  def step(state, key):
    carry, tokens, done, log_prob = state
    carry, logits, attention = apply_fn(variables, carry, tokens, memory, method='decode_step')
    logits = _forbid_specials(logits)
    chosen = choose(logits, key).astype(jnp.int32)
    next_tokens = jnp.where(done, PAD_ID, chosen)
    chosen_log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits), chosen[:, None], -1)[:, 0]
    log_prob = log_prob + jnp.where(done, 0.0, chosen_log_prob)
    attention = jnp.where(done[:, None], 0.0, attention.astype(jnp.float32))
    done = done | (next_tokens == EOS_ID)
    return (carry, next_tokens, done, log_prob), (next_tokens, attention)

  start = (carry, jnp.full((batch_size,), BOS_ID, jnp.int32), jnp.zeros((batch_size,), bool),
           jnp.zeros((batch_size,), jnp.float32))
  (_, _, _, log_prob), (tokens, attention) = jax.lax.scan(
      step, start, jax.random.split(rng, max_len - 1))
  return Captions(tokens.T, log_prob, attention.transpose(1, 0, 2))


TopK = Callable[[jax.Array, int], tuple[jax.Array, jax.Array]]


def _top_id(values: jax.Array, top_k: TopK) -> jax.Array:
  """jnp.argmax over the last axis (the first of equal maxima), through `top_k` with k = 1:
  XLA's CPU reduction to an index ran 1.5x slower than lax.top_k over a 10k vocabulary, and
  self-critical steps at that vocabulary 1.3x faster without it (docs/benchmarks.md)."""
  return top_k(values, 1)[1][..., 0]


def _greedy(top_k: TopK = jax.lax.top_k) -> Callable[[jax.Array, jax.Array], jax.Array]:
  return lambda logits, key: _top_id(logits, top_k)


def _sampler(temperature: float,
             top_k: TopK = jax.lax.top_k) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """jax.random.categorical's draw (the Gumbel-max trick: the same noise for the same key)."""
  def sample(logits, key):
    scaled = logits / temperature
    return _top_id(jax.random.gumbel(key, scaled.shape, scaled.dtype) + scaled, top_k)
  return sample


def greedy_from_embedding(apply_fn: Callable[..., Any], variables: Any, features: jax.Array,
                          max_len: int) -> jax.Array:
  """Greedy captions of (B, ...) image features (cached features, self-critical training)."""
  return _token_by_token(apply_fn, variables, features, max_len, _greedy(),
                         jax.random.key(0)).tokens


def sample_from_embedding(apply_fn: Callable[..., Any], variables: Any, features: jax.Array,
                          max_len: int, rng: jax.Array, temperature: float = 1.0) -> jax.Array:
  """Captions of (B, ...) image features sampled from softmax(logits / temperature)."""
  return _token_by_token(apply_fn, variables, features, max_len, _sampler(temperature),
                         rng).tokens


def greedy_decode(apply_fn: Callable[..., Any], variables: Any, images: jax.Array,
                  max_len: int) -> jax.Array:
  """Greedy captions (B, max_len - 1): the ids after BOS, EOS included, PAD after EOS."""
  embedding = apply_fn(variables, images, method='encode')
  return greedy_from_embedding(apply_fn, variables, embedding, max_len)


def portable_top_k(operand: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """`lax.top_k` as a stable sort: the same values and indices (of equal values, the lower index
  first). lax.top_k lowers to a StableHLO composite that older consumers cannot read (TF
  2.21's, for a SavedModel); a sort they can, and jnp.argmax for k = 1."""
  if k == 1:
    indices = jnp.argmax(operand, axis=-1, keepdims=True).astype(jnp.int32)
    return jnp.take_along_axis(operand, indices, axis=-1), indices
  indices = jnp.argsort(-operand, axis=-1, stable=True)[..., :k].astype(jnp.int32)
  return jnp.take_along_axis(operand, indices, axis=-1), indices


def beam_hypotheses(apply_fn: Callable[..., Any], variables: Any, images: jax.Array, max_len: int,
                    beam_size: int, length_penalty: float = 0.0,
                    top_k: TopK = jax.lax.top_k) -> Captions:
  """Batched beam search with fixed shapes: every final hypothesis, best first: (B, K,
  max_len - 1) ids, (B, K) their log-probabilities and (B, K, max_len - 1, N) attention.

  Each step extends every live beam by every token and keeps the best `beam_size` of the
  candidates; a finished beam (EOS emitted) continues only with PAD at no cost, so it keeps its
  score and its place among the candidates. At step 0 all beams are the same prefix: only the
  first one is live, so no duplicates are kept. At the end hypotheses are ranked by
  log-probability / length ** length_penalty (0: raw log-probability). beam_size 1 is greedy.
  `top_k` picks the candidates: lax.top_k, or `portable_top_k` for export.
  """
  features = apply_fn(variables, images, method='encode')
  batch_size, steps = images.shape[0], max_len - 1
  features = jnp.repeat(features, beam_size, axis=0)  # (B * K, ...)
  # The memory is the same for every beam of an image: beams never need to gather it.
  carry, memory = apply_fn(variables, features, method='initial_state')
  _, _, first_attention = jax.eval_shape(
      lambda c: apply_fn(variables, c, jnp.zeros((batch_size * beam_size,), jnp.int32), memory,
                         method='decode_step'), carry)
  log_probs = jnp.tile(jnp.array([0.0] + [-jnp.inf] * (beam_size - 1)), (batch_size, 1))
  state = (carry, jnp.full((batch_size, beam_size), BOS_ID, jnp.int32), log_probs,
           jnp.zeros((batch_size, beam_size), bool),
           jnp.full((batch_size, beam_size, steps), PAD_ID, jnp.int32),
           jnp.zeros((batch_size, beam_size, steps, first_attention.shape[-1]), jnp.float32))

  def step(state, t):
    carry, last, log_probs, finished, tokens, attention = state
    carry, logits, step_attention = apply_fn(variables, carry, last.reshape(-1), memory,
                                             method='decode_step')
    step_log_probs = jax.nn.log_softmax(_forbid_specials(logits)).reshape(batch_size, beam_size, -1)
    vocab_size = step_log_probs.shape[-1]
    pad_only = jnp.full((vocab_size,), -jnp.inf).at[PAD_ID].set(0.0)
    step_log_probs = jnp.where(finished[..., None], pad_only, step_log_probs)
    candidates = (log_probs[..., None] + step_log_probs).reshape(batch_size, -1)
    log_probs, index = top_k(candidates, beam_size)
    beam, token = index // vocab_size, (index % vocab_size).astype(jnp.int32)
    gather = lambda x: jnp.take_along_axis(
        x, beam.reshape(beam.shape + (1,) * (x.ndim - 2)), axis=1)
    tokens = gather(tokens).at[:, :, t].set(token)
    step_attention = step_attention.astype(jnp.float32).reshape(batch_size, beam_size, -1)
    step_attention = jnp.where(finished[..., None], 0.0, step_attention)
    attention = gather(attention).at[:, :, t].set(gather(step_attention))
    finished = gather(finished) | (token == EOS_ID)
    flat_beam = (beam + jnp.arange(batch_size)[:, None] * beam_size).reshape(-1)
    carry = jax.tree.map(lambda c: c[flat_beam], carry)
    return (carry, token, log_probs, finished, tokens, attention), None

  (_, _, log_probs, _, tokens, attention), _ = jax.lax.scan(step, state, jnp.arange(steps))
  lengths = jnp.maximum(jnp.sum(tokens != PAD_ID, axis=-1), 1).astype(jnp.float32)
  order = jnp.argsort(-(log_probs / lengths ** length_penalty), axis=-1)
  return Captions(jnp.take_along_axis(tokens, order[..., None], axis=1),
                  jnp.take_along_axis(log_probs, order, axis=1),
                  jnp.take_along_axis(attention, order[..., None, None], axis=1))


def beam_search(apply_fn: Callable[..., Any], variables: Any, images: jax.Array, max_len: int,
                beam_size: int, length_penalty: float = 0.0,
                top_k: TopK = jax.lax.top_k) -> Captions:
  """The best hypothesis of `beam_hypotheses`: (B, max_len - 1) ids, (B,) log-probabilities,
  (B, max_len - 1, N) attention."""
  hypotheses = beam_hypotheses(apply_fn, variables, images, max_len, beam_size, length_penalty,
                               top_k)
  return Captions(*(x[:, 0] for x in hypotheses))


def sample_decode(apply_fn: Callable[..., Any], variables: Any, images: jax.Array, max_len: int,
                  rng: jax.Array, temperature: float = 1.0) -> jax.Array:
  """Captions sampled token by token from softmax(logits / temperature); PAD after EOS."""
  embedding = apply_fn(variables, images, method='encode')
  return sample_from_embedding(apply_fn, variables, embedding, max_len, rng, temperature)


def decode_with_log_probs(
    apply_fn: Callable[..., Any], variables: Any, images: jax.Array, max_len: int,
    decode_config: Any, rng: jax.Array | None = None,
    top_k: TopK = jax.lax.top_k,
) -> Captions:
  """Captions by `decode_config.method` ('greedy', 'beam' or 'sample'): (B, max_len - 1) ids,
  (B,) the model's log-probability of each (for 'sample', at temperature 1) and
  (B, max_len - 1, N) each id's attention over the grid. `top_k` picks the beam's candidates
  (`beam_hypotheses`) and each greedy or sampled id."""
  if decode_config.method == 'beam':
    return beam_search(apply_fn, variables, images, max_len, decode_config.beam_size,
                       decode_config.length_penalty, top_k)
  if decode_config.method == 'greedy':
    choose = _greedy(top_k)
  elif decode_config.method == 'sample':
    choose = _sampler(decode_config.temperature, top_k)
  else:
    raise ValueError(f"config.decode.method={decode_config.method!r} is not 'greedy', 'beam' or "
                     "'sample'")
  embedding = apply_fn(variables, images, method='encode')
  return _token_by_token(apply_fn, variables, embedding, max_len, choose,
                         jax.random.key(0) if rng is None else rng)


def decode(apply_fn: Callable[..., Any], variables: Any, images: jax.Array, max_len: int,
           decode_config: Any, rng: jax.Array | None = None) -> jax.Array:
  """Captions by `decode_config.method`: 'greedy', 'beam' or 'sample'."""
  return decode_with_log_probs(apply_fn, variables, images, max_len, decode_config, rng).tokens
