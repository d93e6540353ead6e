"""A split's reference captions, read without decoding images, and their token table.

Captions are tokenized once per split into a table keyed by image id; the image streams look
their rows up, so tokenization never runs per step.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from jaxcap.data import tokenizer as tokenizer_lib


@dataclasses.dataclass(frozen=True)
class SplitCaptions:
  """The reference captions of one split, in the split's order."""
  image_ids: np.ndarray  # (num_images,) int64
  texts: tuple[tuple[str, ...], ...]

  def all_texts(self) -> list[str]:
    return [text for texts in self.texts for text in texts]


def read_captions(builder: tfds.core.DatasetBuilder, split: str) -> SplitCaptions:
  """Reads a split's captions without decoding its images."""
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={'image': tfds.decode.SkipDecoding()})
  ds = ds.map(lambda f: {'id': f['image/id'], 'text': f['captions']['text']},
              num_parallel_calls=tf.data.AUTOTUNE)
  image_ids, texts = [], []
  for features in ds.as_numpy_iterator():
    image_ids.append(features['id'])
    texts.append(tuple(t.decode('utf-8') for t in features['text']))
  return SplitCaptions(np.asarray(image_ids, np.int64), tuple(texts))


@dataclasses.dataclass(frozen=True)
class TokenTable:
  """Tokenized captions of a split: rows (num_images, max_captions, max_len), PAD-filled."""
  image_ids: np.ndarray
  tokens: np.ndarray
  counts: np.ndarray  # captions per image

  @classmethod
  def build(cls, captions: SplitCaptions, tokenizer: tokenizer_lib.Tokenizer,
            max_len: int) -> TokenTable:
    max_captions = max((len(t) for t in captions.texts), default=1)
    tokens = np.full((len(captions.texts), max_captions, max_len), tokenizer_lib.PAD_ID, np.int32)
    rows = tokenizer.encode(captions.all_texts(), max_len)
    counts = np.asarray([len(t) for t in captions.texts], np.int32)
    starts = np.concatenate([[0], np.cumsum(counts)])
    for i, (start, count) in enumerate(zip(starts, counts)):
      tokens[i, :count] = rows[start:start + count]
    return cls(captions.image_ids, tokens, counts)

  def lookup_fn(self):
    """A tf function: features -> features plus `tokens` (C, L) and `num_captions`."""
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(
            tf.constant(self.image_ids, tf.int64), tf.range(len(self.image_ids), dtype=tf.int64)),
        default_value=-1)
    tokens, counts = tf.constant(self.tokens), tf.constant(self.counts)

    def add_tokens(features):
      row = table.lookup(features['image/id'])
      tf.debugging.assert_non_negative(row, 'image id missing from the caption table')
      return {**features, 'tokens': tf.gather(tokens, row), 'num_captions': tf.gather(counts, row)}

    return add_tokens
