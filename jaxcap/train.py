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
import signal
import threading
import time
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
from clu import metric_writers
from flax import traverse_util

from jaxcap import checkpoint
from jaxcap import evaluate
from jaxcap import inference
from jaxcap import parallel
from jaxcap import resident
from jaxcap import rewards
from jaxcap import scst
from jaxcap import train_step as train_step_lib
from jaxcap.data import input_pipeline
from jaxcap.data import prepare
from jaxcap.data import tokenizer as tokenizer_lib
from jaxcap.models import captioner

METRICS_FILENAME = 'metrics.jsonl'


class NonFiniteLossError(FloatingPointError):
  """Training produced a non-finite loss or gradient; nothing after it was checkpointed."""


# Fields that a resumed run may not change: they change the parameters (their shapes or how
# they were made), the optimizer state's structure or what the tokens mean. Others (steps,
# intervals, learning rate, compute dtype, unrolling, dropout, ...) may change.
_RESUME_LOCKED_FIELDS = frozenset({
    'model.encoder', 'model.encoder_weights', 'model.train_encoder', 'model.small_cnn.features',
    'model.image_bottleneck', 'model.embed_dim', 'model.lstm_size', 'model.logit_bottleneck',
    'data.name', 'data.vocab_size', 'data.tokenizer_type', 'data.coco_dir', 'optimizer.name',
    'features.enabled', 'scst.enabled', 'scst.init_from'})
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


# (summary key, name in the log line) of the train metrics, when the trainer reports them.
_LOGGED = (('train_loss', 'loss'), ('train_token_accuracy', 'token acc'),
           ('train_sample_reward', 'sample reward'), ('train_baseline_reward', 'baseline'),
           ('train_greedy_reward', 'greedy reward'))


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


def _format_duration(seconds: float) -> str:
  minutes, seconds = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f'{hours}h{minutes:02d}m' if hours else f'{minutes}m{seconds:02d}s'


def _append_jsonl(path: str, record: dict[str, Any]) -> None:
  with open(path, 'a') as f:
    f.write(json.dumps(record) + '\n')


@dataclasses.dataclass
class _Trainer:
  """What the loop drives: the state it trains and checkpoints, and how to advance it."""
  state: train_step_lib.TrainState
  # (state, steps) -> (state, metrics with a leading axis of `steps`); batches follow state.step.
  run: Callable[[train_step_lib.TrainState, int], tuple[train_step_lib.TrainState, Any]]
  steps_per_call: int
  # A full-model (encoder + decoder) state for evaluation.
  full_state: Callable[[train_step_lib.TrainState], train_step_lib.TrainState]


def _streaming_trainer(config, prepared, train_table, state, mesh, batch_size: int) -> _Trainer:
  """One jitted step per host batch of images (tf.data)."""
  state_sharding = parallel.replicated(mesh)
  # Batches are a pure function of (seed, step): a resumed run continues the same sequence.
  batches = input_pipeline.train_dataset(
      prepared.builder, config.data.train_split, train_table, config.data, batch_size=batch_size,
      seed=config.seed, start_step=int(state.step), process_index=jax.process_index(),
      process_count=jax.process_count()).as_numpy_iterator()
  dropout_key = train_step_lib.rng_stream(jax.random.key(config.seed), 'dropout')
  step_fn = jax.jit(lambda s, b: _stack(train_step_lib.train_step(s, b, dropout_key)),
                    in_shardings=(state_sharding, parallel.data_sharding(mesh)),
                    out_shardings=(state_sharding, state_sharding), donate_argnums=0)

  def run(state, num_steps):
    del num_steps  # Always one.
    return step_fn(state, parallel.shard_batch(next(batches), mesh))
  return _Trainer(state, run, 1, lambda s: s)


def _stack(outputs):
  state, metrics = outputs
  return state, jax.tree.map(lambda x: x[None], metrics)


def _resident_trainer(config, workdir, prepared, train_table, full_state, model, mesh,
                      manager) -> _Trainer:
  """The decoder alone on cached embeddings resident on the devices, K steps per call."""
  from jaxcap.data import feature_cache  # pylint: disable=g-import-not-at-top
  _check_frozen_encoder(config)
  cached = feature_cache.extract(prepared.builder, config.data.train_split, config, full_state,
                                 mesh, feature_cache_dir(config, workdir))
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
  state = checkpoint.restore_latest(manager, state)
  seed_key = jax.device_put(jax.random.key(config.seed), parallel.replicated(mesh))
  holder = {'order': resident.first_order(data, per_shard_batch)}
  compiled: dict[int, Callable] = {}

  def run(state, num_steps):
    if num_steps not in compiled:
      compiled[num_steps] = resident.jit_train_steps(buckets, per_shard_batch, num_steps)
    state, holder['order'], metrics = compiled[num_steps](state, holder['order'], data, seed_key)
    return state, metrics

  return _Trainer(state, run, config.resident.steps_per_call,
                  functools.partial(inference.with_trained_decoder, full_state))


def _check_frozen_encoder(config: ml_collections.ConfigDict) -> None:
  if config.model.train_encoder:
    raise ValueError('config.features.enabled=True trains on cached embeddings of a frozen '
                     'encoder: set config.model.train_encoder=False')


def _scst_trainer(config, workdir, prepared, train_table, full_state, model, mesh,
                  manager) -> _Trainer:
  """Self-critical training of the decoder on cached embeddings resident on the devices, the
  CIDEr-D reward computed in the step, K steps per call. `full_state` holds init_from's model."""
  from jaxcap.data import feature_cache  # pylint: disable=g-import-not-at-top
  if not config.features.enabled:
    raise ValueError('config.scst.enabled=True trains on cached features: set '
                     'config.features.enabled=True and config.model.train_encoder=False')
  _check_frozen_encoder(config)
  cached = feature_cache.extract(prepared.builder, config.data.train_split, config, full_state,
                                 mesh, feature_cache_dir(config, workdir))
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
  state = checkpoint.restore_latest(manager, state)
  seed_key = jax.device_put(jax.random.key(config.seed), parallel.replicated(mesh))
  compiled: dict[int, Callable] = {}

  def run(state, num_steps):
    if num_steps not in compiled:
      compiled[num_steps] = scst.jit_scst_steps(
          num_steps, per_shard_batch=per_shard_batch, num_samples=config.scst.num_samples,
          baseline=config.scst.baseline, temperature=config.scst.temperature,
          max_len=config.scst.max_len)
    return compiled[num_steps](state, data, tables, seed_key)
  return _Trainer(state, run, config.resident.steps_per_call,
                  functools.partial(inference.with_trained_decoder, full_state))


def feature_cache_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  return config.features.cache_dir or os.path.join(workdir, 'features')


def extract_features(config: ml_collections.ConfigDict, workdir: str,
                     splits: Sequence[str]) -> dict[str, Any]:
  """Fills the feature cache of `splits` with the config's (frozen) encoder, as training would;
  returns each split's cached features. Complete, current caches are only read."""
  from jaxcap.data import feature_cache  # pylint: disable=g-import-not-at-top
  encoder_weights = captioner.load_encoder_weights(config.model)
  prepared = prepare.prepare(config, workdir)
  mesh = parallel.make_mesh()
  model = captioner.create_model(config.model, prepared.tokenizer.vocab_size)
  full_state = inference.initial_state(config, model, mesh, encoder_weights)
  return {split: feature_cache.extract(prepared.builder, split, config, full_state, mesh,
                                       feature_cache_dir(config, workdir)) for split in splits}


def _check_intervals(config: ml_collections.ConfigDict, steps_per_call: int) -> None:
  for field in ('log_every_steps', 'eval_every_steps', 'checkpoint_every_steps'):
    if config[field] % steps_per_call:
      raise ValueError(f'config.{field}={config[field]} is not a multiple of '
                       f'config.resident.steps_per_call={steps_per_call}')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict[str, float]]:
  """Trains to `config.num_train_steps` and returns the final metrics of each eval split."""
  evaluate.check_java()
  encoder_weights = captioner.load_encoder_weights(config.model)  # Fails before any work.
  os.makedirs(workdir, exist_ok=True)
  checkpoint_dir = os.path.join(workdir, checkpoint.CHECKPOINT_DIRNAME)
  if os.path.isdir(checkpoint_dir) and any(n.isdigit() for n in os.listdir(checkpoint_dir)):
    check_resume_config(workdir, config)  # Only a run with a checkpoint constrains this one.
  is_chief = jax.process_index() == 0
  if is_chief:
    with open(os.path.join(workdir, inference.CONFIG_FILENAME), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief)
  mesh = parallel.make_mesh()
  batch_size = parallel.check_batch_size(config.batch_size, mesh)
  data = config.data

  if config.scst.enabled and is_chief:
    inference.copy_tokenizer(config.scst.init_from, workdir)  # The model's ids are init_from's.

  # Data and tokenizer.
  prepared = prepare.prepare(config, workdir)
  builder, tokenizer = prepared.builder, prepared.tokenizer
  logging.info('Tokenizer: %d ids (%s)', tokenizer.vocab_size,
               os.path.join(workdir, tokenizer_lib.MODEL_FILENAME))
  train_table = input_pipeline.TokenTable.build(prepared.train_captions, tokenizer, data.max_len)

  # Model and state, replicated over the mesh.
  model = captioner.create_model(config.model, tokenizer.vocab_size)
  state_sharding = parallel.replicated(mesh)
  full_state = inference.initial_state(config, model, mesh, encoder_weights)
  if encoder_weights is not None:
    logging.info('Encoder weights from %s', config.model.encoder_weights)
  if config.scst.enabled:
    full_state = inference.init_from_state(config, full_state)
  manager = checkpoint.create_manager(workdir, config.keep_checkpoints)
  if config.scst.enabled:
    trainer = _scst_trainer(config, workdir, prepared, train_table, full_state, model, mesh, manager)
    _check_intervals(config, trainer.steps_per_call)
  elif config.features.enabled:
    trainer = _resident_trainer(config, workdir, prepared, train_table, full_state, model, mesh, manager)
    _check_intervals(config, trainer.steps_per_call)
  else:
    state = checkpoint.restore_latest(manager, full_state)
    trainer = _streaming_trainer(config, prepared, train_table, state, mesh, batch_size)
  state = trainer.state
  start_step = int(state.step)
  if start_step:
    logging.info('Resumed from the checkpoint of step %d in %s', start_step, workdir)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info('Model: %s encoder%s, %.2fM parameters trained', config.model.encoder,
               ' (cached embeddings)' if config.features.enabled else '', num_params / 1e6)
  evaluator = evaluate.SplitEvaluator(builder, tokenizer, config, mesh, state_sharding)

  def run_evaluation(step: int, splits) -> dict[str, dict[str, float]]:
    results = {}
    for split in splits:
      result = evaluator(trainer.full_state(state), split)
      metrics = result.metrics
      logging.info('Eval %s at step %d: %s', split, step,
                   ', '.join(f'{k}={v:.4g}' for k, v in metrics.items()))
      evaluate.log_examples(result, evaluator.references(split), config.eval.num_printed_examples)
      if is_chief:
        evaluate.write_results_file(
            os.path.join(workdir, 'captions', f'{split}_step{step}.json'), result.generated)
        _append_jsonl(os.path.join(workdir, METRICS_FILENAME), {'step': step, 'split': split, **metrics})
        writer.write_scalars(step, {f'{split}/{k}': v for k, v in metrics.items()})
      results[split] = metrics
    return results

  logging.info('Training steps %d to %d, global batch %d on %d devices', start_step + 1,
               config.num_train_steps, config.batch_size, mesh.size)
  pending_metrics, unchecked_finite = [], []
  interval_start, interval_first_step = time.perf_counter(), start_step
  results: dict[str, dict[str, float]] = {}
  schedule = train_step_lib.learning_rate_schedule(config)
  # SIGTERM (a preemption notice) makes the loop save a checkpoint after the current step and
  # return normally.
  preempted = threading.Event()
  in_main_thread = threading.current_thread() is threading.main_thread()
  previous_handler = (signal.signal(signal.SIGTERM, lambda *_: preempted.set())
                      if in_main_thread else None)
  try:
    step, first_call = start_step, True
    while step < config.num_train_steps:
      # Calls end on multiples of steps_per_call (so on every log/eval/checkpoint step).
      num_steps = min(trainer.steps_per_call - step % trainer.steps_per_call,
                      config.num_train_steps - step)
      state, metrics = trainer.run(state, num_steps)
      unchecked_finite.append((step + 1, metrics.pop('finite')))
      pending_metrics.append(metrics)
      step += num_steps
      is_last = step == config.num_train_steps
      if first_call:  # Keep compilation out of steps/s.
        first_call = False
        jax.block_until_ready(metrics)
        logging.info('First step (compilation included) took %.1f s',
                     time.perf_counter() - interval_start)
        interval_start, interval_first_step = time.perf_counter(), step

      if step % config.log_every_steps == 0 or is_last:
        _raise_if_nonfinite(unchecked_finite, manager)
        pending_metrics = jax.device_get(pending_metrics)
        fetched = {k: np.concatenate([m[k] for m in pending_metrics]) for k in pending_metrics[0]}
        pending_metrics = []
        elapsed = time.perf_counter() - interval_start
        summary = _train_summary(fetched)
        summary['learning_rate'] = float(schedule(step - 1))
        speed = ''
        if step > interval_first_step:  # Not only the compilation step.
          steps_per_sec = (step - interval_first_step) / elapsed
          summary['steps_per_sec'] = steps_per_sec
          summary['examples_per_sec'] = steps_per_sec * config.batch_size
          speed = f' | {steps_per_sec:.2f} steps/s | {steps_per_sec * config.batch_size:.0f} examples/s'
          if config.scst.enabled:
            summary['captions_per_sec'] = summary['examples_per_sec'] * config.scst.num_samples
            speed += f' | {summary["captions_per_sec"]:.0f} sampled captions/s'
          speed += f' | ETA {_format_duration((config.num_train_steps - step) / steps_per_sec)}'
        writer.write_scalars(step, summary)
        if is_chief:
          _append_jsonl(os.path.join(workdir, METRICS_FILENAME), {'step': step, 'split': 'train', **summary})
        logging.info('step %d/%d | %s%s', step, config.num_train_steps, ' | '.join(
            f'{name} {summary[key]:.4f}' for key, name in _LOGGED if key in summary), speed)
        interval_start, interval_first_step = time.perf_counter(), step

      if step % config.checkpoint_every_steps == 0 or is_last or preempted.is_set():
        _raise_if_nonfinite(unchecked_finite, manager)  # Never checkpoint NaN parameters.
        checkpoint.save(manager, state, force=is_last or preempted.is_set())
      if preempted.is_set():
        logging.warning('SIGTERM: saved the checkpoint of step %d in %s; stopping', step, workdir)
        break

      if is_last:
        results = run_evaluation(step, data.eval_splits)
      elif step % config.eval_every_steps == 0:
        run_evaluation(step, data.eval_splits[:1])
      if step % config.eval_every_steps == 0 or is_last:
        interval_start, interval_first_step = time.perf_counter(), step
  finally:
    if in_main_thread:
      signal.signal(signal.SIGTERM, previous_handler)
    manager.wait_until_finished()
    manager.close()
    writer.flush()
  if start_step >= config.num_train_steps:
    logging.info('Nothing to train: the checkpoint in %s is at step %d', workdir, start_step)
  return results
