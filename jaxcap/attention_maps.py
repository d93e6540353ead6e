"""Where the model looked: a decoded caption's attention weights as one map per token and per
word, for `caption.py --json`, the gallery and the caption page.

Decoding gives each generated id's weights over the N = H x W grid positions (`jaxcap.decode`);
here they become (H, W) maps beside the pieces they produced, and words (a piece that starts
with sentencepiece's '▁' starts a word) with the mean map of their pieces.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import os

import numpy as np

from jaxcap.data import tokenizer as tokenizer_lib

WORD_START = '▁'
END = '</s>'
# The page code that draws a word's map over its image, shared by the gallery and the caption page.
OVERLAY_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'attention_overlay.js')


def overlay_script() -> str:
  """attention_overlay.js, to inline in a page."""
  with open(OVERLAY_SCRIPT, encoding='utf-8') as f:
    return f.read()


@dataclasses.dataclass(frozen=True)
class TokenMaps:
  tokens: list[str]  # The generated pieces, EOS included as '</s>'.
  maps: np.ndarray   # (len(tokens), H, W) each piece's attention weights, summing to 1.


def token_maps(tokenizer: tokenizer_lib.Tokenizer, ids: Sequence[int], attention: np.ndarray,
               grid: Sequence[int]) -> TokenMaps:
  """One caption's generated ids (max_len - 1,) and attention (max_len - 1, H * W) -> the
  pieces up to and including EOS and their (H, W) maps."""
  ids = [int(i) for i in ids]
  length = ids.index(tokenizer_lib.EOS_ID) + 1 if tokenizer_lib.EOS_ID in ids else len(ids)
  tokens = [END if i == tokenizer_lib.EOS_ID else tokenizer.processor.id_to_piece(i)
            for i in ids[:length]]
  maps = np.asarray(attention, np.float32)[:length].reshape(length, *grid)
  return TokenMaps(tokens, maps)


def word_maps(token_maps_: TokenMaps) -> list[tuple[str, np.ndarray]]:
  """The caption's words, each with the mean of its pieces' maps (EOS left out)."""
  words: list[tuple[str, list[np.ndarray]]] = []
  for token, weights in zip(token_maps_.tokens, token_maps_.maps):
    if token == END:
      break
    if token.startswith(WORD_START) or not words:
      words.append((token.removeprefix(WORD_START), [weights]))
    else:
      words[-1] = (words[-1][0] + token, words[-1][1] + [weights])
  return [(word, np.mean(maps, axis=0)) for word, maps in words if word]
