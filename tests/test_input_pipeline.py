"""tf.data pipeline on the tiny built-in dataset: shapes, dtypes, scaling, padding, masks."""

import json

import numpy as np
import pytest
import tensorflow as tf

from jaxcap import workdir as workdir_lib
from jaxcap.data import captions as captions_lib
from jaxcap.data import input_pipeline
from jaxcap.data import preprocess as preprocess_lib
from jaxcap.data import sources
from jaxcap.data import tokenizer as tokenizer_lib


@pytest.fixture
def prepared(config):
  builder = sources.get_builder(config.data)
  captions = captions_lib.read_captions(builder, 'train')
  tokenizer = tokenizer_lib.train(captions.all_texts(), config.data.vocab_size)
  return builder, captions, tokenizer


def test_read_captions(config, prepared):
  _, captions, _ = prepared
  assert len(captions.image_ids) == config.data.shapes.train_size
  assert len(set(captions.image_ids.tolist())) == len(captions.image_ids)
  assert all(len(texts) == 5 for texts in captions.texts)


def test_token_table_pads_missing_captions(prepared):
  _, captions, tokenizer = prepared
  uneven = captions_lib.SplitCaptions(captions.image_ids[:2],
                                        (captions.texts[0][:2], captions.texts[1]))
  table = captions_lib.TokenTable.build(uneven, tokenizer, max_len=24)
  assert table.tokens.shape == (2, 5, 24)
  assert table.counts.tolist() == [2, 5]
  assert (table.tokens[0, 2:] == tokenizer_lib.PAD_ID).all()
  assert tokenizer.decode(table.tokens[0, :2]) == list(captions.texts[0][:2])


def test_train_batches(config, prepared):
  builder, captions, tokenizer = prepared
  table = captions_lib.TokenTable.build(captions, tokenizer, config.data.max_len)
  ds = input_pipeline.train_dataset(builder, 'train', table, config.data, batch_size=8, seed=0)
  batches = list(ds.take(20).as_numpy_iterator())  # 160 rows: more than two epochs of 64.
  batch = batches[0]
  assert set(batch) == {'image', 'tokens'}
  # uint8 pixels (scaled on the device), not all alike.
  assert batch['image'].shape == (8, 32, 32, 3) and batch['image'].dtype == np.uint8
  assert batch['tokens'].shape == (8, 24) and batch['tokens'].dtype == np.int32
  assert batch['image'].std() > 10
  tokens = np.concatenate([b['tokens'] for b in batches])
  assert (tokens[:, 0] == tokenizer_lib.BOS_ID).all()
  lengths = (tokens != tokenizer_lib.PAD_ID).sum(1)
  assert (tokens[np.arange(len(tokens)), lengths - 1] == tokenizer_lib.EOS_ID).all()
  assert all((row[n:] == tokenizer_lib.PAD_ID).all() for row, n in zip(tokens, lengths))
  # Every token row is one of the image's reference captions.
  texts = set(captions.all_texts())
  assert set(tokenizer.decode(tokens)) <= texts
  # Captions are re-picked each epoch: over 2.5 epochs more distinct captions than images.
  assert len(set(tokenizer.decode(tokens))) > config.data.shapes.train_size
  again = list(input_pipeline.train_dataset(builder, 'train', table, config.data, batch_size=8,
                                            seed=0).take(20).as_numpy_iterator())
  np.testing.assert_array_equal(tokens, np.concatenate([b['tokens'] for b in again]))


def test_image_scaling_matches_keras_preprocess_input():
  from keras.applications import inception_v3
  pixels = np.arange(256 * 3, dtype=np.uint8).reshape(16, 16, 3)
  scaled = preprocess_lib.scale_image(pixels).numpy()
  expected = inception_v3.preprocess_input(pixels.astype(np.float32))
  np.testing.assert_array_equal(scaled, expected)
  assert scaled.dtype == np.float32 and scaled.min() == -1.0 and scaled.max() == 1.0


def test_resize_to_configured_size():
  image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
  assert preprocess_lib.resize_image(image, 32).shape == (32, 32, 3)
  np.testing.assert_array_equal(preprocess_lib.resize_image(image[:32, :32], 32), image[:32, :32])


def test_eval_batches_are_padded_with_mask(config, prepared):
  builder, _, tokenizer = prepared
  captions = captions_lib.read_captions(builder, 'val')
  table = captions_lib.TokenTable.build(captions, tokenizer, config.data.max_len)
  ds = input_pipeline.eval_dataset(builder, 'val', table, config.data, batch_size=8)
  batches = list(input_pipeline.eval_batches(ds, 8))
  assert len(batches) == 2  # 12 images.
  assert all(
      b['image'].shape == (8, 32, 32, 3) and b['tokens'].shape == (8, 5, 24) for b in batches)
  assert np.concatenate([b['mask'] for b in batches]).tolist() == [1] * 12 + [0] * 4
  ids = np.concatenate([b['image/id'] for b in batches])[:12]
  np.testing.assert_array_equal(ids, captions.image_ids)
  assert tokenizer.decode(batches[0]['tokens'][0]) == list(captions.texts[0])


def test_process_shards_are_disjoint_and_cover_the_split(config, prepared):
  builder, _, tokenizer = prepared
  captions = captions_lib.read_captions(builder, 'val')
  table = captions_lib.TokenTable.build(captions, tokenizer, config.data.max_len)
  ids = []
  for process in range(2):
    ds = input_pipeline.eval_dataset(builder, 'val', table, config.data, batch_size=4,
                                     process_index=process, process_count=2)
    ids.append([
        i for b in input_pipeline.eval_batches(ds, 4) for i, m in zip(b['image/id'], b['mask']) if m
    ])
  assert not set(ids[0]) & set(ids[1])
  assert sorted(ids[0] + ids[1]) == sorted(captions.image_ids.tolist())


def test_preprocessed_images_of_any_size_have_a_static_shape():
  # Decoded JPEGs have an unknown size: the padding batches of an empty process share are shaped
  # from the element spec, so preprocessing must state (image_size, image_size, 3).
  images = tf.data.Dataset.from_generator(
      lambda: iter([np.zeros((40, 50, 3), np.uint8), np.zeros((32, 32, 3), np.uint8)]),
      output_signature=tf.TensorSpec((None, None, 3), tf.uint8))
  ds = images.map(lambda image: {'image': image}).map(preprocess_lib.preprocess_image(32))
  assert ds.element_spec['image'].shape == (32, 32, 3)
  assert [b['image'].shape for b in ds.as_numpy_iterator()] == [(32, 32, 3)] * 2


def test_every_process_runs_the_same_batches_even_with_an_empty_share(config, prepared):
  # 12 images over 16 processes: 4 processes get none, and must still run the padding batch
  # the others run, or the collective calls of evaluation and feature extraction hang.
  builder, _, tokenizer = prepared
  captions = captions_lib.read_captions(builder, 'val')
  table = captions_lib.TokenTable.build(captions, tokenizer, config.data.max_len)
  num_batches = input_pipeline.batches_per_process(builder, 'val', 4, 16)
  real = 0
  for process in range(16):
    ds = input_pipeline.eval_dataset(builder, 'val', table, config.data, batch_size=4,
                                     process_index=process, process_count=16)
    batches = list(input_pipeline.eval_batches(ds, 4, num_batches))
    assert len(batches) == num_batches == 1, process
    assert batches[0]['image'].shape == (4, 32, 32, 3) and batches[0]['tokens'].shape == (4, 5, 24)
    assert batches[0]['mask'].dtype == np.int32
    real += int(batches[0]['mask'].sum())
  assert real == 12


def test_a_workdir_config_from_before_the_file_fields_still_builds(config, tmp_path):
  """config.json of a run trained before data.karpathy_json and data.image_dir existed."""
  values = json.loads(config.to_json_best_effort())
  del values['data']['karpathy_json'], values['data']['image_dir']
  (tmp_path / 'config.json').write_text(json.dumps(values))
  config = workdir_lib.load_config(str(tmp_path))
  builder = sources.get_builder(config.data)
  assert builder.name == 'shapes_captions' and builder.info.splits['test'].num_examples == 12


@pytest.mark.parametrize('size', [(480, 640), (500, 375), (299, 299)])
def test_training_pixels_are_evaluations_within_rounding(size):
  """The training stream decodes a JPEG's square alone and ships uint8: scaled as the model
  scales it, each pixel is the evaluation path's (whole decode, crop, resize, scale) within
  half a level; a random window decodes exactly the whole decoding's pixels; PNGs alike."""
  import io

  from PIL import Image

  from jaxcap.data import coco_like
  rng = np.random.default_rng(size[0])
  jpeg = coco_like._jpeg(rng, size[1], size[0], 90)
  png = io.BytesIO()
  Image.open(io.BytesIO(jpeg)).save(png, format='PNG')
  for encoded in (jpeg, png.getvalue()):
    evaluation = preprocess_lib.decode_and_preprocess(encoded, 299).numpy()
    square = preprocess_lib.training_square()(tf.constant(0, tf.int64),
                                              {'image': tf.constant(encoded)})
    _, features = preprocess_lib.training_resize(299)(*square)
    shipped = features['image'].numpy()
    assert shipped.dtype == np.uint8 and shipped.shape == (299, 299, 3)
    scaled = np.asarray(captioner_scale(shipped))
    np.testing.assert_allclose(scaled, evaluation, atol=0.5 / 127.5 + 1e-6, rtol=0)
    assert np.abs(scaled - evaluation).mean() < 0.3 / 127.5
    whole = tf.io.decode_image(encoded, channels=3).numpy()
    for seed in range(4):
      window = preprocess_lib.random_square(tf.shape(whole), tf.constant([seed, 7], tf.int64),
                                            0.3).numpy()
      top, left, side, _ = window
      np.testing.assert_array_equal(
          preprocess_lib.decode_window(tf.constant(encoded), lambda _, w=window: w).numpy(),
          whole[top:top + side, left:left + side])


def captioner_scale(pixels):
  """What the model does to the stream's uint8 images (`Captioner.encode`)."""
  import jax.numpy as jnp

  from jaxcap.models import captioner
  from tests.conftest import tiny_config
  config = tiny_config('unused')
  config.model.encoder = 'zeros'
  seen = []

  class Spy(captioner.Captioner):
    pass
  model = captioner.create_model(config.model, 16)

  def encoder(images, train=False):
    seen.append(images)
    return jnp.zeros((images.shape[0], 4))
  Spy(encoder=encoder, decoder=model.decoder).apply({}, jnp.asarray(pixels)[None], method='encode')
  return seen[0][0]
