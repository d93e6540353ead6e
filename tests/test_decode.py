"""Beam search and sampling against exhaustive search and greedy decoding (no TensorFlow)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcap import decode
from jaxcap.data.tokenizer import BOS_ID
from jaxcap.data.tokenizer import EOS_ID
from jaxcap.data.tokenizer import PAD_ID

VOCAB = 6  # PAD, UNK, BOS, EOS and two words.


def _table_model(seed):
  """A decoder whose next-token logits depend on the image, the step and the previous token."""
  table = jax.random.normal(jax.random.key(seed), (2, 8, VOCAB, VOCAB)) * 2.0
  return apply_with(table), table


def _sequence_log_prob(table, image, sequence):
  logits = table[image].at[..., PAD_ID].set(-jnp.inf).at[..., BOS_ID].set(-jnp.inf)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  total, previous = 0.0, BOS_ID
  for position, token in enumerate(sequence):
    total += float(log_probs[position, previous, token])
    if token == EOS_ID:
      break
    previous = token
  return total


def _all_sequences(table, image, steps):
  """Every valid sequence of `steps` ids (PAD only after EOS) with its log-probability."""
  result = []
  for sequence in itertools.product(range(VOCAB), repeat=steps):
    end = sequence.index(EOS_ID) if EOS_ID in sequence else steps
    if PAD_ID in sequence[:end] or BOS_ID in sequence[:end] or any(
        t != PAD_ID for t in sequence[end + 1:]):
      continue
    result.append((_sequence_log_prob(table, image, sequence), list(sequence)))
  return sorted(result, reverse=True)


def _exhaustive(table, image, steps):
  """The most probable sequence over all sequences of `steps` ids (PAD after EOS)."""
  score, sequence = _all_sequences(table, image, steps)[0]
  return sequence, score


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_wide_beam_equals_exhaustive_search(seed):
  apply, table = _table_model(seed)
  images = jnp.array([0.0, 1.0]).reshape(2, 1, 1, 1) * jnp.ones((2, 2, 2, 1))
  max_len = 5  # 4 steps.
  tokens, scores, _ = jax.jit(decode.beam_search, static_argnums=(0, 3, 4))(
      apply, None, images, max_len, VOCAB ** 3)
  for image in range(2):
    best, best_score = _exhaustive(table, image, max_len - 1)
    assert tokens[image].tolist() == best
    assert scores[image] == pytest.approx(best_score, abs=1e-4)


@pytest.mark.parametrize('seed', [0, 3])
def test_beam_one_is_greedy(seed):
  apply, _ = _table_model(seed)
  images = jnp.array([0.0, 1.0]).reshape(2, 1, 1, 1) * jnp.ones((2, 2, 2, 1))
  beam, _, _ = decode.beam_search(apply, None, images, 8, beam_size=1)
  greedy = decode.greedy_decode(apply, None, images, 8)
  np.testing.assert_array_equal(beam, greedy)


def test_beam_keeps_finished_hypotheses_and_distinct_beams():
  apply, table = _table_model(4)
  # Step 0: EOS is the likeliest first id, so the one-id caption [EOS] is finished at once and
  # must survive four more steps beside the live beams.
  table = table.at[:, 0, BOS_ID, EOS_ID].set(6.0)
  images = jnp.zeros((1, 2, 2, 1))
  tokens, scores, attention = decode.beam_hypotheses(apply_with(table), None, images, 6,
                                                     beam_size=3)
  np.testing.assert_array_equal(attention, _expected_attention(tokens))
  rows = [row for row in tokens[0].tolist()]
  assert len({tuple(row) for row in rows}) == 3  # Distinct hypotheses.
  assert [EOS_ID] + [PAD_ID] * 4 in rows  # The finished one is kept, PAD after its EOS.
  for row, score in zip(rows, scores[0].tolist()):
    assert score == pytest.approx(_sequence_log_prob(table, 0, row), abs=1e-4)
  assert scores[0].tolist() == sorted(scores[0].tolist(), reverse=True)
  # A beam as wide as the search space keeps exactly the best sequences, in order.
  wide_tokens, wide_scores, _ = decode.beam_hypotheses(apply_with(table), None, images, 4,
                                                       VOCAB ** 2)
  exhaustive = _all_sequences(table, 0, 3)
  assert wide_tokens[0, :5].tolist() == [seq for _, seq in exhaustive[:5]]
  np.testing.assert_allclose(wide_scores[0, :5], [s for s, _ in exhaustive[:5]], atol=1e-4)


def apply_with(table):
  """A decoder reading its logits from `table[image, step, previous id]`, whose "attention"
  over a grid of VOCAB positions is the one-hot of the previous id."""
  def apply(variables, *args, method):
    del variables
    if method == 'encode':
      return args[0][:, 0, 0, :1]  # Image "embedding": 0 or 1, picks the table.
    if method == 'initial_state':
      return (args[0][:, 0].astype(jnp.int32), jnp.zeros(args[0].shape[0], jnp.int32)), ()
    (image, position), tokens, _ = args
    return (image, position + 1), table[image, position, tokens], jax.nn.one_hot(tokens, VOCAB)
  return apply


def _expected_attention(tokens):
  """The fake decoder's attention for each generated id: one-hot of the id before it (BOS
  first), zero after EOS."""
  tokens = np.asarray(tokens)
  previous = np.concatenate([np.full(tokens.shape[:-1] + (1,), BOS_ID), tokens[..., :-1]], -1)
  after_eos = np.cumsum(previous == EOS_ID, axis=-1) > 0
  return np.where(after_eos[..., None], 0.0, np.eye(VOCAB)[previous])


def _greedy_by_definition(table, image, steps):
  """Each step's first largest allowed logit (np.argmax), fed back; PAD after EOS."""
  tokens, previous = [], BOS_ID
  for position in range(steps):
    if previous == EOS_ID or (tokens and tokens[-1] == PAD_ID):
      tokens.append(PAD_ID)
      continue
    logits = np.array(table[image, position, previous])
    logits[[PAD_ID, BOS_ID]] = -np.inf
    previous = int(np.argmax(logits))
    tokens.append(previous)
  return tokens


def test_greedy_takes_the_first_largest_logit_at_each_step():
  rng = np.random.default_rng(0)
  # Small integers: many ties between the largest logits, where the first id must win.
  table = jnp.asarray(rng.integers(-2, 2, (2, 8, VOCAB, VOCAB)).astype(np.float32))
  images = jnp.array([0.0, 1.0]).reshape(2, 1, 1, 1) * jnp.ones((2, 2, 2, 1))
  tokens = decode.greedy_decode(apply_with(table), None, images, 9)
  for image in range(2):
    assert tokens[image].tolist() == _greedy_by_definition(table, image, 8)


def test_samples_follow_the_tempered_softmax():
  table = jax.random.normal(jax.random.key(7), (2, 8, VOCAB, VOCAB))
  draws = 6000
  tokens = decode.sample_decode(apply_with(table), None, jnp.zeros((draws, 2, 2, 1)), 3,
                                jax.random.key(2), temperature=0.5)
  counts = np.bincount(np.asarray(tokens[:, 0]), minlength=VOCAB) / draws
  logits = np.array(table[0, 0, BOS_ID]) / 0.5
  logits[[PAD_ID, BOS_ID]] = -np.inf
  expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
  np.testing.assert_allclose(counts, expected, atol=0.02)


def test_sampling_at_low_temperature_is_greedy_and_pads_after_eos():
  apply, _ = _table_model(5)
  images = jnp.array([0.0, 1.0]).reshape(2, 1, 1, 1) * jnp.ones((2, 2, 2, 1))
  cold = decode.sample_decode(apply, None, images, 8, jax.random.key(0), temperature=1e-4)
  np.testing.assert_array_equal(cold, decode.greedy_decode(apply, None, images, 8))
  # EOS made likely at every step: every sampled row ends early, and only PAD follows.
  _, table = _table_model(5)
  hot = decode.sample_decode(
      apply_with(table.at[..., EOS_ID].add(3.0)),
      None,
      jnp.zeros((64, 2, 2, 1)),
      8,
      jax.random.key(1),
      temperature=1.0)
  ends = [row.index(EOS_ID) if EOS_ID in row else None for row in hot.tolist()]
  assert all(end is not None and end < 6 for end in ends)
  for row, end in zip(hot.tolist(), ends):
    assert row[end + 1:] == [PAD_ID] * (len(row) - end - 1)


@pytest.mark.parametrize('method', ['greedy', 'sample', 'beam'])
def test_decode_with_log_probs_scores_each_caption_by_the_definition(method):
  apply, table = _table_model(4)
  images = jnp.array([0.0, 1.0]).reshape(2, 1, 1, 1) * jnp.ones((2, 2, 2, 1))
  config = type('DecodeConfig', (), {'method': method, 'beam_size': 3, 'length_penalty': 0.0,
                                     'temperature': 1.5})()
  tokens, log_probs, attention = decode.decode_with_log_probs(apply, None, images, 8, config,
                                                              jax.random.key(5))
  np.testing.assert_array_equal(attention, _expected_attention(tokens))
  np.testing.assert_array_equal(tokens,
                                decode.decode(apply, None, images, 8, config, jax.random.key(5)))
  for image in range(2):
    assert log_probs[image] == pytest.approx(
        _sequence_log_prob(table, image, tokens[image].tolist()), abs=1e-4)


def test_portable_top_k_equals_lax_top_k_with_ties_and_infinities():
  rng = np.random.default_rng(0)
  x = rng.integers(-3, 3, (50, 40)).astype(np.float32)  # Many ties.
  x[rng.random(x.shape) < 0.3] = -np.inf
  x[0] = -np.inf
  for k in (1, 3, 7):
    values, indices = decode.portable_top_k(jnp.asarray(x), k)
    expected_values, expected_indices = jax.lax.top_k(jnp.asarray(x), k)
    np.testing.assert_array_equal(values, expected_values)
    np.testing.assert_array_equal(indices, expected_indices)
