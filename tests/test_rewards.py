"""The device CIDEr-D against a plain-Python CIDEr-D written from the definition."""

import collections
import math

import jax
import numpy as np
from pycocoevalcap.cider import cider_scorer
import pytest

from jaxcap import rewards


def _ngrams(ids, n):
  return collections.Counter(tuple(ids[i:i + n]) for i in range(len(ids) - n + 1))


def reference_cider_d(candidates, image_index, references):
  """CIDEr-D by its definition, in float64, one candidate at a time."""
  df = collections.Counter()
  for refs in references:
    df.update({g for ref in refs for n in range(1, 5) for g in _ngrams(ref, n)})
  log_documents = math.log(len(references))

  def vector(ids):
    vec = [{g: c * (log_documents - math.log(max(1, df[g]))) for g, c in _ngrams(ids, n).items()}
           for n in range(1, 5)]
    return vec, [math.sqrt(sum(v * v for v in d.values())) for d in vec], max(len(ids) - 1, 0)

  result = []
  for candidate, image in zip(candidates, image_index):
    ids = [int(t) for t in candidate if t != 0]
    vec, norm, length = vector(ids)
    total = 0.0
    for ref in references[image]:
      ref_vec, ref_norm, ref_length = vector(list(ref))
      for n in range(4):
        value = sum(
            min(v, ref_vec[n].get(g, 0.0)) * ref_vec[n].get(g, 0.0) for g, v in vec[n].items())
        if norm[n] and ref_norm[n]:
          value /= norm[n] * ref_norm[n]
        total += value * math.exp(-((length - ref_length) ** 2) / (2 * 6.0 ** 2)) / 4
    result.append(10.0 * total / len(references[image]))
  return np.array(result)


def _padded(rows, length):
  out = np.zeros((len(rows), length), np.int32)
  for i, row in enumerate(rows):
    out[i, :len(row)] = row
  return out


def test_hand_made_cases():
  references = [
      [[5, 6, 7, 8, 9, 2], [5, 6, 6, 6, 9, 2], [7, 8, 9, 2]],   # Repeated n-grams.
      [[10, 11, 12, 2], [10, 11, 2]],                          # Two references.
      [[5, 6, 7, 2]],                                          # One reference, shared n-grams.
      [[13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 2]],   # Long.
  ]
  candidates = [
      [5, 6, 7, 8, 9, 2],             # Equal to a reference.
      [5, 6, 6, 6, 6, 6, 6, 9, 2],    # Repeats beyond the references' counts (clipping).
      [40, 41, 42, 2],                # n-grams absent from all references.
      [],                             # Empty: 0.
      [10, 11, 2],
      [10, 11, 12, 10, 11, 12, 10, 11, 12, 10, 11, 12, 10, 11, 12, 2],  # Longer than every ref.
      [5, 2],                         # Shorter than every ref.
      [13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 2],
      [7, 8, 9, 2],
  ]
  image_index = np.array([0, 0, 0, 1, 1, 1, 2, 3, 2])
  scorer = rewards.CiderD(references)
  got = scorer.scores(_padded(candidates, 18), image_index)
  want = reference_cider_d(candidates, image_index, references)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert got[3] == 0 and got[2] == 0 and got[0] > got[1] > 0
  np.testing.assert_allclose(got, _pycocoevalcap_cider_d(candidates, image_index, references),
                             rtol=1e-5, atol=1e-6)


def _pycocoevalcap_cider_d(candidates, image_index, references):
  """pycocoevalcap's CiderScorer (coco-caption's CIDEr-D), ids as words: df from one entry per
  image, then each candidate scored as the first entry (the others empty, so the number of
  documents stays the number of images)."""
  words = lambda ids: ' '.join(str(i) for i in ids if i)
  coco = cider_scorer.CiderScorer(n=4, sigma=6.0)
  for refs in references:
    coco += (None, [words(r) for r in refs])
  coco.compute_doc_freq()
  all_refs = coco.crefs
  result = []
  for candidate, image in zip(candidates, image_index):
    coco.crefs = [all_refs[image]] + [r for i, r in enumerate(all_refs) if i != image]
    coco.ctest = [cider_scorer.cook_test(words(candidate))] + [{}] * (len(all_refs) - 1)
    result.append(coco.compute_cider()[0])
  return np.array(result)


@pytest.mark.parametrize('vocab_size', [64, 32_768, 65_536])
def test_random_captions_and_largest_vocabulary(vocab_size):
  rng = np.random.default_rng(vocab_size)
  # Few distinct ids so that n-grams repeat and match; the largest ids of the vocabulary too.
  alphabet = np.r_[np.arange(2, 8), vocab_size - 6 + np.arange(6)]
  references = []
  for _ in range(12):
    references.append([list(rng.choice(alphabet, rng.integers(1, 14))) + [2]
                       for _ in range(rng.integers(1, 6))])   # 1 to 5 references per image.
  candidates = [list(rng.choice(alphabet, rng.integers(0, 16))) for _ in range(60)]
  candidates += [references[i][0] for i in range(12)]
  image_index = rng.integers(0, 12, len(candidates))
  image_index[60:] = np.arange(12)
  got = rewards.CiderD(references, vocab_size).scores(_padded(candidates, 20), image_index)
  np.testing.assert_allclose(got, reference_cider_d(candidates, image_index, references),
                             rtol=1e-5, atol=1e-6)
  assert (got[60:] > 0).all()


def test_ids_beyond_the_packing_are_refused():
  with pytest.raises(ValueError, match='ids must lie'):
    rewards.CiderD([[[70_000, 2]]])


def test_from_padded_equals_the_lists_whatever_lies_in_the_masked_rows():
  """Training's constructor (ids after BOS, (I, C, L) padded, counts per image): the references
  beyond each image's count are masked out, whatever ids they hold."""
  rng = np.random.default_rng(7)
  references = [[
      list(rng.integers(3, 12, rng.integers(1, 9))) + [2] for _ in range(rng.integers(1, 5))
  ] for _ in range(10)]
  tokens = rng.integers(3, 12, (10, 5, 12))  # Junk everywhere, then the real references over it.
  for i, refs in enumerate(references):
    for c, ref in enumerate(refs):
      tokens[i, c] = _padded([ref], 12)[0]
  counts = np.array([len(refs) for refs in references])
  candidates = [list(rng.integers(3, 12, rng.integers(0, 10))) for _ in range(40)]
  candidates += [tokens[i, 4][:6].tolist() for i in range(10)
                ]  # A masked row's junk as the caption.
  image_index = np.r_[rng.integers(0, 10, 40), np.arange(10)]
  padded = rewards.CiderD.from_padded(tokens, counts, 16)
  listed = rewards.CiderD(references, 16)
  got = padded.scores(_padded(candidates, 14), image_index)
  np.testing.assert_allclose(got, listed.scores(_padded(candidates, 14), image_index), rtol=1e-6)
  np.testing.assert_allclose(got, reference_cider_d(candidates, image_index, references),
                             rtol=1e-5, atol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, padded.tables, listed.tables)
