"""The Show-and-Tell caption decoder, in Flax linen.

image embedding -> Dense bottleneck (elu) -> Dense to the LSTM size (elu) = the LSTM's initial
c and h; word embedding -> LSTM (nn.RNN, a scan under jit) -> Dense bottleneck (elu) -> logits.

Training never builds the (B, T, vocab) logits: `loss_sums` projects and scores a few time
steps at a time (`softmax_loss`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxcap.models import softmax_loss

Carry = tuple[jnp.ndarray, jnp.ndarray]  # (c, h)


class LogitsProjection(nn.Module):
  """Dense(vocab) that can also score targets without materialising the logits."""
  vocab_size: int
  features_in: int
  # Time steps projected at a time by `loss_sums`.
  loss_chunk_steps: int = 1
  dtype: Any = jnp.float32

  def setup(self):
    self.kernel = self.param('kernel', nn.initializers.lecun_normal(),
                             (self.features_in, self.vocab_size))
    self.bias = self.param('bias', nn.initializers.zeros_init(), (self.vocab_size,))

  def __call__(self, features: jnp.ndarray) -> jnp.ndarray:
    logits = features.astype(self.dtype) @ self.kernel.astype(self.dtype)
    return logits.astype(jnp.float32) + self.bias

  def loss_sums(self, features: jnp.ndarray, targets: jnp.ndarray, weights: jnp.ndarray,
                excluded_ids: tuple[int, ...] = (),
                temperature: float = 1.0) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Sums of weighted token cross-entropy and of weighted correct argmaxes, over (B, T)."""
    return softmax_loss.projected_cross_entropy(
        features.astype(self.dtype), self.kernel, self.bias, targets, weights,
        self.loss_chunk_steps, tuple(excluded_ids), float(temperature))


class Decoder(nn.Module):
  vocab_size: int
  embed_dim: int = 100
  lstm_size: int = 300
  image_bottleneck: int = 120
  logit_bottleneck: int = 120
  loss_chunk_steps: int = 1
  # Time steps per iteration of the LSTM's scan (1: a plain loop).
  lstm_unroll: int = 1
  # Dropout rate on the word embeddings and on the LSTM's outputs, in training only.
  dropout: float = 0.0
  dtype: Any = jnp.float32

  def setup(self):
    self.image_to_bottleneck = nn.Dense(self.image_bottleneck, dtype=self.dtype)
    self.bottleneck_to_state = nn.Dense(self.lstm_size, dtype=self.dtype)
    self.word_embedding = nn.Embed(self.vocab_size, self.embed_dim, dtype=self.dtype)
    self.lstm = nn.RNN(nn.OptimizedLSTMCell(self.lstm_size, dtype=self.dtype), return_carry=True,
                       unroll=self.lstm_unroll)
    self.embedding_dropout = nn.Dropout(self.dropout)
    self.output_dropout = nn.Dropout(self.dropout)
    self.lstm_to_bottleneck = nn.Dense(self.logit_bottleneck, dtype=self.dtype)
    self.bottleneck_to_logits = LogitsProjection(
        self.vocab_size, features_in=self.logit_bottleneck,
        loss_chunk_steps=self.loss_chunk_steps, dtype=self.dtype)

  def initial_state(self, image_embedding: jnp.ndarray) -> tuple[Carry, tuple[()]]:
    """The LSTM's initial (c, h), both the projected image embedding, and what each decoding
    step reads besides (nothing: the image enters through the initial state only)."""
    bottleneck = nn.elu(self.image_to_bottleneck(image_embedding))
    state = nn.elu(self.bottleneck_to_state(bottleneck))
    return (state, state), ()

  def _lstm(self,
            carry: Carry,
            tokens: jnp.ndarray,
            train: bool = False) -> tuple[Carry, jnp.ndarray]:
    """(B, T) ids -> final carry and (B, T, logit_bottleneck) features of the next-id logits.
    `train` applies dropout (its rng stream: 'dropout')."""
    embedded = self.embedding_dropout(self.word_embedding(tokens), deterministic=not train)
    carry, lstm_outputs = self.lstm(embedded, initial_carry=carry)
    lstm_outputs = self.output_dropout(lstm_outputs, deterministic=not train)
    return carry, nn.elu(self.lstm_to_bottleneck(lstm_outputs))

  def __call__(self, image_embedding: jnp.ndarray, input_tokens: jnp.ndarray) -> jnp.ndarray:
    """Teacher forcing: (B, D) embeddings, (B, T) input ids -> (B, T, vocab) float32 logits."""
    _, features = self._lstm(self.initial_state(image_embedding)[0], input_tokens)
    return self.bottleneck_to_logits(features)

  def loss_sums(self, image_embedding: jnp.ndarray, input_tokens: jnp.ndarray,
                targets: jnp.ndarray, weights: jnp.ndarray, train: bool = False,
                excluded_ids: tuple[int, ...] = (),
                temperature: float = 1.0) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Teacher forcing, scored: sums of weighted cross-entropy and correct argmaxes (of the
    distribution without `excluded_ids`, at `temperature`, when given)."""
    _, features = self._lstm(self.initial_state(image_embedding)[0], input_tokens, train)
    return self.bottleneck_to_logits.loss_sums(features, targets, weights, excluded_ids,
                                               temperature)

  def step(self, carry: Carry, tokens: jnp.ndarray,
           memory: tuple[()] = ()) -> tuple[Carry, jnp.ndarray, jnp.ndarray]:
    """One decoding step: (B,) ids -> new carry, (B, vocab) logits of the next id and (B, 0)
    attention weights (this decoder attends to nothing)."""
    del memory
    carry, features = self._lstm(carry, tokens[:, None])
    return carry, self.bottleneck_to_logits(features[:, 0]), jnp.zeros((tokens.shape[0], 0))
