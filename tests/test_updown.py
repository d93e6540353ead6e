"""The Up-Down decoder against the equations of the PyTorch peer (`shared/peers/torch_updown.py`),
written out in numpy one word at a time, and the captioner that feeds it the encoder's grid."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest

from jaxcap import attention_maps
from jaxcap import caption
from jaxcap import decode
from jaxcap import predict
from jaxcap.data import shapes
from jaxcap.data.tokenizer import BOS_ID
from jaxcap.data.tokenizer import EOS_ID
from jaxcap.data.tokenizer import PAD_ID
from jaxcap.models import captioner
from jaxcap.models import updown

VOCAB, EMBED, LSTM, ATTENTION, CHANNELS = 11, 5, 6, 4, 7


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def _elu(x):
  return np.where(x > 0, x, np.exp(np.minimum(x, 0)) - 1)


def _lstm_cell(x, h, c, w_ih, w_hh, b):
  """torch.nn.LSTMCell: gates (i, f, g, o) = x W_ih + h W_hh + b."""
  i, f, g, o = np.split(x @ w_ih + h @ w_hh + b, 4, axis=-1)
  c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
  return _sigmoid(o) * np.tanh(c), c


def reference(params, grid, tokens):
  """The peer's forward pass: logits (B, T, V) and attention weights (B, T, N)."""
  p = jax.tree.map(np.asarray, params)
  cell = p['cell']
  grid = grid.reshape(grid.shape[0], -1, grid.shape[-1])
  mean = grid.mean(1)
  h0 = _elu(mean @ p['image_to_h']['kernel'] + p['image_to_h']['bias'])
  c0 = _elu(mean @ p['image_to_c']['kernel'] + p['image_to_c']['bias'])
  (h_att, c_att), (h_lang, c_lang) = (h0, c0), (h0, c0)
  # The attention LSTM's input is [h_language, mean, word]; the language LSTM's [context, h_att].
  state = cell['attention_lstm_state']['kernel']
  att_w_ih = np.concatenate([state[:LSTM], p['attention_lstm_mean']['kernel'],
                             p['attention_lstm_word']['kernel']])
  lang_state = cell['language_lstm_state']['kernel']
  lang_w_ih = np.concatenate([cell['language_lstm_context']['kernel'], lang_state[:LSTM]])
  projected = grid @ p['grid_to_attention']['kernel'] + p['grid_to_attention']['bias']
  logits, attention = [], []
  for t in range(tokens.shape[1]):
    word = p['word_embedding']['embedding'][tokens[:, t]]
    h_att, c_att = _lstm_cell(np.concatenate([h_lang, mean, word], -1), h_att, c_att, att_w_ih,
                              state[LSTM:], p['attention_lstm_word']['bias'])
    query = h_att @ cell['attention_query']['kernel'] + cell['attention_query']['bias']
    scores = (np.tanh(projected + query[:, None]) @ cell['attention_score']['kernel'])[..., 0]
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    context = np.einsum('bn,bnc->bc', weights, grid)
    h_lang, c_lang = _lstm_cell(np.concatenate([context, h_att], -1), h_lang, c_lang, lang_w_ih,
                                lang_state[LSTM:], cell['language_lstm_context']['bias'])
    logits.append(h_lang @ p['lstm_to_logits']['kernel'] + p['lstm_to_logits']['bias'])
    attention.append(weights)
  return np.stack(logits, 1), np.stack(attention, 1)


@pytest.fixture(scope='module')
def model_and_params():
  model = updown.UpDownDecoder(VOCAB, EMBED, LSTM, ATTENTION)
  grid = np.random.default_rng(0).normal(size=(3, 2, 3, CHANNELS)).astype(np.float32)
  tokens = np.random.default_rng(1).integers(0, VOCAB, size=(3, 5))
  params = model.init(jax.random.key(0), grid, tokens)['params']
  # Non-zero biases, so that a bias in the wrong place shows.
  params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(x.size), x.shape),
                        params)
  return model, params, grid, tokens


def test_teacher_forcing_and_attention_equal_the_peer_equations(model_and_params):
  model, params, grid, tokens = model_and_params
  expected_logits, expected_attention = reference(params, grid, tokens)
  logits = model.apply({'params': params}, grid, tokens)
  attention = model.apply({'params': params}, grid, tokens, method='attention')
  np.testing.assert_allclose(logits, expected_logits, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(attention, expected_attention, atol=1e-6, rtol=1e-5)
  np.testing.assert_allclose(attention.sum(-1), 1.0, atol=1e-6)


def test_grid_coordinates_are_each_position_s_row_and_column_appended(model_and_params):
  _, _, grid, tokens = model_and_params
  model = updown.UpDownDecoder(VOCAB, EMBED, LSTM, ATTENTION, grid_coordinates=True)
  params = model.init(jax.random.key(0), grid, tokens)['params']
  batch, height, width, _ = grid.shape  # 2 rows, 3 columns.
  rows = np.array([-1.0, 1.0])[:, None] * np.ones((1, width))
  cols = np.ones((height, 1)) * np.array([-1.0, 0.0, 1.0])[None]
  positions = np.broadcast_to(np.stack([rows, cols], -1), (batch, height, width, 2))
  expected_logits, _ = reference(params, np.concatenate([grid, positions], -1), tokens)
  np.testing.assert_allclose(model.apply({'params': params}, grid, tokens), expected_logits,
                             atol=1e-5, rtol=1e-5)


def test_step_by_step_equals_teacher_forcing(model_and_params):
  model, params, grid, tokens = model_and_params
  variables = {'params': params}
  expected_logits, expected_attention = reference(params, grid, tokens)
  carry, memory = model.apply(variables, grid, method='initial_state')
  for t in range(tokens.shape[1]):
    carry, logits, attention = model.apply(variables, carry, tokens[:, t], memory,
                                           method='step')
    np.testing.assert_allclose(logits, expected_logits[:, t], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(attention, expected_attention[:, t], atol=1e-6, rtol=1e-5)


def test_loss_sums_equal_cross_entropy_of_the_logits(model_and_params):
  model, params, grid, tokens = model_and_params
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  weights = (np.arange(4) < np.array([[4], [2], [3]])).astype(np.float32)
  loss_sum, _ = model.apply({'params': params}, grid, inputs, targets, weights,
                            method='loss_sums')
  logits, _ = reference(params, grid, inputs)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
  assert float(loss_sum) == pytest.approx(float((nll * weights).sum()), rel=1e-5)


def _updown_config():
  config = ml_collections.ConfigDict({
      'decoder': 'updown', 'encoder': 'small_cnn', 'train_encoder': True, 'bn_momentum': 0.9,
      'small_cnn': {'features': (4, 8), 'pool_before_norm': False, 'strided_first_conv': False},
      'image_bottleneck': 8, 'embed_dim': EMBED, 'lstm_size': LSTM, 'logit_bottleneck': 8,
      'attention_size': ATTENTION, 'grid_coordinates': False, 'loss_chunk_steps': 1,
      'lstm_unroll': 1, 'dropout': 0.0, 'dtype': 'float32'})
  return config


def test_captioner_attends_over_the_encoder_grid_and_decodes_with_it():
  model = captioner.create_model(_updown_config(), VOCAB)
  images = jax.random.uniform(jax.random.key(2), (2, 16, 16, 3), minval=-1, maxval=1)
  tokens = jnp.ones((2, 4), jnp.int32)
  variables = model.init(jax.random.key(0), images, tokens)
  grid = model.apply(variables, images, method='encode')
  assert grid.shape == (2, 8, 8, 8)  # One 2x2 pool between the two blocks.
  # The grid is the last block's map: the spatial map the encoder sows.
  _, sown = model.apply(variables, images, method='encode', mutable='intermediates')
  np.testing.assert_array_equal(grid, sown['intermediates']['encoder']['spatial_map'][0])
  config = ml_collections.ConfigDict({'method': 'greedy', 'beam_size': 2, 'length_penalty': 0.0,
                                      'temperature': 1.0})
  for method in ('greedy', 'beam', 'sample'):
    config.method = method
    captions = decode.decode_with_log_probs(model.apply, variables, images, 6, config,
                                            jax.random.key(1))
    assert captions.attention.shape == (2, 5, 64)
    live = np.asarray(captions.tokens) != PAD_ID
    np.testing.assert_allclose(np.asarray(captions.attention).sum(-1), live.astype(np.float32),
                               atol=1e-5)
  # Greedy decoding's attention is the teacher-forced attention of the caption it chose.
  captions = decode.decode_with_log_probs(model.apply, variables, images, 6,
                                          ml_collections.ConfigDict({'method': 'greedy'}))
  inputs = jnp.concatenate([jnp.full((2, 1), BOS_ID), captions.tokens[:, :-1]], axis=1)
  teacher = updown.UpDownDecoder(VOCAB, EMBED, LSTM, ATTENTION).apply(
      {'params': variables['params']['decoder']}, grid, inputs, method='attention')
  live = np.asarray(captions.tokens) != PAD_ID
  np.testing.assert_allclose(captions.attention, np.where(live[..., None], teacher, 0.0),
                             atol=1e-5)


def test_a_trainable_encoder_gets_gradient_through_attention():
  model = captioner.create_model(_updown_config(), VOCAB)
  images = jax.random.uniform(jax.random.key(2), (2, 16, 16, 3), minval=-1, maxval=1)
  tokens = jnp.array([[1, 5, 6, 2], [1, 7, 2, 0]], jnp.int32)
  variables = model.init(jax.random.key(0), images, tokens)

  def loss(params):
    sums, _ = model.apply({**variables, 'params': params}, images, tokens[:, :-1], tokens[:, 1:],
                          (tokens[:, 1:] > 0).astype(jnp.float32), method='loss_sums')
    return sums
  grads = jax.grad(loss)(variables['params'])
  assert float(jnp.abs(grads['encoder']['conv1']['kernel']).sum()) > 0
  assert float(jnp.abs(grads['decoder']['grid_to_attention']['kernel']).sum()) > 0


def test_caption_json_gives_each_generated_token_its_attention_map(updown_workdir, tmp_path):
  """caption.py's attention equals the decoder's teacher-forced attention over the encoder's grid
  for the caption it chose, one H x W map per token up to EOS."""
  trained = predict.restore(updown_workdir)
  image = shapes.make_example(0, 2, 0, image_size=32, min_objects=1, max_objects=2,
                              relations=True).image
  path = tmp_path / 'scene.png'
  Image.fromarray(image).save(path)
  (_, result), = caption.caption_paths(trained, [str(path)])
  grid = trained.state.apply_fn(trained.state.variables,
                                caption.load_image(str(path), 32)[None], method='encode')
  assert result['grid'] == [16, 16] == list(grid.shape[1:3])  # (8, 16) blocks: one 2x2 pool.
  tokens, maps = result['tokens'], np.asarray(result['attention'])
  assert maps.shape == (len(tokens), 16, 16)
  np.testing.assert_allclose(maps.sum((1, 2)), 1.0, atol=1e-5)
  ids = [trained.tokenizer.processor.piece_to_id(t) for t in tokens if t != attention_maps.END]
  assert trained.tokenizer.decode(np.array([ids]))[0] == result['caption']
  inputs = np.array([[BOS_ID] + ids + [EOS_ID] * (len(tokens) - len(ids))])[:, :len(tokens)]
  config = trained.config.model
  teacher = updown.UpDownDecoder(
      trained.tokenizer.vocab_size, config.embed_dim, config.lstm_size, config.attention_size,
      grid_coordinates=config.grid_coordinates).apply(
          {'params': trained.state.params['decoder']}, grid, inputs, method='attention')
  np.testing.assert_allclose(maps.reshape(len(tokens), -1), teacher[0], atol=1e-5)
  # The evaluation of the relational run reports both scene metrics.
  with open(os.path.join(updown_workdir, 'metrics.jsonl')) as f:
    last = [json.loads(line) for line in f][-1]
  assert last['split'] == 'test'
  assert {'relation_accuracy', 'scene_accuracy'} <= set(last), sorted(last)


def test_word_maps_join_pieces_into_words_with_their_mean_map():
  maps = np.arange(5 * 4, dtype=np.float32).reshape(5, 2, 2)
  words = attention_maps.word_maps(attention_maps.TokenMaps(
      ['▁a', '▁ab', 'ove', '▁red', attention_maps.END], maps))
  assert [w for w, _ in words] == ['a', 'above', 'red']
  np.testing.assert_array_equal(words[1][1], (maps[1] + maps[2]) / 2)
  np.testing.assert_array_equal(words[2][1], maps[3])
