"""Throughput of jaxcap's jitted functions on synthetic inputs: no dataset, no TensorFlow
(`scripts/benchmark.py` is its command line; `run` is what it and the tests call).

Modes: `decoder` (a train step of the decoder alone on cached image embeddings, host batches
grouped by length and cut to `config.data.length_buckets`), `decoder_resident` (the same
steps, `config.resident.steps_per_call` per jitted call, data resident on the devices),
`encoder` (image embeddings), `train` (one end-to-end train step with images), `decode`
(captions from images with the configured decoding method), `pipeline` (the tf.data input of
the config's dataset alone: needs TensorFlow and the dataset), `cider` (the device CIDEr-D of
--batch_size candidates, 5 references each, beside pycocoevalcap's host scorer on the same
inputs when it is installed) and `scst` (self-critical steps on synthetic cached features,
`config.scst` settings, with the reward's share of the step) and `checkpoint` (the wall time
a checkpoint adds to a loop of train steps: saved as training saves, asynchronously, and saved
then waited for, against the same loop without saves). Synthetic captions follow
COCO's lengths (words ~ N(10.5, 2.5), clipped, plus BOS and EOS, padded to max_len). Timing waits
for the device and excludes compilation. FLOPs are the matrix products' and convolutions' of
the traced program (`jaxcap.flops`: loops per iteration, the same count on every backend), and
the peak is a large matrix product's, timed in the same run, times the devices that do not
share a CPU. Every result names the host's CPU model and vector ISA beside it.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools
import itertools
import os
import pathlib
import platform
import tempfile
import time
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxcap import checkpoint
from jaxcap import flops
from jaxcap import parallel
from jaxcap import predict
from jaxcap import rewards
from jaxcap import state as state_lib
from jaxcap import train_step as train_step_lib
from jaxcap.data.tokenizer import BOS_ID
from jaxcap.data.tokenizer import EOS_ID
from jaxcap.data.tokenizer import PAD_ID
from jaxcap.models import captioner
from jaxcap.trainers import features
from jaxcap.trainers import images
from jaxcap.trainers import resident
from jaxcap.trainers import scst

MODES = ('decoder', 'decoder_resident', 'encoder', 'train', 'decode', 'pipeline', 'cider', 'scst',
         'checkpoint')


@dataclasses.dataclass(frozen=True)
class Options:
  """What to time and how (the command line's flags, which take their defaults from here)."""
  mode: str = 'train'
  batch_size: int | None = None     # Global batch (None: config.batch_size).
  vocab_size: int = 10_000          # Of the synthetic model.
  max_len: int | None = None        # Caption length (None: config.data.max_len).
  steps: int = 10                   # Timed steps, rounded up to whole calls (and cycles).
  warmup: int = 2                   # Untimed calls first (compilation).
  num_batches: int = 32             # Decoder and scst modes: distinct synthetic batches.
  embedding_dim: int = 2048         # Decoder and scst modes: embedding or grid channels.
  grid: int = 8                     # Decoder and scst modes, updown: the grid's side.
  peak_matmul_size: int = 2048      # Side of the square matrix product timed for the peak.
  workdir: str | None = None        # Pipeline mode: tokenizer and COCO-like folder.
  coco_like: int = 0                # Pipeline mode: images of a COCO-like folder (0: none).
  checkpoint_every: int = 4         # Checkpoint mode: train steps between checkpoints.
  checkpoint_rounds: int = 2        # Checkpoint mode: interleaved rounds of the three loops.


# COCO captions: words per caption ~ N(mean, std), clipped to [_MIN_WORDS, max_len - 2].
_COCO_WORDS_MEAN, _COCO_WORDS_STD, _MIN_WORDS = 10.5, 2.5, 5
# Train steps of models with dropout (configs/coco.py) draw from it.
_DROPOUT_KEY = jax.random.key(0)


def synthetic_tokens(batch_size: int, max_len: int, vocab_size: int, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  tokens = rng.integers(4, vocab_size, (batch_size, max_len)).astype(np.int32)
  words = np.clip(np.round(rng.normal(_COCO_WORDS_MEAN, _COCO_WORDS_STD, batch_size)),
                  _MIN_WORDS, max_len - 2).astype(int)
  tokens[:, 0] = BOS_ID
  for row, n in zip(tokens, words):
    row[n + 1], row[n + 2:] = EOS_ID, PAD_ID
  return tokens


class Workload(NamedTuple):
  """What to time: `calls` are cycled, each runs `steps_per_call` steps of `batch_size`."""
  calls: list[Callable[[], Any]]
  steps_per_call: int
  flops_per_step: float
  # Non-padding target tokens per step (train and decoder modes).
  tokens_per_step: float | None = None


def time_calls(calls, steps: int, warmup: int) -> float:
  """Seconds per call, cycling through `calls` after each has run (compiled) and `warmup`
  more calls, waiting for the device each time. The timed calls are `steps` rounded up to
  whole cycles, so every call counts equally: the host batches of the decoder modes are
  sorted by length, and a part of a cycle would time only the shortest."""
  for call in calls:
    jax.block_until_ready(call())
  for i in range(warmup):
    jax.block_until_ready(calls[i % len(calls)]())
  steps = -(-steps // len(calls)) * len(calls)
  start = time.perf_counter()
  for i in range(steps):
    jax.block_until_ready(calls[i % len(calls)]())
  return (time.perf_counter() - start) / steps


def peak_tflops(dtype, size: int) -> float:
  """TFLOP/s of a size^3 matrix product in `dtype`: the machine's practical peak."""
  a = jax.random.normal(jax.random.key(0), (size, size), dtype)
  b = jax.random.normal(jax.random.key(1), (size, size), dtype)
  matmul = jax.jit(jnp.matmul)
  seconds = time_calls([lambda: matmul(a, b)], steps=5, warmup=2)
  return 2 * size**3 / seconds / 1e12


# The vector extensions that set a CPU's matrix-product peak, as /proc/cpuinfo names them.
_CPU_ISA_FLAGS = ('avx2', 'fma', 'avx512f', 'avx512_vnni', 'avx512_bf16', 'avx512_fp16',
                  'amx_tile', 'amx_bf16')


def host_cpu(cpuinfo: str | None = None) -> dict[str, Any]:
  """The host's CPU model and vector ISA: a CPU's time means nothing without them. From Linux's
  /proc/cpuinfo (its first processor), else what `platform` knows."""
  if cpuinfo is None:
    try:
      cpuinfo = pathlib.Path('/proc/cpuinfo').read_text()
    except OSError:
      return {'cpu': platform.processor() or platform.machine(), 'cpu_isa': []}
  fields = {}
  for line in cpuinfo.split('\n\n')[0].splitlines():
    name, _, value = line.partition(':')
    fields[name.strip()] = value.strip()
  flags_present = set(fields.get('flags', '').split())
  model = fields.get('model name', platform.machine())
  if 'cpu family' in fields:
    model += f" (family {fields['cpu family']} model {fields.get('model', '?')})"
  return {'cpu': model, 'cpu_isa': [f for f in _CPU_ISA_FLAGS if f in flags_present]}


def independent_devices() -> int:
  """How many devices' peaks add up: one product's peak per process on CPU, whose devices
  (`--xla_force_host_platform_device_count`) share that process's cores; every device elsewhere."""
  return jax.process_count() if jax.default_backend() == 'cpu' else jax.device_count()


def _stateful(step_fn, state):
  """A call that runs `step_fn(state, *args)` and keeps the new state (donated each time)."""
  holder = {'state': state}

  def call(*args):
    holder['state'], *outputs = step_fn(holder['state'], *args)
    return outputs
  return call


def trainer_calls(trainer) -> list[Callable[[], Any]]:
  """One call: a trainer's `steps_per_call` steps, its state kept (donated each time)."""
  return [functools.partial(_stateful(trainer.run, trainer.state), trainer.steps_per_call)]


def features_shape(config, options: Options) -> tuple[int, ...]:
  """One synthetic image's features: an embedding, or a grid for a decoder that attends."""
  if captioner.DECODERS[config.model.decoder]:
    return (options.grid, options.grid, options.embedding_dim)
  return (options.embedding_dim,)


def decoder_workload(config, mesh, options: Options, resident_steps: bool) -> Workload:
  """Decoder steps on synthetic embeddings and COCO-like captions grouped by length: host
  batches, or the 'features' trainer's steps on the same data resident on the devices."""
  batch_size, vocab_size = config.batch_size, options.vocab_size
  buckets = features.check_length_buckets(config.data.length_buckets, config.data.max_len)
  num_batches = max(options.steps, options.num_batches)
  tokens = synthetic_tokens(batch_size * num_batches, config.data.max_len, vocab_size)
  shape = features_shape(config, options)
  embedding = np.random.default_rng(1).normal(size=(len(tokens), *shape)).astype(np.float32)
  model = captioner.create_model(config.model, vocab_size)
  state = state_lib.initial_decoder_state(config, model, mesh, shape)
  decoder_step = functools.partial(train_step_lib.decoder_train_step, dropout_key=_DROPOUT_KEY)
  # Host batches as a length-grouping input pipeline makes them.
  grouped = np.argsort(features.bucket_index(tokens, buckets), kind='stable').reshape(
      num_batches, batch_size)
  batches = [parallel.shard_batch(features.trim_to_bucket(
      {'embedding': embedding[rows], 'tokens': tokens[rows]}, buckets), mesh) for rows in grouped]
  # One count per batch shape (bucket length), weighted by how many batches have it.
  batch_of_length = {batch['tokens'].shape[1]: batch for batch in batches}
  flops_of_length = {length: flops.count_flops(decoder_step, state, batch)
                     for length, batch in batch_of_length.items()}
  step_flops = np.mean([flops_of_length[batch['tokens'].shape[1]] for batch in batches])
  tokens_per_step = float((tokens[:, 1:] != PAD_ID).sum()) / num_batches
  if not resident_steps:
    run = _stateful(parallel.jit_data_parallel(decoder_step, mesh, donate_state=True), state)
    return Workload([functools.partial(run, batch) for batch in batches], 1, step_flops,
                    tokens_per_step)
  trainer = features.make(state, embedding, tokens, np.arange(len(tokens)), config, mesh)
  return Workload(trainer_calls(trainer), trainer.steps_per_call, step_flops, tokens_per_step)


def synthetic_image_batch(config, mesh, tokens: np.ndarray) -> dict[str, jax.Array]:
  """Uniform random images in [-1, 1] with `tokens`' captions, sharded over the mesh."""
  size = config.data.image_size
  image = np.random.default_rng(1).uniform(-1, 1, (len(tokens), size, size, 3))
  return parallel.shard_batch({'image': image.astype(np.float32), 'tokens': tokens}, mesh)


def image_workload(config, mesh, options: Options) -> Workload:
  """Encoder, end-to-end train step or decoding on synthetic images."""
  batch_size, vocab_size, mode = config.batch_size, options.vocab_size, options.mode
  model = captioner.create_model(config.model, vocab_size)
  tokens = synthetic_tokens(batch_size, config.data.max_len, vocab_size)
  state = state_lib.initial_state(config, model, mesh)
  batch = synthetic_image_batch(config, mesh, tokens)
  if mode == 'train':
    train_step = functools.partial(train_step_lib.train_step, dropout_key=_DROPOUT_KEY)
    step_flops = flops.count_flops(train_step, state, batch)
    trainer = images.make(state, itertools.repeat(batch), config, mesh)
    return Workload(trainer_calls(trainer), 1, step_flops,
                    float((tokens[:, 1:] != PAD_ID).sum()))
  if mode == 'encoder':
    fn = parallel.jit_data_parallel(
        lambda s, images: s.apply_fn(s.variables, images, method='encode'), mesh)
  else:
    captions = predict.caption_fn(config)
    fn = parallel.jit_data_parallel(lambda s, images: captions(s.apply_fn, s.variables, images),
                                    mesh)
  return Workload([functools.partial(fn, state, batch['image'])], 1,
                  flops.count_flops(fn, state, batch['image']))


_REFERENCES_PER_IMAGE = 5


def _synthetic_references(num_images: int, max_len: int, vocab_size: int) -> np.ndarray:
  """(images, 5, max_len - 1) COCO-like references: ids after BOS, EOS included."""
  tokens = synthetic_tokens(num_images * _REFERENCES_PER_IMAGE, max_len, vocab_size, seed=2)
  return tokens[:, 1:].reshape(num_images, _REFERENCES_PER_IMAGE, max_len - 1)


def cider_workload(config, options: Options) -> tuple[Workload, dict[str, float]]:
  """CIDEr-D of a batch of candidates, one per image, against 5 references each. Candidates
  are a reference with a third of its words replaced, so n-grams of every order match."""
  batch_size, vocab_size = config.batch_size, options.vocab_size
  references = _synthetic_references(batch_size, config.data.max_len, vocab_size)
  rng = np.random.default_rng(3)
  candidates = references[np.arange(batch_size),
                          rng.integers(0, _REFERENCES_PER_IMAGE, batch_size)].copy()
  replace = (rng.random(candidates.shape) < 1 / 3) & (candidates > EOS_ID)
  candidates[replace] = rng.integers(4, vocab_size, replace.sum())
  scorer = rewards.CiderD.from_padded(references, np.full(batch_size, _REFERENCES_PER_IMAGE),
                                      vocab_size)
  gathered = jax.device_put(rewards.gather_references(scorer.references, np.arange(batch_size)))
  tables, device_candidates = jax.device_put(scorer.tables), jax.device_put(candidates)
  score = jax.jit(rewards.scores)
  workload = Workload([functools.partial(score, tables, gathered, device_candidates)], 1,
                      0.0)  # No matrix products: no MFU (run).
  extra = {'references_per_image': _REFERENCES_PER_IMAGE}
  try:
    from pycocoevalcap.cider import cider_scorer
  except ImportError:
    return workload, extra
  words = lambda ids: ' '.join(str(i) for i in ids if i != PAD_ID)
  host = cider_scorer.CiderScorer(n=rewards.MAX_N, sigma=rewards.SIGMA)
  for candidate, refs in zip(candidates, references):
    host += (words(candidate), [words(r) for r in refs])
  host.compute_doc_freq()  # Once, as the device scorer's tables: the loop alone is timed.
  start = time.perf_counter()
  host_scores = np.asarray(host.compute_cider())
  extra['host_scores_per_sec'] = batch_size / (time.perf_counter() - start)
  device_scores = np.asarray(score(tables, gathered, device_candidates))
  extra['max_abs_difference_to_host'] = float(np.max(np.abs(device_scores - host_scores)))
  return workload, extra


def scst_workload(config, mesh, options: Options) -> tuple[Workload, dict[str, float]]:
  """Self-critical steps (config.scst) on synthetic cached embeddings and references, K per
  call; also times the step's two reward computations alone, on inputs of the same shapes."""
  batch_size, vocab_size = config.batch_size, options.vocab_size
  num_images = batch_size * max(options.num_batches, 1)
  references = _synthetic_references(num_images, config.data.max_len, vocab_size)
  scorer = rewards.CiderD.from_padded(references, np.full(num_images, _REFERENCES_PER_IMAGE),
                                      vocab_size)
  shape = features_shape(config, options)
  embedding = np.random.default_rng(1).normal(size=(num_images, *shape)).astype(np.float32)
  model = captioner.create_model(config.model, vocab_size)
  state = state_lib.initial_decoder_state(config, model, mesh, shape)
  data = scst.place(embedding, scorer.references, mesh, captioner.DTYPES[config.model.dtype])
  tables = jax.device_put(scorer.tables, parallel.replicated(mesh))
  # FLOPs of one step, on the data the trainer trains on.
  one_step = resident.jit_steps(scst.config_step(config, batch_size // mesh.size))(1)
  step_flops = flops.count_flops(one_step, state, data, tables, resident.seed_key(config, mesh))
  trainer = scst.make(state, data, tables, config, mesh)

  # The reward alone: samples (B * S) and greedy captions (B) of the step's lengths.
  samples = batch_size * config.scst.num_samples
  candidates = _synthetic_references(samples + batch_size, config.scst.max_len, vocab_size)[:, 0]
  image_index = np.random.default_rng(4).integers(0, num_images, samples + batch_size)
  gathered = jax.device_put(rewards.gather_references(scorer.references, image_index),
                            parallel.data_sharding(mesh))
  candidates = jax.device_put(candidates, parallel.data_sharding(mesh))
  score = jax.jit(rewards.scores)
  reward_seconds = time_calls([functools.partial(score, tables, gathered, candidates)],
                              max(options.steps, 3), options.warmup)
  return (Workload(trainer_calls(trainer), trainer.steps_per_call, step_flops),
          {'reward_seconds_per_step': reward_seconds, 'num_samples': config.scst.num_samples,
           'baseline': config.scst.baseline, 'steps_per_call': trainer.steps_per_call})


def checkpoint_stall(config, mesh, options: Options) -> dict[str, Any]:
  """Seconds a checkpoint adds to a loop of `options.steps` train steps (at least one
  checkpoint's worth) that saves every `options.checkpoint_every` steps, with the loop's
  finite-loss check (a device sync) at each save point in every variant; the variants are
  interleaved, `options.checkpoint_rounds` times, and the faster of each is kept."""
  batch_size, vocab_size = config.batch_size, options.vocab_size
  model = captioner.create_model(config.model, vocab_size)
  batch = synthetic_image_batch(
      config, mesh, synthetic_tokens(batch_size, config.data.max_len, vocab_size))
  trainer = images.make(state_lib.initial_state(config, model, mesh), itertools.repeat(batch),
                        config, mesh)
  holder = {'state': trainer.state}
  jax.block_until_ready(trainer.run(holder['state'], 1))  # Compiled (the state was donated).
  holder['state'] = state_lib.initial_state(config, model, mesh)
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(holder['state']))
  every = options.checkpoint_every
  steps = max(options.steps, every)  # At least one checkpoint.

  def loop(saving: str) -> tuple[float, float]:
    """(seconds of the loop, seconds of the last write's wait after it)."""
    with tempfile.TemporaryDirectory(prefix='jaxcap_checkpoint_') as workdir:
      checkpoints = checkpoint.Checkpoints(workdir, keep=2)
      start = time.perf_counter()
      for i in range(1, steps + 1):
        holder['state'], metrics = trainer.run(holder['state'], 1)
        if i % every == 0:
          jax.device_get(metrics['finite'])
          if saving != 'none':
            checkpoints.save(holder['state'])
          if saving == 'sync':
            checkpoints.wait()
      jax.block_until_ready(holder['state'])
      seconds = time.perf_counter() - start
      checkpoints.close()
      return seconds, time.perf_counter() - start - seconds

  runs: dict[str, list[tuple[float, float]]] = {'none': [], 'sync': [], 'async': []}
  for _ in range(max(options.checkpoint_rounds, 1)):
    for saving in runs:
      runs[saving].append(loop(saving))
  best = {saving: min(times) for saving, times in runs.items()}
  saves = steps // every
  return {
      'state_bytes': state_bytes,
      'steps': steps,
      'checkpoints': saves,
      'checkpoint_every': every,
      'loop_seconds': {
          saving: seconds for saving, (seconds, _) in best.items()
      },
      'seconds_per_checkpoint_sync': (best['sync'][0] - best['none'][0]) / saves,
      'seconds_per_checkpoint_async': (best['async'][0] - best['none'][0]) / saves,
      'final_wait_seconds_async': best['async'][1]
  }


def pipeline_workload(config, options: Options) -> tuple[Workload, dict[str, Any]]:
  """The training input pipeline alone (TensorFlow is imported here only): the dataset is
  built or found as training would, the tokenizer kept in `options.workdir`."""
  from jaxcap.data import prepare
  workdir = options.workdir or tempfile.mkdtemp(prefix='jaxcap_benchmark_')
  extra = {'cpu_cores': len(os.sched_getaffinity(0)), 'image_size': config.data.image_size,
           'augment': config.data.augment, 'cache_images': config.data.cache_images}
  if options.coco_like:
    from jaxcap.data import coco_like
    folder = os.path.join(workdir, 'coco_like')
    extra.update(coco_like.write_coco_like_folder(folder, options.coco_like))
    config.data.name, config.data.coco_dir = 'coco_captions', folder
    config.data.data_dir = os.path.join(workdir, 'tfds')
  batches = prepare.train_batches(prepare.prepare(config, workdir), config, config.batch_size)
  return Workload([lambda: next(batches)], 1, 0.0), extra


def run(config: ml_collections.ConfigDict, options: Options) -> dict[str, Any]:
  """Times `options.mode` on synthetic inputs for `config` (changed in place: batch size, caption
  length); the results, as `scripts/benchmark.py` prints them."""
  if options.max_len:
    config.data.max_len = options.max_len
  batch_size = config.batch_size = options.batch_size or config.batch_size
  mode = options.mode
  extra: dict[str, Any] = {}
  if mode == 'checkpoint':
    mesh = parallel.make_mesh()
    results = {'mode': mode, 'batch_size': batch_size, 'image_size': config.data.image_size,
               'encoder': config.model.encoder, 'train_encoder': config.model.train_encoder,
               'device_kind': jax.devices()[0].device_kind, **host_cpu(),
               **checkpoint_stall(config, mesh, options)}
    return results
  if mode == 'pipeline':
    workload, extra = pipeline_workload(config, options)
  elif mode == 'cider':
    workload, extra = cider_workload(config, options)
  else:
    mesh = parallel.make_mesh()
    parallel.check_batch_size(batch_size, mesh, 'batch_size (--batch_size)')
    if mode in ('decoder', 'decoder_resident'):
      workload = decoder_workload(config, mesh, options, mode == 'decoder_resident')
    elif mode == 'scst':
      workload, extra = scst_workload(config, mesh, options)
    else:
      workload = image_workload(config, mesh, options)
  calls = -(-options.steps // workload.steps_per_call)
  warmup = -(-options.warmup // workload.steps_per_call)
  seconds = time_calls(workload.calls, calls, warmup) / workload.steps_per_call
  results = {'mode': mode, 'steps_per_sec': 1 / seconds, 'examples_per_sec': batch_size / seconds,
             'batch_size': batch_size, 'max_len': config.data.max_len, 'dtype': config.model.dtype,
             'device_kind': jax.devices()[0].device_kind, 'device_count': jax.device_count(),
             'jax_version': jax.__version__, **host_cpu()}
  if mode not in ('pipeline', 'cider'):  # The device CIDEr-D has no matrix products.
    peak_dtype = jnp.bfloat16 if config.model.dtype == 'bfloat16' else jnp.float32
    peak_devices = independent_devices()
    peak = peak_tflops(peak_dtype, options.peak_matmul_size) * peak_devices
    achieved = workload.flops_per_step / seconds / 1e12
    results.update({
        'flops_per_step': workload.flops_per_step, 'achieved_tflops': achieved, 'peak_tflops': peak,
        'mfu': achieved / peak if peak else 0.0, 'peak_devices': peak_devices,
        'vocab_size': options.vocab_size,
        'image_size': config.data.image_size, 'encoder': config.model.encoder,
        'decoder': config.model.decoder, 'decode': config.decode.to_dict()})
  if mode in ('decoder', 'decoder_resident'):
    results.update({
        'length_buckets': list(config.data.length_buckets),
        'steps_per_call': workload.steps_per_call,
        'features_shape': list(features_shape(config, options)),
    })
  if workload.tokens_per_step is not None:
    results['tokens_per_sec'] = workload.tokens_per_step / seconds
  results.update(extra)
  if mode == 'cider':
    results['scores_per_sec'] = results['examples_per_sec']
    if 'host_scores_per_sec' in extra:
      results['speedup_over_host'] = results['scores_per_sec'] / extra['host_scores_per_sec']
  if mode == 'pipeline':
    results['images_per_sec_per_core'] = results['examples_per_sec'] / extra['cpu_cores']
  if mode == 'scst':
    results['captions_per_sec'] = results['examples_per_sec'] * config.scst.num_samples
    results['reward_share'] = extra['reward_seconds_per_step'] * results['steps_per_sec']
  return results
