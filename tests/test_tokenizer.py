"""Sentencepiece tokenizer: special ids, padding, round trips, persistence."""

import numpy as np

from jaxcap.data import shapes
from jaxcap.data import tokenizer as tokenizer_lib

CAPTIONS = [
    c for i in range(300)
    for c in shapes.make_example(0, 0, i, image_size=32, min_objects=1, max_objects=3).captions
]


def test_round_trip_and_padding():
  tok = tokenizer_lib.train(CAPTIONS, vocab_size=128)
  rows = tok.encode(CAPTIONS[:20], max_len=24)
  assert rows.shape == (20, 24) and rows.dtype == np.int32
  assert (rows[:, 0] == tokenizer_lib.BOS_ID).all()
  for row in rows:
    length = int((row != tokenizer_lib.PAD_ID).sum())
    assert row[length - 1] == tokenizer_lib.EOS_ID
    assert (row[length:] == tokenizer_lib.PAD_ID).all()
  assert tok.decode(rows) == CAPTIONS[:20]
  assert tok.unknown_rate(CAPTIONS) == 0.0


def test_whole_words_and_truncation():
  tok = tokenizer_lib.train(CAPTIONS, vocab_size=128)
  assert tok.processor.encode('a big red circle', out_type=str) == ['▁a', '▁big', '▁red', '▁circle']
  row = tok.encode(['a big red circle'], max_len=3)[0]
  assert row.tolist() == [tokenizer_lib.BOS_ID, tok.processor.piece_to_id('▁a'),
                          tok.processor.piece_to_id('▁big')]
  assert tok.decode(np.array([[5, 6, tokenizer_lib.EOS_ID, 7]]))[0] == tok.processor.decode([5, 6])


def test_unknown_characters_and_case():
  tok = tokenizer_lib.train(CAPTIONS, vocab_size=128)
  assert tok.decode(tok.encode(['A BIG Red circle'], 24)) == ['a big red circle']
  assert tok.unknown_rate(['a big red circle ☃']) > 0


def test_load_or_train_saves_and_reuses(tmp_path):
  calls = []
  def captions():
    calls.append(1)
    return CAPTIONS
  first = tokenizer_lib.load_or_train(tmp_path, captions, 128)
  second = tokenizer_lib.load_or_train(tmp_path, captions, 128)
  assert len(calls) == 1
  assert (tmp_path / tokenizer_lib.MODEL_FILENAME).exists()
  np.testing.assert_array_equal(first.encode(CAPTIONS[:5], 24), second.encode(CAPTIONS[:5], 24))
