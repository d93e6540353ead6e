"""The Up-Down caption decoder over an image grid (Anderson et al. 2018), in Flax linen.

Per word: an attention LSTM reads [language LSTM's h, mean grid feature, word embedding];
additive attention `w . tanh(W_v v_i + W_h h_att)`, softmax over the grid positions v_i, gives a
context vector; a language LSTM reads [context, h_att]; the next-word logits come from the
language LSTM's h. Both LSTMs start from (h, c) = elu(Dense(mean grid feature)): the decoder is
still initialised from the pooled image embedding.

What does not change from word to word is computed once per caption, outside the scan: the
grid's projection `W_v v_i`, and the attention LSTM's input gates from the word embeddings and
the mean grid feature (one matmul over all time steps). The scan does the rest.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcap.models.decoder import LogitsProjection

LstmCarry = tuple[jnp.ndarray, jnp.ndarray]  # (c, h)
Carry = tuple[LstmCarry, LstmCarry]          # (attention LSTM, language LSTM)
# (B, N, C) grid, (B, N, A) its attention projection, (B, 4 * lstm) the mean's attention-LSTM gates
Memory = tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]


def lstm_update(c: jnp.ndarray, gates: jnp.ndarray) -> LstmCarry:
  """The LSTM's new (c, h) from its pre-activation gates (i, f, g, o) along the last axis."""
  i, f, g, o = jnp.split(gates.astype(jnp.float32), 4, axis=-1)
  c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
  return c, jax.nn.sigmoid(o) * jnp.tanh(c)


def with_coordinates(grid: jnp.ndarray) -> jnp.ndarray:
  """(B, H, W, C) -> (B, H, W, C + 2): each position's row and column, from -1 to 1, appended."""
  batch, height, width, _ = grid.shape
  rows, cols = jnp.meshgrid(jnp.linspace(-1, 1, height), jnp.linspace(-1, 1, width),
                            indexing='ij')
  coordinates = jnp.broadcast_to(jnp.stack([rows, cols], -1), (batch, height, width, 2))
  return jnp.concatenate([grid, coordinates.astype(grid.dtype)], axis=-1)


class UpDownCell(nn.Module):
  """One word: both LSTMs and the attention between them. Returns the new carry, the language
  LSTM's h and the attention weights over the grid (B, N)."""
  lstm_size: int
  attention_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, carry: Carry, input_gates: jnp.ndarray,
               grids: tuple[jnp.ndarray, jnp.ndarray]) -> tuple[Carry, tuple[jnp.ndarray, ...]]:
    (c_att, h_att), (c_lang, h_lang) = carry
    grid, projected_grid = grids
    dense = lambda size, name, bias=True: nn.Dense(size, use_bias=bias, dtype=self.dtype,
                                                   name=name)
    gates = input_gates + dense(4 * self.lstm_size, 'attention_lstm_state', bias=False)(
        jnp.concatenate([h_lang, h_att], axis=-1))
    c_att, h_att = lstm_update(c_att, gates)
    query = dense(self.attention_size, 'attention_query')(h_att)
    hidden = jnp.tanh(projected_grid + query[:, None, :].astype(projected_grid.dtype))
    # No bias: softmax ignores a shift, so its gradient would be rounding noise that Adam scales
    # up into a parameter that differs with the order of the gradient all-reduce.
    scores = dense(1, 'attention_score', bias=False)(hidden)[..., 0].astype(jnp.float32)
    weights = jax.nn.softmax(scores, axis=-1)
    context = jnp.einsum('bn,bnc->bc', weights.astype(grid.dtype), grid)
    gates = (dense(4 * self.lstm_size, 'language_lstm_context')(context)
             + dense(4 * self.lstm_size, 'language_lstm_state', bias=False)(
                 jnp.concatenate([h_att, h_lang], axis=-1)))
    c_lang, h_lang = lstm_update(c_lang, gates)
    return ((c_att, h_att), (c_lang, h_lang)), (h_lang, weights)


class UpDownDecoder(nn.Module):
  """Reads image features (B, H, W, C): the encoder's last spatial map."""
  vocab_size: int
  embed_dim: int = 512
  lstm_size: int = 512
  attention_size: int = 512
  loss_chunk_steps: int = 1
  # Time steps per iteration of the scan (1: a plain loop).
  lstm_unroll: int = 1
  # Dropout rate on the word embeddings and on the language LSTM's outputs, in training only.
  dropout: float = 0.0
  # Append each grid position's (row, column), in [-1, 1], to its features: the context vector
  # then says where the decoder looked, which features a CNN pools over do not.
  grid_coordinates: bool = False
  dtype: Any = jnp.float32

  def setup(self):
    dense = lambda size, bias=True: nn.Dense(size, use_bias=bias, dtype=self.dtype)
    self.image_to_h = dense(self.lstm_size)
    self.image_to_c = dense(self.lstm_size)
    self.word_embedding = nn.Embed(self.vocab_size, self.embed_dim, dtype=self.dtype)
    self.attention_lstm_word = dense(4 * self.lstm_size)
    self.attention_lstm_mean = dense(4 * self.lstm_size, bias=False)
    self.grid_to_attention = dense(self.attention_size)
    self.cells = nn.scan(UpDownCell, variable_broadcast='params', split_rngs={'params': False},
                         in_axes=(1, nn.broadcast), out_axes=1, unroll=self.lstm_unroll)(
                             self.lstm_size, self.attention_size, self.dtype, name='cell')
    self.embedding_dropout = nn.Dropout(self.dropout)
    self.output_dropout = nn.Dropout(self.dropout)
    self.lstm_to_logits = LogitsProjection(self.vocab_size, features_in=self.lstm_size,
                                           loss_chunk_steps=self.loss_chunk_steps,
                                           dtype=self.dtype)

  def initial_state(self, grid: jnp.ndarray) -> tuple[Carry, Memory]:
    """(B, H, W, C) grid -> both LSTMs' initial (c, h), and what attention reads each step:
    the flattened grid (B, H * W, C) and its projection (B, H * W, attention_size)."""
    if self.grid_coordinates:
      grid = with_coordinates(grid)
    grid = grid.reshape(grid.shape[0], -1, grid.shape[-1])
    mean = jnp.mean(grid.astype(jnp.float32), axis=1)
    # The carry stays float32 whatever the compute dtype (`lstm_update` computes in float32).
    h = nn.elu(self.image_to_h(mean)).astype(jnp.float32)
    c = nn.elu(self.image_to_c(mean)).astype(jnp.float32)
    carry = ((c, h), (c, h))
    grid = grid.astype(self.dtype)
    # The mean's share of the attention LSTM's gates is the same at every step.
    return carry, (grid, self.grid_to_attention(grid), self.attention_lstm_mean(mean))

  def _run(self, carry: Carry, memory: Memory, tokens: jnp.ndarray,
           train: bool = False) -> tuple[Carry, jnp.ndarray, jnp.ndarray]:
    """(B, T) ids -> final carry, (B, T, lstm_size) features of the next-id logits and
    (B, T, N) attention weights."""
    grid, projected_grid, mean_gates = memory
    embedded = self.embedding_dropout(self.word_embedding(tokens), deterministic=not train)
    input_gates = self.attention_lstm_word(embedded) + mean_gates[:, None, :]
    carry, (features, weights) = self.cells(carry, input_gates, (grid, projected_grid))
    return carry, self.output_dropout(features, deterministic=not train), weights

  def __call__(self, grid: jnp.ndarray, input_tokens: jnp.ndarray) -> jnp.ndarray:
    """Teacher forcing: (B, H, W, C) grids, (B, T) input ids -> (B, T, vocab) float32 logits."""
    _, features, _ = self._run(*self.initial_state(grid), input_tokens)
    return self.lstm_to_logits(features)

  def attention(self, grid: jnp.ndarray, input_tokens: jnp.ndarray) -> jnp.ndarray:
    """Teacher forcing: (B, T, H * W) each input's attention weights over the grid."""
    return self._run(*self.initial_state(grid), input_tokens)[2]

  def loss_sums(self, grid: jnp.ndarray, input_tokens: jnp.ndarray, targets: jnp.ndarray,
                weights: jnp.ndarray, train: bool = False, excluded_ids: tuple[int, ...] = (),
                temperature: float = 1.0) -> tuple[jnp.ndarray, jnp.ndarray]:
    """As `Decoder.loss_sums`, from grids."""
    _, features, _ = self._run(*self.initial_state(grid), input_tokens, train)
    return self.lstm_to_logits.loss_sums(features, targets, weights, excluded_ids, temperature)

  def step(self, carry: Carry, tokens: jnp.ndarray,
           memory: Memory) -> tuple[Carry, jnp.ndarray, jnp.ndarray]:
    """One decoding step: (B,) ids -> new carry, (B, vocab) logits of the next id and (B, N)
    the attention weights it used."""
    carry, features, weights = self._run(carry, memory, tokens[:, None])
    return carry, self.lstm_to_logits(features[:, 0]), weights[:, 0]
