"""Train step, sharding and decoding on tiny data; no TensorFlow (runs on accelerator hosts)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcap import decode
from jaxcap import parallel
from jaxcap import state as state_lib
from jaxcap import train_step as train_step_lib
from jaxcap.data.tokenizer import BOS_ID
from jaxcap.data.tokenizer import EOS_ID
from jaxcap.data.tokenizer import PAD_ID
from jaxcap.models import captioner

VOCAB = 40


def _random_batch(config, batch_size, seed=0):
  rng = np.random.default_rng(seed)
  size, max_len = config.data.image_size, config.data.max_len
  tokens = rng.integers(4, VOCAB, (batch_size, max_len)).astype(np.int32)
  tokens[:, 0] = BOS_ID
  for row, length in zip(tokens, rng.integers(4, max_len, batch_size)):
    row[length - 1], row[length:] = EOS_ID, PAD_ID
  return {'image': rng.uniform(-1, 1, (batch_size, size, size, 3)).astype(np.float32),
          'tokens': tokens}


def _state(config, mesh, vocab_size=VOCAB):
  return state_lib.initial_state(config, captioner.create_model(config.model, vocab_size), mesh)


def _jit_step(mesh):
  return parallel.jit_data_parallel(train_step_lib.train_step, mesh, donate_state=True)


def _overfit_losses(config, steps=60):
  config.optimizer.learning_rate = 1e-2
  config.num_train_steps = steps
  mesh = parallel.make_mesh(jax.devices()[:1])
  state, step = _state(config, mesh), _jit_step(mesh)
  batch = parallel.shard_batch(_random_batch(config, 8), mesh)
  losses = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  assert int(state.step) == steps
  return np.array(losses), state


def test_loss_falls_when_overfitting_one_batch(config):
  losses, _ = _overfit_losses(config)
  assert losses[-1] < 0.3 * losses[0], losses


def test_bfloat16_compute_tracks_float32(config):
  """bf16 compute, float32 parameters and optimizer state: the same loss curve within bf16
  rounding."""
  float32_losses, _ = _overfit_losses(config)
  config.model.dtype = 'bfloat16'
  bfloat16_losses, state = _overfit_losses(config)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.opt_state)
             if jnp.issubdtype(leaf.dtype, jnp.floating))
  np.testing.assert_allclose(bfloat16_losses[:5], float32_losses[:5], rtol=2e-2)
  assert abs(bfloat16_losses[-1] - float32_losses[-1]) < 0.05 * float32_losses[0], (
      bfloat16_losses[-1], float32_losses[-1])


def test_padding_does_not_change_the_loss(config):
  mesh = parallel.make_mesh(jax.devices()[:1])
  state = _state(config, mesh)
  batch = _random_batch(config, 4)
  step = jax.jit(train_step_lib.train_step)
  _, metrics = step(state, batch)
  longer = {**batch, 'tokens': np.pad(batch['tokens'], ((0, 0), (0, 6)))}
  _, longer_metrics = step(state, longer)
  assert metrics['num_tokens'] == (batch['tokens'][:, 1:] != PAD_ID).sum()
  np.testing.assert_allclose(metrics['loss'], longer_metrics['loss'], rtol=1e-5)


def test_train_step_is_the_same_on_1_and_8_devices(config):
  assert jax.device_count() == 8, 'conftest forces 8 CPU devices'
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = parallel.make_mesh(devices)
    state = _state(config, mesh)
    batches = [parallel.shard_batch(_random_batch(config, 16, seed), mesh) for seed in range(3)]
    # Compiled as users' programs are (the tests' processes turn LLVM's optimisation off): with
    # it off, 1 and 8 devices round differently enough that Adam's first steps, which move a
    # parameter by the learning rate whatever its gradient's size, part ways where a gradient
    # is ~0.
    step = _jit_step(mesh).lower(state, batches[0]).compile(
        {**parallel.compiler_options(), 'xla_backend_optimization_level': 3})
    for batch in batches:
      state, metrics = step(state, batch)
    assert state.params['decoder']['bottleneck_to_logits']['kernel'].sharding.is_fully_replicated
    results.append(jax.device_get((state.params, state.batch_stats, metrics)))
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=2e-4, atol=1e-5), *results)


def test_shard_batch_splits_rows_over_devices(config):
  mesh = parallel.make_mesh()
  batch = parallel.shard_batch(_random_batch(config, 16), mesh)
  assert batch['image'].shape == (16, 32, 32, 3)
  assert len(batch['image'].addressable_shards) == 8
  assert batch['image'].addressable_shards[0].data.shape == (2, 32, 32, 3)
  with pytest.raises(ValueError, match='batch_size=12 is not divisible by the 8 devices'):
    parallel.check_batch_size(12, mesh)


def test_greedy_decode_stops_at_eos():
  script = jnp.array([5, 6, EOS_ID, 7, 8, 9])

  def scripted_apply(variables, *args, method):
    del variables
    if method == 'encode':
      return jnp.zeros((args[0].shape[0], 1))
    if method == 'initial_state':
      return jnp.zeros(args[0].shape[0], jnp.int32), ()
    position, _, _ = args
    return position + 1, jax.nn.one_hot(script[position], 10), jnp.zeros((len(position), 0))

  tokens = jax.jit(decode.greedy_decode, static_argnums=(0, 3))(
      scripted_apply, None, jnp.zeros((2, 4, 4, 3)), 8)
  assert tokens.tolist() == [[5, 6, EOS_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID]] * 2


def test_greedy_decode_of_a_real_model(config):
  mesh = parallel.make_mesh(jax.devices()[:1])
  state = _state(config, mesh)
  params = jax.tree.map(lambda x: x, state.params)
  bias = params['decoder']['bottleneck_to_logits']['bias']
  params['decoder']['bottleneck_to_logits']['bias'] = bias.at[EOS_ID].set(100.0)
  variables = {'params': params, 'batch_stats': state.batch_stats}
  images = jnp.zeros((3, 32, 32, 3))
  tokens = decode.greedy_decode(state.apply_fn, variables, images, config.data.max_len)
  assert tokens.shape == (3, config.data.max_len - 1)
  assert (tokens[:, 0] == EOS_ID).all() and (tokens[:, 1:] == PAD_ID).all()


def test_decoder_alone_learns_from_embeddings(config):
  config.optimizer.learning_rate = 1e-2
  config.num_train_steps = 60
  model = captioner.create_model(config.model, VOCAB)
  state = state_lib.create_decoder_state(config, model, jax.random.key(0), features_shape=12)
  assert set(state.params) == {'decoder'}
  batch = {'embedding': np.random.default_rng(0).normal(size=(8, 12)).astype(np.float32),
           'tokens': _random_batch(config, 8)['tokens']}
  step = jax.jit(train_step_lib.decoder_train_step)
  losses = []
  for _ in range(60):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  assert losses[-1] < 0.5 * losses[0], losses


def test_decoder_dropout_only_in_training_and_replayable(config):
  batch = {'embedding': np.random.default_rng(0).normal(size=(8, 12)).astype(np.float32),
           'tokens': _random_batch(config, 8)['tokens']}
  plain = state_lib.create_decoder_state(config, captioner.create_model(config.model, VOCAB),
                                              jax.random.key(0), features_shape=12)
  config.model.dropout = 0.5
  dropped = plain.replace(apply_fn=captioner.create_model(config.model, VOCAB).apply)
  inputs, targets = batch['tokens'][:, :-1], batch['tokens'][:, 1:]
  weights = (targets != PAD_ID).astype(np.float32)
  loss = lambda state, **kw: state.apply_fn({'params': state.params}, batch['embedding'], inputs,
                                            targets, weights, method='caption_loss_sums', **kw)[0]
  # Evaluation (train=False) ignores the rate; training drops, differently per key.
  np.testing.assert_allclose(loss(dropped), loss(plain), rtol=1e-6)
  key = jax.random.key(1)
  dropped_loss = loss(dropped, train=True, rngs={'dropout': key})
  assert abs(float(dropped_loss) - float(loss(plain))) > 1e-3
  assert float(dropped_loss) != float(
      loss(dropped, train=True, rngs={'dropout': jax.random.key(2)}))
  # The step's mask is a pure function of (key, step): the same step twice is the same update,
  # the same key at another step (same parameters) another mask, so another loss.
  step = jax.jit(train_step_lib.decoder_train_step)
  first, first_metrics = step(dropped, batch, key)
  again, again_metrics = step(dropped, batch, key)
  for a, b in zip(jax.tree.leaves(first.params), jax.tree.leaves(again.params)):
    np.testing.assert_array_equal(a, b)
  assert float(first_metrics['loss']) == float(again_metrics['loss'])
  _, later_metrics = step(dropped.replace(step=dropped.step + 5), batch, key)
  assert abs(float(later_metrics['loss']) - float(first_metrics['loss'])) > 1e-4
  with pytest.raises(Exception, match='dropout'):  # A model with dropout needs the key.
    step(dropped, batch)
