"""A trained captioner as a TensorFlow SavedModel (jax2tf), for serving without JAX.

The serving signature takes a batch of encoded images (JPEG or PNG bytes) and returns their
captions and log-probabilities, and for a decoder that attends `attention`: (images,
max_len - 1, H, W) each generated id's weights over the grid (zero after EOS). Everything
between happens in the graph: decoding the bytes, the evaluation preprocessing of training
(`preprocess_lib.preprocess_image`: centre square crop, resize, [-1, 1]), the model and its
decoding (greedy, beam or sampled, as configured), and the sentencepiece pieces joined back
into text. The model part is the StableHLO JAX lowers,
for CPU and CUDA, so TF Serving or any TF runtime with XLA runs what jaxcap runs.
"""

from __future__ import annotations

import os
import shutil

import jax
from jax.experimental import jax2tf
import numpy as np
import tensorflow as tf

from jaxcap import decode
from jaxcap import predict
from jaxcap.data import preprocess as preprocess_lib
from jaxcap.data import tokenizer as tokenizer_lib

SIGNATURE = 'serving_default'
# Where the model's StableHLO is lowered for: a host without a GPU, or one with.
PLATFORMS = ('cpu', 'cuda')
_WORD_BOUNDARY = '\u2581'  # sentencepiece's '▁', the space before a word.


def piece_table(tokenizer: tokenizer_lib.Tokenizer) -> list[str]:
  """Each id's text as sentencepiece decodes it: nothing for control ids (PAD, BOS, EOS),
  sentencepiece's ' ⁇ ' for the unknown id, the piece itself otherwise."""
  processor = tokenizer.processor
  table = []
  for i in range(processor.get_piece_size()):
    if processor.is_control(i):
      table.append('')
    elif processor.is_unknown(i):
      table.append(_WORD_BOUNDARY + '\u2047' + _WORD_BOUNDARY)
    else:
      table.append(processor.id_to_piece(i))
  return table


def detokenize(tokens: tf.Tensor, pieces: tf.Tensor) -> tf.Tensor:
  """(B, T) ids -> (B,) texts as `Tokenizer.decode` gives them: read up to the first EOS,
  pieces joined, '▁' as a space, no leading spaces."""
  before_eos = tf.math.cumsum(tf.cast(tokens == tokenizer_lib.EOS_ID, tf.int32), axis=-1,
                              exclusive=True) == 0
  words = tf.where(before_eos & (tokens != tokenizer_lib.EOS_ID), tf.gather(pieces, tokens), '')
  texts = tf.strings.regex_replace(tf.strings.reduce_join(words, axis=-1), _WORD_BOUNDARY, ' ')
  return tf.strings.regex_replace(texts, '^ +', '')


class CaptionModule(tf.Module):
  """What the SavedModel holds: the variables, the piece table and the serving function."""

  def __init__(self, trained: predict.Trained, batch_size: int):
    super().__init__()
    self.batch_size = batch_size
    config = trained.config
    self.image_size = config.data.image_size
    apply_fn = trained.state.apply_fn
    variables = jax.device_get(trained.state.variables)
    captions = predict.caption_fn(config, top_k=decode.portable_top_k)
    self.grid = trained.attention_grid

    def caption_ids(variables, images):
      outputs = captions(apply_fn, variables, images)
      return outputs['ids'], outputs['log_probs'], outputs['attention']

    # Fixed shapes, as everywhere in jaxcap: the graph runs the model on padded chunks.
    self._caption_ids = jax2tf.convert(caption_ids, with_gradient=False,
                                       native_serialization_platforms=PLATFORMS)
    self.variables_tree = tf.nest.map_structure(
        lambda x: tf.Variable(np.asarray(x), trainable=False), variables)
    self.pieces = tf.constant(piece_table(trained.tokenizer))

  @tf.function(input_signature=[tf.TensorSpec((None,), tf.string, name='images')], autograph=False)
  def serve(self, images):
    pixels = tf.map_fn(
        lambda encoded: preprocess_lib.decode_and_preprocess(encoded, self.image_size), images,
        fn_output_signature=tf.TensorSpec((self.image_size, self.image_size, 3), tf.float32))
    count = tf.shape(images)[0]
    padded = -count % self.batch_size
    chunks = tf.reshape(tf.pad(pixels, [[0, padded], [0, 0], [0, 0], [0, 0]]),
                        (-1, self.batch_size, self.image_size, self.image_size, 3))
    tokens, log_probs, attention = tf.map_fn(
        lambda chunk: self._caption_ids(self.variables_tree, chunk), chunks,
        fn_output_signature=(tf.int32, tf.float32, tf.float32))
    tokens = tf.reshape(tokens, (-1, tokens.shape[-1]))[:count]
    log_probs = tf.reshape(log_probs, (-1,))[:count]
    outputs = {'captions': detokenize(tokens, self.pieces), 'log_probs': log_probs}
    if self.grid is not None:
      outputs['attention'] = tf.reshape(attention, (-1, tokens.shape[-1], *self.grid))[:count]
    return outputs


def export(trained: predict.Trained, output_dir: str, batch_size: int = 8) -> None:
  """Writes the SavedModel of `trained` (decoding by `trained.config.decode`) to `output_dir`;
  it runs the model on chunks of `batch_size` images."""
  module = CaptionModule(trained, batch_size)
  # Written beside, then swapped in: an interrupted export leaves any earlier one whole.
  tmp_dir = output_dir.rstrip('/') + '.tmp'
  shutil.rmtree(tmp_dir, ignore_errors=True)
  tf.saved_model.save(module, tmp_dir, signatures={SIGNATURE: module.serve})
  shutil.rmtree(output_dir, ignore_errors=True)
  os.replace(tmp_dir, output_dir)
