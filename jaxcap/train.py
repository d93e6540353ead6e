"""The training loop: data, model and state set up, then steps, logs, evaluations, checkpoints.

`train_and_evaluate(config, workdir)` is what `scripts/train.py` and the tests call. Running it
again on the same workdir resumes from the latest checkpoint with the saved tokenizer.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from clu import metric_writers

from jaxcap import checkpoint
from jaxcap import evaluate
from jaxcap import inference
from jaxcap import parallel
from jaxcap import train_step as train_step_lib
from jaxcap.data import input_pipeline
from jaxcap.data import prepare
from jaxcap.data import tokenizer as tokenizer_lib
from jaxcap.models import captioner

METRICS_FILENAME = 'metrics.jsonl'


class NonFiniteLossError(FloatingPointError):
  """Training produced a non-finite loss or gradient; nothing after it was checkpointed."""


# Fields that a resumed run may not change: they change the parameters, the optimizer state or
# what the tokens mean. Other fields (steps, intervals, learning rate, ...) may change.
_RESUME_LOCKED_PREFIXES = ('model.', 'data.name', 'data.vocab_size', 'data.tokenizer_type',
                           'data.shapes.', 'data.coco_dir', 'optimizer.name')


def _flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(tree, dict):
    return {k: v for key, value in tree.items() for k, v in _flatten(value, f'{prefix}{key}.').items()}
  return {prefix[:-1]: tree}


def check_resume_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Stops a resumed run whose config changes a locked field; logs the harmless changes."""
  path = os.path.join(workdir, inference.CONFIG_FILENAME)
  if not os.path.exists(path):
    return
  with open(path) as f:
    old = _flatten(json.load(f))
  new = _flatten(json.loads(config.to_json_best_effort()))
  changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
  locked = [k for k in changed if k.startswith(_RESUME_LOCKED_PREFIXES)]
  if locked:
    raise ValueError(f'{workdir} holds a run with a different {", ".join(locked)} '
                     f'({", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in locked)}); '
                     'use a new workdir, or the old values, to resume')
  for key in changed:
    logging.info('Resuming with config.%s changed: %r -> %r', key, old.get(key), new.get(key))


def _raise_if_nonfinite(unchecked: list[tuple[int, jax.Array]], manager) -> None:
  """Fetches the pending per-step finite flags (one small sync) and stops at the first bad one."""
  flags = jax.device_get([finite for _, finite in unchecked])
  for (step, _), finite in zip(unchecked, flags):
    if not finite:
      raise NonFiniteLossError(
          f'non-finite loss or gradient at step {step}; nothing after it was saved. Last good '
          f'checkpoint: step {manager.latest_step()} in {manager.directory}')
  unchecked.clear()


def _format_duration(seconds: float) -> str:
  minutes, seconds = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f'{hours}h{minutes:02d}m' if hours else f'{minutes}m{seconds:02d}s'


def _append_jsonl(path: str, record: dict[str, Any]) -> None:
  with open(path, 'a') as f:
    f.write(json.dumps(record) + '\n')


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

  # Data and tokenizer.
  prepared = prepare.prepare(config, workdir)
  builder, tokenizer = prepared.builder, prepared.tokenizer
  logging.info('Tokenizer: %d ids (%s)', tokenizer.vocab_size,
               os.path.join(workdir, tokenizer_lib.MODEL_FILENAME))
  train_table = input_pipeline.TokenTable.build(prepared.train_captions, tokenizer, data.max_len)

  # Model and state, replicated over the mesh.
  model = captioner.create_model(config.model, tokenizer.vocab_size)
  state_sharding = parallel.replicated(mesh)
  init_fn = jax.jit(functools.partial(train_step_lib.create_train_state, config, model),
                    out_shardings=state_sharding)
  state = init_fn(jax.random.key(config.seed))
  manager = checkpoint.create_manager(workdir, config.keep_checkpoints)
  state = checkpoint.restore_latest(manager, state)
  start_step = int(state.step)
  if start_step:
    logging.info('Resumed from the checkpoint of step %d in %s', start_step, workdir)
  elif encoder_weights is not None:
    state = jax.jit(train_step_lib.with_encoder_variables, out_shardings=state_sharding)(
        state, encoder_weights)
    logging.info('Encoder weights from %s', config.model.encoder_weights)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info('Model: %s encoder, %.2fM parameters', config.model.encoder, num_params / 1e6)

  # The input order depends on the seed and the step training starts from.
  train_seed = config.seed * 1_000_003 + start_step
  train_iter = input_pipeline.train_dataset(
      builder, data.train_split, train_table, data, batch_size=batch_size, seed=train_seed,
      process_index=jax.process_index(), process_count=jax.process_count()).as_numpy_iterator()

  p_train_step = jax.jit(train_step_lib.train_step,
                         in_shardings=(state_sharding, parallel.data_sharding(mesh)),
                         out_shardings=(state_sharding, parallel.replicated(mesh)),
                         donate_argnums=0)
  evaluator = evaluate.SplitEvaluator(builder, tokenizer, config, mesh, state_sharding)

  def run_evaluation(step: int, splits) -> dict[str, dict[str, float]]:
    results = {}
    for split in splits:
      result = evaluator(state, split)
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
    for step in range(start_step + 1, config.num_train_steps + 1):
      batch = parallel.shard_batch(next(train_iter), mesh)
      state, metrics = p_train_step(state, batch)
      unchecked_finite.append((step, metrics.pop('finite')))
      pending_metrics.append(metrics)
      is_last = step == config.num_train_steps
      if step == start_step + 1:  # Keep compilation out of steps/s.
        jax.block_until_ready(metrics)
        logging.info('First step (compilation included) took %.1f s',
                     time.perf_counter() - interval_start)
        interval_start, interval_first_step = time.perf_counter(), step

      if step % config.log_every_steps == 0 or is_last:
        _raise_if_nonfinite(unchecked_finite, manager)
        fetched = jax.device_get(pending_metrics)
        pending_metrics = []
        elapsed = time.perf_counter() - interval_start
        weights = np.array([m['num_tokens'] for m in fetched])
        summary = {
            'train_loss': float(np.average([m['loss'] for m in fetched], weights=weights)),
            'train_token_accuracy': float(np.average([m['token_accuracy'] for m in fetched],
                                                     weights=weights)),
            'grad_norm': float(np.mean([m['grad_norm'] for m in fetched])),
            'learning_rate': float(schedule(step - 1)),
        }
        speed = ''
        if step > interval_first_step:  # Not only the compilation step.
          steps_per_sec = (step - interval_first_step) / elapsed
          summary['steps_per_sec'] = steps_per_sec
          summary['examples_per_sec'] = steps_per_sec * config.batch_size
          eta = _format_duration((config.num_train_steps - step) / steps_per_sec)
          speed = (f' | {steps_per_sec:.2f} steps/s | {steps_per_sec * config.batch_size:.0f} '
                   f'examples/s | ETA {eta}')
        writer.write_scalars(step, summary)
        logging.info('step %d/%d | loss %.4f | token acc %.3f%s', step, config.num_train_steps,
                     summary['train_loss'], summary['train_token_accuracy'], speed)
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
