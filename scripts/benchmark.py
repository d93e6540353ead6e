"""Throughput of jaxcap's jitted functions on synthetic inputs: no dataset, no TensorFlow.

  python scripts/benchmark.py --config configs/demo.py --mode train
  python scripts/benchmark.py --config configs/coco.py --mode encoder --batch_size 32 \
      --config.model.dtype=bfloat16 --config.model.encoder_weights=None

Modes: `decoder` (a train step of the decoder alone on cached image embeddings), `encoder`
(image embeddings), `train` (one end-to-end train step with images),
`decode` (captions from images with the configured decoding method). Synthetic captions follow
COCO's lengths (words ~ N(10.5, 2.5), clipped, plus BOS and EOS, padded to max_len). Timing waits
for the device and excludes compilation; FLOPs come from XLA's cost analysis of the compiled
function, and the peak from a large matrix product timed in the same run.
"""

import json
import pathlib
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from jaxcap import decode  # pylint: disable=g-import-not-at-top
from jaxcap import parallel  # pylint: disable=g-import-not-at-top
from jaxcap import train_step as train_step_lib  # pylint: disable=g-import-not-at-top
from jaxcap.data.tokenizer import BOS_ID, EOS_ID, PAD_ID  # pylint: disable=g-import-not-at-top
from jaxcap.models import captioner  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Configuration file.', lock_config=True)
flags.mark_flag_as_required('config')
flags.DEFINE_enum('mode', 'train', ['decoder', 'encoder', 'train', 'decode'], 'What to time.')
flags.DEFINE_integer('embedding_dim', 2048, 'Image embedding size of the decoder mode (InceptionV3: 2048).')
flags.DEFINE_integer('batch_size', None, 'Global batch (default: config.batch_size).')
flags.DEFINE_integer('vocab_size', 10_000, 'Vocabulary size of the synthetic model.')
flags.DEFINE_integer('max_len', None, 'Caption length (default: config.data.max_len).')
flags.DEFINE_integer('steps', 10, 'Timed calls.')
flags.DEFINE_integer('warmup', 2, 'Untimed calls first (compilation).')
flags.DEFINE_integer('peak_matmul_size', 2048, 'Side of the square matrix product timed for the peak.')
flags.DEFINE_string('json', None, 'Also write the results to this JSON file.')

# COCO captions: words per caption ~ N(mean, std), clipped to [_MIN_WORDS, max_len - 2].
_COCO_WORDS_MEAN, _COCO_WORDS_STD, _MIN_WORDS = 10.5, 2.5, 5


def synthetic_tokens(batch_size: int, max_len: int, vocab_size: int, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  tokens = rng.integers(4, vocab_size, (batch_size, max_len)).astype(np.int32)
  words = np.clip(np.round(rng.normal(_COCO_WORDS_MEAN, _COCO_WORDS_STD, batch_size)),
                  _MIN_WORDS, max_len - 2).astype(int)
  tokens[:, 0] = BOS_ID
  for row, n in zip(tokens, words):
    row[n + 1], row[n + 2:] = EOS_ID, PAD_ID
  return tokens


def time_calls(fn, args, steps: int, warmup: int) -> float:
  """Seconds per call, after `warmup` calls, waiting for the device each time."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(steps):
    jax.block_until_ready(fn(*args))
  return (time.perf_counter() - start) / steps


def flops_of(fn, args) -> float:
  """FLOPs of one call from XLA's cost analysis of the lowered (device-independent) program;
  after compilation for a GPU, convolutions become library calls the analysis does not count."""
  analysis = fn.lower(*args).cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get('flops', 0.0))


def peak_tflops(dtype, size: int) -> float:
  """TFLOP/s of a size^3 matrix product in `dtype`: the machine's practical peak."""
  a = jax.random.normal(jax.random.key(0), (size, size), dtype)
  b = jax.random.normal(jax.random.key(1), (size, size), dtype)
  matmul = jax.jit(jnp.matmul)
  seconds = time_calls(matmul, (a, b), steps=5, warmup=2)
  return 2 * size**3 / seconds / 1e12


def build(config, mode: str, batch_size: int, vocab_size: int):
  """The jitted function of `mode` and its synthetic arguments, sharded over all devices."""
  mesh = parallel.make_mesh()
  parallel.check_batch_size(batch_size, mesh, 'batch_size (--batch_size)')
  model = captioner.create_model(config.model, vocab_size)
  tokens = synthetic_tokens(batch_size, config.data.max_len, vocab_size)
  if mode == 'decoder':
    state = jax.jit(lambda key: train_step_lib.create_decoder_state(
        config, model, key, FLAGS.embedding_dim), out_shardings=parallel.replicated(mesh))(jax.random.key(0))
    batch = parallel.shard_batch({
        'embedding': np.random.default_rng(1).normal(size=(batch_size, FLAGS.embedding_dim)).astype(np.float32),
        'tokens': tokens}, mesh)
    return jax.jit(train_step_lib.decoder_train_step), (state, batch)
  state = jax.jit(lambda key: train_step_lib.create_train_state(config, model, key),
                  out_shardings=parallel.replicated(mesh))(jax.random.key(0))
  size = config.data.image_size
  batch = parallel.shard_batch({
      'image': np.random.default_rng(1).uniform(-1, 1, (batch_size, size, size, 3)).astype(np.float32),
      'tokens': tokens}, mesh)
  if mode == 'encoder':
    return jax.jit(lambda s, images: s.apply_fn(s.variables, images, method='encode')), (state, batch['image'])
  if mode == 'train':
    return jax.jit(train_step_lib.train_step), (state, batch)  # Not donated: reused each call.
  return jax.jit(lambda s, images: decode.decode(
      s.apply_fn, s.variables, images, config.data.max_len, config.decode,
      jax.random.key(0))), (state, batch['image'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = FLAGS.config
  if FLAGS.max_len:
    config.data.max_len = FLAGS.max_len
  batch_size = FLAGS.batch_size or config.batch_size
  size = config.data.image_size
  fn, args = build(config, FLAGS.mode, batch_size, FLAGS.vocab_size)
  batch_tokens = synthetic_tokens(batch_size, config.data.max_len, FLAGS.vocab_size)
  flops = flops_of(fn, args)
  seconds = time_calls(fn, args, FLAGS.steps, FLAGS.warmup)
  peak_dtype = jnp.bfloat16 if config.model.dtype == 'bfloat16' else jnp.float32
  peak = peak_tflops(peak_dtype, FLAGS.peak_matmul_size) * jax.device_count()
  achieved = flops / seconds / 1e12
  results = {
      'mode': FLAGS.mode, 'steps_per_sec': 1 / seconds, 'examples_per_sec': batch_size / seconds,
      'flops_per_step': flops, 'achieved_tflops': achieved, 'peak_tflops': peak,
      'mfu': achieved / peak if peak else 0.0,
      'batch_size': batch_size, 'vocab_size': FLAGS.vocab_size, 'max_len': config.data.max_len,
      'image_size': size, 'encoder': config.model.encoder, 'dtype': config.model.dtype,
      'decode': config.decode.to_dict(), 'device_kind': jax.devices()[0].device_kind,
      'device_count': jax.device_count(), 'jax_version': jax.__version__}
  if FLAGS.mode in ('train', 'decoder'):
    results['tokens_per_sec'] = float((batch_tokens[:, 1:] != PAD_ID).sum()) / seconds
  print(json.dumps(results, indent=1))
  if FLAGS.json:
    with open(FLAGS.json, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  app.run(main)
