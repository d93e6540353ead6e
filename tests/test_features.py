"""Feature cache (extraction, resume, stale detection) and decoder training on cached features."""

import json
import logging

import jax
import numpy as np
import pytest

from jaxcap import feature_cache
from jaxcap import parallel
from jaxcap import predict
from jaxcap import state as state_lib
from jaxcap import train
from jaxcap.data import captions as captions_lib
from jaxcap.data import input_pipeline
from jaxcap.data import prepare
from jaxcap.models import captioner

pytestmark = pytest.mark.slow


def _features_config(config):
  config.model.train_encoder = False
  config.features.storage_dtype = 'float32'
  config.features.batch_size = 8
  config.features.batches_per_part = 1
  return config


def _streamed_embeddings(config, workdir, split):
  prepared = prepare.prepare(config, workdir)
  mesh = parallel.make_mesh()
  model = captioner.create_model(config.model, prepared.tokenizer.vocab_size)
  state = state_lib.initial_state(config, model, mesh)
  encode = jax.jit(lambda s, images: s.apply_fn(s.variables, images, method='encode'))
  embeddings = {}
  for batch in input_pipeline.eval_dataset(prepared.builder, split, _table(prepared, config, split),
                                           config.data, batch_size=8).as_numpy_iterator():
    embeddings.update(zip(batch['image/id'].tolist(), np.asarray(encode(state, batch['image']))))
  return embeddings


def _table(prepared, config, split):
  return captions_lib.TokenTable.build(captions_lib.read_captions(prepared.builder, split),
                                         prepared.tokenizer, config.data.max_len)


@pytest.mark.parametrize('decoder,storage_dtype', [('show_tell', 'float32'),
                                                   ('updown', 'bfloat16')])
def test_cache_equals_streaming_resumes_and_rebuilds_when_stale(config, tmp_path, caplog, decoder,
                                                                storage_dtype):
  """Pooled embeddings exactly, or the updown decoder's grids in bfloat16 (rounded once)."""
  config = _features_config(config)
  config.model.decoder, config.features.storage_dtype = decoder, storage_dtype
  workdir = str(tmp_path)
  cached = feature_cache.load(feature_cache.extract_splits(config, workdir, ['val'])['val'])
  streamed = _streamed_embeddings(config, workdir, 'val')
  assert sorted(cached.image_ids.tolist()) == sorted(streamed) and len(streamed) == 12
  assert cached.embedding.dtype == np.dtype(storage_dtype)
  assert cached.embedding.shape[1:] == ((16,) if decoder == 'show_tell' else (16, 16, 16))
  for image_id, embedding in zip(cached.image_ids.tolist(), cached.embedding):
    expected = streamed[image_id].astype(storage_dtype)
    if storage_dtype == 'bfloat16':
      np.testing.assert_array_equal(embedding, expected)
    else:
      np.testing.assert_allclose(embedding, expected, rtol=1e-5, atol=1e-6)

  # Interrupted after its first part: only the missing part is encoded again.
  directory = tmp_path / 'features' / 'val'
  assert sorted(p.name for p in directory.iterdir()) == [
      'complete.json', 'fingerprint.json', 'part-00000.npz', 'part-00001.npz']
  (directory / 'complete.json').unlink()
  (directory / 'part-00001.npz').unlink()
  first_part_mtime = (directory / 'part-00000.npz').stat().st_mtime_ns
  resumed = feature_cache.load(feature_cache.extract_splits(config, workdir, ['val'])['val'])
  assert (directory / 'part-00000.npz').stat().st_mtime_ns == first_part_mtime
  np.testing.assert_array_equal(resumed.embedding, cached.embedding)

  # Another image size makes other embeddings: the cache is rebuilt, not reused.
  config.data.image_size = 24
  with caplog.at_level(logging.WARNING):
    rebuilt = feature_cache.load(feature_cache.extract_splits(config, workdir, ['val'])['val'])
  assert 'stale (image_size changed)' in caplog.text
  assert json.loads((directory / 'fingerprint.json').read_text())['image_size'] == 24
  assert rebuilt.embedding.shape != cached.embedding.shape or not np.allclose(
      rebuilt.embedding.astype(np.float32), cached.embedding.astype(np.float32))


def test_training_on_cached_features_resumes_and_restores(config, tmp_path):
  """With the decoder that attends: grids cached, resident and restored (Show and Tell's
  embeddings train on the cache in the loss-curve test below)."""
  config = _features_config(config)
  config.model.decoder = 'updown'
  config.trainer = 'features'
  config.resident.steps_per_call = 2
  config.num_train_steps, config.log_every_steps, config.checkpoint_every_steps = 6, 2, 2
  config.optimizer.learning_rate = 3e-3
  config.data.eval_splits = ('val',)
  workdir = tmp_path / 'workdir'
  results = train.train_and_evaluate(config, str(workdir))
  assert results['val']['num_images'] == 12
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  losses = [r['train_loss'] for r in records if r['split'] == 'train']
  assert [r['step'] for r in records if r['split'] == 'train'] == [2, 4, 6]
  assert losses[-1] < losses[0]

  # Checkpoints hold the decoder; the workdir restores to a full captioner.
  trained = predict.restore(str(workdir))
  assert set(trained.state.params) == {'encoder', 'decoder'} and int(trained.state.step) == 6

  config.num_train_steps = 8  # Resumes from step 6.
  train.train_and_evaluate(config, str(workdir))
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records if r['split'] == 'train'][-1] == 8

  config.log_every_steps = 3
  with pytest.raises(ValueError, match='log_every_steps=3 is not a multiple'):
    train.train_and_evaluate(config, str(tmp_path / 'other'))


def test_cached_and_streaming_training_follow_the_same_loss_curve(config, tmp_path):
  """Same frozen encoder, same model: the two input paths reach about the same training loss."""
  config = _features_config(config)
  config.num_train_steps, config.log_every_steps, config.checkpoint_every_steps = 40, 20, 40
  config.optimizer.learning_rate = 3e-3
  config.data.eval_splits = ()
  train.train_and_evaluate(config, str(tmp_path / 'streaming'))
  config.trainer = 'features'
  config.resident.steps_per_call = 10
  train.train_and_evaluate(config, str(tmp_path / 'cached'))
  final = {}
  for name in ('streaming', 'cached'):
    records = [
        json.loads(line) for line in (tmp_path / name / 'metrics.jsonl').read_text().splitlines()
    ]
    final[name] = [r['train_loss'] for r in records if r['split'] == 'train']
  for name, losses in final.items():  # Both learned: the loss fell (by about 11% here).
    assert losses[-1] < 0.95 * losses[0], (name, losses)
  assert final['cached'][0] == pytest.approx(final['streaming'][0], rel=0.1)
  assert final['cached'][-1] == pytest.approx(final['streaming'][-1], rel=0.1)
