"""The Show-and-Tell caption decoder of the course project, in Flax linen.

image embedding -> Dense bottleneck (elu) -> Dense to the LSTM size (elu) = the LSTM's initial
c and h; word embedding -> LSTM (nn.RNN, a scan under jit) -> Dense bottleneck (elu) -> logits.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

Carry = tuple[jnp.ndarray, jnp.ndarray]  # (c, h)


class Decoder(nn.Module):
  vocab_size: int
  embed_dim: int = 100
  lstm_size: int = 300
  image_bottleneck: int = 120
  logit_bottleneck: int = 120
  dtype: Any = jnp.float32

  def setup(self):
    self.image_to_bottleneck = nn.Dense(self.image_bottleneck, dtype=self.dtype)
    self.bottleneck_to_state = nn.Dense(self.lstm_size, dtype=self.dtype)
    self.word_embedding = nn.Embed(self.vocab_size, self.embed_dim, dtype=self.dtype)
    self.lstm = nn.RNN(nn.OptimizedLSTMCell(self.lstm_size, dtype=self.dtype), return_carry=True)
    self.lstm_to_bottleneck = nn.Dense(self.logit_bottleneck, dtype=self.dtype)
    self.bottleneck_to_logits = nn.Dense(self.vocab_size, dtype=self.dtype)

  def initial_state(self, image_embedding: jnp.ndarray) -> Carry:
    """The LSTM's initial (c, h), both the projected image embedding."""
    bottleneck = nn.elu(self.image_to_bottleneck(image_embedding))
    state = nn.elu(self.bottleneck_to_state(bottleneck))
    return state, state

  def logits(self, lstm_outputs: jnp.ndarray) -> jnp.ndarray:
    bottleneck = nn.elu(self.lstm_to_bottleneck(lstm_outputs))
    return self.bottleneck_to_logits(bottleneck).astype(jnp.float32)

  def __call__(self, image_embedding: jnp.ndarray, input_tokens: jnp.ndarray) -> jnp.ndarray:
    """Teacher forcing: (B, D) embeddings, (B, T) input ids -> (B, T, vocab) float32 logits."""
    carry = self.initial_state(image_embedding)
    _, lstm_outputs = self.lstm(self.word_embedding(input_tokens), initial_carry=carry)
    return self.logits(lstm_outputs)

  def step(self, carry: Carry, tokens: jnp.ndarray) -> tuple[Carry, jnp.ndarray]:
    """One decoding step: (B,) ids -> new carry and (B, vocab) logits of the next id."""
    carry, lstm_outputs = self.lstm(self.word_embedding(tokens)[:, None], initial_carry=carry)
    return carry, self.logits(lstm_outputs[:, 0])
