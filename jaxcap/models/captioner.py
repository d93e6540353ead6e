"""Captioner = image encoder (chosen by name) + decoder (`config.model.decoder`).

'show_tell' reads the pooled image embedding (B, D); 'updown' reads the encoder's grid
(B, H, W, C) and attends over it at every word. "Image features" below are whichever of the two
the decoder reads: what `encode` returns and what the feature cache stores.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxcap.data.tokenizer import BOS_ID
from jaxcap.data.tokenizer import PAD_ID
from jaxcap.models import decoder as decoder_lib
from jaxcap.models import encoders
from jaxcap.models import inception_v3
from jaxcap.models import updown

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# `config.model.decoder` -> whether its image features are the encoder's grid.
DECODERS = {'show_tell': False, 'updown': True}


class Captioner(nn.Module):
  encoder: nn.Module
  decoder: decoder_lib.Decoder | updown.UpDownDecoder
  # False freezes the encoder: no gradient reaches it and batch norm uses its moving statistics.
  train_encoder: bool = True

  def encode(self, images: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """(B, H, W, 3) images in [-1, 1], or uint8 pixels (the training stream's, scaled here on
    the device as `preprocess.scale_image` would) -> float32 image features: (B, D) embeddings,
    or (B, H', W', C) grids for a decoder that attends."""
    if images.dtype == jnp.uint8:
      images = images.astype(jnp.float32) / 127.5 - 1.0
    embedding = self.encoder(images, train=train and self.train_encoder)
    return embedding if self.train_encoder else jax.lax.stop_gradient(embedding)

  def __call__(self, images: jnp.ndarray, input_tokens: jnp.ndarray,
               train: bool = False) -> jnp.ndarray:
    """Teacher-forced logits (B, T, vocab) for input ids (B, T)."""
    return self.decoder(self.encode(images, train), input_tokens)

  def caption_logits(self, image_embedding: jnp.ndarray, input_tokens: jnp.ndarray) -> jnp.ndarray:
    """Teacher-forced logits from precomputed embeddings (evaluation, cached features)."""
    return self.decoder(image_embedding, input_tokens)

  def loss_sums(self, images: jnp.ndarray, input_tokens: jnp.ndarray, targets: jnp.ndarray,
                weights: jnp.ndarray, train: bool = False) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Teacher-forced sums of weighted cross-entropy and correct argmaxes, no logits tensor."""
    return self.decoder.loss_sums(self.encode(images, train), input_tokens, targets, weights, train)

  def caption_loss_sums(self, image_embedding: jnp.ndarray, input_tokens: jnp.ndarray,
                        targets: jnp.ndarray, weights: jnp.ndarray,
                        train: bool = False) -> tuple[jnp.ndarray, jnp.ndarray]:
    """`loss_sums` from precomputed embeddings (cached features, evaluation)."""
    return self.decoder.loss_sums(image_embedding, input_tokens, targets, weights, train)

  def sampler_loss_sums(self, image_embedding: jnp.ndarray, input_tokens: jnp.ndarray,
                        targets: jnp.ndarray, weights: jnp.ndarray,
                        temperature: float = 1.0) -> tuple[jnp.ndarray, jnp.ndarray]:
    """`caption_loss_sums` under the distribution captions are sampled from: PAD and BOS left
    out (`jaxcap.decode`), logits divided by `temperature` (self-critical training)."""
    return self.decoder.loss_sums(image_embedding, input_tokens, targets, weights,
                                  excluded_ids=(PAD_ID, BOS_ID), temperature=temperature)

  def initial_state(self, image_features: jnp.ndarray) -> tuple[Any, Any]:
    """The decoder's initial carry, and the memory every decoding step reads (for 'updown' the
    grid and its attention projection, computed once here)."""
    return self.decoder.initial_state(image_features)

  def decode_step(self, carry: Any, tokens: jnp.ndarray,
                  memory: Any) -> tuple[Any, jnp.ndarray, jnp.ndarray]:
    """(B,) ids -> new carry, (B, vocab) next-id logits, (B, N) attention over the N grid
    positions (N = 0 for a decoder that does not attend)."""
    return self.decoder.step(carry, tokens, memory)


def create_model(model_config: ml_collections.ConfigDict, vocab_size: int) -> Captioner:
  """The captioner described by `config.model`, for a tokenizer of `vocab_size` ids."""
  if model_config.dtype not in DTYPES:
    raise ValueError(f'config.model.dtype={model_config.dtype!r} is not one of {sorted(DTYPES)}')
  if model_config.decoder not in DECODERS:
    raise ValueError(f'config.model.decoder={model_config.decoder!r} is not one of '
                     f'{sorted(DECODERS)}')
  dtype = DTYPES[model_config.dtype]
  if model_config.decoder == 'updown':
    return Captioner(
        encoder=encoders.create_encoder(model_config, dtype, grid=True),
        decoder=updown.UpDownDecoder(
            vocab_size=vocab_size, embed_dim=model_config.embed_dim,
            lstm_size=model_config.lstm_size, attention_size=model_config.attention_size,
            loss_chunk_steps=model_config.loss_chunk_steps, lstm_unroll=model_config.lstm_unroll,
            dropout=model_config.dropout, grid_coordinates=model_config.grid_coordinates,
            dtype=dtype),
        train_encoder=model_config.train_encoder)
  decoder = decoder_lib.Decoder(
      vocab_size=vocab_size, embed_dim=model_config.embed_dim, lstm_size=model_config.lstm_size,
      image_bottleneck=model_config.image_bottleneck,
      logit_bottleneck=model_config.logit_bottleneck,
      loss_chunk_steps=model_config.loss_chunk_steps, lstm_unroll=model_config.lstm_unroll,
      dropout=model_config.dropout, dtype=dtype)
  return Captioner(encoder=encoders.create_encoder(model_config, dtype), decoder=decoder,
                   train_encoder=model_config.train_encoder)


def load_encoder_weights(model_config: ml_collections.ConfigDict) -> dict | None:
  """The converted encoder variables named by `config.model.encoder_weights`, or None.

  Call it before any training work: a missing directory, or one converted with the top, stops
  the run here with a message saying how to convert the weights.
  """
  directory = model_config.encoder_weights
  if directory is None:
    return None
  if model_config.encoder != 'inception_v3':
    raise ValueError(f'config.model.encoder_weights is set, but config.model.encoder='
                     f'{model_config.encoder!r}: pretrained weights exist for inception_v3 only')
  return inception_v3.load_pretrained(directory, include_top=False)
