"""CIDEr-D on the device: the reward of self-critical training, inside the jitted step.

Semantics are coco-caption's CIDEr-D (pycocoevalcap's `CiderScorer`, self-critical.pytorch's
`CiderD`) over token ids: n-grams n = 1..4; an n-gram's value is its count times
`idf = log(num_documents) - log(max(1, df))`, where a document is one image's reference set;
per n, the candidate's values clipped to the reference's (`min(c, r) * r`) over the product of
the two norms; a Gaussian length penalty (sigma 6) on the difference in bigram counts; mean
over n, mean over the image's references, times 10. Every non-PAD id counts.

Design, exact for ids below 2**16 (keys are compared in full: no collisions):
- The references' distinct n-grams form a trie. A unigram's node is its id; an n-gram (n > 1)
  is the key (node of its (n-1)-gram prefix, last id), stored with its document frequency in
  an open-addressing hash table per n (linear probing, load at most 1/4). A key lies within a
  fixed window of slots after its hash, the window's width measured when the table is built,
  so a lookup is one gather of a contiguous window and a comparison: fixed shapes, no loop. Its
  slot is the n-gram's node for the next level. Absent n-grams get df 0.
- Counts inside the candidate and inside each of its image's references come from comparing
  n-grams directly (T x T and T x C x L id equalities, extended one position per n), so only df
  needs the tables. The references' norms and bigram counts are computed once, on the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcap.data.tokenizer import PAD_ID

MAX_N = 4
SIGMA = 6.0
_ID_BITS = 16  # Ids are packed into uint64 n-gram keys on the host: 4 x 16 bits.


class NgramTables(NamedTuple):
  """Document frequencies of the references' n-grams (replicated on the devices)."""
  unigram_df: jax.Array          # (vocab,) int32
  # Per n = 2..MAX_N: (slots + window - 1, 3) int32 rows (prefix node, last id, df); empty
  # slots hold prefix -1. A key hashing to h lies in rows h .. h + window - 1.
  slots: tuple[jax.Array, ...]
  log_num_documents: jax.Array   # () float32


_MIN_SLOTS = 16


def _num_hash_slots(rows: int) -> int:
  """The power of two below `rows` (= slots + window - 1, window <= slots)."""
  return 1 << (rows.bit_length() - 1) if rows & (rows - 1) else rows


def _hash(prefix, last, num_slots: int, xp=np):
  """Slot of a key (prefix, last), in uint32 arithmetic that numpy and jax.numpy share."""
  h = (xp.asarray(prefix).astype(xp.uint32) * xp.uint32(0x9E3779B1)) ^ (
      xp.asarray(last).astype(xp.uint32) * xp.uint32(0x85EBCA77))
  h = h ^ (h >> xp.uint32(15))
  h = h * xp.uint32(0x2C1B3C6D)
  h = h ^ (h >> xp.uint32(12))
  return (h & xp.uint32(num_slots - 1)).astype(xp.int32)


def _hash_table(prefix: np.ndarray, last: np.ndarray,
                df: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Linear-probing table of the keys (prefix, last) -> (rows (slots + window - 1, 3), each
  key's slot). Keys are placed one probe step per round, vectorised."""
  num_slots = max(_MIN_SLOTS, 1 << int(np.ceil(np.log2(max(4 * len(prefix), 1)))))
  home = _hash(prefix, last, num_slots)
  owner = np.full(num_slots + len(prefix) + 1, -1, np.int64)
  slot_of = np.full(len(prefix), -1, np.int64)
  pending, step = np.arange(len(prefix)), 0
  while pending.size:
    position = home[pending] + step
    free = owner[position] == -1
    position, candidates = position[free], pending[free]
    taken, first = np.unique(position, return_index=True)  # One key per free slot per round.
    owner[taken] = candidates[first]
    slot_of[candidates[first]] = taken
    pending = pending[slot_of[pending] == -1]
    step += 1
  window = max(1, step)
  rows = np.zeros((num_slots + window - 1, 3), np.int32)
  rows[:, 0] = -1
  used = owner[:len(rows)] >= 0
  keys = owner[:len(rows)][used]
  rows[used] = np.stack([prefix[keys], last[keys], df[keys]], -1)
  return rows, slot_of


class ImageReferences(NamedTuple):
  """Each image's references, laid out for the scorer (leading axes: image)."""
  tokens: np.ndarray | jax.Array   # (I, C, L) int32, PAD after the end and for missing references
  norms: np.ndarray | jax.Array  # (I, C, MAX_N) float32 norm of each reference's tf-idf per n
  lengths: np.ndarray | jax.Array  # (I, C) float32 number of bigrams
  mask: np.ndarray | jax.Array     # (I, C) float32 1 for a real reference


def _windows(rows: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
  """Packed uint64 keys (R, L - n + 1) of every n-gram of every row, and whether it is real."""
  length = rows.shape[1] - n + 1
  if length <= 0:
    return np.zeros((len(rows), 0), np.uint64), np.zeros((len(rows), 0), bool)
  keys = np.zeros((len(rows), length), np.uint64)
  real = np.ones((len(rows), length), bool)
  for j in range(n):
    column = rows[:, j:j + length]
    keys = (keys << np.uint64(_ID_BITS)) | column.astype(np.uint64)
    real &= column != PAD_ID
  return keys, real


def _unique_counts(groups: np.ndarray,
                   keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Distinct (group, key) pairs and how often each occurs."""
  if keys.size == 0:
    return groups[:0], keys[:0], np.zeros(0, np.int64)
  order = np.lexsort((keys, groups))
  groups, keys = groups[order], keys[order]
  starts = np.flatnonzero(np.r_[True, (groups[1:] != groups[:-1]) | (keys[1:] != keys[:-1])])
  return groups[starts], keys[starts], np.diff(np.r_[starts, len(keys)])


class CiderD:
  """CIDEr-D of candidates against the references of their images.

  `references[i]` holds image i's reference captions as sequences of ids (PAD never inside).
  Document frequencies and the number of documents (images) come from them, once, on the host.
  """

  def __init__(self, references: Sequence[Sequence[Sequence[int]]], vocab_size: int | None = None):
    if len(references) == 0:
      raise ValueError('CiderD needs the references of at least one image')
    max_refs = max(1, max(len(refs) for refs in references))
    max_len = max([1] + [len(r) for refs in references for r in refs])
    tokens = np.zeros((len(references), max_refs, max_len), np.int64)
    for i, refs in enumerate(references):
      for c, ref in enumerate(refs):
        tokens[i, c, :len(ref)] = ref
    self._build(tokens, np.array([len(refs) for refs in references]), vocab_size)

  @classmethod
  def from_padded(cls, tokens: np.ndarray, num_references: np.ndarray,
                  vocab_size: int | None = None) -> CiderD:
    """From (I, C, L) ids, PAD after each reference's end, the first num_references[i] real."""
    scorer = cls.__new__(cls)
    scorer._build(np.asarray(tokens, np.int64), np.asarray(num_references), vocab_size)
    return scorer

  def _build(self, tokens: np.ndarray, num_references: np.ndarray, vocab_size: int | None) -> None:
    num_images, max_refs, max_len = tokens.shape
    if num_images == 0:
      raise ValueError('CiderD needs the references of at least one image')
    mask = (np.arange(max_refs)[None, :] < num_references[:, None]).astype(np.float32)
    tokens = np.where(mask[..., None] > 0, tokens, PAD_ID)
    if tokens.min(initial=0) < 0 or tokens.max(initial=0) >= 2 ** _ID_BITS:
      raise ValueError(f'CiderD: reference ids must lie in [0, {2 ** _ID_BITS})')
    vocab_size = max(vocab_size or 0, int(tokens.max(initial=0)) + 1)
    rows = tokens.reshape(-1, max_len)
    image_of_row = np.repeat(np.arange(num_images), max_refs)

    log_num_documents = np.log(float(num_images))
    level_keys, level_df, norms_sq = [], [], np.zeros((len(rows), MAX_N))
    for n in range(1, MAX_N + 1):
      keys, real = _windows(rows, n)
      row_index = np.broadcast_to(np.arange(len(rows))[:, None], keys.shape)[real]
      keys = keys[real]
      # Document frequency: in how many images' reference sets each n-gram occurs.
      _, image_keys, _ = _unique_counts(image_of_row[row_index], keys)
      distinct, df = np.unique(image_keys, return_counts=True)
      level_keys.append(distinct)
      level_df.append(df)
      # Each reference's own tf-idf norm for this n.
      ref_rows, ref_keys, tf = _unique_counts(row_index, keys)
      idf = log_num_documents - np.log(np.maximum(1, df[np.searchsorted(distinct, ref_keys)]))
      np.add.at(norms_sq[:, n - 1], ref_rows, (tf * idf) ** 2)
    bigrams = _windows(rows, 2)[1].sum(-1)

    unigram_df = np.zeros(vocab_size, np.int32)
    unigram_df[level_keys[0].astype(np.int64)] = level_df[0]
    slots, nodes = [], level_keys[0].astype(np.int64)  # A unigram's node is its id.
    for n in range(2, MAX_N + 1):
      keys = level_keys[n - 1]
      # The node of an n-gram's prefix: its id (n = 2) or its slot in level n - 1's table.
      prefix = nodes[np.searchsorted(level_keys[n - 2], keys >> np.uint64(_ID_BITS))]
      last = (keys & np.uint64(2 ** _ID_BITS - 1)).astype(np.int64)
      rows, nodes = _hash_table(prefix, last, level_df[n - 1])
      slots.append(rows)
    self.tables = NgramTables(unigram_df=jnp.asarray(unigram_df),
                              slots=tuple(map(jnp.asarray, slots)),
                              log_num_documents=jnp.float32(log_num_documents))
    # On the host: training places them beside the cached embeddings, split over the devices.
    self.references = ImageReferences(
        tokens=tokens.astype(np.int32),
        norms=np.sqrt(norms_sq).reshape(num_images, max_refs, MAX_N).astype(np.float32),
        lengths=bigrams.reshape(num_images, max_refs).astype(np.float32), mask=mask)
    self._scores = jax.jit(scores)

  @property
  def num_images(self) -> int:
    return self.references.tokens.shape[0]

  def scores(self, candidates: np.ndarray, image_index: np.ndarray) -> np.ndarray:
    """(N,) float32 CIDEr-D of each (N, T) candidate against the references of its image."""
    candidates, image_index = np.asarray(candidates), np.asarray(image_index)
    if candidates.ndim != 2 or image_index.shape != candidates.shape[:1]:
      raise ValueError(f'candidates {candidates.shape} must be (N, T) and image_index (N,), '
                       f'got {image_index.shape}')
    if image_index.size and (image_index.min() < 0 or image_index.max() >= self.num_images):
      raise ValueError(f'image_index must lie in [0, {self.num_images})')
    references = gather_references(self.references, image_index)
    return np.asarray(self._scores(self.tables, references, jnp.asarray(candidates, jnp.int32)))


def gather_references(references: ImageReferences, image_index) -> ImageReferences:
  """The references of each candidate's image: leading axis image -> candidate."""
  return ImageReferences(*(x[image_index] for x in references))


def _find(rows: jax.Array, query_prefix: jax.Array,
          query_last: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Node (slot, -1 where absent) and df (0 where absent) of each key (query_prefix, query_last)."""
  num_rows = rows.shape[0]
  num_slots = _num_hash_slots(num_rows)
  window = num_rows - num_slots + 1
  home = _hash(query_prefix, query_last, num_slots, jnp)
  # One contiguous window per key (a gather of (window, 3) slices).
  window_at = lambda start: jax.lax.dynamic_slice_in_dim(rows, start, window)
  candidates = jax.vmap(window_at)(home.reshape(-1)).reshape(*home.shape, window, 3)
  match = ((candidates[..., 0] == query_prefix[..., None]) &
           (candidates[..., 1] == query_last[..., None]) & (query_prefix[..., None] >= 0))
  found = jnp.any(match, -1)
  node = jnp.where(found, home + jnp.argmax(match, -1).astype(jnp.int32), -1)
  return node, jnp.sum(jnp.where(match, candidates[..., 2], 0), -1)


def scores(tables: NgramTables, references: ImageReferences, candidates: jax.Array) -> jax.Array:
  """(N,) CIDEr-D of (N, T) candidates, `references` already gathered per candidate (N, C, ...).

  Pure and fixed-shape: training calls it inside its jitted step.
  """
  num, length = candidates.shape
  vocab_size = tables.unigram_df.shape[0]
  ref_tokens = references.tokens
  # Equal real n-grams, extended one position per n: candidate x candidate (N, Tn, Tn) and
  # candidate x references (N, C, Tn, Ln); which candidate positions start a real n-gram.
  real_1 = candidates != PAD_ID
  same_1 = (candidates[:, :, None] == candidates[:, None, :]) & real_1[:, :, None] & real_1[:,
                                                                                            None, :]
  in_ref_1 = ((candidates[:, None, :, None] == ref_tokens[:, :, None, :]) &
              real_1[:, None, :, None] & (ref_tokens != PAD_ID)[:, :, None, :])
  real, same, in_ref = real_1, same_1, in_ref_1
  per_n = []
  node = jnp.where(candidates < vocab_size, candidates, -1)  # Trie node of each position's n-gram.
  candidate_bigrams = jnp.zeros((num,), jnp.float32)
  for n in range(1, MAX_N + 1):
    if length - n + 1 <= 0:
      per_n.append(jnp.zeros(ref_tokens.shape[:2], jnp.float32))
      continue
    if n == 1:
      df = jnp.where(node >= 0, tables.unigram_df[jnp.maximum(node, 0)], 0)
    else:
      real = real[:, :-1] & real_1[:, n - 1:]
      same = same[:, :-1, :-1] & same_1[:, n - 1:, n - 1:]
      in_ref = in_ref[..., :-1, :-1] & in_ref_1[..., n - 1:, n - 1:]
      node, df = _find(tables.slots[n - 2], node[:, :-1], candidates[:, n - 1:])
    idf = tables.log_num_documents - jnp.log(jnp.maximum(df, 1).astype(jnp.float32))
    count = jnp.sum(same, -1).astype(jnp.float32)
    earlier = jnp.tril(jnp.ones(same.shape[-2:], bool), -1)
    first = real & ~jnp.any(same & earlier, -1)  # One per distinct n-gram.
    ref_count = jnp.sum(in_ref, -1).astype(jnp.float32)                       # (N, C, Tn)
    value = count * idf
    norm = jnp.sqrt(jnp.sum(jnp.where(first, value ** 2, 0.0), -1))           # (N,)
    ref_value = ref_count * idf[:, None, :]
    overlap = jnp.sum(
        jnp.where(first[:, None, :],
                  jnp.minimum(value[:, None, :], ref_value) * ref_value, 0.0), -1)  # (N, C)
    ref_norm = references.norms[..., n - 1]
    both = (norm[:, None] > 0) & (ref_norm > 0)
    per_n.append(jnp.where(both, overlap / jnp.where(both, norm[:, None] * ref_norm, 1.0), overlap))
    if n == 2:
      candidate_bigrams = jnp.sum(real, -1).astype(jnp.float32)
  delta = candidate_bigrams[:, None] - references.lengths
  penalty = jnp.exp(-(delta ** 2) / (2 * SIGMA ** 2))
  per_reference = jnp.mean(jnp.stack(per_n, -1), -1) * penalty                # (N, C)
  num_refs = jnp.maximum(jnp.sum(references.mask, -1), 1.0)
  return 10.0 * jnp.sum(per_reference * references.mask, -1) / num_refs
