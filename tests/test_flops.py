"""jaxcap.flops against independent counts: InceptionV3's published multiply-adds, and the
decoders' train steps counted by hand from their equations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from jaxcap import flops
from jaxcap import parallel
from jaxcap import state as state_lib
from jaxcap import train_step
from jaxcap.models import captioner
from jaxcap.models import inception_v3


def test_inception_v3_embedding_is_5_7_gmacs_per_299px_image():
  """Szegedy et al. (2016) and Keras' application table: 5.7 G multiply-adds per image."""
  model = inception_v3.InceptionV3()
  images = jax.ShapeDtypeStruct((2, 299, 299, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  count = flops.count_flops(model.apply, variables, images)
  assert count == pytest.approx(2 * 2 * 5.7e9, rel=0.05)


def _decoder_step_flops(decoder: str, batch: int, length: int, features_shape, **model_fields):
  config = default.get_config()
  config.model.decoder = decoder
  config.model.update(model_fields)
  vocab = 1000
  model = captioner.create_model(config.model, vocab)
  state = jax.eval_shape(lambda key: state_lib.create_decoder_state(
      config, model, key, features_shape), jax.random.key(0))
  step_batch = {'embedding': jax.ShapeDtypeStruct((batch, *features_shape), jnp.float32),
                'tokens': jax.ShapeDtypeStruct((batch, length + 1), jnp.int32)}
  return flops.count_flops(train_step.decoder_train_step, state, step_batch), config.model, vocab


def test_show_tell_train_step_equals_the_count_by_hand():
  """Forward multiply-adds of each matrix product; a train step adds the gradients of its input
  and its kernel (2 more), except where the input is data (the image embedding): 1 more."""
  b, t, d = 8, 12, 64
  count, m, v = _decoder_step_flops('show_tell', b, t, (d,), embed_dim=32, lstm_size=48,
                                    image_bottleneck=24, logit_bottleneck=20)
  e, h, i, lb = m.embed_dim, m.lstm_size, m.image_bottleneck, m.logit_bottleneck
  per_token = e * 4 * h + h * 4 * h + h * lb + lb * v
  on_data = b * d * i  # Embedding -> bottleneck.
  forward = on_data + b * i * h + b * t * per_token
  assert count == 2 * (3 * forward - on_data)


def test_updown_train_step_equals_the_count_by_hand():
  """Anderson et al.'s Up-Down per token: both LSTMs, the attention's query, scores and
  context; per caption: the grid's projection, the mean's gates and the initial states."""
  b, t, (rows, cols, c) = 4, 10, (3, 5, 40)
  count, m, v = _decoder_step_flops('updown', b, t, (rows, cols, c), embed_dim=24,
                                    lstm_size=32, attention_size=16)
  e, h, a, n = m.embed_dim, m.lstm_size, m.attention_size, rows * cols
  # Products of a learned input (3x: forward, input and kernel gradients).
  per_token = (e * 4 * h + 2 * h * 4 * h  # Attention LSTM: word, [h_lang, h_att].
               + h * a + n * a  # Query; the score of each position.
               + c * 4 * h + 2 * h * 4 * h  # Language LSTM: context, [h_att, h_lang].
               + h * v)  # Logits.
  # Products of the data (the grid and its mean) with a kernel: forward and kernel gradient.
  on_data = b * (n * c * a + c * 4 * h + 2 * c * h)
  # The context, weights x grid: forward and the weights' gradient.
  context = b * t * n * c
  assert count == 2 * (3 * b * t * per_token + 2 * on_data + 2 * context)


def test_loops_count_each_iteration_and_a_while_loop_raises():
  x = jnp.ones((4, 8))
  w = jnp.ones((8, 8))

  def scanned(x, w):
    return jax.lax.scan(lambda carry, _: (carry @ w, None), x, length=5)[0]

  assert flops.count_flops(scanned, x, w) == 5 * 2 * 4 * 8 * 8
  # Forward, and per step the kernel's and the carry's gradients (the scan's transpose computes
  # the first step's too, though x is data).
  assert flops.count_flops(jax.jit(jax.grad(lambda w: scanned(x, w).sum())), w) == 3 * 5 * (
      2 * 4 * 8 * 8)
  cond = lambda x, w: jax.lax.cond(x.sum() > 0, lambda: x @ w @ w, lambda: x @ w)
  assert flops.count_flops(cond, x, w) == 2 * 2 * 4 * 8 * 8
  with pytest.raises(ValueError, match='while_loop'):
    flops.count_flops(lambda x: jax.lax.while_loop(lambda c: c.sum() < 9, lambda c: c @ w, x), x)


def test_convolution_counts_its_definition():
  """A grouped, strided convolution: each output element sums (in-features / groups) x window."""
  images, kernel = np.ones((2, 9, 11, 6), np.float32), np.ones((3, 3, 3, 4), np.float32)
  conv = lambda x, k: jax.lax.conv_general_dilated(
      x, k, (2, 2), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=2)
  out = jax.eval_shape(conv, images, kernel).shape
  assert out == (2, 5, 6, 4)
  assert flops.count_flops(conv, images, kernel) == 2 * np.prod(out) * (6 // 2) * 3 * 3


def test_a_jitted_function_with_compiler_options_is_counted():
  """As the trainers jit their steps (`parallel.jit_data_parallel`: CPU compiler options)."""
  mesh = parallel.make_mesh()
  product = parallel.jit_data_parallel(lambda w, x: x @ w, mesh)
  x, w = jnp.ones((mesh.size * 2, 8)), jnp.ones((8, 4))
  assert flops.count_flops(product, w, x) == 2 * mesh.size * 2 * 8 * 4
