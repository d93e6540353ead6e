"""The training loop: data, model and state set up, then steps, logs, evaluations, checkpoints.

`train_and_evaluate(config, workdir)` is what `scripts/train.py` and the tests call. Running it
again on the same workdir resumes from the latest checkpoint with the saved tokenizer.
"""

from __future__ import annotations

import logging
import time

from clu import periodic_actions
import jax
import ml_collections
import numpy as np

from jaxcap import checkpoint
from jaxcap import evaluate
from jaxcap import feature_cache
from jaxcap import metrics_writer
from jaxcap import parallel
from jaxcap import predict
from jaxcap import preemption
from jaxcap import state as state_lib
from jaxcap import trainers
from jaxcap import workdir as workdir_lib
from jaxcap.data import captions as captions_lib
from jaxcap.data import input_pipeline
from jaxcap.data import prepare
from jaxcap.models import captioner


class NonFiniteLossError(FloatingPointError):
  """Training produced a non-finite loss or gradient; nothing after it was checkpointed."""


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


def _setup(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh,
           encoder_weights: dict | None) -> tuple[trainers.Setup, prepare.PreparedData]:
  """The run's data, tokenizer, model, initial full state and checkpoints, for its trainer;
  the checkpoint folder is made once the data and the initial model are there."""
  if config.trainer == 'scst' and jax.process_index() == 0:  # The model's ids are init_from's.
    workdir_lib.copy_tokenizer(
        workdir_lib.check_is_workdir(config.scst.init_from, 'config.scst.init_from'), workdir)
  prepared = prepare.prepare(config, workdir)
  logging.info('Tokenizer: %d ids (%s)', prepared.tokenizer.vocab_size,
               workdir_lib.tokenizer_path(workdir))
  train_table = captions_lib.TokenTable.build(prepared.train_captions, prepared.tokenizer,
                                                config.data.max_len)
  model = captioner.create_model(config.model, prepared.tokenizer.vocab_size)
  full_state = predict.full_model_state(config, model, mesh, encoder_weights)
  checkpoints = checkpoint.Checkpoints(workdir, config.keep_checkpoints,
                                      checkpoint.best_of(config))
  if encoder_weights is not None:
    logging.info('Encoder weights from %s', config.model.encoder_weights)

  def train_batches(start_step: int):
    return input_pipeline.train_dataset(
        prepared.builder, prepared.train_split, train_table, config.data,
        batch_size=parallel.check_batch_size(config.batch_size, mesh), seed=config.seed,
        start_step=start_step,
        process_index=jax.process_index(),
        process_count=jax.process_count()).as_numpy_iterator()

  def cached_features():
    return feature_cache.load(feature_cache.extract(
        prepared.builder, prepared.train_split, config, full_state, mesh,
        workdir_lib.features_dir(config, workdir)))

  setup = trainers.Setup(config, model, prepared.tokenizer.vocab_size, mesh, full_state,
                         checkpoints, train_table, train_batches, cached_features)
  return setup, prepared


def _every(interval: int, last_step: int) -> set[int]:
  """The steps of a periodic action: multiples of `interval`, and the last step."""
  return {*range(interval, last_step + 1, interval), last_step}


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, dict[str, float]]:
  """Trains to `config.num_train_steps` and returns the final metrics of each eval split."""
  evaluate.ensure_java()
  trainers.check_trainer(config)
  encoder_weights = captioner.load_encoder_weights(config.model)  # Fails before any work.
  workdir_lib.check_resume(workdir, config)
  best, validation_metrics = checkpoint.best_of(config), evaluate.validation_metric_names(config)
  if best is not None and best[0] not in validation_metrics:
    raise ValueError(
        f'config.best_checkpoint.metric={best[0]!r} is not a metric of the validation '
        f'(config.eval.periodic_metrics={config.eval.periodic_metrics!r} logs '
        f'{", ".join(sorted(validation_metrics))})')
  is_chief = jax.process_index() == 0
  if is_chief:
    workdir_lib.write_config(workdir, config)
  mesh = parallel.make_mesh()
  parallel.log_devices(mesh)
  parallel.check_batch_size(config.batch_size, mesh)
  last_step = config.num_train_steps

  # Data, model and the trainer's state, from the latest checkpoint if there is one.
  setup, prepared = _setup(config, workdir, mesh, encoder_weights)
  checkpoints = setup.checkpoints
  trainer = trainers.build(setup)
  state = trainer.state
  start_step = int(state.step)
  if start_step:
    logging.info('Resumed from the checkpoint of step %d in %s', start_step, workdir)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info('Model: %s encoder%s, %.2fM parameters trained', config.model.encoder,
               ' (cached embeddings)' if trainers.on_features(config) else '', num_params / 1e6)
  evaluator = evaluate.SplitEvaluator(prepared.builder, prepared.tokenizer, config, mesh)
  writer = metrics_writer.create(workdir, is_chief=is_chief, per_step=trainer.per_step)
  schedule = state_lib.learning_rate_schedule(config)
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

  eval_steps = _every(config.eval_every_steps, last_step)
  periodic_coco = evaluate.periodic_coco_metrics(config)
  # The first eval split validates (and chooses the best checkpoint); the others are reported.
  validation_split, *report_splits = config.data.eval_splits or (None,)

  def score_split(scored_state, split: str, step: int, *, coco_metrics: bool = True,
                     **more: float) -> dict[str, float]:
    """Scores `split`, logs it (and `more`) at `step` and writes its captions (named by the
    scored state's step)."""
    with progress.timed('eval', wait_jax_async_dispatch=False):
      result = evaluator(trainer.full_state(scored_state), split, coco_metrics=coco_metrics)
    evaluate.log_examples(result, evaluator.references(split), config.eval.num_printed_examples)
    if is_chief:
      evaluate.write_results_file(
          workdir_lib.captions_path(workdir, split, int(scored_state.step)), result.generated)
    results[split] = {**result.metrics, **more}
    writer.write_scalars(step, {f'{split}/{k}': v for k, v in results[split].items()})
    return results[split]

  def save_checkpoint(step: int, t: float) -> None:
    """Validates first on evaluation steps: the checkpoint carries its validation metrics."""
    del t
    _raise_if_nonfinite(unchecked_finite, checkpoints.manager)  # Never checkpoint NaN parameters.
    validate = step in eval_steps and validation_split is not None
    metrics = score_split(state, validation_split, step,
                             coco_metrics=periodic_coco) if validate else None
    with progress.timed('checkpoint', wait_jax_async_dispatch=False):
      checkpoints.save(state, force=step == last_step, metrics=metrics)
    if step == last_step:
      final_report(step)

  def final_report(step: int) -> None:
    """The other eval splits, scored on the best checkpoint (the last state where none is
    recorded), logged at the last step with the step they scored as `checkpoint_step`."""
    if not report_splits:
      return
    checkpoints.wait()
    best_step = checkpoints.best_step()
    scored_state = state if best_step in (None, step) else checkpoints.restore(state, best_step)
    scored_step = int(scored_state.step)
    logging.info('Final report: %s scored on the checkpoint of step %d (%s)',
                 ', '.join(report_splits), scored_step,
                 'the last step' if best_step is None else
                 f'the best by {validation_split} {checkpoints.best[0]}')
    for split in report_splits:
      score_split(scored_state, split, step, checkpoint_step=scored_step)

  # Progress: steps/s, examples/s and the ETA, with the time evaluations and checkpoints take.
  log_steps = _every(config.log_every_steps, last_step)
  progress = periodic_actions.ReportProgress(
      num_train_steps=last_step, writer=writer, every_secs=None, on_steps=log_steps)
  actions = [
      # First: fetching the metrics waits for the steps, so progress times finished steps.
      periodic_actions.PeriodicCallback(on_steps=log_steps, callback_fn=log_train_metrics),
      progress,
      # Every evaluation step is a checkpoint step (its metrics choose the best checkpoint).
      periodic_actions.PeriodicCallback(
          on_steps=_every(config.checkpoint_every_steps, last_step) | eval_steps,
          callback_fn=save_checkpoint),
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
          log_train_metrics(step, 0.0)  # Checks the steps are finite first.
          checkpoints.save(state)  # No evaluation: the time left is short.
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
