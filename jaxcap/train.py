"""The training loop: data, model and state set up, then steps, logs, evaluations, checkpoints.

`train_and_evaluate(config, workdir)` is what `scripts/train.py` and the tests call. Running it
again on the same workdir resumes from the latest checkpoint with the saved tokenizer.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from clu import periodic_actions
from flax import traverse_util

from jaxcap import checkpoint
from jaxcap import evaluate
from jaxcap import inference
from jaxcap import metrics_writer
from jaxcap import parallel
from jaxcap import preemption
from jaxcap import resident
from jaxcap import rewards
from jaxcap import scst
from jaxcap import train_step as train_step_lib
from jaxcap.data import input_pipeline
from jaxcap.data import prepare
from jaxcap.data import tokenizer as tokenizer_lib
from jaxcap.models import captioner

METRICS_FILENAME = metrics_writer.METRICS_FILENAME


class NonFiniteLossError(FloatingPointError):
  """Training produced a non-finite loss or gradient; nothing after it was checkpointed."""


# Fields that a resumed run may not change: they change the parameters (their shapes or how
# they were made), the optimizer state's structure or what the tokens mean. Others (steps,
# intervals, learning rate, compute dtype, unrolling, dropout, ...) may change.
_RESUME_LOCKED_FIELDS = frozenset({
    'model.encoder', 'model.encoder_weights', 'model.train_encoder', 'model.small_cnn.features',
    'model.small_cnn.pool_before_norm', 'model.small_cnn.strided_first_conv',
    'model.image_bottleneck', 'model.embed_dim', 'model.lstm_size', 'model.logit_bottleneck',
    'data.name', 'data.vocab_size', 'data.tokenizer_type', 'data.coco_dir', 'data.karpathy_json',
    'optimizer.name', 'features.enabled', 'scst.enabled', 'scst.init_from'})
_RESUME_LOCKED_PREFIXES = ('data.shapes.',)  # The built-in dataset's generation.


def _is_locked(field: str) -> bool:
  return field in _RESUME_LOCKED_FIELDS or field.startswith(_RESUME_LOCKED_PREFIXES)


def check_resume_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Stops a resumed run whose config changes a locked field; logs the harmless changes."""
  path = os.path.join(workdir, inference.CONFIG_FILENAME)
  if not os.path.exists(path):
    return
  with open(path) as f:
    old = traverse_util.flatten_dict(json.load(f), sep='.')
  new = traverse_util.flatten_dict(json.loads(config.to_json_best_effort()), sep='.')
  changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
  # A field added since the run was written (model.dropout, scst.*) is compatible at its off
  # value (False, 0, None): that is how the run was trained.
  locked = [k for k in changed if _is_locked(k) and (k in old or new.get(k))]
  if locked:
    raise ValueError(f'{workdir} holds a run with a different {", ".join(locked)} '
                     f'({", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in locked)}); '
                     'use a new workdir, or the old values, to resume')
  for key in changed:
    logging.info('Resuming with config.%s changed: %r -> %r', key, old.get(key), new.get(key))


def _raise_if_nonfinite(unchecked: list[tuple[int, jax.Array]], manager) -> None:
  """Fetches the pending finite flags (one small sync) and stops at the first bad step.

  Each entry is (first step of a call, that call's per-step flags)."""
  flags = jax.device_get([finite for _, finite in unchecked])
  for (first_step, _), call_flags in zip(unchecked, flags):
    bad = np.flatnonzero(~np.asarray(call_flags, bool))
    if bad.size:
      step = first_step + int(bad[0])
      raise NonFiniteLossError(
          f'non-finite loss or gradient at step {step}; nothing after it was saved. Last good '
          f'checkpoint: step {manager.latest_step()} in {manager.directory}')
  unchecked.clear()


def _train_summary(fetched: dict[str, np.ndarray]) -> dict[str, float]:
  """Per-interval means of the step metrics: loss and token accuracy weighted by tokens."""
  weights = fetched['num_tokens']
  summary = {}
  for key, values in fetched.items():
    if key in ('loss', 'token_accuracy'):
      summary[f'train_{key}'] = float(np.average(values, weights=weights))
    elif key == 'grad_norm':
      summary[key] = float(np.mean(values))
    elif key != 'num_tokens':
      summary[f'train_{key}'] = float(np.mean(values))
  return summary


@dataclasses.dataclass
class _Trainer:
  """What the loop drives: the state it trains and checkpoints, and how to advance it."""
  state: train_step_lib.TrainState
  # (state, steps) -> (state, metrics with a leading axis of `steps`); batches follow state.step.
  run: Callable[[train_step_lib.TrainState, int], tuple[train_step_lib.TrainState, Any]]
  steps_per_call: int
  # A full-model (encoder + decoder) state for evaluation.
  full_state: Callable[[train_step_lib.TrainState], train_step_lib.TrainState]


def _streaming_trainer(config, prepared, train_table, full_state, mesh, checkpoints) -> _Trainer:
  """One jitted step per host batch of images (tf.data)."""
  state = checkpoints.restore_latest(full_state)
  # Batches are a pure function of (seed, step): a resumed run continues the same sequence.
  batches = input_pipeline.train_dataset(
      prepared.builder, prepared.train_split, train_table, config.data,
      batch_size=parallel.check_batch_size(config.batch_size, mesh), seed=config.seed,
      start_step=int(state.step), process_index=jax.process_index(),
      process_count=jax.process_count()).as_numpy_iterator()
  dropout_key = train_step_lib.named_key(config.seed, 'dropout')
  step_fn = parallel.jit_data_parallel(
      lambda s, b: _stack(train_step_lib.train_step(s, b, dropout_key)), mesh, donate_state=True)

  def run(state, num_steps):
    del num_steps  # Always one.
    return step_fn(state, parallel.shard_batch(next(batches), mesh))
  return _Trainer(state, run, 1, lambda s: s)


def _stack(outputs):
  state, metrics = outputs
  return state, jax.tree.map(lambda x: x[None], metrics)


def _cached_features(config, workdir, prepared, full_state, mesh):
  """The training split's embeddings, from the feature cache (filled first if needed)."""
  from jaxcap.data import feature_cache  # pylint: disable=g-import-not-at-top
  if config.model.train_encoder:
    raise ValueError('config.features.enabled=True trains on cached embeddings of a frozen '
                     'encoder: set config.model.train_encoder=False')
  return feature_cache.extract(prepared.builder, prepared.train_split, config, full_state,
                               mesh, feature_cache.directory(config, workdir))


def _resident_trainer(config, workdir, prepared, train_table, full_state, model, mesh,
                      checkpoints) -> _Trainer:
  """The decoder alone on cached embeddings resident on the devices, K steps per call."""
  from jaxcap.data import feature_cache  # pylint: disable=g-import-not-at-top
  cached = _cached_features(config, workdir, prepared, full_state, mesh)
  tokens, image_index = feature_cache.caption_rows(cached, train_table)
  buckets = resident.check_length_buckets(config.data.length_buckets, config.data.max_len)
  data = resident.place(cached.embedding, tokens, image_index, buckets, mesh,
                        captioner.DTYPES[config.model.dtype])
  logging.info('Resident training data: %d captions of %d images, %s embeddings, on %d devices',
               data.tokens.shape[0] * data.tokens.shape[1], len(cached.image_ids),
               config.model.dtype, mesh.size)
  per_shard_batch = config.batch_size // mesh.size
  if data.tokens.shape[1] < per_shard_batch:
    raise ValueError(f'config.batch_size={config.batch_size} is larger than the '
                     f'{data.tokens.shape[1] * mesh.size} cached training captions')

  state = inference.initial_decoder_state(config, model, mesh, cached.embedding.shape[1])
  state = checkpoints.restore_latest(state)
  seed_key = jax.device_put(jax.random.key(config.seed), parallel.replicated(mesh))
  holder = {'order': resident.first_order(data, per_shard_batch)}
  # One compilation per length of call (the last call of a run may be shorter).
  steps_fn = functools.cache(functools.partial(resident.jit_train_steps, buckets, per_shard_batch))

  def run(state, num_steps):
    state, holder['order'], metrics = steps_fn(num_steps)(state, holder['order'], data, seed_key)
    return state, metrics

  return _Trainer(state, run, config.resident.steps_per_call,
                  functools.partial(inference.with_trained_decoder, full_state))


def _scst_trainer(config, workdir, prepared, train_table, full_state, model, mesh,
                  checkpoints) -> _Trainer:
  """Self-critical training of the decoder on cached embeddings resident on the devices, the
  CIDEr-D reward computed in the step, K steps per call. `full_state` holds init_from's model."""
  from jaxcap.data import feature_cache  # pylint: disable=g-import-not-at-top
  if not config.features.enabled:
    raise ValueError('config.scst.enabled=True trains on cached features: set '
                     'config.features.enabled=True and config.model.train_encoder=False')
  cached = _cached_features(config, workdir, prepared, full_state, mesh)
  tokens, counts = feature_cache.references(cached, train_table)
  # Rewards compare the ids after BOS, EOS included, as sampled captions have them.
  scorer = rewards.CiderD.from_padded(tokens[:, :, 1:], counts, prepared.tokenizer.vocab_size)
  data = scst.place(cached.embedding, scorer.references, mesh, captioner.DTYPES[config.model.dtype])
  tables = jax.device_put(scorer.tables, parallel.replicated(mesh))
  per_shard_batch = config.batch_size // mesh.size
  images_per_shard = data.embedding.shape[1]
  if images_per_shard < per_shard_batch:
    raise ValueError(f'config.batch_size={config.batch_size} images per step is more than the '
                     f'{images_per_shard * mesh.size} cached training images')
  logging.info('Self-critical training: %d images with %d references each at most, %d samples '
               'each, %s baseline, from %s', images_per_shard * mesh.size, tokens.shape[1],
               config.scst.num_samples, config.scst.baseline, config.scst.init_from)

  state = inference.initial_decoder_state(config, model, mesh, cached.embedding.shape[1])
  # init_from's decoder with a fresh optimizer (Adam's moments start at zero for any parameters).
  state = state.replace(params={'decoder': full_state.params['decoder']})
  state = checkpoints.restore_latest(state)
  seed_key = jax.device_put(jax.random.key(config.seed), parallel.replicated(mesh))
  # One compilation per length of call (the last call of a run may be shorter).
  steps_fn = functools.cache(functools.partial(
      scst.jit_scst_steps, per_shard_batch=per_shard_batch, num_samples=config.scst.num_samples,
      baseline=config.scst.baseline, temperature=config.scst.temperature,
      max_len=config.scst.max_len))

  def run(state, num_steps):
    return steps_fn(num_steps)(state, data, tables, seed_key)
  return _Trainer(state, run, config.resident.steps_per_call,
                  functools.partial(inference.with_trained_decoder, full_state))


def _check_intervals(config: ml_collections.ConfigDict, steps_per_call: int) -> None:
  for field in ('log_every_steps', 'eval_every_steps', 'checkpoint_every_steps'):
    if config[field] % steps_per_call:
      raise ValueError(f'config.{field}={config[field]} is not a multiple of '
                       f'config.resident.steps_per_call={steps_per_call}')


def _create_trainer(config, workdir, prepared, train_table, full_state, model, mesh,
                    checkpoints) -> _Trainer:
  """The trainer the config asks for, from the latest checkpoint if there is one."""
  if config.scst.enabled:  # First: it also stops a config without cached features.
    make = _scst_trainer
  elif config.features.enabled:
    make = _resident_trainer
  else:
    return _streaming_trainer(config, prepared, train_table, full_state, mesh, checkpoints)
  trainer = make(config, workdir, prepared, train_table, full_state, model, mesh, checkpoints)
  _check_intervals(config, trainer.steps_per_call)
  return trainer


def _every(interval: int, last_step: int) -> set[int]:
  """The steps of a periodic action: multiples of `interval`, and the last step."""
  return {*range(interval, last_step + 1, interval), last_step}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict[str, float]]:
  """Trains to `config.num_train_steps` and returns the final metrics of each eval split."""
  evaluate.ensure_java()
  encoder_weights = captioner.load_encoder_weights(config.model)  # Fails before any work.
  os.makedirs(workdir, exist_ok=True)
  checkpoint_dir = os.path.join(workdir, checkpoint.CHECKPOINT_DIRNAME)
  if os.path.isdir(checkpoint_dir) and any(n.isdigit() for n in os.listdir(checkpoint_dir)):
    check_resume_config(workdir, config)  # Only a run with a checkpoint constrains this one.
  is_chief = jax.process_index() == 0
  if is_chief:
    with open(os.path.join(workdir, inference.CONFIG_FILENAME), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.batch_size, mesh)
  last_step = config.num_train_steps

  if config.scst.enabled and is_chief:
    inference.copy_tokenizer(config.scst.init_from, workdir)  # The model's ids are init_from's.

  # Data and tokenizer.
  prepared = prepare.prepare(config, workdir)
  logging.info('Tokenizer: %d ids (%s)', prepared.tokenizer.vocab_size,
               os.path.join(workdir, tokenizer_lib.MODEL_FILENAME))
  train_table = input_pipeline.TokenTable.build(prepared.train_captions, prepared.tokenizer,
                                                config.data.max_len)

  # Model and state, replicated over the mesh, from the latest checkpoint if there is one.
  model = captioner.create_model(config.model, prepared.tokenizer.vocab_size)
  full_state = inference.initial_state(config, model, mesh, encoder_weights)
  if encoder_weights is not None:
    logging.info('Encoder weights from %s', config.model.encoder_weights)
  if config.scst.enabled:
    full_state = inference.init_from_state(config, full_state)
  checkpoints = checkpoint.Checkpoints(workdir, config.keep_checkpoints)
  trainer = _create_trainer(config, workdir, prepared, train_table, full_state, model, mesh,
                            checkpoints)
  state = trainer.state
  start_step = int(state.step)
  if start_step:
    logging.info('Resumed from the checkpoint of step %d in %s', start_step, workdir)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info('Model: %s encoder%s, %.2fM parameters trained', config.model.encoder,
               ' (cached embeddings)' if config.features.enabled else '', num_params / 1e6)
  evaluator = evaluate.SplitEvaluator(prepared.builder, prepared.tokenizer, config, mesh)
  per_step = {'examples_per_sec': config.batch_size}
  if config.scst.enabled:
    per_step['captions_per_sec'] = config.batch_size * config.scst.num_samples
  writer = metrics_writer.create(workdir, is_chief=is_chief, per_step=per_step)
  schedule = train_step_lib.learning_rate_schedule(config)
  pending_metrics, unchecked_finite = [], []
  results: dict[str, dict[str, float]] = {}

  # The periodic actions around the steps, each given the last step of a call.
  def log_train_metrics(step: int, t: float) -> None:
    del t
    _raise_if_nonfinite(unchecked_finite, checkpoints.manager)
    fetched = jax.device_get(pending_metrics)
    pending_metrics.clear()
    summary = _train_summary({k: np.concatenate([m[k] for m in fetched]) for k in fetched[0]})
    writer.write_scalars(step, {**summary, 'learning_rate': float(schedule(step - 1))})

  def save_checkpoint(step: int, t: float) -> None:
    del t
    _raise_if_nonfinite(unchecked_finite, checkpoints.manager)  # Never checkpoint NaN parameters.
    with progress.timed('checkpoint', wait_jax_async_dispatch=False):
      checkpoints.save(state, force=step == last_step)

  def run_evaluation(step: int, t: float) -> None:
    del t
    splits = config.data.eval_splits if step == last_step else config.data.eval_splits[:1]
    with progress.timed('eval', wait_jax_async_dispatch=False):
      for split in splits:
        result = evaluator(trainer.full_state(state), split)
        evaluate.log_examples(result, evaluator.references(split), config.eval.num_printed_examples)
        if is_chief:
          evaluate.write_results_file(
              os.path.join(workdir, 'captions', f'{split}_step{step}.json'), result.generated)
        writer.write_scalars(step, {f'{split}/{k}': v for k, v in result.metrics.items()})
        results[split] = result.metrics

  # Progress: steps/s, examples/s and the ETA, with the time evaluations and checkpoints take.
  log_steps = _every(config.log_every_steps, last_step)
  progress = periodic_actions.ReportProgress(
      num_train_steps=last_step, writer=writer, every_secs=None, on_steps=log_steps)
  actions = [
      # First: fetching the metrics waits for the steps, so progress times finished steps.
      periodic_actions.PeriodicCallback(on_steps=log_steps, callback_fn=log_train_metrics),
      progress,
      periodic_actions.PeriodicCallback(
          on_steps=_every(config.checkpoint_every_steps, last_step), callback_fn=save_checkpoint),
      periodic_actions.PeriodicCallback(
          on_steps=_every(config.eval_every_steps, last_step), callback_fn=run_evaluation),
  ]

  logging.info('Training steps %d to %d, global batch %d on %d devices', start_step + 1,
               last_step, config.batch_size, mesh.size)
  try:
    with preemption.PreemptionWatch() as preemption_watch:
      step = start_step
      while step < last_step:
        # Calls end on multiples of steps_per_call (so on every log/eval/checkpoint step).
        num_steps = min(trainer.steps_per_call - step % trainer.steps_per_call, last_step - step)
        call_start = time.perf_counter()
        state, metrics = trainer.run(state, num_steps)
        unchecked_finite.append((step + 1, metrics.pop('finite')))
        pending_metrics.append(metrics)
        if step == start_step:  # Keeps compilation out of steps/s.
          jax.block_until_ready(metrics)
          logging.info('First step (compilation included) took %.1f s',
                       time.perf_counter() - call_start)
        if preemption_watch.reached_stop(range(step + 1, step + num_steps + 1)):
          step += num_steps
          log_train_metrics(step, 0.0)
          save_checkpoint(step, 0.0)
          checkpoints.wait()
          logging.warning('SIGTERM: saved the checkpoint of step %d in %s; stopping', step, workdir)
          break
        step += num_steps
        for action in actions:
          action(step)
  finally:
    checkpoints.close()  # Waits for the last write; raises if it failed.
    writer.close()
  if start_step >= last_step:
    logging.info('Nothing to train: the checkpoint in %s is at step %d', workdir, start_step)
  return results
