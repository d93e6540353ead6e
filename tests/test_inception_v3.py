"""InceptionV3 parity with Keras: random Keras weights saved in both file formats, converted.

Keras (TensorFlow) is used here only as the reference; jaxcap's model code does not import it.
"""

import functools
import json
import os
import pathlib
import subprocess
import sys

import h5py
import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

from jaxcap import parallel
from jaxcap.models import inception_v3

# As jaxcap's own programs compile it (on CPU: XLA's convolutions, not YNNPACK's).
_jit = functools.partial(jax.jit, compiler_options=parallel.compiler_options())

pytestmark = pytest.mark.slow


def _rel_error(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return np.linalg.norm(actual - expected) / np.linalg.norm(expected)


@pytest.fixture(scope='module')
def keras_model():
  """Keras' InceptionV3 with the top, random weights and non-trivial batch-norm statistics."""
  keras.utils.set_random_seed(0)
  model = keras.applications.InceptionV3(weights=None, include_top=True)
  rng = np.random.default_rng(0)
  for layer in model.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      beta, mean, var = layer.get_weights()
      layer.set_weights([rng.normal(0, 0.1, beta.shape), rng.normal(0, 0.2, mean.shape),
                         rng.uniform(0.5, 1.5, var.shape)])
  return model


def keras_notop_model(keras_model):
  """The same weights without the top, for images of any size."""
  notop = keras.applications.InceptionV3(
      weights=None, include_top=False, input_shape=(None, None, 3))
  notop.set_weights(keras_model.get_weights()[:-2])  # All but the predictions kernel and bias.
  return notop


@pytest.fixture(scope='module')
def weight_files(keras_model, tmp_path_factory):
  """The weights without the top as a Keras 3 .weights.h5 and a Keras 2 style legacy HDF5
  file (the ImageNet _notop layout), and with the top as a legacy file."""
  from keras.src.legacy.saving import legacy_h5_format
  notop = keras_notop_model(keras_model)
  directory = tmp_path_factory.mktemp('weights')
  files = {'keras3': str(directory / 'inception_notop.weights.h5'),
           'legacy': str(directory / 'inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5'),
           'legacy_top': str(directory / 'inception_v3_weights_tf_dim_ordering_tf_kernels.h5')}
  notop.save_weights(files['keras3'])
  for name, model in (('legacy', notop), ('legacy_top', keras_model)):
    with h5py.File(files[name], 'w') as f:
      legacy_h5_format.save_weights_to_hdf5_group(f, model)
  return files


def _keras_outputs(model, images):
  names = [f'mixed{i}' for i in range(11)]
  probe = keras.Model(model.inputs, [model.get_layer(n).output for n in names])
  outputs = {n: np.asarray(o) for n, o in zip(names, probe(images, training=False))}
  outputs['embedding'] = outputs['mixed10'].mean(axis=(1, 2))  # Keras' pooling='avg'.
  return outputs


def test_both_file_formats_load_the_same_weights(weight_files):
  keras3 = inception_v3.load_keras_weights(weight_files['keras3'], include_top=False)
  legacy = inception_v3.load_keras_weights(weight_files['legacy'], include_top=False)
  assert len(jax.tree.leaves(keras3)) == 2 * 94 + 2 * 94  # Kernel, beta, mean, var... of 94 layers.
  jax.tree.map(np.testing.assert_array_equal, keras3, legacy)


@pytest.mark.parametrize('fmt,shape', [('keras3', (299, 299)), ('legacy', (150, 200))])
def test_notop_matches_keras_block_by_block(keras_model, weight_files, fmt, shape):
  """Every mixed block and the pooled embedding, at the pretrained size and at another (both
  formats load the same arrays: the test above)."""
  variables = inception_v3.load_keras_weights(weight_files[fmt], include_top=False)
  model = inception_v3.InceptionV3()
  apply = _jit(lambda v, x: model.apply(v, x, mutable=['intermediates']))
  images = np.random.default_rng(1).uniform(-1, 1, (2, *shape, 3)).astype(np.float32)
  expected = _keras_outputs(keras_notop_model(keras_model), images)
  embedding, state = apply(variables, images)
  assert embedding.shape == (2, 2048) and embedding.dtype == jnp.float32
  errors = {'embedding': _rel_error(embedding, expected['embedding'])}
  for block in range(11):
    actual, = state['intermediates'][f'mixed{block}']
    errors[f'mixed{block}'] = _rel_error(actual, expected[f'mixed{block}'])
  print(f'{fmt} {shape}: largest relative error {max(errors.values()):.1e} '
        f'(embedding {errors["embedding"]:.1e})')
  assert all(error <= 1e-4 for error in errors.values()), errors


def test_top_logits_match_keras(keras_model, weight_files):
  variables = inception_v3.load_keras_weights(weight_files['legacy_top'], include_top=True)
  model = inception_v3.InceptionV3(include_top=True)
  images = np.random.default_rng(2).uniform(-1, 1, (2, 299, 299, 3)).astype(np.float32)
  logits = _jit(model.apply)(variables, images)
  probe = keras.Model(keras_model.inputs, keras_model.get_layer('predictions').output)
  probe.get_layer('predictions').activation = keras.activations.linear  # Logits, not softmax.
  expected = np.asarray(probe(images, training=False))
  assert logits.shape == (2, 1000)
  print(f'top logits: relative error {_rel_error(logits, expected):.1e}')
  assert _rel_error(logits, expected) <= 1e-4
  np.testing.assert_array_equal(np.argmax(logits, -1), np.argmax(expected, -1))


def test_keras2_layer_names_and_order(weight_files, tmp_path):
  """Keras 2 numbered layers from 1 (conv2d_1 ...); the same weights must load identically."""
  def text(value):
    return value.decode() if isinstance(value, bytes) else str(value)

  renamed = str(tmp_path / 'keras2_names.h5')
  with h5py.File(weight_files['legacy_top'], 'r') as src, h5py.File(renamed, 'w') as dst:
    def keras2(name):
      base, _, number = name.rpartition('_')
      return f'{base}_{int(number) + 1}' if number.isdigit() else f'{name}_1'
    names = []
    for name in src.attrs['layer_names']:
      name = text(name)
      new = keras2(name) if name.startswith(('conv2d', 'batch_normalization')) else name
      names.append(new.encode())
      group = dst.create_group(new)
      weight_names = []
      for weight in map(text, src[name].attrs['weight_names']):
        new_weight = weight.replace(name + '/', new + '/', 1)
        group[new_weight] = np.asarray(src[name][weight])
        weight_names.append(new_weight.encode())
      group.attrs['weight_names'] = weight_names
    dst.attrs['layer_names'] = names
  a = inception_v3.load_keras_weights(weight_files['legacy_top'], include_top=True)
  b = inception_v3.load_keras_weights(renamed, include_top=True)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_bfloat16_compute_stays_close(weight_files):
  variables = inception_v3.load_keras_weights(weight_files['keras3'])
  images = np.random.default_rng(3).uniform(-1, 1, (2, 299, 299, 3)).astype(np.float32)
  reference = _jit(inception_v3.InceptionV3().apply)(variables, images)
  bf16 = _jit(inception_v3.InceptionV3(dtype=jnp.bfloat16).apply)(variables, images)
  error = _rel_error(bf16, reference)
  print(f"bfloat16 compute vs float32: relative error {error:.2e}")
  assert bf16.dtype == jnp.float32 and error < 5e-2


def test_bad_files_give_clear_errors(weight_files, tmp_path):
  truncated = tmp_path / 'truncated.h5'
  truncated.write_bytes(open(weight_files['legacy'], 'rb').read()[:100_000])
  with pytest.raises(inception_v3.WeightsError, match='truncated.h5: cannot read'):
    inception_v3.load_keras_weights(str(truncated))
  garbage = tmp_path / 'garbage.h5'
  garbage.write_bytes(b'not an hdf5 file' * 100)
  with pytest.raises(inception_v3.WeightsError, match='garbage.h5'):
    inception_v3.load_keras_weights(str(garbage))
  with pytest.raises(inception_v3.WeightsError, match='has a top Dense layer'):
    inception_v3.load_keras_weights(weight_files['legacy_top'], include_top=False)
  with pytest.raises(inception_v3.WeightsError, match='no top Dense layer'):
    inception_v3.load_keras_weights(weight_files['legacy'], include_top=True)
  other = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3),
                            keras.layers.BatchNormalization(), keras.layers.Dense(2)])
  other_path = str(tmp_path / 'other.weights.h5')
  other.save_weights(other_path)
  with pytest.raises(
      inception_v3.WeightsError,
      match="layer '.*' with weights of shapes .* is not part of InceptionV3"):
    inception_v3.load_keras_weights(other_path)


def test_missing_and_misshaped_layers_are_named(weight_files, tmp_path):
  path = str(tmp_path / 'edited.h5')
  with h5py.File(weight_files['legacy'], 'r') as src, h5py.File(path, 'w') as dst:
    for key in src:
      src.copy(key, dst)
    names = [n for n in src.attrs['layer_names']]
    dst.attrs['layer_names'] = names
  with h5py.File(path, 'a') as f:
    text = lambda v: v.decode() if isinstance(v, bytes) else str(v)
    conv = [text(n) for n in f.attrs['layer_names'] if text(n).startswith('conv2d')][5]
    weight = text(f[conv].attrs['weight_names'][0])
    kernel = np.asarray(f[conv][weight])
    del f[conv][weight]
    f[conv][weight] = kernel[:, :, :, :-1]
  with pytest.raises(inception_v3.WeightsError, match=f"layer '{conv}' kernel has shape"):
    inception_v3.load_keras_weights(path)
  with h5py.File(path, 'a') as f:
    f.attrs['layer_names'] = [n for n in f.attrs['layer_names'] if text(n) != conv]
  with pytest.raises(inception_v3.WeightsError, match='93 Conv2D layers'):
    inception_v3.load_keras_weights(path)


def test_converted_directory_round_trip(weight_files, tmp_path):
  variables = inception_v3.load_keras_weights(weight_files['keras3'])
  directory = str(tmp_path / 'converted')
  inception_v3.save_pretrained(
      variables, directory, source=weight_files['keras3'], include_top=False)
  manifest = inception_v3.read_manifest(directory)
  assert manifest['source'] == 'inception_notop.weights.h5' and manifest['include_top'] is False
  assert len(manifest['sha256']) == 64 and manifest['layer_count'] == 188
  loaded = inception_v3.load_pretrained(directory)
  jax.tree.map(np.testing.assert_array_equal, variables, jax.device_get(loaded))
  with pytest.raises(inception_v3.WeightsError, match='include_top=False, but include_top=True'):
    inception_v3.load_pretrained(directory, include_top=True)
  with pytest.raises(inception_v3.WeightsError, match='manifest.json missing'):
    inception_v3.load_pretrained(str(tmp_path / 'nowhere'))


def test_keras_layer_order_is_keras_model_layers_order(keras_model):
  """Keras numbers default layer names in creation order, our conv2d_bn block order."""
  convs = [x for x in keras_model.layers if isinstance(x, keras.layers.Conv2D)]
  norms = [x for x in keras_model.layers if isinstance(x, keras.layers.BatchNormalization)]
  def created(layers):
    numbers = [inception_v3._name_number(layer.name) for layer in layers]
    return [n - min(numbers) for n in numbers]
  assert inception_v3.keras_layer_order() == (created(convs), created(norms))


def test_convert_weights_script(weight_files, tmp_path):
  root = pathlib.Path(__file__).resolve().parents[1]
  script = [sys.executable, str(root / 'scripts' / 'convert_weights.py')]
  output = tmp_path / 'converted'
  result = subprocess.run(script + ['--keras', weight_files['legacy'], '--output', str(output)],
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert json.loads((output / 'manifest.json').read_text())['source'] == os.path.basename(
      weight_files['legacy'])
  expected = inception_v3.load_keras_weights(weight_files['legacy'])
  jax.tree.map(np.testing.assert_array_equal, expected,
               jax.device_get(inception_v3.load_pretrained(str(output))))
  result = subprocess.run(script + ['--keras', weight_files['legacy_top'], '--output', str(output)],
                          capture_output=True, text=True, timeout=120)
  assert result.returncode != 0 and 'has a top Dense layer' in result.stderr


def test_captioner_uses_converted_weights(config, weight_files, tmp_path):
  from jaxcap import state as state_lib
  from jaxcap.models import captioner
  directory = str(tmp_path / 'converted')
  variables = inception_v3.load_keras_weights(weight_files['keras3'])
  inception_v3.save_pretrained(
      variables, directory, source=weight_files['keras3'], include_top=False)
  config.model.encoder, config.model.encoder_weights = 'inception_v3', directory
  config.data.image_size = 75
  weights = captioner.load_encoder_weights(config.model)
  model = captioner.create_model(config.model, vocab_size=20)
  mesh = parallel.make_mesh()
  state = state_lib.initial_state(config, model, mesh, weights)
  jax.tree.map(np.testing.assert_array_equal, variables['params'],
               jax.device_get(state.params['encoder']))
  jax.tree.map(np.testing.assert_array_equal, variables['batch_stats'],
               jax.device_get(state.batch_stats['encoder']))
  # The decoder is the seed's, whatever the encoder's weights (one program builds both).
  halved = state_lib.initial_state(config, model, mesh, jax.tree.map(lambda x: x / 2, weights))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params['decoder']),
               jax.device_get(halved.params['decoder']))


def test_training_stops_early_on_missing_or_wrong_weights(config, weight_files, tmp_path):
  from jaxcap import train
  config.model.encoder = 'inception_v3'
  config.model.encoder_weights = str(tmp_path / 'missing')
  workdir = tmp_path / 'workdir'
  with pytest.raises(inception_v3.WeightsError, match='missing: no converted InceptionV3 weights'):
    train.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()  # Stopped before any training work.
  top = str(tmp_path / 'top')
  inception_v3.save_pretrained(inception_v3.load_keras_weights(weight_files['legacy_top'], True),
                               top, source=weight_files['legacy_top'], include_top=True)
  config.model.encoder_weights = top
  with pytest.raises(inception_v3.WeightsError, match='include_top=True, but include_top=False'):
    train.train_and_evaluate(config, str(workdir))
  config.model.encoder = 'small_cnn'
  with pytest.raises(ValueError, match="encoder='small_cnn'"):
    train.train_and_evaluate(config, str(workdir))
