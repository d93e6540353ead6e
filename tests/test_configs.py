"""Config files load, variants change only what they say, unknown overrides are rejected."""

import functools
import importlib
import pathlib
import subprocess
import sys

import flax
import jax
import numpy as np
import pytest

from configs import default
from jaxcap import parallel
from jaxcap import rewards
from jaxcap import state as state_lib
from jaxcap import train_step as train_step_lib
from jaxcap.data.tokenizer import BOS_ID
from jaxcap.data.tokenizer import EOS_ID
from jaxcap.data.tokenizer import PAD_ID
from jaxcap.models import captioner
from jaxcap.trainers import resident
from jaxcap.trainers import scst

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config_files():
  return sorted(p.stem for p in (ROOT / 'configs').glob('*.py') if p.stem != '__init__')


def test_every_config_is_default_with_changes():
  base = default.get_config()
  for name in _config_files():
    config = importlib.import_module(f'configs.{name}').get_config()
    assert set(flax.traverse_util.flatten_dict(config.to_dict())) == set(
        flax.traverse_util.flatten_dict(base.to_dict())), name  # Variants change, never add.


def _what_it_trains(name):
  """What a step of the config depends on: its model, its optimizer's kind (not its schedule)
  and its kind of training."""
  config = importlib.import_module(f'configs.{name}').get_config()
  return (config.model.to_json(), config.optimizer.name, config.optimizer.grad_clip_norm > 0,
          config.trainer, config.scst.baseline)


def _configs_training_differently():
  """One config per distinct step (flickr8k and flickr30k train coco.py's model, for example)."""
  firsts = {}
  for name in _config_files():
    firsts.setdefault(_what_it_trains(name), name)
  return sorted(firsts.values())


def _changed(before, after) -> dict[str, list[bool]]:
  """Per top-level module (encoder, decoder): whether each of its arrays changed."""
  return {name: [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[name]),
                                                           jax.tree.leaves(after[name]))]
          for name in before}


@pytest.mark.parametrize('name', _configs_training_differently())
def test_every_config_builds_its_model_and_trains_its_parameters(name):
  """Its own model and optimizer, on tiny inputs: two steps of what the config trains (images,
  cached embeddings, or self-critical samples; the schedule's first step may have a learning
  rate of 0) move every trained array and no frozen one. Configs whose step is another's are
  covered by it."""
  config = importlib.import_module(f'configs.{name}').get_config()
  config.model.encoder_weights = None  # Converted weights cannot exist here.
  config.data.image_size = 75 if config.model.encoder == 'inception_v3' else 32
  if config.model.decoder == 'updown' and config.model.encoder == 'inception_v3':
    config.data.image_size = 139  # A 3 x 3 grid to attend over (1 x 1 at 75 pixels).
  vocab, batch_size, max_len = 50, 2, 8
  config.data.max_len = config.scst.max_len = max_len
  model = captioner.create_model(config.model, vocab)
  key = jax.random.key(0)
  tokens = np.array([[BOS_ID, 5, 6, 7, EOS_ID, PAD_ID, PAD_ID, PAD_ID],
                     [BOS_ID, 8, 9, EOS_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID]], np.int32)
  images = np.random.default_rng(0).uniform(
      -1, 1, (batch_size, config.data.image_size, config.data.image_size, 3)).astype(np.float32)
  if config.trainer == 'images':
    create = jax.jit(functools.partial(state_lib.create_train_state, config, model))
    state = create(key)  # Jitted: eagerly, InceptionV3's init takes ~25 s.
    step = functools.partial(jax.jit(train_step_lib.train_step),
                             batch={'image': images, 'tokens': tokens}, dropout_key=key)
  else:
    full = jax.eval_shape(functools.partial(state_lib.create_train_state, config, model), key)
    features_shape = jax.eval_shape(
        lambda s: s.apply_fn(s.variables, images, method='encode'), full).shape[1:]
    state = state_lib.create_decoder_state(config, model, key, features_shape)
    embedding = np.random.default_rng(1).normal(
        size=(batch_size, *features_shape)).astype(np.float32)
    if config.trainer == 'scst':
      mesh = parallel.make_mesh(jax.devices()[:1])
      # Image 0's reference holds every word, image 1's none of them: samples score apart.
      scorer = rewards.CiderD([[list(range(4, vocab)) + [EOS_ID]], [[EOS_ID]]], vocab)
      data = scst.place(embedding, scorer.references, mesh)
      scst_step = resident.jit_steps(scst.config_step(config, per_shard_batch=batch_size))(1)
      step = lambda state: scst_step(state, data, scorer.tables, key)
    else:
      step = functools.partial(jax.jit(train_step_lib.decoder_train_step),
                               batch={'embedding': embedding, 'tokens': tokens}, dropout_key=key)
  params, batch_stats = jax.device_get((state.params, state.batch_stats))
  for _ in range(2):
    state, metrics = step(state)
    assert bool(np.all(metrics['finite'])), name
  assert int(state.step) == 2
  changed = _changed(params, jax.device_get(state.params))
  frozen = set() if config.model.train_encoder else {'encoder'}
  assert set(changed) == ({'decoder'}
                          if config.trainer != 'images' else {'encoder', 'decoder'}), name
  for module, moved in changed.items():
    assert (not any(moved)) if module in frozen else all(moved), (name, module, moved)
  if 'encoder' in frozen and config.trainer == 'images':  # Its batch-norm statistics too.
    assert not any(_changed(batch_stats, jax.device_get(state.batch_stats))['encoder']), name


def test_train_script_rejects_unknown_config_fields(tmp_path):
  result = subprocess.run([
      sys.executable,
      str(ROOT / 'scripts' / 'train.py'), '--config',
      str(ROOT / 'configs' / 'demo.py'), '--workdir',
      str(tmp_path), '--config.model.lstm_sise=10'
  ],
                          capture_output=True,
                          text=True,
                          timeout=120)
  assert result.returncode != 0
  assert 'lstm_sise' in result.stderr
  assert not (tmp_path / 'checkpoints').exists()
