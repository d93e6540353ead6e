"""Self-critical training: the policy gradient, K steps per call, resume, and the whole run."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcap import decode
from jaxcap import parallel
from jaxcap import predict
from jaxcap import rewards
from jaxcap import state as state_lib
from jaxcap import train
from jaxcap import trainers
from jaxcap.data.tokenizer import BOS_ID
from jaxcap.data.tokenizer import EOS_ID
from jaxcap.data.tokenizer import PAD_ID
from jaxcap.models import captioner
from jaxcap.trainers import resident
from jaxcap.trainers import scst
from tests import test_resident

VOCAB, EMBEDDING_DIM, IMAGES = 24, test_resident.EMBEDDING_DIM, 32


def _decoder_state(config, mesh):
  return test_resident._decoder_state(config, mesh, VOCAB)  # Embeddings of EMBEDDING_DIM.


def _references(rng):
  references = []
  for _ in range(IMAGES):
    references.append([list(rng.integers(4, 10, rng.integers(2, 8))) + [EOS_ID]
                       for _ in range(rng.integers(1, 4))])
  return references


@pytest.mark.parametrize('temperature', [1.0, 0.7])
def test_policy_loss_gradient_is_reinforce(config, temperature):
  """With fixed advantages, the gradient is that of -mean_tokens(advantage * log p(token)) for
  the sampler's distribution (softmax of logits / temperature without PAD and BOS), log p from
  the full teacher-forced logits: an independent path to the chunked loss."""
  mesh = parallel.make_mesh()
  state = _decoder_state(config, mesh)
  rng = np.random.default_rng(0)
  embedding = jnp.asarray(rng.normal(size=(6, EMBEDDING_DIM)), jnp.float32)
  samples = rng.integers(4, VOCAB, (6, 9)).astype(np.int32)
  for row, length in zip(samples, [1, 3, 9, 5, 2, 7]):
    row[length - 1], row[length:] = EOS_ID, PAD_ID
  samples = jnp.asarray(samples)
  advantage = jnp.asarray([1.5, -0.5, 0.25, -2.0, 0.0, 3.0])

  def explicit(params):
    inputs = jnp.concatenate([jnp.full((6, 1), BOS_ID), samples[:, :-1]], 1)
    logits = state.apply_fn({'params': params}, embedding, inputs, method='caption_logits')
    logits = (logits / temperature).at[..., [PAD_ID, BOS_ID]].set(-jnp.inf)
    log_p = jnp.take_along_axis(jax.nn.log_softmax(logits), samples[..., None], -1)[..., 0]
    mask = samples != PAD_ID
    return -jnp.sum(jnp.where(mask, advantage[:, None] * log_p, 0.0)) / jnp.sum(mask)

  (loss, num_tokens), grads = jax.value_and_grad(scst.policy_loss, has_aux=True)(
      state.params, state.apply_fn, embedding, samples, advantage, temperature)
  want_loss, want_grads = jax.value_and_grad(explicit)(state.params)
  assert int(num_tokens) == 1 + 3 + 9 + 5 + 2 + 7
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)


def test_mixed_loss_adds_the_references_cross_entropy(config):
  """The mixed loss and its gradient are the policy loss's plus xe_weight times the references'
  mean token cross-entropy, that taken from the full teacher-forced logits (softmax without PAD
  and BOS, at temperature 1 whatever the sampler's)."""
  mesh = parallel.make_mesh()
  state = _decoder_state(config, mesh)
  rng = np.random.default_rng(5)
  embedding = jnp.asarray(rng.normal(size=(2, EMBEDDING_DIM)), jnp.float32)
  sample_embedding = jnp.repeat(embedding, 2, axis=0)
  samples = jnp.asarray([[5, 6, EOS_ID, PAD_ID], [7, EOS_ID, PAD_ID, PAD_ID],
                         [8, 9, 10, EOS_ID], [EOS_ID, PAD_ID, PAD_ID, PAD_ID]], jnp.int32)
  advantage = jnp.asarray([0.5, -1.0, 2.0, 0.25])
  references = jnp.asarray([[11, 12, 13, EOS_ID, PAD_ID], [14, EOS_ID, PAD_ID, PAD_ID, PAD_ID]],
                           jnp.int32)

  def references_cross_entropy(params):
    inputs = jnp.concatenate([jnp.full((2, 1), BOS_ID), references[:, :-1]], 1)
    logits = state.apply_fn({'params': params}, embedding, inputs, method='caption_logits')
    logits = logits.at[..., [PAD_ID, BOS_ID]].set(-jnp.inf)
    log_p = jnp.take_along_axis(jax.nn.log_softmax(logits), references[..., None], -1)[..., 0]
    mask = references != PAD_ID
    return -jnp.sum(jnp.where(mask, log_p, 0.0)) / jnp.sum(mask)

  def policy(params):
    return scst.policy_loss(params, state.apply_fn, sample_embedding, samples, advantage, 0.7)[0]

  def mixed(params, xe_weight):
    return scst.mixed_loss(params, state.apply_fn, sample_embedding, samples, advantage, 0.7,
                           embedding, references, xe_weight)

  (loss, parts), grads = jax.value_and_grad(mixed, has_aux=True)(state.params, 0.3)
  want_xe, want_xe_grads = jax.value_and_grad(references_cross_entropy)(state.params)
  want_policy, want_policy_grads = jax.value_and_grad(policy)(state.params)
  np.testing.assert_allclose(parts['reference_loss'], want_xe, rtol=1e-5)
  np.testing.assert_allclose(loss, want_policy + 0.3 * want_xe, rtol=1e-5)
  assert int(parts['num_tokens']) == 3 + 2 + 4 + 1
  for got, want_p, want_x in zip(jax.tree.leaves(grads), jax.tree.leaves(want_policy_grads),
                                 jax.tree.leaves(want_xe_grads)):
    np.testing.assert_allclose(got, want_p + 0.3 * want_x, rtol=1e-4, atol=1e-7)
  # Weight 0: the policy loss alone, nothing computed for the references.
  loss, parts = mixed(state.params, 0.0)
  np.testing.assert_allclose(loss, want_policy, rtol=1e-6)
  assert 'reference_loss' not in parts


def test_the_reference_drawn_is_a_real_one_each_equally_often():
  tokens = np.full((3, 4, 5), PAD_ID, np.int32)
  tokens[:, :, 0] = np.arange(12).reshape(3, 4) + 4    # Reference c of image i starts 4 + 4i + c.
  mask = np.asarray([[1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], np.float32)
  references = rewards.ImageReferences(jnp.asarray(tokens), jnp.zeros((3, 4, 4)),
                                       jnp.zeros((3, 4)), jnp.asarray(mask))
  draws = jax.vmap(lambda key: scst.reference_per_image(references, key))(
      jax.random.split(jax.random.key(0), 3000))
  first = np.asarray(draws[:, :, 0])                        # (draws, images)
  assert draws.shape == (3000, 3, 5) and np.all(draws[:, :, 1:] == PAD_ID)
  for image, real in enumerate(mask.astype(bool)):
    counts = np.bincount(first[:, image] - 4 - 4 * image, minlength=4)
    assert np.all(counts[~real] == 0), counts               # Never a missing reference.
    np.testing.assert_allclose(counts[real] / 3000, 1 / real.sum(), atol=0.03)


def test_baselines():
  rewards_ = jnp.asarray([[1.0, 2.0, 6.0], [0.0, 0.0, 3.0]])
  np.testing.assert_allclose(
      scst.baseline_rewards(rewards_, jnp.asarray([5.0, 7.0]), 'mean_of_others'),
      [[4.0, 3.5, 1.5], [1.5, 1.5, 0.0]])
  np.testing.assert_allclose(scst.baseline_rewards(rewards_, jnp.asarray([5.0, 7.0]), 'greedy'),
                             [[5.0] * 3, [7.0] * 3])
  with pytest.raises(ValueError, match='config.scst.baseline'):
    scst.make_scst_step(
        per_shard_batch=1, num_samples=2, baseline='mean', temperature=1.0, max_len=8)
  with pytest.raises(ValueError, match='config.scst.xe_weight=-0.5'):
    scst.make_scst_step(per_shard_batch=1, num_samples=2, baseline='greedy', temperature=1.0,
                        max_len=8, xe_weight=-0.5)


@pytest.mark.parametrize('baseline,xe_weight', [('mean_of_others', 0.0), ('greedy', 0.5)])
def test_k_steps_per_call_equal_single_steps(config, baseline, xe_weight):
  config.optimizer.learning_rate = 1e-2
  mesh = parallel.make_mesh()  # 8 forced CPU devices: 4 images each.
  rng = np.random.default_rng(1)
  scorer = rewards.CiderD(_references(rng), VOCAB)
  data = scst.place(rng.normal(size=(IMAGES, EMBEDDING_DIM)).astype(np.float32),
                    scorer.references, mesh)
  tables = jax.device_put(scorer.tables, parallel.replicated(mesh))
  seed_key = jax.device_put(jax.random.key(3), parallel.replicated(mesh))
  # Global batch 16 images of 3 samples; 2 steps an epoch, so the calls cross epochs.
  kwargs = dict(per_shard_batch=2, num_samples=3, baseline=baseline, temperature=1.0, max_len=10,
                xe_weight=xe_weight)
  steps_fn = resident.jit_steps(scst.make_scst_step(**kwargs))
  four = steps_fn(4)
  state, metrics = four(_decoder_state(config, mesh), data, tables, seed_key)
  with jax.transfer_guard('disallow'):  # Nothing moves from the host between calls.
    state, more = four(state, data, tables, seed_key)
  one = steps_fn(1)
  reference = _decoder_state(config, mesh)
  single = []
  for _ in range(8):
    reference, step_metrics = one(reference, data, tables, seed_key)
    single.append(jax.device_get(step_metrics))
  keys = ['loss', 'sample_reward', 'baseline_reward', 'greedy_reward']
  for key in keys + (['reference_loss'] if xe_weight else []):
    got = np.concatenate([metrics[key], more[key]])
    np.testing.assert_allclose(got, [m[key][0] for m in single], rtol=1e-5, atol=1e-6)
  assert np.asarray(metrics['sample_reward']).max() > 0  # Rewards are not all zero.
  assert int(state.step) == 8
  for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(reference.params)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_logged_rewards_are_host_cider_d_of_the_step_s_own_captions(config):
  """The step's sample and greedy rewards are CIDEr-D (`rewards.CiderD.scores`, on the host) of
  the captions it drew, each against its own image's references: the step's images re-derived
  from `images_at`, its samples from `sample_from_embedding` with the step's key."""
  mesh = parallel.make_mesh()  # 8 forced CPU devices: 4 images each.
  rng = np.random.default_rng(2)
  references = _references(rng)
  scorer = rewards.CiderD(references, VOCAB)
  embedding = rng.normal(size=(IMAGES, EMBEDDING_DIM)).astype(np.float32)
  data = scst.place(embedding, scorer.references, mesh)
  seed_key, num_samples, max_len = jax.random.key(4), 3, 10
  one = resident.jit_steps(scst.make_scst_step(
      per_shard_batch=2, num_samples=num_samples, baseline='greedy', temperature=1.0,
      max_len=max_len))(1)
  state = _decoder_state(config, mesh)
  params = jax.device_get(state.params)
  _, metrics = one(state, data, jax.device_put(scorer.tables, parallel.replicated(mesh)),
                   jax.device_put(seed_key, parallel.replicated(mesh)))

  shard_index = scst.images_at(state_lib.rng_stream(seed_key, 'order'), jnp.int32(0), 8, 4, 2)
  image = np.asarray(shard_index + 4 * jnp.arange(8)[:, None]).reshape(-1)  # Shard blocks of 4.
  model = captioner.create_model(config.model, VOCAB)
  variables = {'params': params}
  samples = decode.sample_from_embedding(
      model.apply, variables, jnp.repeat(embedding[image], num_samples, 0), max_len,
      jax.random.fold_in(state_lib.rng_stream(seed_key, 'sample'), 0), 1.0)
  greedy = decode.greedy_from_embedding(model.apply, variables, jnp.asarray(embedding[image]),
                                        max_len)
  sample_rewards = scorer.scores(samples, np.repeat(image, num_samples))
  greedy_rewards = scorer.scores(greedy, image)
  assert len(set(image.tolist())) == 16 and np.ptp(sample_rewards) > 0
  # Against the wrong images' references the mean would differ: the check can tell.
  assert abs(scorer.scores(samples, np.tile(image, num_samples)).mean() -
             sample_rewards.mean()) > 1e-3
  np.testing.assert_allclose(metrics['sample_reward'][0], sample_rewards.mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics['greedy_reward'][0], greedy_rewards.mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics['baseline_reward'][0], greedy_rewards.mean(), rtol=1e-5)


@pytest.mark.parametrize('baseline', ['mean_of_others', 'greedy'])
def test_self_critical_steps_raise_the_sample_reward(config, baseline):
  """The policy gradient climbs: on a toy task (each image its own short captions), 40 steps
  raise the mean CIDEr-D of the samples well above where they started."""
  config.optimizer.learning_rate, config.optimizer.end_learning_rate_factor = 3e-2, 1.0
  mesh = parallel.make_mesh(jax.devices()[:1])
  rng = np.random.default_rng(3)
  scorer = rewards.CiderD(_references(rng), VOCAB)
  data = scst.place(rng.normal(size=(IMAGES, EMBEDDING_DIM)).astype(np.float32),
                    scorer.references, mesh)
  steps = resident.jit_steps(scst.make_scst_step(
      per_shard_batch=8, num_samples=4, baseline=baseline, temperature=1.0, max_len=10))(10)
  state, tables, key = _decoder_state(config, mesh), scorer.tables, jax.random.key(6)
  curve = []
  for _ in range(4):
    state, metrics = steps(state, data, tables, key)
    curve += np.asarray(metrics['sample_reward']).tolist()
  first, last = np.mean(curve[:10]), np.mean(curve[-10:])
  assert last > first + 0.4, curve


def test_images_of_an_epoch_are_each_drawn_once():
  key = jax.random.key(5)
  picks = np.stack(
      [np.asarray(scst.images_at(key, jnp.int32(step), 2, 12, 4)) for step in range(3)], 1)
  for shard in picks:  # (steps, batch): the 3 steps of epoch 0 cover the 12 images once.
    assert sorted(shard.ravel().tolist()) == list(range(12))
  np.testing.assert_array_equal(scst.images_at(key, jnp.int32(1), 2, 12, 4), picks[:, 1])
  assert not np.array_equal(scst.images_at(key, jnp.int32(3), 2, 12, 4), picks[:, 0])


def _train_records(workdir):
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return [r for r in records if r['split'] == 'train']


@pytest.mark.slow
def test_self_critical_run_starts_from_init_from_resumes_exactly_and_restores(config, tmp_path):
  config.data.eval_splits, config.num_train_steps = (), 2  # A short cross-entropy start.
  xe_workdir = tmp_path / 'xe'
  train.train_and_evaluate(config, str(xe_workdir))
  config.data.eval_splits = ('val',)

  config.model.train_encoder = False
  config.trainer = 'scst'
  config.features.batch_size, config.features.batches_per_part = 8, 1
  config.features.storage_dtype = 'float32'
  config.scst.init_from = str(xe_workdir)
  config.scst.num_samples = 3
  config.resident.steps_per_call = 2
  config.num_train_steps, config.log_every_steps, config.checkpoint_every_steps = 4, 2, 2
  config.eval_every_steps = 4
  # A schedule that does not depend on the run's length.
  config.optimizer.end_learning_rate_factor = 1.0

  config.scst.max_len = 12
  config.scst.xe_weight = 0.5  # The mixed objective, its reference draws replayed on resume.
  config.seed = 1  # Not init_from's: a decoder initialised here would be another one.
  workdir = tmp_path / 'scst'
  results = train.train_and_evaluate(config, str(workdir))
  assert results['val']['num_images'] == 12
  records = _train_records(workdir)
  assert [r['step'] for r in records] == [2, 4]
  assert {'train_sample_reward', 'train_baseline_reward', 'train_greedy_reward',
          'train_reference_loss', 'captions_per_sec'} <= set(records[-1])
  assert (workdir / 'tokenizer.model').read_bytes() == (xe_workdir / 'tokenizer.model').read_bytes()

  # Interrupted after step 2 (its checkpoint is the latest): the rerun replays steps 3 and 4.
  shutil.rmtree(workdir / 'checkpoints' / '4')
  train.train_and_evaluate(config, str(workdir))
  replayed = _train_records(workdir)[-1]
  assert replayed['step'] == 4
  for key in ('train_loss', 'train_sample_reward', 'train_greedy_reward', 'train_reference_loss',
              'grad_norm'):
    assert replayed[key] == pytest.approx(records[-1][key], rel=1e-6), key

  # The workdir restores to a full captioner: init_from's encoder, the trained decoder.
  trained, start = predict.restore(str(workdir)), predict.restore(str(xe_workdir))
  assert int(trained.state.step) == 4
  for got, want in zip(jax.tree.leaves(trained.state.params['encoder']),
                       jax.tree.leaves(start.state.params['encoder'])):
    np.testing.assert_array_equal(got, want)
  # ... and init_from's decoder, moved by 4 Adam steps: each parameter by at most a few
  # learning rates (a fresh decoder's kernels differ from it by ~0.1), and some by more than 0.
  moved = [
      np.abs(np.asarray(a, np.float64) - b).max() for a, b in zip(
          jax.tree.leaves(trained.state.params['decoder']),
          jax.tree.leaves(start.state.params['decoder']))
  ]
  assert max(moved) <= 4 * 3 * config.optimizer.learning_rate and max(moved) > 0, moved


def test_self_critical_needs_its_start_and_cached_features(config, tmp_path):
  config.trainer, config.model.train_encoder = 'scst', False
  config.scst.init_from = str(tmp_path / 'missing')
  with pytest.raises(FileNotFoundError, match='init_from=.*missing: not a jaxcap workdir'):
    predict.init_from_state(config, None)
  config.model.train_encoder = True
  with pytest.raises(ValueError, match="trainer='scst' trains on cached embeddings of a frozen"):
    trainers.check_trainer(config)
