"""Sentencepiece tokenizer trained on the training captions, with fixed special ids.

The model file lives in the workdir, so evaluation, resumed training and inference all use the
exact vocabulary the parameters were trained with.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Sequence
import io
import os

import numpy as np
import sentencepiece as spm

PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3
MODEL_FILENAME = 'tokenizer.model'


class Tokenizer:
  """Captions to padded id rows (BOS ... EOS PAD ...) and back."""

  def __init__(self, model_proto: bytes):
    self.processor = spm.SentencePieceProcessor(model_proto=model_proto)
    specials = (self.processor.pad_id(), self.processor.unk_id(),
                self.processor.bos_id(), self.processor.eos_id())
    if specials != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
      raise ValueError(f'tokenizer has special ids {specials}, expected '
                       f'{(PAD_ID, UNK_ID, BOS_ID, EOS_ID)} (pad, unk, bos, eos)')

  @classmethod
  def load(cls, path: str | os.PathLike) -> Tokenizer:
    with open(path, 'rb') as f:
      return cls(f.read())

  @property
  def vocab_size(self) -> int:
    return self.processor.get_piece_size()

  def encode(self, texts: Sequence[str], max_len: int) -> np.ndarray:
    """(N, max_len) int32 rows: BOS, pieces, EOS, then PAD; cut at max_len."""
    rows = np.full((len(texts), max_len), PAD_ID, np.int32)
    for i, ids in enumerate(self.processor.encode(list(texts))):
      ids = [BOS_ID, *ids, EOS_ID][:max_len]
      rows[i, :len(ids)] = ids
    return rows

  def decode(self, rows: np.ndarray) -> list[str]:
    """Texts of id rows, read up to the first EOS; BOS and PAD are dropped."""
    texts = []
    for row in np.asarray(rows).tolist():
      if EOS_ID in row:
        row = row[:row.index(EOS_ID)]
      texts.append(self.processor.decode([t for t in row if t not in (PAD_ID, BOS_ID)]))
    return texts

  def unknown_rate(self, texts: Sequence[str]) -> float:
    """Fraction of pieces that map to the unknown id."""
    pieces = [t for ids in self.processor.encode(list(texts)) for t in ids]
    return float(np.mean([t == UNK_ID for t in pieces])) if pieces else 0.0


def train(captions: Iterable[str], vocab_size: int, model_type: str = 'bpe') -> Tokenizer:
  """Trains a sentencepiece model on `captions` (lower-cased by NFKC case folding).

  `vocab_size` is an upper bound: a small corpus such as the built-in dataset's yields fewer
  pieces rather than an error. BPE is the default because on a small, repetitive corpus the
  unigram trainer keeps character pieces instead of whole words.
  """
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(captions), model_writer=model, vocab_size=vocab_size,
      model_type=model_type, character_coverage=1.0, hard_vocab_limit=False,
      normalization_rule_name='nmt_nfkc_cf', pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID,
      eos_id=EOS_ID, num_threads=1, minloglevel=2)
  return Tokenizer(model.getvalue())


def load_or_train(workdir: str | os.PathLike, captions_fn: Callable[[], Iterable[str]],
                  vocab_size: int, model_type: str = 'bpe') -> Tokenizer:
  """The workdir's tokenizer; trained on `captions_fn()` and saved there on first use (the
  workdir is created if it does not exist yet: a first command's normal case)."""
  path = os.path.join(workdir, MODEL_FILENAME)
  if os.path.exists(path):
    return Tokenizer.load(path)
  tokenizer = train(captions_fn(), vocab_size, model_type)
  os.makedirs(workdir, exist_ok=True)
  tmp_path = path + '.tmp'
  with open(tmp_path, 'wb') as f:
    f.write(tokenizer.processor.serialized_model_proto())
  os.replace(tmp_path, path)
  return tokenizer
